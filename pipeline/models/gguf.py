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
from typing import cast

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlx_interp.engine.integrity import file_sha256
from mlx_interp.models import gguf_cache
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
from mlx_interp.models.gguf_tokenizer import TokenizerParts, tokenizer_parts, wrap_tokenizer

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
        assert target is not None  # _check_complete refused the tensors it cannot place
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


def load_gguf(
    path: str | Path, keep_quantized: bool = False, cache: bool = True
) -> tuple[nn.Module, TokenizerWrapper]:
    """Load a GGUF file as (mlx-lm model in eval mode, tokenizer wrapper).

    Every weight is float32, except with ``keep_quantized`` where the tensor's type has an exact
    MLX affine form (``QuantizedLinear``/``QuantizedEmbedding``, group size 32, float32
    scales). Raises ``GGUFError`` naming the problem before decoding any weight. With
    ``cache`` (and ``MLX_INTERP_MODEL_CACHE`` not ``off``) a second load of the same file
    reads the prepared model of :mod:`mlx_interp.models.gguf_cache`.
    """
    path = Path(path)
    root = gguf_cache.cache_root() if cache else None
    key = None
    if root is not None and path.is_file():
        key = gguf_cache.entry_key(gguf_sha256(path), keep_quantized)
        loaded = gguf_cache.read_entry(root, key, _from_entry)
        if loaded is not None:
            return loaded
    gguf = read_gguf(path)
    check_gguf(gguf, sorted(ARCHITECTURES))
    assert gguf.architecture is not None  # check_gguf refused a file without one
    spec = ARCHITECTURES[gguf.architecture]
    parts = tokenizer_parts(gguf.metadata, gguf.architecture)
    args = spec.build_args(gguf)
    model = build_model(gguf, spec)
    _check_complete(model, gguf, spec)
    weights, kept = decode_weights(gguf, spec, model, keep_quantized)
    weights = model.sanitize(weights) if hasattr(model, "sanitize") else weights
    _quantize(model, kept)
    _load_strict(model, weights, gguf, spec)
    rope = None
    if "rope_freqs.weight" in gguf.tensors and "rope_freqs.weight" in spec.ignored:
        freqs = gguf.tensors["rope_freqs.weight"]
        factors = decode_float32(freqs.raw, freqs.qtype).reshape(-1)
        dims = model.args.head_dim or model.args.hidden_size // model.args.num_attention_heads
        rope = {
            "factors": factors.tolist(),
            "theta": float(model.args.rope_theta),
            "dims": int(dims),
        }
        _apply_rope(model, rope)
    mx.eval(model.parameters())
    model.eval()
    if root is not None and key is not None:
        model_json = {"module": spec.module, "args": args, "quantized": kept, "rope_freqs": rope}
        gguf_cache.write_entry(root, key, model, model_json, parts)
    return model, wrap_tokenizer(parts)


def gguf_sha256(path: Path) -> str:
    """sha256 of a GGUF file, memoized per process by (path, size, mtime)."""
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo not in _SHA256:
        _SHA256[memo] = file_sha256(path)
    return _SHA256[memo]


_SHA256: dict[tuple, str] = {}


def _quantize(model: nn.Module, kept: dict[str, int]) -> None:
    """Turn the modules kept affine-quantized into MLX's quantized modules (group size 32)."""
    if kept:
        nn.quantize(
            model,
            class_predicate=lambda p, m: (
                {"group_size": GROUP_SIZE, "bits": kept[p]} if p in kept else False
            ),
        )


def _apply_rope(model: nn.Module, rope: dict) -> None:
    factors = np.asarray(rope["factors"], dtype=np.float32)
    apply_rope_freqs(model, factors, rope["theta"], rope["dims"])


def _from_entry(folder: Path):
    """(model, tokenizer) from a model load cache entry: the same steps as a fresh load."""
    import importlib
    import json

    model_json = json.loads((folder / "model.json").read_text())
    module = importlib.import_module(f"mlx_lm.models.{model_json['module']}")
    model = module.Model(module.ModelArgs.from_dict(model_json["args"]))
    weights = cast(dict[str, mx.array], mx.load(str(folder / "weights.safetensors")))
    weights = model.sanitize(weights) if hasattr(model, "sanitize") else weights
    _quantize(model, model_json["quantized"])
    model.load_weights(list(weights.items()), strict=True)
    if model_json["rope_freqs"] is not None:
        _apply_rope(model, model_json["rope_freqs"])
    mx.eval(model.parameters())
    model.eval()
    settings = json.loads((folder / "tokenizer_settings.json").read_text())
    parts = TokenizerParts(raw=folder / "tokenizer.json", **settings)
    return model, wrap_tokenizer(parts)


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
    expected = set(dict(tree_flatten(model.parameters()))) - {"lm_head.weight"}
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
