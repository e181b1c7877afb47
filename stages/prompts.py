"""Stage `prompts`: a dataset file + concept config -> prompts.parquet.

Columns: prompt_id, condition, label, text, chat_text, tokens (list<int32>), n_tokens,
split, answer, meta, base_id, variant. ``chat_text`` is exactly what the model reads (chat
template applied).

Two concept options shape the text:
- ``response_key``: the dataset row's reply (that meta key) is rendered as the assistant's
  turn, and the text ends where the reply ends (no end-of-turn token), so the last token is
  the reply's own last token.
- ``variants``: each row becomes one prompt per kind: ``clean`` (the task alone), ``rubric``
  (its condition's rubric before the task), ``wrong_rubric`` (the next condition's rubric, in
  sorted order), ``padding`` (random common words with the same token count as its rubric).
  ``base_id`` ties the variants of one row together.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mlx_interp.engine.cache import file_sha256
from mlx_interp.engine.dag import ConfigError, Stage
from mlx_interp.engine.schema import ConceptConfig, ModelConfig, PromptsConfig, VariantsConfig
from mlx_interp.io.datasets import DatasetError, read_jsonl, resolve_dataset_path
from mlx_interp.io.prompts import render
from mlx_interp.models.loading import load_model, model_fingerprint

log = logging.getLogger(__name__)

# Content-neutral words for the padding variant (no grading, rubric or task vocabulary).
PADDING_WORDS = (
    "apple river window garden pencil cloud table morning bottle orange yellow silver "
    "mountain bicycle kitchen letter forest candle pocket ladder harbor blanket button "
    "carpet basket mirror pillow hammer island marble meadow paper pepper rabbit saddle "
    "shadow spoon tunnel violin wagon walnut whistle anchor barrel castle cherry copper "
    "desert feather glove honey jacket kettle lantern lemon magnet needle ocean parrot "
    "pebble pumpkin ribbon rocket sandal shell sponge sugar thunder tiger tomato towel "
    "trumpet umbrella valley velvet wheel willow wool yarn zebra cotton dolphin engine "
    "fabric falcon fountain ginger granite helmet jungle kitten lizard meadow napkin"
).split()


def select_conditions(df: pd.DataFrame, conditions: list[str] | None, path: Path) -> list[str]:
    """The conditions to keep, in label order; each must have rows."""
    present = sorted(df["condition"].unique())
    if not conditions:
        return present
    unknown = [c for c in present if c not in conditions]
    typos = {c: closest_condition(c, conditions) for c in unknown}
    typos = {c: near for c, near in typos.items() if near}
    if typos:
        counts = df["condition"].value_counts()
        listed = ", ".join(
            f"{c!r} ({counts[c]} rows; closest known: {n!r})" for c, n in typos.items()
        )
        raise DatasetError(
            f"{path}: condition(s) not in concept.conditions {list(conditions)}: {listed}; "
            "fix the spelling in the dataset, or add them to concept.conditions"
        )
    if unknown:  # other conditions: an intended subset, said in the log and the summary
        log.info("prompts: rows of conditions %s are left out (not in concept.conditions)", unknown)
    empty = [c for c in conditions if c not in present]
    if empty:
        raise DatasetError(
            f"{path}: condition(s) {empty} have no rows (conditions in the file: {present}); "
            "fix concept.conditions or the dataset"
        )
    return list(conditions)


def closest_condition(name: str, known: list[str]) -> str | None:
    """The known condition ``name`` is probably a typo of (case, spaces, a letter or two)."""
    for cond in known:
        if cond.strip().casefold() == name.strip().casefold():
            return cond
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
    return close[0] if close else None


@dataclass(frozen=True)
class PromptsInputs:
    concept: ConceptConfig
    prompts: PromptsConfig
    model: ModelConfig  # its tokenizer and prompt format
    seed: int


def assign_splits(df: pd.DataFrame, test_fraction: float, seed: int) -> pd.Series:
    """Keep given splits; mark ``test_fraction`` (in [0, 1)) of each condition's other rows
    as test."""
    split = df["split"].fillna("train").astype(str)
    if test_fraction == 0:
        return split
    rng = np.random.default_rng(seed)
    for _, group in df[df["split"].isna()].groupby("condition", sort=True):
        n_test = int(round(test_fraction * len(group)))
        chosen = rng.choice(group.index.to_numpy(), size=n_test, replace=False)
        split.loc[chosen] = "test"
    return split


def read_rubrics(path: Path, conditions: list[str]) -> dict[str, str]:
    """{condition: rubric} from a JSON file; every condition needs a non-empty rubric."""
    try:
        rubrics = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from err
    if not isinstance(rubrics, dict):
        raise DatasetError(f"{path}: expected a JSON object {{condition: rubric text}}")
    missing = [c for c in conditions if not isinstance(rubrics.get(c), str) or not rubrics[c]]
    if missing:
        raise DatasetError(
            f"{path}: no rubric for condition(s) {missing} (has {sorted(rubrics)}); add them "
            "or fix concept.conditions"
        )
    return {c: rubrics[c] for c in conditions}


def padding_like(tokenizer, target: str, seed: int) -> str:
    """Random common words whose token count equals that of ``target`` (seeded).

    Words are drawn until the count reaches the target; if the last word overshoots, other
    last words are tried in a seeded order. If none fits exactly (rare), the closest count not
    above the target is kept; the prompts table records every prompt's token count.
    """
    n_target = len(tokenizer.encode(target, add_special_tokens=False))
    rng = np.random.default_rng(seed)

    def count(ws: list[str]) -> int:
        return len(tokenizer.encode(" ".join(ws), add_special_tokens=False))

    words: list[str] = []
    while count(words) < n_target:
        words.append(str(rng.choice(PADDING_WORDS)))
    if count(words) > n_target:
        head = words[:-1]
        for word in rng.permutation(PADDING_WORDS):
            if count([*head, str(word)]) == n_target:
                words = [*head, str(word)]
                break
        else:
            words = head
    return " ".join(words)


def expand_variants(
    df: pd.DataFrame, variants: VariantsConfig, conditions: list[str], tokenizer, seed: int
) -> pd.DataFrame:
    """One row per (dataset row, kind): text with the rubric, padding or nothing added."""
    kinds = list(variants.kinds)
    placement, sep = variants.placement, variants.separator
    rubrics = read_rubrics(
        resolve_dataset_path(variants.rubrics, "concept.variants.rubrics"), conditions
    )
    order = sorted(rubrics)
    if "wrong_rubric" in kinds and len(order) < 2:
        raise DatasetError("wrong_rubric needs rubrics for at least 2 conditions")
    wrong = {c: order[(order.index(c) + 1) % len(order)] for c in order}
    pad_cache: dict[tuple[str, int], str] = {}
    rows = []
    for row in df.to_dict("records"):
        cond = row["condition"]
        for kind in kinds:
            if kind == "clean":
                extra = None
            elif kind == "rubric":
                extra = rubrics[cond]
            elif kind == "wrong_rubric":
                extra = rubrics[wrong[cond]]
            else:
                pad_seed = seed * 1_000_003 + zlib.crc32(row["id"].encode())
                key = (cond, pad_seed)
                if key not in pad_cache:
                    pad_cache[key] = padding_like(tokenizer, rubrics[cond], pad_seed)
                extra = pad_cache[key]
            text = row["text"]
            if extra is not None:
                text = f"{extra}{sep}{text}" if placement == "before" else f"{text}{sep}{extra}"
            rows.append(
                {
                    **row,
                    "id": f"{row['id']}|{kind}",
                    "text": text,
                    "base_id": row["id"],
                    "variant": kind,
                }
            )
    return pd.DataFrame(rows)


def given_variants(df: pd.DataFrame) -> dict[str, list[str]]:
    """``base_id`` and ``variant`` of each row: the dataset's own ``variant`` (e.g. the same
    question in another wording) and ``base_id`` (the row it rewords) when a row names them,
    else its own id and "" (an original row)."""
    metas = [json.loads(m) if m else {} for m in df["meta"]]
    variant = [str(m.get("variant") or "") for m in metas]
    base = [str(m.get("base_id") or i) for m, i in zip(metas, df["id"], strict=True)]
    return {"base_id": base, "variant": variant}


def read_datasets(concept: ConceptConfig) -> tuple[pd.DataFrame, list[Path]]:
    """Rows of the concept's dataset and extra datasets (ids unique across files)."""
    paths = [resolve_dataset_path(concept.dataset)]
    paths += [resolve_dataset_path(p, "concept.extra_datasets") for p in concept.extra_datasets]
    frames = [read_jsonl(p) for p in paths]
    df = pd.concat(frames, ignore_index=True)
    dup = df["id"][df["id"].duplicated()]
    if len(dup):
        raise DatasetError(
            f"id {dup.iloc[0]!r} appears in more than one of {[str(p) for p in paths]}; "
            "ids must be unique across concept.dataset and concept.extra_datasets"
        )
    return df, paths


def build_prompts(
    df: pd.DataFrame, concept: ConceptConfig, prompts_cfg: PromptsConfig, tokenizer, seed: int
):
    """Pure part of the stage: dataset rows -> prompts table (tested without a model)."""
    fmt = prompts_cfg.format
    path = Path(concept.dataset)
    conditions = select_conditions(df, concept.conditions, path)
    df = df[df["condition"].isin(conditions)].reset_index(drop=True)
    if concept.variants:
        df = expand_variants(df, concept.variants, conditions, tokenizer, seed)
    else:
        df = df.assign(**given_variants(df))
    label_of = {c: i for i, c in enumerate(conditions)}
    labels = df["label"].where(df["label"].notna(), df["condition"].map(label_of)).astype(int)
    user_texts = [concept.instruction.format(text=t) for t in df["text"]]
    responses: list[str | None] = [None] * len(df)
    key = concept.response_key
    if key:
        metas = [json.loads(m) for m in df["meta"]]
        bad = [i for i, m in enumerate(metas) if not isinstance(m.get(key), str) or not m[key]]
        if bad:
            raise DatasetError(
                f"{path}: row {df['id'].iloc[bad[0]]!r} has no {key!r} string; every row needs "
                f"one when concept.response_key={key}"
            )
        responses = [m[key] for m in metas]
    shots = []
    if prompts_cfg.fewshot:
        shots = [
            (concept.instruction.format(text=ex["text"]), ex["answer"]) for ex in concept.fewshot
        ]
    system = concept.system_prompt
    rendered = [
        render(tokenizer, u, fmt, system, shots, r)
        for u, r in zip(user_texts, responses, strict=True)
    ]
    return pd.DataFrame(
        {
            "prompt_id": df["id"].astype(str),
            "condition": df["condition"].astype(str),
            "label": labels.astype("int32"),
            "text": df["text"].astype(str),
            "chat_text": [r[0] for r in rendered],
            "tokens": [np.asarray(r[1], dtype=np.int32) for r in rendered],
            "n_tokens": np.array([len(r[1]) for r in rendered], dtype=np.int32),
            "split": assign_splits(df, prompts_cfg.test_fraction, seed).to_numpy(),
            "answer": df["answer"].astype("string"),
            "meta": df["meta"].astype(str),
            "base_id": df["base_id"].astype(str),
            "variant": df["variant"].astype(str),
        }
    )


def fingerprint(inputs: PromptsInputs) -> dict:
    concept = inputs.concept
    out = {
        "dataset_sha256": file_sha256(resolve_dataset_path(concept.dataset)),
        "model": model_fingerprint(inputs.model),
    }
    if concept.extra_datasets:
        out["extra_sha256"] = [
            file_sha256(resolve_dataset_path(p, "concept.extra_datasets"))
            for p in concept.extra_datasets
        ]
    if concept.variants:
        out["rubrics_sha256"] = file_sha256(
            resolve_dataset_path(concept.variants.rubrics, "concept.variants.rubrics")
        )
    return out


def prompts_config(prompts: PromptsConfig, model: ModelConfig, tokenizer) -> PromptsConfig:
    """``prompts`` with the model's prompt format applied (a base model says plain: it has no
    chat template); chat on a tokenizer without a template is refused."""
    if model.prompt_format:
        prompts = dataclasses.replace(prompts, format=model.prompt_format)
    if prompts.format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"model {model.name!r} has no chat template (a base model?); use "
            "prompts.format=plain or model.prompt_format=plain"
        )
    return prompts


def run(inputs: PromptsInputs, upstream: dict[str, Path], out: Path) -> dict:
    """Stage entry: the dataset rows as the model's prompts."""
    df, paths = read_datasets(inputs.concept)
    path = paths[0]
    concept = dataclasses.replace(inputs.concept, dataset=str(path))
    tokenizer = load_model(inputs.model).tokenizer
    prompts_cfg = prompts_config(inputs.prompts, inputs.model, tokenizer)
    table = build_prompts(df, concept, prompts_cfg, tokenizer, inputs.seed)
    table.to_parquet(out / "prompts.parquet", index=False)
    counts = table["condition"].value_counts().sort_index().to_dict()
    left_out = sorted(set(df["condition"]) - set(table["condition"]))
    return {
        "n_prompts": len(table),
        "per_condition": counts,
        "dataset": str(path),
        "conditions_left_out": left_out,
    }


STAGE = Stage(
    name="prompts",
    run=run,
    inputs=PromptsInputs,
    fingerprint=fingerprint,
    writes=("prompts.parquet",),
)
