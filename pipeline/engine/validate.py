"""One place that checks the composed config before any stage runs.

Hydra and the dataclass schema (``pipeline/engine/schema.py``) catch unknown keys and values
that cannot be converted; this module catches the rest: choices (every schema field declared
``Annotated[str, <Choice enum>]``, found by walking the schema), ranges (negative, zero, NaN,
inf), values typed ``Any`` in the schema (``steer.layer``), keys added with ``+key=`` that the
schema does not know, templates, and rules across keys (``model.path`` with a source that
ignores it). Stages trust what passed: they do not check a value again.
Every message names the key, the value and a valid example; the first problem found is raised
as :class:`~mlx_interp.errors.ConfigError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import string
from collections.abc import Callable, Mapping
from typing import Any

from mlx_interp.engine.inputs import choice_fields
from mlx_interp.engine.schema import PATCH_KINDS, RootConfig, VariantKind
from mlx_interp.errors import ConfigError

Check = Callable[[Any], bool]

FREE_FORM = {  # schema fields whose value is a user mapping: their keys are data, not config
    "directions.contrast",
    "directions.method",
    "score.scorer",
    "score.swap",
    "steer.mode",
    "probes.probe",
    "probes.contrasts",
    "probes.transfer",
    "probes.directions",
    "probes.pairs",
    "report.reference",
    "concept.fewshot",
}


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def at_least(low: int) -> Check:
    return lambda v: is_int(v) and v >= low


def in_open_unit(v: Any) -> bool:
    return is_number(v) and 0 < v < 1


def layer_list(v: Any) -> bool:
    """null, or a non-empty list of ints."""
    return v is None or (isinstance(v, list) and len(v) > 0 and all(is_int(x) for x in v))


def one_or_more_layers(v: Any) -> bool:
    return is_int(v) or (isinstance(v, list) and len(v) > 0 and all(is_int(x) for x in v))


def one_of(*values: Any) -> Check:
    return lambda v: v in values


def list_of(*values: Any) -> Check:
    return lambda v: isinstance(v, list) and all(x in values for x in v)


def template_with_text(v: Any) -> bool:
    return isinstance(v, str) and template_fields(v) == ["text"]


def template_fields(text: str) -> list[str]:
    """The distinct ``{field}`` names of a str.format template (raises on a malformed one)."""
    names = [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]
    return sorted(set(names))


def choice_rules() -> dict[str, tuple[Check, str, str]]:
    """A rule per choice field of the schema: the value (or each item of a list) is one of
    its enum's values; null passes (Hydra already refused it where the field is not Optional).
    The example is the enum's first value."""
    rules = {}
    for key, choice, many in choice_fields(RootConfig):
        values = choice.values()
        if many:
            rules[key] = (list_of(*values), f"a list of {values}", f"{key}=[{values[0]}]")
        else:
            rules[key] = (one_of(None, *values), f"one of {values}", f"{key}={values[0]}")
    return rules


# key -> (check, what a valid value is, an example). Keys absent from the config are skipped.
# Choice fields get theirs from the schema (choice_rules); a rule here replaces that one.
RULES: dict[str, tuple[Check, str, str]] = {
    "seed": (at_least(0), "an int >= 0", "seed=42"),
    "model.dequantize": (
        lambda v: isinstance(v, bool) or str(v).lower() in ("auto", "true", "false"),
        "auto, true or false",  # `model.dequantize=false` arrives as the string "False"
        "model.dequantize=auto",
    ),
    "prompts.test_fraction": (
        lambda v: is_number(v) and 0 <= v < 1,
        "a number in [0, 1)",
        "prompts.test_fraction=0.2",
    ),
    "concept.instruction": (
        template_with_text,
        "a template holding {text} and no other {field}",
        "concept.instruction='Q: {text}'",
    ),
    "concept.fewshot": (
        lambda v: (
            isinstance(v, list)
            and all(isinstance(x, dict) and {"text", "answer"} <= set(x) for x in v)
        ),
        "a list of {text, answer} examples",
        "concept.fewshot=[{text: 'What colour is grass?', answer: green}]",
    ),
    "capture.layers": (
        layer_list,
        "null (all) or a non-empty list of ints",
        "capture.layers=[0,8,-1]",
    ),
    "localize.kinds": (
        lambda v: isinstance(v, list) and len(v) > 0 and all(k in PATCH_KINDS for k in v),
        f"a non-empty list of {PATCH_KINDS} (the residual after a layer, the attention output, "
        "the MLP output)",
        "localize.kinds=[resid,attn,mlp]",
    ),
    "localize.max_pairs": (
        at_least(2),
        "an int >= 2 (the most clean/corrupted pairs patched; patching needs two)",
        "localize.max_pairs=24",
    ),
    "model.tiny.hidden_size": (
        lambda v: is_int(v) and v > 0 and v % 8 == 0,
        "a positive multiple of 8 (4 attention heads of an even width)",
        "model.tiny.hidden_size=32",
    ),
    "model.tiny.num_layers": (at_least(1), "an int >= 1", "model.tiny.num_layers=4"),
    "model.tiny.intermediate_size": (
        at_least(1),
        "an int >= 1",
        "model.tiny.intermediate_size=64",
    ),
    "model.tiny.seed": (at_least(0), "an int >= 0", "model.tiny.seed=0"),
    "pipeline.stages": (
        lambda v: isinstance(v, list) and len(v) > 0 and all(isinstance(s, str) for s in v),
        "a non-empty list of stage names (the targets; their upstream stages run too)",
        "pipeline.stages=[report]",
    ),
    "concept.dataset": (
        lambda v: isinstance(v, str) and bool(v.strip()),
        "a path to a JSONL file (relative to the working directory or the project root)",
        "concept.dataset=datasets/color_swap.jsonl",
    ),
    "concept.extra_datasets": (
        lambda v: isinstance(v, list) and all(isinstance(p, str) and p.strip() for p in v),
        "a list of paths to JSONL files",
        "concept.extra_datasets=[datasets/sycophancy_3way.jsonl]",
    ),
    "capture.batch_size": (at_least(1), "an int >= 1", "capture.batch_size=16"),
    "capture.max_tokens": (
        lambda v: v is None or at_least(1)(v),
        "null (the model's context) or an int >= 1",
        "capture.max_tokens=2048",
    ),
    "score.batch_size": (at_least(1), "an int >= 1", "score.batch_size=16"),
    "score.max_tokens": (at_least(1), "an int >= 1 (answers are scored)", "score.max_tokens=8"),
    "score.fluency.n_prompts": (at_least(0), "an int >= 0 (0 = off)", "score.fluency.n_prompts=6"),
    "score.fluency.max_tokens": (at_least(1), "an int >= 1", "score.fluency.max_tokens=32"),
    "score.fluency.instruction": (
        template_with_text,
        "a template holding {text} and no other {field}",
        "score.fluency.instruction='{text} Describe it.'",
    ),
    "score.fluency.ngram": (at_least(1), "an int >= 1", "score.fluency.ngram=3"),
    "score.fluency.max_period": (at_least(1), "an int >= 1", "score.fluency.max_period=10"),
    "score.fluency.min_repeats": (at_least(2), "an int >= 2", "score.fluency.min_repeats=3"),
    "steer.layer": (
        one_or_more_layers,
        "an int or a non-empty list of ints",
        "steer.layer=12 or steer.layer=[8,12]",
    ),
    "steer.alpha": (
        lambda v: is_number(v) and abs(v) <= 1e3,
        "a finite number with |alpha| <= 1000 (beyond it float32 activations overflow)",
        "steer.alpha=1.5",
    ),
    "steer.n_random": (at_least(0), "an int >= 0 (0 = no random baseline)", "steer.n_random=10"),
    "steer.confirm_n": (
        at_least(0),
        "an int >= 0 (0 = no greedy confirmation; at least the questions = every one)",
        "steer.confirm_n=24",
    ),
    "directions.gate": (
        lambda v: (
            v is None
            or (
                isinstance(v, dict)
                and is_int(v.get("layer"))
                and set(v) <= {"measured", "layer", "C", "method"}
                and v.get("measured", "object") in ("last", "object")
                and v.get("method", "probe") in ("probe", "unembed", "lens")
                and is_number(v.get("C", 1.0))
                and v.get("C", 1.0) > 0
            )
        ),
        "null or {measured: last|object, layer: <int>, C: <number > 0>, "
        "method: probe|unembed|lens}",
        "directions.gate={measured: object, layer: 12}",
    ),
    "directions.heads": (
        lambda v: v is None or at_least(1)(v) or (isinstance(v, list) and layer_list(v)),
        "null (all heads), k >= 1 (the k heads writing most of the difference) or a list",
        "directions.heads=2",
    ),
    "sweep.folds": (at_least(2), "an int >= 2", "sweep.folds=3"),
    "sweep.n_random": (at_least(0), "an int >= 0", "sweep.n_random=3"),
    "sweep.loop_prompts": (at_least(1), "an int >= 1", "sweep.loop_prompts=20"),
    "sweep.top": (at_least(1), "an int >= 1", "sweep.top=6"),
    "sweep.max_checks": (at_least(1), "an int >= 1", "sweep.max_checks=20"),
    "probes.folds": (at_least(2), "an int >= 2", "probes.folds=5"),
    "probes.n_permutations": (at_least(0), "an int >= 0 (0 = skip)", "probes.n_permutations=100"),
    "probes.alpha": (in_open_unit, "a number in (0, 1)", "probes.alpha=0.05"),
    "probes.layers": (layer_list, "null (all) or a non-empty list of ints", "probes.layers=[4,8]"),
    "probes.n_bootstrap": (at_least(1), "an int >= 1", "probes.n_bootstrap=1000"),
    "contamination.layers": (
        layer_list,
        "null (all) or a non-empty list of ints",
        "contamination.layers=[4,8]",
    ),
    "contamination.layer": (
        lambda v: v is None or is_int(v),
        "null or an int",
        "contamination.layer=8",
    ),
    "contamination.reference": (
        lambda v: isinstance(v, str) and bool(v),
        "a variant name",
        "contamination.reference=clean",
    ),
    "contamination.compare": (
        lambda v: (
            isinstance(v, list)
            and all(
                isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p)
                for p in v
            )
        ),
        "a list of [variant, variant] pairs",
        "contamination.compare=[[rubric,padding]]",
    ),
    "contamination.n_bootstrap": (at_least(1), "an int >= 1", "contamination.n_bootstrap=1000"),
    "contamination.confidence": (
        in_open_unit,
        "a number in (0, 1)",
        "contamination.confidence=0.95",
    ),
    "concept.variants.kinds": (
        lambda v: isinstance(v, list) and len(v) > 0 and set(v) <= set(VariantKind.values()),
        "a non-empty list of clean, rubric, padding, wrong_rubric",
        "concept.variants.kinds=[clean,rubric]",
    ),
    "concept.variants.placement": (
        one_of("before", "after"),
        "before or after",
        "concept.variants.placement=after",
    ),
    "concept.conditions": (
        lambda v: (
            v is None
            or (
                isinstance(v, list)
                and len(v) > 0
                and len(set(v)) == len(v)
                and all(isinstance(c, str) and c.strip() for c in v)
            )
        ),
        "null (all) or a non-empty list of distinct names",
        "concept.conditions=[green,red]",
    ),
}


def lookup(cfg: Mapping, dotted: str) -> tuple[bool, Any]:
    """(present, value) of a dotted key."""
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def validate_config(cfg: Mapping) -> None:
    """Raise ConfigError for the first value of ``cfg`` (the resolved root config as plain
    containers) that no stage could use correctly."""
    unknown_keys(cfg)
    for key, (check, valid, example) in {**choice_rules(), **RULES}.items():
        present, value = lookup(cfg, key)
        if present and not _passes(check, value):
            raise ConfigError(f"{key} must be {valid}, not {value!r}; e.g. {example}")
    model_path_rule(cfg.get("model") or {})


def _passes(check: Check, value: Any) -> bool:
    try:
        return bool(check(value))
    except (ValueError, TypeError):  # e.g. a malformed "{" template
        return False


def model_path_rule(model: Mapping) -> None:
    """``model.path`` is read by sources gguf and mlx_lm only: given with another source it
    would be silently ignored, so it is an error that says which model group reads it."""
    source, path = model.get("source"), model.get("path")
    if path in (None, "") or source in ("gguf", "mlx_lm"):
        return
    group = "gguf" if str(path).lower().endswith(".gguf") else "qwen2_5_7b_instruct_4bit"
    hint = (
        f"model=gguf model.path={path}"
        if group == "gguf"
        else f"model.source=mlx_lm model.path={path} (an mlx-lm folder or Hugging Face id)"
    )
    raise ConfigError(
        f"model.path={path} is given but model.source={source} does not read a path, so the "
        f"run would silently use another model; use {hint}"
    )


def unknown_keys(cfg: Mapping) -> None:
    """Keys the schema does not define (``+steer.alpah=1`` passes Hydra's own check)."""
    from mlx_interp.engine.schema import RootConfig

    problem = _unknown_under(cfg, RootConfig, "")
    if problem:
        raise ConfigError(problem)


def _unknown_under(node: Any, schema: type, prefix: str) -> str | None:
    if not isinstance(node, Mapping) or not dataclasses.is_dataclass(schema):
        return None
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if key == "hydra" and not prefix:
            continue
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"did you mean {prefix}{close[0]}?" if close else f"known: {sorted(fields)}"
            return (
                f"unknown config key {dotted} (given as {dotted}={value!r}, perhaps with +); "
                f"{hint} Remove it or fix the spelling"
            )
        if dotted in FREE_FORM:
            continue
        sub = _dataclass_of(fields[key])
        if sub is not None:
            problem = _unknown_under(value, sub, f"{dotted}.")
            if problem:
                return problem
    return None


def _dataclass_of(field: dataclasses.Field) -> type | None:
    """The dataclass type of a schema field (``X`` or ``X | None``), else None."""
    from mlx_interp.engine import schema

    text = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
    for name in str(text).replace(" ", "").split("|"):
        cls = getattr(schema, name, None)
        if isinstance(cls, type) and dataclasses.is_dataclass(cls):
            return cls
    return None
