"""Stage `prompts`: a dataset file + concept config -> prompts.parquet.

Columns: prompt_id, condition, label, text, chat_text, tokens (list<int32>), n_tokens,
split, answer, meta. ``chat_text`` is exactly what the model reads (chat template applied).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.cache import file_sha256
from pipeline.models import load_model, model_fingerprint
from stages.datasets import DatasetError, read_jsonl, resolve_dataset_path

VERSION = "1"
FORMATS = ("chat", "plain")


def select_conditions(df: pd.DataFrame, conditions: list[str] | None, path: Path) -> list[str]:
    """The conditions to keep, in label order; each must have rows."""
    present = sorted(df["condition"].unique())
    if not conditions:
        return present
    empty = [c for c in conditions if c not in present]
    if empty:
        raise DatasetError(
            f"{path}: condition(s) {empty} have no rows (conditions in the file: {present}); "
            "fix concept.conditions or the dataset"
        )
    return list(conditions)


def assign_splits(df: pd.DataFrame, test_fraction: float, seed: int) -> pd.Series:
    """Keep given splits; mark ``test_fraction`` of each condition's other rows as test."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"prompts.test_fraction must be in [0, 1), not {test_fraction}")
    split = df["split"].fillna("train").astype(str)
    if test_fraction == 0:
        return split
    rng = np.random.default_rng(seed)
    for _, group in df[df["split"].isna()].groupby("condition", sort=True):
        n_test = int(round(test_fraction * len(group)))
        chosen = rng.choice(group.index.to_numpy(), size=n_test, replace=False)
        split.loc[chosen] = "test"
    return split


def render(
    tokenizer, user_text: str, fmt: str, system_prompt: str | None, shots: list[tuple[str, str]]
) -> tuple[str, list]:
    """The text the model reads and its token ids; ``shots`` are (question, answer) examples."""
    if fmt == "plain":
        text = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in shots)
        text += f"Q: {user_text}\nA:" if shots else user_text
        return text, list(tokenizer.encode(text))
    messages = []
    if system_prompt is not None:
        messages.append({"role": "system", "content": system_prompt})
    for q, a in shots:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": user_text})
    chat_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return chat_text, list(tokenizer.encode(chat_text, add_special_tokens=False))


def build_prompts(df: pd.DataFrame, concept: dict, prompts_cfg: dict, tokenizer, seed: int):
    """Pure part of the stage: dataset rows -> prompts table (tested without a model)."""
    fmt = prompts_cfg["format"]
    if fmt not in FORMATS:
        raise ValueError(f"prompts.format must be one of {FORMATS}, not {fmt!r}")
    path = Path(concept["dataset"])
    conditions = select_conditions(df, concept.get("conditions"), path)
    df = df[df["condition"].isin(conditions)].reset_index(drop=True)
    label_of = {c: i for i, c in enumerate(conditions)}
    labels = df["label"].where(df["label"].notna(), df["condition"].map(label_of)).astype(int)
    user_texts = [concept["instruction"].format(text=t) for t in df["text"]]
    shots = []
    if prompts_cfg.get("fewshot", True):
        shots = [
            (concept["instruction"].format(text=ex["text"]), ex["answer"])
            for ex in concept.get("fewshot") or []
        ]
    system = concept.get("system_prompt")
    rendered = [render(tokenizer, u, fmt, system, shots) for u in user_texts]
    return pd.DataFrame(
        {
            "prompt_id": df["id"].astype(str),
            "condition": df["condition"].astype(str),
            "label": labels.astype("int32"),
            "text": df["text"].astype(str),
            "chat_text": [r[0] for r in rendered],
            "tokens": [np.asarray(r[1], dtype=np.int32) for r in rendered],
            "n_tokens": np.array([len(r[1]) for r in rendered], dtype=np.int32),
            "split": assign_splits(df, float(prompts_cfg["test_fraction"]), seed).to_numpy(),
            "answer": df["answer"].astype("string"),
            "meta": df["meta"].astype(str),
        }
    )


def fingerprint(cfg: dict) -> dict:
    path = resolve_dataset_path(cfg["concept"]["dataset"])
    return {"dataset_sha256": file_sha256(path), "model": model_fingerprint(cfg["model"])}


def run(cfg: dict, inputs: dict, out: Path) -> dict:
    """Stage entry: reads concept, prompts, model (tokenizer), seed."""
    concept = dict(cfg["concept"])
    path = resolve_dataset_path(concept["dataset"])
    concept["dataset"] = str(path)
    df = read_jsonl(path)
    tokenizer = load_model(cfg["model"]).tokenizer
    table = build_prompts(df, concept, cfg["prompts"], tokenizer, int(cfg["seed"]))
    table.to_parquet(out / "prompts.parquet", index=False)
    counts = table["condition"].value_counts().sort_index().to_dict()
    return {"n_prompts": len(table), "per_condition": counts, "dataset": str(path)}
