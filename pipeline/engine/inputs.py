"""A stage's typed inputs, built from the plain config its cache key is computed from.

A stage declares its inputs as a frozen dataclass whose fields are top-level config keys
typed by the schema (``model: ModelConfig``, ``score: ScoreConfig``, ``seed: int``). The
runner slices the resolved plain config by those field names (that slice is what the cache
key hashes) and turns the slice into the dataclass here: nested schema dataclasses are built
field by field (like mlx-lm's ``ModelArgs.from_dict``), a :class:`~mlx_interp.engine.schema.
Choice` field becomes its enum member, and everything else (numbers, lists, free-form
mappings) is kept as given. So the stage sees exactly what was hashed, with attributes
instead of keys.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from mlx_interp.engine.schema import Choice
from mlx_interp.errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")  # a schema dataclass

__all__ = ["choice_fields", "input_keys", "typed"]


def input_keys(inputs: type) -> tuple[str, ...]:
    """The config keys a stage's inputs dataclass reads: its field names, in order."""
    if not (isinstance(inputs, type) and dataclasses.is_dataclass(inputs)):
        raise TypeError(f"a stage's inputs must be a frozen dataclass type, not {inputs!r}")
    params = getattr(inputs, "__dataclass_params__", None)
    if params is None or not params.frozen:  # a stage must not change what it was given
        raise TypeError(f"a stage's inputs must be frozen: @dataclass(frozen=True) {inputs}")
    return tuple(f.name for f in dataclasses.fields(inputs))


def typed(cls: type[T], plain: Mapping[str, Any], where: str = "") -> T:
    """``cls`` (a dataclass) built from the plain mapping ``plain``; keys absent from it take
    the dataclass defaults. ``where``: the dotted config key of ``plain``, for messages."""
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in plain:
            kwargs[f.name] = _convert(hints[f.name], plain[f.name], f"{where}{f.name}")
    return cls(**kwargs)


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        value = _convert(args[0], value, where)
        choice = next((m for m in args[1:] if _is_choice(m)), None)
        if choice is None or value is None:
            return value
        try:
            return choice(value)
        except ValueError:
            raise ConfigError(
                f"{where} must be one of {choice.values()}, not {value!r}; "
                f"e.g. {where}={choice.values()[0]}"
            ) from None
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where) if len(inner) == 1 else value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
        return typed(tp, value, f"{where}.")
    if origin is list and args and isinstance(value, list):
        return [_convert(args[0], v, where) for v in value]
    return value


def _is_choice(meta: Any) -> bool:
    return isinstance(meta, type) and issubclass(meta, Choice)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def choice_fields(schema: type, prefix: str = "") -> Iterator[tuple[str, type[Choice], bool]]:
    """(dotted key, Choice enum, is a list) of every choice field under the dataclass
    ``schema``, nested dataclasses included: what the validator checks."""
    hints = _hints(schema)
    for f in dataclasses.fields(schema):
        tp, many = _optional_of(hints[f.name]), False
        if typing.get_origin(tp) is list:
            tp, many = _optional_of(typing.get_args(tp)[0]), True
        if typing.get_origin(tp) is typing.Annotated:
            choice = next((m for m in typing.get_args(tp)[1:] if _is_choice(m)), None)
            if choice is not None:
                yield f"{prefix}{f.name}", choice, many
        elif isinstance(tp, type) and dataclasses.is_dataclass(tp):
            yield from choice_fields(tp, f"{prefix}{f.name}.")


def _optional_of(tp: Any) -> Any:
    """``X`` of ``X | None``; any other type as it is."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) == 1:
            return inner[0]
    return tp
