"""One factory for the swappable parts: steering modes, direction methods, scorers, probes.

Each kind keeps a :class:`Registry` (its names, its error type, what an object of the kind
must provide); :func:`build` makes one from a registered name, a Hydra ``_target_`` config,
a class, or an object of the kind, and every kind fails with the same one-line message
shapes (unknown name, config without ``_target_``, a constructor that refuses its
arguments, an object of the wrong kind).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Registry", "build"]


@dataclass(frozen=True)
class Registry:
    """The names of one kind of part (name -> class or zero-argument factory).

    Attributes: ``what`` (``"steering mode"``), ``plural`` (``"modes"``), ``names``,
    ``error`` (the exception type to raise), ``accepts`` (whether an object is of the kind),
    ``adapt`` (turns a near miss, e.g. a plain function, into one; None when it cannot),
    ``example`` (a ``_target_`` for messages).
    """

    what: str
    plural: str
    names: Mapping[str, Callable[[], Any]]
    error: type[Exception]
    accepts: Callable[[Any], bool]
    example: str
    adapt: Callable[[Any], Any] | None = field(default=None)

    def valid(self) -> str:
        return ", ".join(self.names)


def _instantiate(spec: Mapping, registry: Registry) -> Any:
    from hydra.utils import instantiate

    try:
        return instantiate(spec, _convert_="all")
    except Exception as err:
        cause: BaseException = err
        while cause.__cause__ is not None:  # Hydra wraps the constructor's own error
            cause = cause.__cause__
        raise registry.error(
            f"cannot build the {registry.what} {dict(spec)}: {cause}; valid {registry.plural}: "
            f"{registry.valid()}"
        ) from err


def build(spec: Any, registry: Registry) -> Any:
    """A part of ``registry``'s kind from a name, a ``_target_`` config, a class or an
    object; ``registry.error`` with a one-line message otherwise."""
    if isinstance(spec, str):
        if spec not in registry.names:
            raise registry.error(
                f"unknown {registry.what} {spec!r}; valid {registry.plural}: {registry.valid()} "
                "(choose one of these, or a config with `_target_`)"
            )
        made = registry.names[spec]()
    elif isinstance(spec, Mapping):
        if "_target_" not in spec:
            raise registry.error(
                f"a {registry.what} config needs a `_target_` (e.g. {registry.example}); or "
                f"use a name: {registry.valid()}"
            )
        made = _instantiate(spec, registry)
    elif isinstance(spec, type):
        made = spec()
    else:
        made = spec
    if registry.accepts(made):
        return made
    adapted = registry.adapt(made) if registry.adapt is not None else None
    if adapted is not None:
        return adapted
    raise registry.error(
        f"a {registry.what} must be a name ({registry.valid()}), a config with `_target_` "
        f"(e.g. {registry.example}) or a {registry.what} object; got {type(made).__name__}"
    )
