"""Load a GGUF checkpoint (llama.cpp format) exactly, as an mlx-lm model + tokenizer.

The file is opened with the ``gguf`` package and checked (architecture, tokenizer model,
every tensor's type) before any weight is decoded. Weights are decoded with
``gguf.quants`` to float32, or, with ``keep_quantized``, re-packed bit-exactly into MLX's
affine format where the type allows it (``mlx_interp.models.gguf_decode``). MLX's own GGUF reader is
not used for weights: it decodes Q4_K wrongly and cannot read Q5_0, Q5_1, Q3_K, Q5_K.
"""

from __future__ import annotations

import logging
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlx_interp.models.gguf_arch import (
    ARCHITECTURES,
    ArchSpec,
    apply_rope_freqs,
    build_model,
    gguf_name,
    mlx_name,
)
from mlx_interp.models.gguf_decode import AFFINE_BITS, GROUP_SIZE, decode_affine, decode_float32
from mlx_interp.models.gguf_embedded import EMBEDDED, embedded_gguf_path
from mlx_interp.models.gguf_read import GGUFError, GGUFFile, check_gguf, read_gguf
from mlx_interp.models.gguf_tokenizer import tokenizer_from_gguf

logger = logging.getLogger(__name__)

__all__ = ["EMBEDDED", "GGUFError", "embedded_gguf_path", "load_gguf", "decode_weights"]


def decode_weights(
    gguf: GGUFFile, spec: ArchSpec, model: nn.Module, keep_quantized: bool
) -> tuple[dict[str, mx.array], dict[str, int]]:
    """GGUF tensors -> mlx-lm parameters by mlx name; returns (weights, module path -> bits of
    the modules kept affine-quantized). Norm offsets are applied here."""
    weights: dict[str, mx.array] = {}
    kept: dict[str, int] = {}
    modules = dict(model.named_modules())
    for name, tensor in gguf.tensors.items():
        if name in spec.ignored:
            continue
        target = mlx_name(name, spec)
        module_path = target.rpartition(".")[0]
        affine = (
            keep_quantized
            and tensor.qtype in AFFINE_BITS
            and name.endswith(".weight")
            and hasattr(modules.get(module_path), "to_quantized")
            and tensor.shape[-1] % GROUP_SIZE == 0
        )
        if affine:
            parts = decode_affine(tensor.raw, tensor.qtype)
            weights[target] = mx.array(parts.packed)
            weights[f"{module_path}.scales"] = mx.array(parts.scales)
            weights[f"{module_path}.biases"] = mx.array(parts.biases)
            kept[module_path] = parts.bits
            continue
        values = decode_float32(tensor.raw, tensor.qtype).reshape(tensor.shape)
        if spec.norm_offset and name.endswith("norm.weight"):
            values = values - np.float32(spec.norm_offset)
        weights[target] = mx.array(values)
    return weights, kept


def load_gguf(path: str | Path, keep_quantized: bool = False) -> tuple[nn.Module, TokenizerWrapper]:
    """Load a GGUF file as (mlx-lm model in eval mode, tokenizer wrapper).

    Every weight is float32, except with ``keep_quantized`` where the tensor's type has an exact
    MLX affine form (``QuantizedLinear``/``QuantizedEmbedding``, group size 32, float32
    scales). Raises ``GGUFError`` naming the problem before decoding any weight.
    """
    gguf = read_gguf(path)
    check_gguf(gguf, sorted(ARCHITECTURES))
    spec = ARCHITECTURES[gguf.architecture]
    tokenizer = tokenizer_from_gguf(gguf.metadata, gguf.architecture)
    model = build_model(gguf, spec)
    _check_complete(model, gguf, spec)
    weights, kept = decode_weights(gguf, spec, model, keep_quantized)
    weights = model.sanitize(weights) if hasattr(model, "sanitize") else weights
    if kept:
        nn.quantize(
            model,
            class_predicate=lambda p, m: (
                {"group_size": GROUP_SIZE, "bits": kept[p]} if p in kept else False
            ),
        )
    _load_strict(model, weights, gguf, spec)
    if "rope_freqs.weight" in gguf.tensors and "rope_freqs.weight" in spec.ignored:
        freqs = gguf.tensors["rope_freqs.weight"]
        factors = decode_float32(freqs.raw, freqs.qtype).reshape(-1)
        dims = model.args.head_dim or model.args.hidden_size // model.args.num_attention_heads
        apply_rope_freqs(model, factors, float(model.args.rope_theta), int(dims))
    mx.eval(model.parameters())
    model.eval()
    return model, tokenizer


def _check_complete(model: nn.Module, gguf: GGUFFile, spec: ArchSpec) -> None:
    """Every GGUF tensor has a place in the model and every parameter of the model (the head
    aside: it may be tied) has a GGUF tensor."""
    unmapped = [n for n in gguf.tensors if n not in spec.ignored and mlx_name(n, spec) is None]
    if unmapped:
        raise GGUFError(
            f"{gguf.path}: GGUF tensor(s) {', '.join(unmapped[:5])} have no counterpart in "
            f"mlx-lm's {spec.module} model; the file holds parts this loader does not support"
        )
    present = {mlx_name(name, spec) for name in gguf.tensors}
    expected = {name for name, _ in tree_flatten(model.parameters())} - {"lm_head.weight"}
    missing = sorted(gguf_name(n, spec) for n in expected - present)
    if missing:
        raise GGUFError(
            f"{gguf.path}: GGUF file lacks required tensor(s) for the {gguf.architecture} "
            f"model: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )


def _load_strict(
    model: nn.Module, weights: dict[str, mx.array], gguf: GGUFFile, spec: ArchSpec
) -> None:
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as err:
        raise GGUFError(
            f"{gguf.path}: GGUF tensors do not fit the {gguf.architecture} model: {err}"
        ) from err
