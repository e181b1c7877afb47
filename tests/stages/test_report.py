"""Report maths on hand-made stage tables with known answers (no model)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest

from mlx_interp.apps.sweep import markdown_table
from mlx_interp.stages.report import compute_report
from mlx_interp.stages.report_text import render_markdown

SWAP = {"green": "red", "red": "green"}
CFG = {"swap": SWAP, "controls": ["control"], "model_name": "toy"}


def _tables(n_per_class=10, right=(8, 6), main_swaps=(6, 3), random_swaps=((1, 0), (0, 1))):
    """Baseline/generation tables: the first `right[c]` questions of each class are right
    unsteered; of those, the first `main_swaps[c]` swap; random direction r swaps the first
    `random_swaps[r][c]` questions."""
    base, gens = [], []
    for c, cond in enumerate(("green", "red")):
        for i in range(n_per_class):
            pid = f"{cond}-{i}"
            ok = i < right[c]
            base.append(
                {
                    "prompt_id": pid,
                    "condition": cond,
                    "scorer": "logit",
                    "margin": -1.0 if ok else 1.0,
                    "top_token": "x",
                    "top_word": None,
                    "answer": None,
                    "named": None,
                }
            )
            base.append(
                {
                    "prompt_id": pid,
                    "condition": cond,
                    "scorer": "generate",
                    "margin": np.nan,
                    "top_token": None,
                    "top_word": None,
                    "answer": cond if ok else "blue",
                    "named": cond if ok else None,
                }
            )
            gens.append(
                {
                    "prompt_id": pid,
                    "condition": cond,
                    "direction": "main",
                    "scorer": "logit",
                    "margin": 1.0 if i < main_swaps[c] else -1.0,
                    "top_token": "x",
                    "top_word": None,
                    "answer": None,
                    "named": None,
                    "swapped": i < main_swaps[c],
                }
            )
            for r, sw in enumerate(random_swaps):
                gens.append(
                    {
                        "prompt_id": pid,
                        "condition": cond,
                        "direction": f"random-{r:02d}",
                        "scorer": "logit",
                        "margin": 0.0,
                        "top_token": "x",
                        "top_word": None,
                        "answer": None,
                        "named": None,
                        "swapped": i < sw[c],
                    }
                )
    for i in range(4):  # controls: 1 of 4 changes its top token to a swap word
        pid = f"control-{i}"
        base.append(
            {
                "prompt_id": pid,
                "condition": "control",
                "scorer": "logit",
                "margin": 0.0,
                "top_token": "Blue",
                "top_word": None,
                "answer": None,
                "named": None,
            }
        )
        gens.append(
            {
                "prompt_id": pid,
                "condition": "control",
                "direction": "main",
                "scorer": "logit",
                "margin": 0.0,
                "top_token": "Red" if i == 0 else "Blue",
                "top_word": "red" if i == 0 else None,
                "answer": None,
                "named": None,
                "swapped": False,
            }
        )
    return pd.DataFrame(base), pd.DataFrame(gens)


DIRECTIONS = {
    "method": "mean_diff",
    "contrast": ["red", "green"],
    "n_pos": 10,
    "n_neg": 10,
    "per_layer": {},
}
STEER = {"layers": [3], "alpha": 1.0, "mode": "ReflectMode", "n_random": 2, "scorer": "logit"}


def test_counts_denominators_and_tests():
    base, gens = _tables()
    r = compute_report(base, gens, DIRECTIONS, STEER, CFG)
    assert r["unsteered"]["n_answered_right"] == 14 and r["unsteered"]["n_questions"] == 20
    green = r["unsteered"]["per_class"]["green"]
    assert green["unsteered_right_logit"] == 8 and green["unsteered_right_generate"] == 8
    assert green["swap_answered_right"]["k"] == 6 and green["swap_answered_right"]["n"] == 8
    swap = r["swap"]
    assert (swap["answered_right"]["k"], swap["answered_right"]["n"]) == (9, 14)
    assert (swap["all"]["k"], swap["all"]["n"]) == (9, 20)
    lo, hi = swap["answered_right"]["ci95"]
    ci = binomtest(9, 14).proportion_ci(method="wilson")
    assert lo == pytest.approx(ci.low) and hi == pytest.approx(ci.high)
    test = r["random_baseline"]["answered_right"]
    assert test["random_rates"] == pytest.approx([1 / 14, 1 / 14])
    assert test["random_mean"] == pytest.approx(1 / 14) and test["random_sd"] == pytest.approx(0)
    assert test["binomial_p"] == pytest.approx(binomtest(9, 14, 1 / 14, "greater").pvalue)
    assert r["controls"]["logit_top_token_changed"]["k"] == 1
    assert r["controls"]["logit_top_became_target_word"]["k"] == 1


def test_no_random_swaps_uses_a_stated_floor_not_zero():
    base, gens = _tables(random_swaps=((0, 0), (0, 0)))
    r = compute_report(base, gens, DIRECTIONS, STEER, CFG)
    test = r["random_baseline"]["answered_right"]
    assert test["p0_floored"] and test["p0"] == pytest.approx(0.5 / (2 * 14))
    assert 0 < test["binomial_p"] < 1e-6
    md = render_markdown(r)
    assert "floored" in md and "9/14" in md


def test_markdown_has_the_table_rows():
    base, gens = _tables()
    md = render_markdown(compute_report(base, gens, DIRECTIONS, STEER, CFG))
    for text in (
        "swap rate, answered right unsteered",
        "random directions (mean +- sd)",
        "exact binomial test",
        "green -> red",
        "original study",
    ):
        assert text in md
    assert (
        markdown_table(pd.DataFrame({"a": [1.23456, np.nan], "b": ["x|y", "z"]})).count("\n") == 3
    )


def test_held_out_headline_counts_test_questions_and_shows_in_sample_beside():
    base, gens = _tables(main_swaps=(8, 6))  # every right question swaps
    # odd question numbers are test; on the test half only green-1 and red-1 stay swapped
    for t in (base, gens):
        t["split"] = ["test" if int(p.split("-")[1]) % 2 else "train" for p in t["prompt_id"]]
    keep = ~gens["prompt_id"].isin(["green-3", "green-5", "green-7", "red-3", "red-5"])
    gens.loc[~keep & (gens["direction"] == "main"), "swapped"] = False
    r = compute_report(base, gens, DIRECTIONS, STEER, CFG)
    assert r["evaluated_on"] == "test"
    green = r["unsteered"]["per_class"]["green"]["swap_answered_right"]
    red = r["unsteered"]["per_class"]["red"]["swap_answered_right"]
    assert (green["k"], green["n"]) == (1, 4) and (red["k"], red["n"]) == (1, 3)
    assert r["bidirectional_swap"] == pytest.approx(1 / 4)
    assert r["in_sample"]["bidirectional_swap"] == pytest.approx(1.0)
    md = render_markdown(r)
    assert "Held out beside in-sample" in md and "| bidirectional swap | 25.0% | 100.0% |" in md
