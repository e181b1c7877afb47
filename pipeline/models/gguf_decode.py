"""Decode GGUF tensors exactly: to float32 with ``gguf.quants``, or into MLX's affine format.

Every supported type decodes to float32 through ``gguf.quants.dequantize`` (the reference).
Types whose 32-weight sub-blocks are affine, ``w = scale * q + bias`` with unsigned ``q``
of 4, 5 or 8 bits, are also re-packed into MLX's quantized layout (``mx.dequantize`` with
``group_size=32``) with float32 scales and biases; that reproduces ``gguf.quants`` bit for
bit (every product below is exact in float32, one rounding in the sum as in gguf.quants).
Q2_K, Q3_K and Q6_K use 16-weight sub-blocks, which MLX's quantized matmul does not take.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import Q4_K, dequantize

T = GGMLQuantizationType

# Every type decoded here (each one covered by tests with synthetic files).
SUPPORTED_TYPES = (
    T.F32,
    T.F16,
    T.BF16,
    T.Q4_0,
    T.Q4_1,
    T.Q5_0,
    T.Q5_1,
    T.Q8_0,
    T.Q2_K,
    T.Q3_K,
    T.Q4_K,
    T.Q5_K,
    T.Q6_K,
)
# Types MLX's affine format (group size 32) represents exactly -> bits per weight.
AFFINE_BITS = {T.Q4_0: 4, T.Q4_1: 4, T.Q5_0: 5, T.Q5_1: 5, T.Q8_0: 8, T.Q4_K: 4, T.Q5_K: 5}
GROUP_SIZE = 32


def decode_float32(raw: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """``[rows, bytes]`` (or stored floats ``[rows, cols]``) -> float32 ``[rows, cols]``."""
    if qtype == T.F32:
        return np.asarray(raw, dtype=np.float32)
    if qtype == T.F16 and raw.dtype == np.float16:
        return raw.astype(np.float32)
    return np.asarray(dequantize(np.ascontiguousarray(raw), qtype), dtype=np.float32)


@dataclass
class AffineWeight:
    """MLX affine-quantized weight: ``packed`` uint32 ``[rows, cols*bits/32]``, ``scales``
    and ``biases`` float32 ``[rows, cols/32]``."""

    packed: np.ndarray
    scales: np.ndarray
    biases: np.ndarray
    bits: int


def _f16(column: np.ndarray) -> np.ndarray:
    """Two-byte columns ``[n, 2]`` -> float32 ``[n, 1]`` (the stored float16 values)."""
    return np.ascontiguousarray(column).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, width: int) -> np.ndarray:
    """Bytes ``[n, k*width/2]`` -> 4-bit values ``[n, k*width]``: low nibbles of a ``width/2``
    run of bytes are weights ``0..width/2-1``, high nibbles the next ``width/2``."""
    n = qs.shape[0]
    grouped = qs.reshape(n, -1, 1, width // 2) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (grouped & 0x0F).reshape(n, -1)


def _high_bits_legacy(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1 ``qh`` (uint32 per block) -> bit ``j`` for weight ``j``, ``[n, 32]``."""
    bits = np.ascontiguousarray(qh).view(np.uint32) >> np.arange(32, dtype=np.uint32)
    return (bits & 1).astype(np.uint8)


def _blocks_affine(blocks: np.ndarray, qtype: GGMLQuantizationType):
    """Blocks ``[n, type_size]`` -> (q uint8 ``[n, block]``, scale, bias ``[n, block/32]``)."""
    n = blocks.shape[0]
    if qtype == T.Q8_0:
        d = _f16(blocks[:, :2])
        q = (blocks[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return q, d, -128 * d
    if qtype in (T.Q4_0, T.Q4_1):
        d = _f16(blocks[:, :2])
        offset = 2 if qtype == T.Q4_0 else 4
        q = _nibbles(blocks[:, offset:], 32)
        bias = -8 * d if qtype == T.Q4_0 else _f16(blocks[:, 2:4])
        return q, d, bias
    if qtype in (T.Q5_0, T.Q5_1):
        d = _f16(blocks[:, :2])
        start = 2 if qtype == T.Q5_0 else 4
        high = _high_bits_legacy(blocks[:, start : start + 4])
        q = _nibbles(blocks[:, start + 4 :], 32) | (high << 4)
        bias = -16 * d if qtype == T.Q5_0 else _f16(blocks[:, 2:4])
        return q, d, bias
    if qtype in (T.Q4_K, T.Q5_K):
        d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
        sc, m = Q4_K.get_scale_min(np.ascontiguousarray(blocks[:, 4:16]))
        scale = d * sc.astype(np.float32)  # exact: float16 x 6-bit integer
        bias = -(dmin * m.astype(np.float32))
        if qtype == T.Q4_K:
            return _nibbles(blocks[:, 16:], 64), scale, bias
        qh = blocks[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
        q = _nibbles(blocks[:, 48:], 64) | ((qh & 1).reshape(n, 256) << 4)
        return q, scale, bias
    raise ValueError(f"{qtype.name} has no exact MLX affine form")


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned values ``[rows, cols]`` -> MLX's packing, a little-endian bit stream per row
    as uint32 ``[rows, cols*bits/32]``."""
    rows, cols = q.shape
    q = q.astype(np.uint8)
    if bits == 8:
        packed = q
    elif bits == 4:
        packed = q[:, 0::2] | (q[:, 1::2] << 4)
    elif bits == 5:
        wide = q.reshape(rows, cols // 8, 8).astype(np.uint64)
        word = (wide << (5 * np.arange(8, dtype=np.uint64))).sum(axis=-1, dtype=np.uint64)
        packed = word.reshape(rows, cols // 8, 1).view(np.uint8)[..., :5]
    else:
        raise ValueError(f"no packing for {bits} bits")
    return np.ascontiguousarray(packed).reshape(rows, -1).view(np.uint32)


def decode_affine(raw: np.ndarray, qtype: GGMLQuantizationType) -> AffineWeight:
    """``[rows, bytes]`` of an ``AFFINE_BITS`` type -> MLX affine parts (exact)."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    rows = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(-1, type_size)
    q, scale, bias = _blocks_affine(blocks, qtype)
    bits = AFFINE_BITS[qtype]
    return AffineWeight(
        packed=pack_bits(q.reshape(rows, -1), bits),
        scales=np.ascontiguousarray(scale.reshape(rows, -1), dtype=np.float32),
        biases=np.ascontiguousarray(bias.reshape(rows, -1), dtype=np.float32),
        bits=bits,
    )
