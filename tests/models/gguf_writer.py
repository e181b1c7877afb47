"""Write tiny mlx-lm models as GGUF files the way llama.cpp's converter does (for tests).

Written independently of ``mlx_interp.models.gguf_arch``: its own name table and llama.cpp's
transformations (llama Q/K row permutation, gemma norms stored as ``1 + w``, no head when
tied). ``write_gguf`` encodes every matrix in one tensor type and then sets the source
model's weights to the decoded values (``gguf.quants.dequantize``), so the file and the
source model hold the same weights and logits must agree to float32 rounding.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize
from mlx.utils import tree_flatten

T = GGMLQuantizationType
GGUF_ARCH = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
}
# Dims divisible by 256 so every K-quant fits; 3 layers (gemma3: 6, one global layer).
GGUF_DIMS = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "vocab_size": 256,
}
ARCH_DIMS = {
    "llama": {"num_key_value_heads": 4},
    "mistral": {"num_key_value_heads": 2},
    "qwen2": {"num_key_value_heads": 2},
    "qwen3": {"num_key_value_heads": 2, "head_dim": 64},
    "gemma2": {"num_key_value_heads": 2, "head_dim": 64, "query_pre_attn_scalar": 64.0},
    "gemma3_text": {
        "num_key_value_heads": 2,
        "head_dim": 64,
        "query_pre_attn_scalar": 64.0,
        "num_hidden_layers": 6,
        "sliding_window_pattern": 6,
        "sliding_window": 4,
    },
    "phi3": {"num_key_value_heads": 4},
}
# mlx-lm module path (inside model.layers.{i}) -> llama.cpp tensor stem.
LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.qkv_proj": "attn_qkv",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.gate_up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
}
POST_ATTENTION = {"gemma2": "post_attention_norm", "gemma3_text": "post_attention_norm"}
GEMMA_NORMS = {
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
# Offsets of the float16 scale fields (d, dmin) inside one block of each K type.
K_SCALE_FIELDS = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}


def gguf_tensor_name(mlx_name: str, arch: str) -> str:
    stem, _, suffix = mlx_name.rpartition(".")
    if stem in TOP_NAMES:
        return f"{TOP_NAMES[stem]}.{suffix}"
    _, _, index, path = stem.split(".", 3)
    if path == "post_attention_layernorm":
        name = POST_ATTENTION.get(arch, "ffn_norm")
    else:
        name = LAYER_NAMES.get(path) or GEMMA_NORMS[path]
    return f"blk.{index}.{name}.{suffix}"


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter: half-split (NEOX) rows -> interleaved pairs per head."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def llama_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def random_blocks(rows: int, cols: int, qtype: GGMLQuantizationType, std: float, seed: int):
    """Valid blocks of a type ``gguf.quants`` cannot encode: random bits, float16 scale fields
    chosen so the decoded weights have about ``std``. Returns ``[rows, bytes]`` uint8."""
    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    for offset in K_SCALE_FIELDS[qtype]:
        raw[:, offset : offset + 2] = np.array([1.0], np.float16).view(np.uint8)
    scale = std / float(dequantize(raw, qtype).std())
    for offset in K_SCALE_FIELDS[qtype]:
        values = rng.uniform(0.5, 1.5, size=(raw.shape[0], 1)) * scale
        raw[:, offset : offset + 2] = values.astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """A plain Q4_K encoder (min/max per 32 weights, 6-bit sub-scales): ``[rows, cols]`` float
    -> ``[rows, cols/256*144]`` uint8 in llama.cpp's block layout."""
    rows, cols = w.shape
    sub = w.reshape(-1, 8, 32).astype(np.float32)
    low = np.minimum(sub.min(-1), 0)
    scale = (sub.max(-1) - low) / 15
    d = np.maximum(scale.max(-1, keepdims=True) / 63, 1e-10).astype(np.float16)
    dmin = np.maximum((-low).max(-1, keepdims=True) / 63, 1e-10).astype(np.float16)
    sc = np.clip(np.round(scale / d.astype(np.float32)), 1, 63).astype(np.uint8)
    m = np.clip(np.round(-low / dmin.astype(np.float32)), 0, 63).astype(np.uint8)
    step = (d.astype(np.float32) * sc)[..., None]
    offset = (dmin.astype(np.float32) * m)[..., None]
    q = np.clip(np.round((sub + offset) / step), 0, 15).astype(np.uint8)
    packed_scales = np.zeros((sub.shape[0], 12), np.uint8)
    packed_scales[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    packed_scales[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    packed_scales[:, 8:12] = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    q = q.reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    blocks = np.concatenate([d.view(np.uint8), dmin.view(np.uint8), packed_scales, qs], axis=1)
    return blocks.reshape(rows, -1)


def encode(w: np.ndarray, qtype: GGMLQuantizationType, seed: int) -> np.ndarray:
    """Float ``[rows, cols]`` -> the stored array of ``qtype`` (gguf.quants where it can)."""
    if qtype == T.F32:
        return w.astype(np.float32)
    if qtype == T.F16:
        return w.astype(np.float16)
    if qtype == T.Q4_K:
        return quantize_q4_k(w)
    if qtype in K_SCALE_FIELDS:
        return random_blocks(*w.shape, qtype, float(w.std()), seed)
    return quantize(w.astype(np.float32), qtype)


def decoded(stored: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    if qtype in (T.F32, T.F16):
        return stored.astype(np.float32)
    return dequantize(stored, qtype)


def byte_tokens() -> list[str]:
    """The 256 single-byte tokens of a byte-level BPE vocabulary (GPT-2 spelling)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    spelled = {b: chr(b) for b in printable}
    spelled.update(
        {b: chr(256 + n) for n, b in enumerate(sorted(set(range(256)) - set(printable)))}
    )
    return [spelled[b] for b in range(256)]


def _metadata(writer: GGUFWriter, args, arch: str, name: str) -> None:
    key = GGUF_ARCH[arch]
    heads = args.num_attention_heads
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // heads
    writer.add_uint32(f"{key}.embedding_length", args.hidden_size)
    writer.add_uint32(f"{key}.block_count", args.num_hidden_layers)
    writer.add_uint32(f"{key}.feed_forward_length", args.intermediate_size)
    writer.add_uint32(f"{key}.attention.head_count", heads)
    writer.add_uint32(f"{key}.attention.head_count_kv", args.num_key_value_heads)
    writer.add_uint32(f"{key}.attention.key_length", head_dim)
    writer.add_uint32(f"{key}.attention.value_length", head_dim)
    writer.add_uint32(f"{key}.rope.dimension_count", head_dim)
    writer.add_uint32(f"{key}.context_length", 512)
    writer.add_float32(f"{key}.attention.layer_norm_rms_epsilon", args.rms_norm_eps)
    writer.add_float32(f"{key}.rope.freq_base", float(args.rope_theta))
    if arch == "gemma3_text":
        writer.add_uint32(f"{key}.attention.sliding_window", args.sliding_window)
    if arch == "gemma2":
        writer.add_float32(f"{key}.attn_logit_softcapping", args.attn_logit_softcapping)
        writer.add_float32(f"{key}.final_logit_softcapping", args.final_logit_softcapping)
    writer.add_name(name)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(byte_tokens()[: args.vocab_size])
    writer.add_token_types([1] * args.vocab_size)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)


def write_gguf(
    model: nn.Module,
    arch: str,
    path: Path,
    qtype: GGMLQuantizationType,
    seed: int = 0,
    extra: dict[str, tuple[np.ndarray, GGMLQuantizationType]] | None = None,
) -> dict[str, GGMLQuantizationType]:
    """Write ``model`` as a llama.cpp-style GGUF (matrices in ``qtype``, vectors in F32) and
    set its weights to the decoded file values. Returns {GGUF tensor name: type}."""
    args = model.args
    writer = GGUFWriter(str(path), GGUF_ARCH[arch])
    _metadata(writer, args, arch, f"tiny-{arch}")
    is_gemma = arch.startswith("gemma")
    permute = GGUF_ARCH[arch] == "llama"
    new_params, types = [], {}
    for index, (name, value) in enumerate(tree_flatten(model.parameters())):
        w = np.array(value.astype(mx.float32))
        target = gguf_tensor_name(name, arch)
        if is_gemma and name.endswith("norm.weight"):  # random norms so the +1 shows
            w = np.random.default_rng(seed + index).normal(0, 0.3, w.shape).astype(np.float32)
            writer.add_tensor(target, w + np.float32(1.0))
            new_params.append((name, mx.array(w)))
            types[target] = T.F32
            continue
        if w.ndim == 1:
            writer.add_tensor(target, w)
            types[target] = T.F32
            continue
        heads = {"attn_q": args.num_attention_heads, "attn_k": args.num_key_value_heads}
        n_head = heads.get(target.split(".")[2]) if target.startswith("blk.") else None
        if permute and n_head:
            w = llama_permute(w, n_head)
        stored = encode(w, qtype, seed + index)
        writer.add_tensor(target, stored, raw_dtype=qtype if stored.dtype == np.uint8 else None)
        types[target] = qtype
        back = decoded(stored, qtype).reshape(w.shape)
        new_params.append(
            (name, mx.array(llama_unpermute(back, n_head) if permute and n_head else back))
        )
    for target, (array, kind) in (extra or {}).items():
        writer.add_tensor(target, array, raw_dtype=kind if array.dtype == np.uint8 else None)
        types[target] = kind
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model.load_weights(new_params, strict=False)
    mx.eval(model.parameters())
    return types


def reencode_gguf(source: Path, target: Path, stems: tuple[str, ...]) -> list[str]:
    """Copy a GGUF, re-encoding the tensors whose name contains one of ``stems`` as Q4_K
    (from their gguf.quants float32 decode). Returns the re-encoded tensor names."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(source))
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(str(target), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), kind, sub)
    changed = []
    for tensor in reader.tensors:
        kind = GGMLQuantizationType(int(tensor.tensor_type))
        data = np.asarray(tensor.data)
        if any(stem in tensor.name for stem in stems):
            data, kind = quantize_q4_k(decoded(data, kind).reshape(data.shape[0], -1)), T.Q4_K
            changed.append(tensor.name)
        writer.add_tensor(tensor.name, data, raw_dtype=kind if data.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return changed
