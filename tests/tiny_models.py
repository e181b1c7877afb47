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


# --- a model whose names mlx-lm never uses: described by ``model.anatomy`` ---------------------


class _OddAttention(nn.Module):
    """llama attention under other names (query/key/value/out, rotary), no head count."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads, self.hd = heads, d // heads
        self.scale = self.hd**-0.5
        self.query, self.key, self.value, self.out = (nn.Linear(d, d, bias=False) for _ in "qkvo")
        self.rotary = nn.RoPE(self.hd)

    def __call__(self, x, mask=None, cache=None):
        from mlx_lm.models.base import scaled_dot_product_attention

        b, n, _ = x.shape
        q, k, v = (
            p(x).reshape(b, n, self.heads, -1).transpose(0, 2, 1, 3)
            for p in (self.query, self.key, self.value)
        )
        offset = cache.offset if cache is not None else 0
        q, k = self.rotary(q, offset=offset), self.rotary(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        z = scaled_dot_product_attention(q, k, v, cache=cache, scale=self.scale, mask=mask)
        return self.out(z.transpose(0, 2, 1, 3).reshape(b, n, -1))


class _OddFFN(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.w_gate, self.w_in = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.w_out = nn.Linear(hidden, d, bias=False)

    def __call__(self, x):
        return self.w_out(nn.silu(self.w_gate(x)) * self.w_in(x))


class _OddBlock(nn.Module):
    def __init__(self, d: int, heads: int, hidden: int):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.mixer, self.ffn = _OddAttention(d, heads), _OddFFN(d, hidden)

    def __call__(self, x, mask=None, cache=None):
        h = x + self.mixer(self.norm1(x), mask, cache)
        return h + self.ffn(self.norm2(h))


class _OddBody(nn.Module):
    def __init__(self, d: int, heads: int, hidden: int):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, d)
        self.blocks = [_OddBlock(d, heads, hidden) for _ in range(N_LAYERS)]
        self.final = nn.RMSNorm(d)

    def __call__(self, tokens, cache=None):
        h = self.tok(tokens)
        cache = cache or [None] * len(self.blocks)
        mask = create_attention_mask(h, cache[0])
        for block, c in zip(self.blocks, cache, strict=True):
            h = block(h, mask, c)
        return self.final(h)


class OddModel(nn.Module):
    """A llama-like model whose parts have names mlx-lm never uses (no ``layers`` at all)."""

    def __init__(self, d: int = 32, heads: int = 4, hidden: int = 48):
        super().__init__()
        self.backbone = _OddBody(d, heads, hidden)
        self.head = nn.Linear(d, VOCAB, bias=False)

    def __call__(self, tokens, cache=None):
        return self.head(self.backbone(tokens, cache))

    def make_cache(self):
        from mlx_lm.models.cache import KVCache

        return [KVCache() for _ in self.backbone.blocks]


ODD_ANATOMY = {  # what a user writes under model.anatomy for OddModel
    "body": "backbone",
    "layers": "backbone.blocks",
    "embed": "backbone.tok",
    "final_norm": "backbone.final",
    "lm_head": "head",
    "attn": "mixer",
    "q_proj": "mixer.query",
    "k_proj": "mixer.key",
    "v_proj": "mixer.value",
    "o_proj": "mixer.out",
    "rope": "mixer.rotary",
    "mlp": "ffn",
    "gate_proj": "ffn.w_gate",
    "up_proj": "ffn.w_in",
    "down_proj": "ffn.w_out",
    "input_norm": "norm1",
    "pre_mlp_norm": "norm2",
    "n_heads": 4,
    "activation": "silu",
}


def odd_model(seed: int = 0) -> OddModel:
    """The :class:`OddModel`, random weights, eval mode."""
    mx.random.seed(seed)
    model = OddModel()
    mx.eval(model.parameters())
    model.eval()
    return model
