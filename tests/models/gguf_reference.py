"""An independent float32 reference forward in numpy for real GGUF files (slow tests).

Reads the file with ``gguf.GGUFReader``, decodes with ``gguf.quants.dequantize`` and runs
the transformer as llama.cpp does (no MLX, no mlx-lm): llama (interleaved RoPE on the
stored, permuted Q/K rows; SwiGLU) and gemma3 (norm weights used as stored, i.e. ``1 + w``;
QK-norm; half-split RoPE, local base 10000 on 5 of 6 layers; GELU-tanh gated MLP; sandwich
norms; embedding scaled by sqrt(hidden) in float32).
"""

from __future__ import annotations

import math

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize


class ReferenceGGUF:
    """Decoded float32 weights and the metadata the forward needs."""

    def __init__(self, path):
        reader = GGUFReader(str(path))
        self.arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
        self.meta = {}
        for name, field in reader.fields.items():
            if name.startswith(self.arch + "."):
                self.meta[name[len(self.arch) + 1 :]] = field.parts[-1].tolist()[0]
        self.weights = {}
        for tensor in reader.tensors:
            kind = GGMLQuantizationType(int(tensor.tensor_type))
            rows = tensor.data.shape[0] if tensor.data.ndim > 1 else 1
            values = dequantize(np.asarray(tensor.data), kind).reshape(rows, -1)
            self.weights[tensor.name] = values.squeeze(0) if tensor.data.ndim == 1 else values

    def w(self, name: str) -> np.ndarray:
        return self.weights[name]


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope(x: np.ndarray, base: float, interleaved: bool) -> np.ndarray:
    """x ``[heads, seq, head_dim]``; pairs (2i, 2i+1) if interleaved else (i, i+d/2)."""
    _, seq, dim = x.shape
    inv = base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    angle = np.arange(seq)[:, None] * inv[None, :]
    cos, sin = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
        return out
    a, b = x[..., : dim // 2], x[..., dim // 2 :]
    return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)


def attention(q, k, v, scale: float, window: int | None) -> np.ndarray:
    """q ``[heads, seq, d]``, k/v ``[kv_heads, seq, d]`` -> ``[seq, heads*d]`` (causal)."""
    heads, seq, _ = q.shape
    group = heads // k.shape[0]
    k, v = np.repeat(k, group, axis=0), np.repeat(v, group, axis=0)
    scores = q @ k.transpose(0, 2, 1) * scale
    i, j = np.arange(seq)[:, None], np.arange(seq)[None, :]
    allowed = (j <= i) if window is None else (j <= i) & (i - j < window)
    scores = np.where(allowed, scores, -np.inf)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    probs = scores / scores.sum(-1, keepdims=True)
    return (probs @ v).transpose(1, 0, 2).reshape(seq, -1)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def hidden_states(ref: ReferenceGGUF, tokens: list[int]) -> list[np.ndarray]:
    """Residual stream after each layer, each ``[seq, hidden]`` float32."""
    m, w = ref.meta, ref.w
    eps = m["attention.layer_norm_rms_epsilon"]
    heads, kv_heads = m["attention.head_count"], m["attention.head_count_kv"]
    hidden = m["embedding_length"]
    head_dim = m.get("attention.key_length", hidden // heads)
    gemma = ref.arch == "gemma3"
    h = w("token_embd.weight")[tokens].astype(np.float32)
    if gemma:
        h = h * np.float32(math.sqrt(hidden))
    states = []
    for i in range(m["block_count"]):
        p = f"blk.{i}."
        x = rms_norm(h, w(p + "attn_norm.weight"), eps)
        q = (x @ w(p + "attn_q.weight").T).reshape(len(tokens), heads, head_dim).transpose(1, 0, 2)
        k = (x @ w(p + "attn_k.weight").T).reshape(len(tokens), kv_heads, head_dim)
        v = (x @ w(p + "attn_v.weight").T).reshape(len(tokens), kv_heads, head_dim)
        k, v = k.transpose(1, 0, 2), v.transpose(1, 0, 2)
        if gemma:
            q = rms_norm(q, w(p + "attn_q_norm.weight"), eps)
            k = rms_norm(k, w(p + "attn_k_norm.weight"), eps)
            is_global = (i + 1) % 6 == 0
            base = m["rope.freq_base"] if is_global else 10000.0
            window = None if is_global else m["attention.sliding_window"]
            q, k = rope(q, base, False), rope(k, base, False)
        else:
            base, window = m.get("rope.freq_base", 10000.0), None
            q, k = rope(q, base, True), rope(k, base, True)
        out = attention(q, k, v, head_dim**-0.5, window) @ w(p + "attn_output.weight").T
        if gemma:
            h = h + rms_norm(out, w(p + "post_attention_norm.weight"), eps)
            x = rms_norm(h, w(p + "ffn_norm.weight"), eps)
            gate = gelu_tanh(x @ w(p + "ffn_gate.weight").T)
            mlp = (gate * (x @ w(p + "ffn_up.weight").T)) @ w(p + "ffn_down.weight").T
            h = h + rms_norm(mlp, w(p + "post_ffw_norm.weight"), eps)
        else:
            h = h + out
            x = rms_norm(h, w(p + "ffn_norm.weight"), eps)
            gate = x @ w(p + "ffn_gate.weight").T
            silu = gate / (1 + np.exp(-gate))
            h = h + (silu * (x @ w(p + "ffn_up.weight").T)) @ w(p + "ffn_down.weight").T
        states.append(h.astype(np.float32))
    return states


def spm_reference(text: str, tokens: list[str], scores: list[float]) -> list[int]:
    """llama.cpp's SentencePiece BPE: merge the best-scoring adjacent pair until none is in
    the vocabulary; unknown characters as <0xXX> byte tokens."""
    vocab = {token: i for i, token in enumerate(tokens)}
    parts = list(text.replace(" ", "\u2581"))
    while True:
        merged = [a + b for a, b in zip(parts, parts[1:], strict=False)]
        pairs = [(scores[vocab[m]], -i) for i, m in enumerate(merged) if m in vocab]
        if not pairs:
            break
        i = -max(pairs)[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    ids = []
    for part in parts:
        ids += [vocab[part]] if part in vocab else [vocab[f"<0x{b:02X}>"] for b in part.encode()]
    return ids
