"""GGUF architectures mapped onto mlx-lm's own model classes, with llama.cpp's differences.

Each ``ArchSpec`` says which mlx-lm module builds the model, how llama.cpp's tensor names map
onto mlx-lm's, how the ``ModelArgs`` follow from the metadata, and what llama.cpp changed:

- llama/mistral: llama.cpp permutes Q/K rows into the interleaved (GPT-J) RoPE layout, so the
  model runs with ``rope_traditional=True`` on the stored rows. qwen2/qwen3/gemma/phi3 keep
  the half-split (NEOX) layout, so mlx-lm's default ``rope_traditional=False`` applies.
- llama ``rope_freqs`` (Llama 3.1/3.2 rope scaling) divides each rotary frequency by its
  factor; ``apply_rope_freqs`` installs those frequencies in every attention layer.
- gemma2/gemma3: llama.cpp stores every ``*norm.weight`` as ``1 + w``; mlx-lm adds the 1
  itself, so ``norm_offset`` subtracts it. The head is tied to the embedding. Settings not in
  the GGUF come from llama.cpp's own defaults (see ``gemma_args``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_interp.models.gguf_read import GGUFError, GGUFFile

BLOCK = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
QK_NORM = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
GEMMA_BLOCK = {
    **{k: v for k, v in BLOCK.items() if k != "ffn_norm"},
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
PHI3_BLOCK = {
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_up": "mlp.gate_up_proj",  # llama.cpp keeps phi3's fused gate+up rows as ffn_up
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


@dataclass(frozen=True)
class ArchSpec:
    """How one GGUF ``general.architecture`` becomes an mlx-lm model."""

    module: str  # mlx_lm.models.<module>
    block_names: dict[str, str]  # blk.{i}.<stem> -> model.layers.{i}.<path>
    build_args: Callable[[GGUFFile], dict[str, Any]]
    norm_offset: float = 0.0  # subtracted from every *norm.weight (gemma: llama.cpp stores 1+w)
    ignored: tuple[str, ...] = ()  # GGUF tensors consumed elsewhere (not module weights)
    extra_top: dict[str, str] = field(default_factory=dict)


def _required(gguf: GGUFFile, key: str) -> Any:
    value = gguf.arch_value(key)
    if value is None:
        raise GGUFError(f"{gguf.path}: GGUF metadata lacks {gguf.architecture}.{key}")
    return value


def _vocab(gguf: GGUFFile) -> int:
    vocab = gguf.arch_value("vocab_size") or len(gguf.metadata.get("tokenizer.ggml.tokens") or [])
    if not vocab:
        raise GGUFError(f"{gguf.path}: GGUF metadata gives no vocabulary size")
    return int(vocab)


def common_args(gguf: GGUFFile) -> dict[str, Any]:
    """ModelArgs fields every architecture reads the same way."""
    hidden = int(_required(gguf, "embedding_length"))
    heads = int(_required(gguf, "attention.head_count"))
    head_dim = int(gguf.arch_value("attention.key_length", hidden // heads))
    rope_dims = gguf.arch_value("rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != head_dim and gguf.architecture != "phi3":
        raise GGUFError(
            f"{gguf.path}: partial rotary embedding ({gguf.architecture}.rope.dimension_count="
            f"{rope_dims}, head size {head_dim}) is not supported for {gguf.architecture}"
        )
    return {
        "hidden_size": hidden,
        "num_hidden_layers": int(_required(gguf, "block_count")),
        "intermediate_size": int(_required(gguf, "feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(gguf.arch_value("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(gguf.arch_value("attention.layer_norm_rms_epsilon", 1e-5)),
        "vocab_size": _vocab(gguf),
        "max_position_embeddings": int(gguf.arch_value("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
    }


def rope_scaling(gguf: GGUFFile) -> dict | None:
    """Linear rope scaling from the metadata; any other kind is refused (never ignored)."""
    kind = gguf.arch_value("rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"type": "linear", "factor": float(gguf.arch_value("rope.scaling.factor"))}
    raise GGUFError(
        f"{gguf.path}: rope scaling {kind!r} ({gguf.architecture}.rope.scaling.type) is not "
        "supported; only linear scaling and llama's rope_freqs are"
    )


def llama_args(gguf: GGUFFile) -> dict[str, Any]:
    args = common_args(gguf)
    args.update(
        model_type="llama",
        rope_theta=float(gguf.arch_value("rope.freq_base", 10000.0)),
        rope_traditional=True,  # Q/K rows were permuted by llama.cpp's converter
        rope_scaling=rope_scaling(gguf),
        attention_bias="blk.0.attn_q.bias" in gguf.tensors,
    )
    return args


def qwen_args(gguf: GGUFFile) -> dict[str, Any]:
    args = common_args(gguf)
    model_type = "qwen3" if gguf.architecture == "qwen3" else "qwen2"
    args.update(
        model_type=model_type,
        rope_theta=float(gguf.arch_value("rope.freq_base", 1e6)),
        rope_scaling=rope_scaling(gguf),
    )
    return args


def gemma_args(gguf: GGUFFile) -> dict[str, Any]:
    """gemma2/gemma3 args. Not in the GGUF, taken from llama.cpp: query scaling by the head
    size (by hidden/heads for the 27B models), gemma3's local rope base 10000 and one global
    layer in 6 (unless the file says otherwise)."""
    args = common_args(gguf)
    args.pop("tie_word_embeddings")  # gemma's head is always the embedding
    is_27b = args["num_hidden_layers"] in (46, 62)
    heads = args["num_attention_heads"]
    scalar = args["hidden_size"] / heads if is_27b else args["head_dim"]
    args.update(query_pre_attn_scalar=float(scalar))
    args["rope_theta"] = float(gguf.arch_value("rope.freq_base", 10000.0))
    if gguf.architecture == "gemma2":
        args.update(
            model_type="gemma2",
            attn_logit_softcapping=float(gguf.arch_value("attn_logit_softcapping", 50.0)),
            final_logit_softcapping=float(gguf.arch_value("final_logit_softcapping", 30.0)),
        )
        return args
    pattern = gguf.arch_value("attention.sliding_window_pattern", 6)
    if not isinstance(pattern, int):
        raise GGUFError(f"{gguf.path}: gemma3 sliding-window pattern {pattern!r} not supported")
    args.update(
        model_type="gemma3_text",
        rope_local_base_freq=10000.0,
        sliding_window=int(gguf.arch_value("attention.sliding_window", 512)),
        sliding_window_pattern=pattern,
        rope_scaling=rope_scaling(gguf),
    )
    return args


def phi3_args(gguf: GGUFFile) -> dict[str, Any]:
    if "rope_factors_long.weight" in gguf.tensors or rope_scaling(gguf) is not None:
        raise GGUFError(f"{gguf.path}: phi3 rope scaling (long-context rope) is not supported")
    args = common_args(gguf)
    args.pop("head_dim")
    head_dim = args["hidden_size"] // args["num_attention_heads"]
    rope_dims = int(gguf.arch_value("rope.dimension_count", head_dim))
    args.update(
        model_type="phi3",
        rope_theta=float(gguf.arch_value("rope.freq_base", 10000.0)),
        partial_rotary_factor=rope_dims / head_dim,
    )
    return args


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", BLOCK, llama_args, ignored=("rope_freqs.weight",)),
    "mistral": ArchSpec("llama", BLOCK, llama_args, ignored=("rope_freqs.weight",)),
    "qwen2": ArchSpec("qwen2", BLOCK, qwen_args),
    "qwen3": ArchSpec("qwen3", {**BLOCK, **QK_NORM}, qwen_args),
    "gemma2": ArchSpec("gemma2", GEMMA_BLOCK, gemma_args, norm_offset=1.0),
    "gemma3": ArchSpec("gemma3_text", {**GEMMA_BLOCK, **QK_NORM}, gemma_args, norm_offset=1.0),
    "phi3": ArchSpec("phi3", PHI3_BLOCK, phi3_args),
}


def mlx_name(stored: str, spec: ArchSpec) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight`` (None if unmapped)."""
    stem, _, suffix = stored.rpartition(".")
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        target = spec.block_names.get(parts[2])
        return f"model.layers.{parts[1]}.{target}.{suffix}" if target else None
    target = {**TOP, **spec.extra_top}.get(stem)
    return f"{target}.{suffix}" if target else None


def gguf_name(name: str, spec: ArchSpec) -> str:
    """Inverse of ``mlx_name`` for error messages (the mlx name itself when unmapped)."""
    stem, _, suffix = name.rpartition(".")
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", stem)
    if match:
        for gguf, path in spec.block_names.items():
            if path == match.group(2):
                return f"blk.{match.group(1)}.{gguf}.{suffix}"
    for gguf, path in {**TOP, **spec.extra_top}.items():
        if path == stem:
            return f"{gguf}.{suffix}"
    return name


def build_model(gguf: GGUFFile, spec: ArchSpec) -> nn.Module:
    """The unquantized mlx-lm ``Model`` the metadata describes (weights not yet loaded)."""
    import importlib

    module = importlib.import_module(f"mlx_lm.models.{spec.module}")
    args = module.ModelArgs.from_dict(spec.build_args(gguf))
    return module.Model(args)


class FrequencyRoPE(nn.Module):
    """RoPE with explicit per-pair wavelengths ``freqs`` ``[dims/2]`` (``mx.fast.rope``)."""

    def __init__(self, dims: int, traditional: bool, freqs: np.ndarray):
        super().__init__()
        self.dims, self.traditional = dims, traditional
        self._freqs = mx.array(freqs.astype(np.float32))

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        return mx.fast.rope(
            x,
            self.dims,
            traditional=self.traditional,
            base=None,
            scale=1.0,
            offset=offset,
            freqs=self._freqs,
        )


def apply_rope_freqs(model: nn.Module, factors: np.ndarray, theta: float, dims: int) -> None:
    """llama.cpp ``rope_freqs``: pair ``i`` turns at ``theta**(-2i/dims) / factors[i]``."""
    if factors.shape != (dims // 2,):
        raise GGUFError(f"rope_freqs has shape {factors.shape}, expected ({dims // 2},)")
    wavelengths = theta ** (np.arange(0, dims, 2, dtype=np.float64) / dims) * factors
    for layer in model.layers:
        rope = FrequencyRoPE(dims, traditional=True, freqs=wavelengths)
        layer.self_attn.rope = rope
