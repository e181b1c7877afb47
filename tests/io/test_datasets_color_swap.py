"""The colour-swap prompt files: schema, counts, one colour per object, the held-out split,
and the second-wording set (every test question once more, in another wording)."""

import json
import re
from collections import Counter

import pandas as pd
import pytest

from mlx_interp.engine.schema import ConceptConfig, PromptsConfig
from mlx_interp.io.datasets import PROJECT_ROOT, read_jsonl
from mlx_interp.stages.prompts import build_prompts, given_variants

DATA = PROJECT_ROOT / "datasets"
SWAP = ("green", "red")
NAMES_A_SWAP_COLOUR = re.compile(r"\b(green|red)\b", re.IGNORECASE)
WORDINGS = (
    re.compile(r"^What is the colour of (.+)\?$"),
    re.compile(r"^(.+) (is|are) usually which colour\?$"),
    re.compile(r"^Name the colour of (.+)\.$"),
)


def load(name):
    df = read_jsonl(DATA / name)
    return df.assign(obj=[json.loads(m).get("object") for m in df["meta"]])


@pytest.fixture(scope="module")
def v2():
    return load("color_swap_v2.jsonl")


@pytest.fixture(scope="module")
def wordings():
    return load("color_swap_v2_wordings.jsonl")


@pytest.mark.parametrize("name", ["color_swap.jsonl", "color_swap_v2.jsonl"])
def test_every_question_has_one_colour_and_names_none(name):
    df = load(name)
    assert df["id"].is_unique and df["text"].is_unique
    for row in df.itertuples():
        assert isinstance(row.obj, str) and row.obj.lower() in row.text.lower(), row.id
        assert not NAMES_A_SWAP_COLOUR.search(row.text), f"{row.id} names a swap colour"
        if row.condition in SWAP:
            assert row.answer == row.condition, row.id
        else:
            assert row.condition == "control" and row.answer not in SWAP, row.id
    objects = df["obj"].str.lower().str.strip()
    assert objects.is_unique, objects[objects.duplicated()].tolist()


def test_v2_counts_and_split(v2):
    counts = Counter(zip(v2["condition"], v2["split"], strict=True))
    for cond in SWAP:
        assert counts[cond, "test"] >= 60 and counts[cond, "train"] >= 60
    assert counts["control", "test"] >= 20 and counts["control", "train"] >= 20
    assert v2["split"].notna().all()  # every row carries its split: no draw at run time


def test_v2_keeps_every_original_question_and_its_split(v2):
    """The first set's rows are all in v2, with the split that prompts.test_fraction=0.5 and
    seed 42 gave them, so results on those questions compare with the earlier runs."""
    from mlx_interp.stages.prompts import assign_splits

    old = read_jsonl(DATA / "color_swap.jsonl")
    old = old.assign(split=assign_splits(old, 0.5, 42))
    merged = old.merge(v2, on="id", suffixes=("_old", ""))
    assert len(merged) == len(old)
    assert (merged["text_old"] == merged["text"]).all()
    assert (merged["split_old"] == merged["split"]).all()


def test_second_wordings_reword_each_test_question_once(v2, wordings):
    test = v2[v2["split"] == "test"].set_index("id")
    assert sorted(wordings["meta"].map(lambda m: json.loads(m)["base_id"])) == sorted(test.index)
    assert (wordings["split"] == "test").all()
    for row in wordings.itertuples():
        meta = json.loads(row.meta)
        base = test.loc[meta["base_id"]]
        assert meta["variant"] == "wording" and row.id == f"{meta['base_id']}|wording"
        assert row.condition == base["condition"] and row.answer == base["answer"]
        assert row.text != base["text"]
        if row.condition in SWAP:
            assert any(w.match(row.text) for w in WORDINGS), row.text
    used = Counter(
        next(i for i, w in enumerate(WORDINGS) if w.match(t))
        for t, c in zip(wordings["text"], wordings["condition"], strict=True)
        if c in SWAP
    )
    assert min(used.values()) >= 40  # the three wordings in about equal shares


class _Words:
    """A whitespace tokenizer: enough for the pure part of the prompts stage."""

    def encode(self, text, add_special_tokens=False):
        return [len(w) for w in text.split()]


def test_prompts_carry_the_variant_and_its_base(v2, wordings):
    df = pd.concat([v2, wordings], ignore_index=True).drop(columns="obj")
    got = given_variants(df)
    is_variant = df["id"].str.endswith("|wording")
    assert {got["variant"][i] for i in df.index[is_variant]} == {"wording"}
    assert {got["variant"][i] for i in df.index[~is_variant]} == {""}
    assert got["base_id"][int(df.index[is_variant][0])] == df["id"][is_variant].iloc[0][:-8]
    concept = ConceptConfig(name="x", dataset="x.jsonl", conditions=["green", "red", "control"])
    prompts = PromptsConfig(format="plain", test_fraction=0.5)
    table = build_prompts(df, concept, prompts, _Words(), 42)
    assert (table.loc[is_variant.to_numpy(), "variant"] == "wording").all()
    assert (table["split"] == df["split"]).all()  # given splits are kept
