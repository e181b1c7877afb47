"""One model anatomy: where the embedding, layers, attention, MLP, norms and head are.

``anatomy_of(model)`` resolves once per model object (memoized on it) which attribute path
holds each part (:mod:`mlx_interp.models.layout`) and answers every structural question the
library asks: the decoder blocks, a block's parts (:class:`LayerParts`: attention with its
q/k/v/o projections or fused qkv, q/k norms, rope, scale, softcap, heads and kv heads,
sliding window; MLP with gate/up/down or fused gate_up and its activation; the block's
norms), the final norm and unembedding. Modules are looked up by path on each access, so a
module replaced in place (quantization) is seen. Capture, steering, sites, patching and the
lens ask it; nothing else knows module names.

An unusual mlx-lm model is described by the config key ``model.anatomy`` (role -> path,
passed through loading), or ``anatomy_of(model, {"mlp": "ffn", ...})`` in Python.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from mlx_interp.models.layout import (
    EXAMPLE,
    LAYER_ROLES,
    AnatomyError,
    Layout,
    NoLayersError,
    activation,
    children,
    embed_scaler,
    find,
    residual_add,
    resolve_layout,
)

__all__ = ["Anatomy", "AnatomyError", "LayerParts", "NoLayersError", "anatomy_of"]

_ATTR = "_mlx_interp_anatomy"
_WHAT = {"attn": "attention", "mlp": "MLP", "o_proj": "output projection"}


def in_features(linear: Any) -> int:
    """Input width of a ``Linear`` or ``QuantizedLinear`` (weight ``[out, in]``, maybe packed)."""
    width = linear["weight"].shape[1]
    bits = getattr(linear, "bits", None)
    return width * 32 // bits if bits else width


def out_features(linear: Any) -> int:
    """Output width of a ``Linear`` or ``QuantizedLinear``."""
    return int(linear["weight"].shape[0])


@dataclass(frozen=True)
class LayerParts:
    """The parts of decoder block ``index``, as the model holds them now.

    Projections are ``None`` where the layout has none: ``qkv_proj`` (phi3, gpt2) replaces
    ``q_proj``/``k_proj``/``v_proj`` (split ``[n_heads, n_kv_heads, n_kv_heads] * head_dim``
    along the output), ``gate_up_proj`` (phi3) replaces ``gate_proj``/``up_proj`` (split in
    halves: gate first); a non-gated MLP (gpt2) has ``up_proj`` (W_in) and no gate. Norms
    missing from a block are None: llama-like blocks have ``input_norm`` and
    ``pre_mlp_norm``; gemma2/3 all four; olmo2 only the two post-norms.
    """

    index: int
    block: Any
    attn: Any
    mlp: Any
    q_proj: Any
    k_proj: Any
    v_proj: Any
    qkv_proj: Any
    o_proj: Any
    q_norm: Any
    k_norm: Any
    rope: Any
    gate_proj: Any
    up_proj: Any
    gate_up_proj: Any
    down_proj: Any
    input_norm: Any
    post_attn_norm: Any
    pre_mlp_norm: Any
    post_mlp_norm: Any
    n_heads: int | None
    n_kv_heads: int | None
    head_dim: int | None
    scale: float | None  # multiplies q . k (mlx-lm's attention scale)
    attn_softcap: float | None  # scores -> tanh(scores / cap) * cap before the mask (gemma2)
    sliding_window: int | None  # keys further back than this are masked (gemma3 local layers)
    qk_norm: str | None  # "head" (per head, after the split) | "full" (olmo2) | None
    activation: str | None  # silu (swiglu), gelu_approx (gemma, gpt2)...
    gated: bool  # mlp = down(act(gate(x)) * up(x)) when True, down(act(up(x))) otherwise
    residual_add: Callable[[mx.array, mx.array], mx.array]

    @property
    def d_mlp(self) -> int | None:
        """Width of the MLP's hidden layer (the neurons): the down projection's input."""
        return in_features(self.down_proj) if self.down_proj is not None else None

    @property
    def act(self) -> Callable[[mx.array], mx.array] | None:
        """The activation function itself."""
        return activation(self.activation)


class Anatomy:
    """Where each part of ``model`` is (see the module docstring); from :func:`anatomy_of`.

    Attributes: ``model``, ``layout`` (role -> path), ``arch`` (the mlx-lm model module).
    """

    def __init__(self, model: Any, layout: Layout) -> None:
        self.model, self.layout, self.arch = model, layout, layout.arch
        self.verified: set[tuple[str, int]] = set()  # explicit forwards checked per layer

    def __repr__(self) -> str:
        return f"Anatomy({self.arch}, n_layers={self.n_layers}, d_model={self.d_model})"

    # --- top level ------------------------------------------------------------------

    def _top(self, role: str) -> Any:
        return find(self.model, self.layout.top[role])

    @property
    def body(self) -> Any:
        """The transformer body (``model.model`` in mlx-lm): tokens -> final normed states."""
        return self._top("body")

    @property
    def embed(self) -> Any:
        """The token embedding module (``embed_tokens``, gpt2's ``wte``)."""
        return self._top("embed")

    @property
    def pos_embed(self) -> Any:
        """The learned positional embedding (gpt2's ``wpe``), or None."""
        return self._top("pos_embed")

    @property
    def layers(self) -> list:
        """The decoder blocks, in order."""
        blocks = self._top("layers")
        if not isinstance(blocks, (list, tuple)) or not blocks:
            raise NoLayersError(f"{type(self.model).__name__} no longer has its decoder layers")
        return list(blocks)

    @property
    def final_norm(self) -> Any:
        """The norm after the last layer (``model.norm``, gpt2's ``ln_f``)."""
        return self.require(self._top("final_norm"), "final_norm", "final norm")

    @property
    def lm_head(self) -> Any:
        """The untied output projection, or None when the head is the tied embedding."""
        return self._top("lm_head")

    @property
    def tied(self) -> bool:
        """Whether the unembedding is the token embedding (``embed.as_linear``)."""
        return self.lm_head is None

    @property
    def final_softcap(self) -> float | None:
        """Logits -> tanh(logits / cap) * cap after the head (gemma2), or None."""
        given = self.layout.settings.get("final_softcap")
        cap = given if given is not None else getattr(self.model, "final_logit_softcapping", None)
        return float(cap) if cap else None

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int | None:
        """Residual width: from the model's args, else the embedding (None if neither)."""
        args = getattr(self.model, "args", None)
        for name in ("hidden_size", "n_embd", "d_model", "dim"):
            value = getattr(args, name, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        embed = self.embed
        if embed is None:
            return None
        return int(getattr(embed, "dims", 0) or embed["weight"].shape[-1])

    @property
    def vocab_size(self) -> int | None:
        head = self.lm_head
        if head is not None:
            return out_features(head)
        embed = self.embed
        return int(embed["weight"].shape[0]) if embed is not None else None

    @property
    def n_heads(self) -> int | None:
        return self.layer(0).n_heads

    @property
    def n_kv_heads(self) -> int | None:
        return self.layer(0).n_kv_heads

    @property
    def head_dim(self) -> int | None:
        return self.layer(0).head_dim

    @property
    def d_mlp(self) -> int | None:
        return self.layer(0).d_mlp

    @property
    def activation(self) -> str | None:
        return self.layout.settings.get("activation")

    @property
    def plain_cache(self) -> bool:
        """Whether every layer's mlx-lm cache is a plain ``KVCache`` (batchable, copyable);
        not for sliding-window (``RotatingKVCache``) or recurrent layers."""
        from mlx_lm.models.cache import KVCache, make_prompt_cache

        return all(type(c) is KVCache for c in make_prompt_cache(self.model))

    def sliding_window(self, index: int) -> int | None:
        """The attention window of layer ``index`` (None: full causal attention)."""
        return self.layer(index).sliding_window

    def mask_kind(self, index: int) -> str:
        """``sliding`` or ``causal``: the mask the model gives layer ``index``."""
        return "causal" if self.sliding_window(index) is None else "sliding"

    # --- the residual stream in and out ---------------------------------------------------

    def embed_tokens(self, tokens: mx.array) -> mx.array:
        """``[batch, seq]`` token ids -> the residual entering layer 0, as the body computes
        it (Gemma's sqrt(d_model) scale; gpt2's positions 0..seq-1 added)."""
        h = self.require(self.embed, "embed", "token embedding")(tokens)
        scale = embed_scaler(self.layout, self.d_model)
        if scale is not None:
            h = scale(h)
        if self.pos_embed is not None:
            h = h + self.pos_embed(mx.arange(tokens.shape[1]))
        return h

    def head(self, h: mx.array) -> mx.array:
        """``[..., d_model]`` normed states -> logits through the head (no norm, no softcap)."""
        if self.lm_head is not None:
            return self.lm_head(h)
        embed = self.require(self.embed, "embed", "token embedding")
        if not hasattr(embed, "as_linear"):
            raise AnatomyError(
                f"{type(self.model).__name__} has no lm_head and its embedding cannot act as "
                f"the head; name the head with model.anatomy (e.g. model.anatomy={{lm_head: out}})"
            )
        return embed.as_linear(h)

    def unembed(self, h: mx.array, softcap: bool = True) -> mx.array:
        """``[..., d_model]`` residual -> ``[..., vocab]`` logits exactly as the model's own
        head: final norm, head, and (``softcap``) gemma2's final logit soft-capping. At the
        last layer's output this equals the model's logits."""
        logits = self.head(self.final_norm(h))
        cap = self.final_softcap if softcap else None
        return mx.tanh(logits / cap) * cap if cap else logits

    def head_rows(self, ids: Sequence[int]) -> mx.array:
        """float32 ``[len(ids), d_model]``: the unembedding rows of ``ids`` (the head's weight
        or the tied embedding), dequantized when quantized."""
        layer = self.lm_head if self.lm_head is not None else self.embed
        layer = self.require(layer, "lm_head", "unembedding")
        index = mx.array(list(ids), dtype=mx.int32)
        if getattr(layer, "bits", None):
            biases = layer.get("biases")
            rows = mx.dequantize(
                layer.weight[index],
                layer.scales[index],
                None if biases is None else biases[index],
                layer.group_size,
                layer.bits,
            )
        else:
            rows = layer.weight[index]
        return rows.astype(mx.float32)

    # --- one block -----------------------------------------------------------------------

    def require(self, part: Any, role: str, what: str, index: int | None = None) -> Any:
        """``part``, or an :class:`AnatomyError` naming the role and ``model.anatomy``."""
        if part is not None:
            return part
        where = f"layer {index}" if index is not None else type(self.model).__name__
        root = self.layers[index] if index is not None else self.model
        looked = " or ".join(p.split(".")[-1] for p in LAYER_ROLES.get(role, ())) or role
        raise AnatomyError(
            f"{where} ({type(root).__module__}.{type(root).__name__}) has no {what} submodule "
            f"named {looked}; its children are: {children(root)}. Name it with the config key "
            f"model.anatomy (role {role!r}, e.g. {EXAMPLE})"
        )

    def layer(self, index: int) -> LayerParts:
        """The parts of decoder block ``index`` (negative counts from the end)."""
        blocks = self.layers
        block = blocks[index]
        index %= len(blocks)
        paths, settings = self.layout.layer, self.layout.settings

        def part(role: str) -> Any:
            return find(block, paths[role])

        attn, o_proj = part("attn"), part("o_proj")
        n_heads = settings.get("n_heads") or _count(attn, ("n_heads", "n_head", "num_heads"))
        n_heads = n_heads or _count(getattr(self.model, "args", None), ("num_attention_heads",))
        n_kv = settings.get("n_kv_heads") or _count(attn, ("n_kv_heads", "num_key_value_heads"))
        head_dim = settings.get("head_dim") or _count(attn, ("head_dim",))
        if not head_dim and n_heads and o_proj is not None:
            head_dim = in_features(o_proj) // n_heads
        q_norm = part("q_norm")
        qk_norm = None
        if q_norm is not None and "weight" in q_norm:
            qk_norm = "head" if q_norm["weight"].shape[-1] == head_dim else "full"
        softcap = settings.get("attn_softcap") or getattr(attn, "attn_logit_softcapping", None)
        scale = getattr(attn, "scale", None)
        if scale is None and head_dim:
            scale = head_dim**-0.5
        gate_up = part("gate_up_proj")
        return LayerParts(
            index=index,
            block=block,
            attn=attn,
            mlp=part("mlp"),
            q_proj=part("q_proj"),
            k_proj=part("k_proj"),
            v_proj=part("v_proj"),
            qkv_proj=part("qkv_proj"),
            o_proj=o_proj,
            q_norm=q_norm,
            k_norm=part("k_norm"),
            rope=part("rope"),
            gate_proj=part("gate_proj"),
            up_proj=part("up_proj"),
            gate_up_proj=gate_up,
            down_proj=part("down_proj"),
            input_norm=part("input_norm"),
            post_attn_norm=part("post_attn_norm"),
            pre_mlp_norm=part("pre_mlp_norm"),
            post_mlp_norm=part("post_mlp_norm"),
            n_heads=n_heads or None,
            n_kv_heads=n_kv or n_heads or None,
            head_dim=head_dim or None,
            scale=None if scale is None else float(scale),
            attn_softcap=float(softcap) if softcap else None,
            sliding_window=self._window(block, attn),
            qk_norm=qk_norm,
            activation=settings.get("activation"),
            gated=gate_up is not None or part("gate_proj") is not None,
            residual_add=residual_add(self.layout, block),
        )

    def _window(self, block: Any, attn: Any) -> int | None:
        body = self.body
        if getattr(attn, "is_sliding", False):  # gemma3_text local layers
            return int(getattr(body, "window_size", 0) or self.model.args.sliding_window)
        if getattr(block, "use_sliding", False):  # llama with layer_types
            return int(body.sliding_window)
        return None

    def describe(self) -> dict[str, Any]:
        """Plain summary (paths, sizes, per-layer windows): for logs, docs and debugging."""
        return {
            "arch": self.arch,
            "paths": {**self.layout.top, **{f"layer.{k}": v for k, v in self.layout.layer.items()}},
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "d_mlp": self.d_mlp,
            "vocab_size": self.vocab_size,
            "tied": self.tied,
            "activation": self.activation,
            "final_softcap": self.final_softcap,
            "sliding_windows": [self.sliding_window(i) for i in range(self.n_layers)],
        }


def _count(obj: Any, names: Sequence[str]) -> int | None:
    for name in names:
        value = getattr(obj, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def anatomy_of(model: Any, overrides: Mapping[str, Any] | None = None) -> Anatomy:
    """The :class:`Anatomy` of ``model``, resolved once and kept on the model object.

    ``overrides`` (role -> attribute path, or value for ``n_heads``, ``activation``...;
    the config key ``model.anatomy``) replace what is found by name; a later call without
    them returns the same anatomy. Raises :class:`NoLayersError` (a ``TypeError``) for a
    model without decoder blocks, :class:`AnatomyError` for a bad override."""
    if hasattr(model, "anatomy") and isinstance(model.anatomy, Anatomy):
        model = model.anatomy.model  # a public-API Model: its mlx-lm module
    known = getattr(model, _ATTR, None)
    if isinstance(known, Anatomy) and known.model is model:
        if overrides is None or known.layout.overrides == dict(overrides):
            return known
    anatomy = Anatomy(model, resolve_layout(model, overrides))
    try:
        object.__setattr__(model, _ATTR, anatomy)  # nn.Module is a dict: keep it out of it
    except (AttributeError, TypeError):
        pass  # an object without a __dict__: resolved again next time
    return anatomy
