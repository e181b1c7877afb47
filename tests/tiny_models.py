"""Tiny random-weight mlx-lm models and a hand-written reference forward for tests.

``tiny_model(arch)`` builds a 3-layer, hidden-32..64, 4-head, vocab-128 model of an mlx-lm
architecture. ``embed_and_run_layers`` mirrors each architecture's own embedding step and
mask construction, then calls the decoder layers one by one.
"""

from __future__ import annotations

import importlib
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask

VOCAB = 128
N_LAYERS = 3

_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
    # Mistral-style llama: grouped-query attention, wider MLP, untied LM head.
    "mistral": {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "tie_word_embeddings": False,
    },
    "qwen2": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
    "qwen3": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 512,
        "rope_theta": 1e6,
        "tie_word_embeddings": True,
    },
    "gemma2": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "rms_norm_eps": 1e-6,
        "query_pre_attn_scalar": 8.0,
    },
    # Small sliding window (4) and pattern (2) so test prompts exercise the windowed mask.
    "gemma3_text": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "rms_norm_eps": 1e-6,
        "query_pre_attn_scalar": 8.0,
        "sliding_window": 4,
        "sliding_window_pattern": 2,
        "max_position_embeddings": 512,
    },
    "phi3": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 512,
    },
    "gpt2": {
        "n_ctx": 64,
        "n_embd": 32,
        "n_head": 4,
        "n_layer": N_LAYERS,
        "n_positions": 64,
        "layer_norm_epsilon": 1e-5,
    },
    "olmo2": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    },
}

ARCHS: list[str] = list(_CONFIGS)


def tiny_model(arch: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """Build a tiny random-weight mlx-lm ``Model`` of ``arch`` (one of ``ARCHS``), in eval mode.

    ``overrides`` replace ModelArgs fields (e.g. wider dims for GGUF K-quant tests)."""
    if arch not in _CONFIGS:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
    config = {"model_type": arch, "num_hidden_layers": N_LAYERS, "vocab_size": VOCAB}
    config.update(_CONFIGS[arch])
    config.update(overrides)
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    args = module.ModelArgs.from_dict(config)
    mx.random.seed(seed)
    model = module.Model(args)
    mx.eval(model.parameters())
    model.eval()
    return model


def _embed(model: nn.Module, arch: str, tokens: mx.array) -> mx.array:
    """The architecture's own embedding step: ``[batch, seq]`` -> ``[batch, seq, d_model]``."""
    inner = model.model
    if arch == "gpt2":
        return inner.wte(tokens) + inner.wpe(mx.arange(tokens.shape[1]))
    h = inner.embed_tokens(tokens)
    if arch == "gemma2":
        return h * (inner.args.hidden_size**0.5)
    if arch == "gemma3_text":  # gemma3 rounds the sqrt(hidden) scale to bfloat16
        return h * mx.array(inner.args.hidden_size**0.5, mx.bfloat16).astype(h.dtype)
    return h


def _layer_masks(model: nn.Module, arch: str, h: mx.array) -> list:
    """The attention mask each decoder layer receives in the model's own forward."""
    n_layers = len(model.layers)
    if arch == "gemma2":
        return [create_attention_mask(h, None, return_array=True)] * n_layers
    if arch == "gemma3_text":
        pattern = model.model.sliding_window_pattern
        full = create_attention_mask(h, None)
        window = create_attention_mask(h, None, window_size=model.model.window_size)
        return [full if i % pattern == pattern - 1 else window for i in range(n_layers)]
    if any(getattr(layer, "use_sliding", False) for layer in model.layers):
        raise NotImplementedError("sliding-window llama layers are not mirrored here")
    return [create_attention_mask(h, None)] * n_layers


def embed_and_run_layers(model: nn.Module, arch: str, tokens: Any, upto: int) -> mx.array:
    """Reference forward: embed ``tokens`` ``[batch, seq]``, run layers ``0..upto`` one by one.

    Returns the hidden state after layer ``upto`` (negative counts from the end),
    ``[batch, seq, d_model]``.
    """
    tokens = tokens if isinstance(tokens, mx.array) else mx.array(tokens)
    layers = model.layers
    upto = upto % len(layers)
    h = _embed(model, arch, tokens)
    masks = _layer_masks(model, arch, h)
    for layer, mask in zip(layers[: upto + 1], masks[: upto + 1], strict=True):
        h = layer(h, mask, None)
    return h
