"""Site names: one scheme for every place a value is recorded or edited.

A :class:`Site` is ``(layer, kind)``. Kinds in forward order, with the canonical name
(``layers.{i}`` + suffix), the TransformerLens hook (``blocks.{i}.`` + name) and the value
per position:

| kind | name suffix | TransformerLens | value |
| --- | --- | --- | --- |
| ``embed`` | (``embed``) | ``hook_embed`` | ``[d_model]`` |
| ``resid_pre`` | ``.resid_pre`` | ``hook_resid_pre`` | ``[d_model]`` |
| ``q``, ``k``, ``v`` | ``.attn.q`` ... | ``attn.hook_q`` ... | ``[heads, head_dim]`` |
| ``attn_scores`` | ``.attn.scores`` | ``attn.hook_attn_scores`` | ``[heads, key]`` |
| ``pattern`` | ``.attn.pattern`` | ``attn.hook_pattern`` | ``[heads, key]`` |
| ``z`` | ``.attn.heads`` | ``attn.hook_z`` | ``[n_heads, head_dim]`` |
| ``attn_out`` | ``.attn`` | ``hook_attn_out`` | ``[d_model]`` |
| ``resid_mid`` | ``.resid_mid`` | ``hook_resid_mid`` | ``[d_model]`` |
| ``mlp_pre`` | ``.mlp.pre`` | ``mlp.hook_pre`` | ``[d_mlp]`` |
| ``mlp_pre_linear`` | ``.mlp.pre_linear`` | ``mlp.hook_pre_linear`` | ``[d_mlp]`` |
| ``mlp_post`` | ``.mlp.post`` | ``mlp.hook_post`` | ``[d_mlp]`` |
| ``mlp_out`` | ``.mlp`` | ``hook_mlp_out`` | ``[d_model]`` |
| ``resid_post`` | (none) | ``hook_resid_post`` | ``[d_model]`` |
| ``logits`` | (``logits``) | (the output) | ``[vocab]`` |

The old kinds ``resid``, ``attn``, ``mlp``, ``heads`` are the same sites as ``resid_post``,
``attn_out``, ``mlp_out``, ``z``, and the old names (``layers.8``, ``layers.8.attn`` or
``self_attn``, ``layers.8.mlp``, ``layers.8.attn.heads``) stay the canonical names of those
four. Shorthand pairs ``("pattern", 5)`` and TransformerLens's ``("pre", 5)``/``("post",
5)`` work too; layers may be negative everywhere (-1: the last layer).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from mlx_interp.errors import ConfigError

__all__ = ["KINDS", "SHORTHAND", "SITE_KINDS", "Site", "SiteError", "kind_of", "parse_site"]

KINDS = (  # forward order within a layer
    "embed",
    "resid_pre",
    "q",
    "k",
    "v",
    "attn_scores",
    "pattern",
    "z",
    "attn_out",
    "resid_mid",
    "mlp_pre",
    "mlp_pre_linear",
    "mlp_post",
    "mlp_out",
    "resid_post",
    "logits",
)
OLD_KINDS = {"resid": "resid_post", "attn": "attn_out", "mlp": "mlp_out", "heads": "z"}
SITE_KINDS = (*OLD_KINDS, *KINDS)  # every kind Site accepts
_SUFFIX = {
    "resid_pre": ".resid_pre",
    "q": ".attn.q",
    "k": ".attn.k",
    "v": ".attn.v",
    "attn_scores": ".attn.scores",
    "pattern": ".attn.pattern",
    "z": ".attn.heads",
    "attn_out": ".attn",
    "resid_mid": ".resid_mid",
    "mlp_pre": ".mlp.pre",
    "mlp_pre_linear": ".mlp.pre_linear",
    "mlp_post": ".mlp.post",
    "mlp_out": ".mlp",
    "resid_post": "",
}
_BY_SUFFIX = {suffix: kind for kind, suffix in _SUFFIX.items()}
_BY_SUFFIX.update({".self_attn": "attn_out", ".self_attn.heads": "z", ".resid_post": "resid_post"})
_BY_SUFFIX.update({f".self_attn.{s}": k for s, k in (("q", "q"), ("k", "k"), ("v", "v"))})
_BY_SUFFIX.update({".self_attn.scores": "attn_scores", ".self_attn.pattern": "pattern"})
_TL = {  # TransformerLens hook name (after blocks.{i}.) -> kind
    "hook_resid_pre": "resid_pre",
    "hook_resid_mid": "resid_mid",
    "hook_resid_post": "resid_post",
    "hook_attn_out": "attn_out",
    "hook_mlp_out": "mlp_out",
    "attn.hook_q": "q",
    "attn.hook_k": "k",
    "attn.hook_v": "v",
    "attn.hook_rot_q": "q",  # ours are after rope: TL's hook_q is before it
    "attn.hook_rot_k": "k",
    "attn.hook_z": "z",
    "attn.hook_attn_scores": "attn_scores",
    "attn.hook_pattern": "pattern",
    "mlp.hook_pre": "mlp_pre",
    "mlp.hook_pre_linear": "mlp_pre_linear",
    "mlp.hook_post": "mlp_post",
}
SHORTHAND = {  # (kind, layer) pairs and bare kinds, as TransformerLens's cache takes them
    **{kind: kind for kind in KINDS},
    "pre": "mlp_pre",
    "post": "mlp_post",
    "pre_linear": "mlp_pre_linear",
    "scores": "attn_scores",
    "rot_q": "q",
    "rot_k": "k",
}
_PATTERN = re.compile(r"^(?:model\.)?layers\.(-?\d+)((?:\.\w+)*)$")
_TL_PATTERN = re.compile(r"^blocks\.(-?\d+)\.((?:attn\.|mlp\.)?hook_\w+)$")
EXAMPLES = (
    "layers.8, layers.8.attn (or self_attn), layers.8.mlp, layers.8.attn.heads, "
    "layers.8.attn.pattern, layers.8.mlp.post, embed, logits, blocks.8.hook_resid_post, "
    "blocks.8.attn.hook_pattern, blocks.8.mlp.hook_post, or ('resid_post', 8)"
)


class SiteError(ConfigError):
    """A site name that does not parse, or a site this model's layers do not have."""


@dataclass(frozen=True)
class Site:
    """A place in the network: decoder ``layer`` and ``kind`` (:data:`KINDS`; the old
    kinds ``resid``, ``attn``, ``mlp``, ``heads`` are kept as their new names).
    ``embed`` belongs to layer 0 and ``logits`` to the last layer."""

    layer: int
    kind: str = "resid_post"

    def __post_init__(self) -> None:
        if self.kind not in SITE_KINDS:
            raise SiteError(
                f"unknown site kind {self.kind!r}; valid: {', '.join(SITE_KINDS)} (the first "
                "four are the old names of resid_post, attn_out, mlp_out, z)"
            )
        object.__setattr__(self, "kind", OLD_KINDS.get(self.kind, self.kind))

    @property
    def name(self) -> str:
        """Canonical name, e.g. ``layers.8.mlp`` (the key of recorded values)."""
        if self.kind in ("embed", "logits"):
            return self.kind
        return f"layers.{self.layer}{_SUFFIX[self.kind]}"

    @property
    def order(self) -> tuple[int, int]:
        """Where the site comes in a forward: (layer, position of its kind in the layer)."""
        return self.layer, KINDS.index(self.kind)

    def __lt__(self, other: Site) -> bool:
        return self.order < other.order

    def __str__(self) -> str:
        return self.name


def kind_of(name: Any) -> str | None:
    """The kind a bare string names (``resid_post``, ``resid``, ``pattern``, ``post``...)."""
    if not isinstance(name, str):
        return None
    return SHORTHAND.get(name) or OLD_KINDS.get(name)


def parse_site(name: str | Site | tuple[str, int]) -> Site:
    """``"layers.8.mlp"``, ``"blocks.8.hook_mlp_out"`` or ``("mlp_out", 8)`` -> ``Site(8,
    "mlp_out")``; ``"embed"``/``"hook_embed"`` and ``"logits"`` name the ends of the model.

    The layer may be negative (counted from the end; resolved by ``resolve_sites``).
    """
    if isinstance(name, Site):
        return name
    if isinstance(name, tuple) and len(name) == 2:
        kind, layer = name
        if kind not in SHORTHAND or isinstance(layer, bool) or not isinstance(layer, int):
            raise SiteError(
                f"cannot parse site {name!r}: a pair is (kind, layer) with kind one of "
                f"{', '.join(SHORTHAND)} and an int layer; valid forms: {EXAMPLES}"
            )
        return Site(layer, SHORTHAND[kind])
    if not isinstance(name, str):
        raise SiteError(f"a site is a name like 'layers.8.mlp', got {type(name).__name__}")
    text = name.strip()
    if text in ("embed", "hook_embed"):
        return Site(0, "embed")
    if text == "logits":
        return Site(-1, "logits")
    tl = _TL_PATTERN.match(text)
    if tl is not None and tl.group(2) in _TL:
        return Site(int(tl.group(1)), _TL[tl.group(2)])
    match = _PATTERN.match(text)
    named = _BY_SUFFIX.get(match.group(2)) if match is not None else None
    if match is None or named is None:
        raise SiteError(f"cannot parse site {name!r}; valid forms: {EXAMPLES}")
    return Site(int(match.group(1)), named)
