"""Where each part of a model lives: role -> attribute path, found once per model.

A :class:`Layout` names, for one model object, the path of every part the library uses:
top-level roles relative to the model (``body``, ``embed``, ``pos_embed``, ``layers``,
``final_norm``, ``lm_head``) and layer roles relative to each decoder block (``attn``,
``q_proj``... ``down_proj``, the norms). Paths are found by the names mlx-lm uses (llama,
mistral, qwen2, qwen3, gemma2, gemma3_text, phi3, gpt2, olmo2 and mlx-lm folders of them);
what names cannot tell (which norm sits where, the embedding scale, the activation) comes
from a small table per architecture. A user describes anything else with a mapping of
role -> path (the config key ``model.anatomy``), never by editing this file.
"""

from __future__ import annotations

import math
import operator
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from mlx_interp.errors import ConfigError

TOP_ROLES: dict[str, tuple[str, ...]] = {  # role -> candidate paths from the model
    "body": ("model", "transformer"),
    "layers": ("layers", "model.layers", "model.h", "transformer.h"),
    "embed": ("model.embed_tokens", "model.wte", "embed_tokens", "wte", "transformer.wte"),
    "pos_embed": ("model.wpe", "transformer.wpe"),
    "final_norm": ("model.norm", "model.ln_f", "model.final_layernorm", "norm", "ln_f"),
    "lm_head": ("lm_head",),
}
LAYER_ROLES: dict[str, tuple[str, ...]] = {  # role -> candidate paths from a decoder block
    "attn": ("self_attn", "attn", "attention", "self_attention"),
    "mlp": ("mlp", "feed_forward"),
    "q_proj": ("{attn}.q_proj", "{attn}.wq"),
    "k_proj": ("{attn}.k_proj", "{attn}.wk"),
    "v_proj": ("{attn}.v_proj", "{attn}.wv"),
    "qkv_proj": ("{attn}.qkv_proj", "{attn}.c_attn", "{attn}.Wqkv"),  # fused [q | k | v]
    "o_proj": ("{attn}.o_proj", "{attn}.c_proj", "{attn}.out_proj", "{attn}.dense", "{attn}.wo"),
    "q_norm": ("{attn}.q_norm",),
    "k_norm": ("{attn}.k_norm",),
    "rope": ("{attn}.rope",),
    "gate_proj": ("{mlp}.gate_proj", "{mlp}.w1"),
    "up_proj": ("{mlp}.up_proj", "{mlp}.w3", "{mlp}.c_fc", "{mlp}.fc1"),  # W_in
    "gate_up_proj": ("{mlp}.gate_up_proj",),  # fused [gate | up]
    "down_proj": ("{mlp}.down_proj", "{mlp}.w2", "{mlp}.c_proj", "{mlp}.fc2"),
    "input_norm": (),  # the norms: from the architecture table (names are ambiguous)
    "post_attn_norm": (),
    "pre_mlp_norm": (),
    "post_mlp_norm": (),
}
NORM_ROLES = ("input_norm", "post_attn_norm", "pre_mlp_norm", "post_mlp_norm")
SETTINGS = (  # roles given as values, not paths
    "n_heads",
    "n_kv_heads",
    "head_dim",
    "activation",
    "embed_scale",
    "attn_softcap",
    "final_softcap",
)
_PRE = {"input_norm": "input_layernorm", "pre_mlp_norm": "post_attention_layernorm"}
_SANDWICH = {
    "input_norm": "input_layernorm",
    "post_attn_norm": "post_attention_layernorm",
    "pre_mlp_norm": "pre_feedforward_layernorm",
    "post_mlp_norm": "post_feedforward_layernorm",
}
# What names do not say, per mlx-lm model module: norm placement, activation, embedding scale.
ARCHS: dict[str, dict[str, Any]] = {
    "llama": {"norms": _PRE, "activation": "silu"},
    "mistral": {"norms": _PRE, "activation": "silu"},
    "qwen2": {"norms": _PRE, "activation": "silu"},
    "qwen3": {"norms": _PRE, "activation": "silu"},
    "phi3": {"norms": _PRE, "activation": "silu"},
    "gemma": {"norms": _PRE, "activation": "gelu_approx", "embed_scale": "sqrt_d"},
    "gemma2": {"norms": _SANDWICH, "activation": "gelu_approx", "embed_scale": "sqrt_d"},
    "gemma3_text": {"norms": _SANDWICH, "activation": "gelu_approx", "embed_scale": "sqrt_d_bf16"},
    "gpt2": {"norms": {"input_norm": "ln_1", "pre_mlp_norm": "ln_2"}, "activation": "gelu_approx"},
    "olmo2": {
        "norms": {"post_attn_norm": "post_attention_layernorm"}
        | {"post_mlp_norm": "post_feedforward_layernorm"},
        "activation": "silu",
    },
}
EXAMPLE = (
    "model.anatomy={layers: transformer.blocks, attn: mixer, o_proj: mixer.out, "
    "mlp: ffn, down_proj: ffn.w2, input_norm: norm1, pre_mlp_norm: norm2}"
)


class AnatomyError(ConfigError):
    """A part of the model that cannot be found, or a bad ``model.anatomy`` entry."""


class NoLayersError(AnatomyError, TypeError):
    """The model has no list of decoder blocks where the layout looks for one."""


def find(root: Any, path: str | None) -> Any:
    """The object at dotted ``path`` under ``root`` (attributes, dict keys or list indices);
    None when any step is missing or ``path`` is None."""
    if path is None:
        return None
    node = root
    for step in path.split("."):
        if node is None:
            return None
        if isinstance(node, (list, tuple)) and step.lstrip("-").isdigit():
            index = int(step)
            node = node[index] if -len(node) <= index < len(node) else None
        elif isinstance(node, dict) and step in node:
            node = node[step]
        else:
            try:
                node = getattr(node, step, None)
            except Exception:  # a property that raises: the part is not there
                node = None
    return node


def children(module: Any) -> str:
    """The names of a module's submodules (and array parameters), for error messages."""
    if isinstance(module, dict):
        return ", ".join(sorted(str(k) for k in module)) or "none"
    return ", ".join(sorted(k for k in vars(module) if not k.startswith("_"))) or "none"


def arch_name(model: Any) -> str:
    """The mlx-lm model module a model comes from (``llama``, ``gemma3_text``...), or its
    class's module name for anything else."""
    return type(model).__module__.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class Layout:
    """Role -> path for one model (top-level from the model, layer roles from each block),
    the settings given as values, and the user's overrides it was built with."""

    arch: str
    top: dict[str, str | None]
    layer: dict[str, str | None]
    settings: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)


def _first(root: Any, candidates: tuple[str, ...], fill: dict[str, str | None]) -> str | None:
    for pattern in candidates:
        try:
            path = pattern.format(**fill)
        except (KeyError, TypeError):
            continue  # a placeholder whose own role was not found
        if "None" in path.split("."):
            continue
        if find(root, path) is not None:
            return path
    return None


def _check_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    known = [*TOP_ROLES, *LAYER_ROLES, *SETTINGS]
    out = {}
    for role, value in dict(overrides).items():
        if role not in known:
            raise AnatomyError(
                f"model.anatomy has an unknown role {role!r}; roles: {', '.join(known)} "
                f"(e.g. {EXAMPLE})"
            )
        if role in SETTINGS:
            if role == "activation" and not isinstance(value, str):
                raise AnatomyError(f"model.anatomy.activation must be a name, not {value!r}")
        elif value is not None and not isinstance(value, str):
            raise AnatomyError(
                f"model.anatomy.{role} must be an attribute path like 'mixer.out' or null, "
                f"not {value!r} (e.g. {EXAMPLE})"
            )
        out[role] = value
    return out


def resolve_layout(model: Any, overrides: Mapping[str, Any] | None = None) -> Layout:
    """Find every role's path in ``model``; ``overrides`` (role -> path or value) win.

    Raises :class:`NoLayersError` when no decoder blocks are found (the one part every
    site needs); other missing parts are reported when a site asks for them."""
    given = _check_overrides(overrides or {})
    arch = arch_name(model)
    table = ARCHS.get(arch, {})
    top: dict[str, str | None] = {}
    for role, candidates in TOP_ROLES.items():
        top[role] = given[role] if role in given else _first(model, candidates, {})
    blocks = find(model, top["layers"])
    if not isinstance(blocks, (list, tuple)) or not blocks:
        where = top["layers"] or " / ".join(TOP_ROLES["layers"])
        raise NoLayersError(
            f"{type(model).__name__} has no decoder layers at {where} (looked for model.layers, "
            f"model.h; its children: {children(model)}); describe its layout with the config "
            f"key model.anatomy, e.g. {EXAMPLE}"
        )
    block = blocks[0]
    layer: dict[str, str | None] = {}
    for role, candidates in LAYER_ROLES.items():
        if role in given:
            layer[role] = given[role]
        elif role in NORM_ROLES:
            layer[role] = _norm_path(block, table, role)
        else:
            layer[role] = _first(block, candidates, layer)
    if layer["q_proj"] is not None:
        layer["qkv_proj"] = given.get("qkv_proj")
    if layer["gate_up_proj"] is not None and "gate_proj" not in given:
        layer["gate_proj"] = layer["up_proj"] = None
    settings: dict[str, Any] = {k: table[k] for k in ("activation", "embed_scale") if k in table}
    settings.update({k: v for k, v in given.items() if k in SETTINGS})
    return Layout(arch, top, layer, settings, given)


def _norm_path(block: Any, table: Mapping[str, Any], role: str) -> str | None:
    """A norm's path: the architecture table's, else llama's placement when the block has
    exactly llama's two norms (the explicit forwards check themselves against the block)."""
    norms = table.get("norms")
    if norms is None:
        names = {k for k in block if k.endswith(("norm", "layernorm"))}
        norms = _PRE if names == set(_PRE.values()) else {}
    path = norms.get(role)
    return path if find(block, path) is not None else None


def embed_scaler(layout: Layout, d_model: int | None) -> Callable[[mx.array], mx.array] | None:
    """The multiplication the body applies to the token embeddings (Gemma: sqrt(d_model),
    gemma3 rounded to bfloat16), exactly as the model computes it; None when there is none."""
    scale = layout.settings.get("embed_scale")
    if scale is None:
        return None
    if d_model is None:
        raise AnatomyError(f"embed_scale {scale!r} needs the model's d_model (the embedding width)")
    if scale == "sqrt_d":
        value = float(d_model) ** 0.5
        return lambda h: h * value
    if scale == "sqrt_d_bf16":
        value = mx.array(float(d_model) ** 0.5, mx.bfloat16)
        return lambda h: h * value.astype(h.dtype)
    number = float(scale)
    if not math.isfinite(number):
        raise AnatomyError(f"model.anatomy.embed_scale must be finite, not {scale!r}")
    return lambda h: h * number


def residual_add(layout: Layout, block: Any) -> Callable[[mx.array, mx.array], mx.array]:
    """How the block adds to its residual: gemma3's float16-clipping add, else ``x + y``."""
    if layout.arch == "gemma3_text":
        clip = getattr(sys.modules.get(type(block).__module__), "clip_residual", None)
        if clip is not None:
            return clip
    return operator.add


def activation(name: str | None) -> Callable[[mx.array], mx.array] | None:
    """The MLP's activation function by name (silu, gelu, gelu_approx, relu)."""
    import mlx.nn as nn

    table = {"silu": nn.silu, "gelu": nn.gelu, "gelu_approx": nn.gelu_approx, "relu": nn.relu}
    return table.get(name) if name else None
