"""Stage `report`: statistics of the colour swap, written as report.json, report.md and plots.

Swap rate with both denominators (questions the unsteered model answered right, and all),
Wilson intervals, the random-direction baseline (mean +- sd), an exact binomial test of the
swap count against the random rate, control contamination, the generation check, and the
fluency of the steered generations beside the unsteered ones (loop rate, repeated n-grams,
distinct-n).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mlx_interp.analysis.stats import SwapStats, binomial_test, mean_sd
from mlx_interp.engine.dag import Headline, Stage
from mlx_interp.engine.schema import ModelConfig, ReportConfig, ScoreConfig
from mlx_interp.stages.report_plots import plot_layers, plot_random_baseline
from mlx_interp.stages.report_sections import (
    gate_accuracy,
    greedy_swap,
    main_rows,
    variant_names,
    variant_rows,
)
from mlx_interp.stages.report_text import render_markdown

ORIGINAL = {  # the earlier study, Qwen2.5-7B-Instruct-4bit, alpha 1.5
    "model": "Qwen2.5-7B-Instruct-4bit",
    "swap": "102/112 (91.1%)",
    "controls_bleed": "2/25",
    "random": "13.8% +- 4.8% (10 directions)",
    "binomial_p": 3.2e-75,
}


@dataclass(frozen=True)
class ReportInputs:
    model: ModelConfig  # its name
    score: ScoreConfig  # the swap words and the controls
    report: ReportConfig


def _stats(k: int, n: int) -> dict:
    s = SwapStats.from_counts(int(k), int(n))
    return {"k": s.k, "n": s.n, "rate": s.rate, "ci95": [s.ci_lo, s.ci_hi]}


def unsteered_right(baseline: pd.DataFrame, swap: dict) -> pd.DataFrame:
    """Per swap question: right by logit (original preferred) and by the greedy answer."""
    logit = baseline[(baseline["scorer"] == "logit") & baseline["condition"].isin(list(swap))]
    gen = baseline[(baseline["scorer"] == "generate") & baseline["condition"].isin(list(swap))]
    right = pd.DataFrame(
        {
            "prompt_id": logit["prompt_id"],
            "condition": logit["condition"],
            "right_logit": logit["margin"] < 0,
        }
    )
    named = gen.set_index("prompt_id")["named"]
    right["right_generate"] = right["prompt_id"].map(named).eq(right["condition"]).to_numpy()
    right["answer"] = right["prompt_id"].map(gen.set_index("prompt_id")["answer"]).to_numpy()
    return right.reset_index(drop=True)


def compute_report(baseline, generations, directions_info, steer_info, cfg) -> dict:
    """All report numbers (pure: tested on small DataFrames). With a held-out split (rows of
    split ``test``), the headline counts the test questions and ``in_sample`` holds the same
    numbers on the train questions (those the direction was fitted on) beside it."""
    variants = variant_names(generations)
    if variants:  # the original questions make the headline; each variant its own column
        report = compute_report(
            main_rows(baseline), main_rows(generations), directions_info, steer_info, cfg
        )
        report["variants"] = {}
        for name in variants:
            b, g = variant_rows(baseline, name), variant_rows(generations, name)
            if "split" in g and (g["split"] == "test").any():
                b, g = b[b["split"] == "test"], g[g["split"] == "test"]
            report["variants"][name] = _compute(b, g, directions_info, steer_info, cfg)
        return report
    held_out = "split" in generations and (generations["split"] == "test").any()
    if not held_out:
        return {
            **_compute(baseline, generations, directions_info, steer_info, cfg),
            "evaluated_on": "all",
        }

    def part(split: str) -> dict:
        b = baseline[baseline["split"] == split] if "split" in baseline else baseline
        g = generations[generations["split"] == split]
        return _compute(b, g, directions_info, steer_info, cfg)

    test, train = part("test"), part("train")
    test["evaluated_on"] = "test"
    test["in_sample"] = {
        "bidirectional_swap": train["bidirectional_swap"],
        "swap": train["swap"],
        "per_class": {
            c: v["swap_answered_right"] for c, v in train["unsteered"]["per_class"].items()
        },
        "random_mean": train["random_baseline"]["answered_right"]["random_mean"],
        "controls": train["controls"],
        "loop": train["fluency"].get("long", {}).get("steered", {}).get("loop"),
    }
    for key in ("greedy", "gate"):  # only runs that have them (greedy on every question, a gate)
        if key in train:
            test["in_sample"][key] = train[key]
    return test


def _compute(baseline, generations, directions_info, steer_info, cfg) -> dict:
    """The report numbers of one set of questions."""
    swap = cfg["swap"]
    right = unsteered_right(baseline, swap)
    right_col = "right_generate" if steer_info["scorer"] == "generate" else "right_logit"
    right_ids = set(right.loc[right[right_col], "prompt_id"])
    main = generations[
        (generations["direction"] == "main")
        & (generations["scorer"] == steer_info["scorer"])
        & generations["condition"].isin(list(swap))
    ]
    per_class = {}
    for cond, group in right.groupby("condition"):
        sub = main[main["condition"] == cond]
        ok = sub[sub["prompt_id"].isin(right_ids)]
        per_class[cond] = {
            "target": swap[cond],
            "n": len(group),
            "unsteered_right_logit": int(group["right_logit"].sum()),
            "unsteered_right_generate": int(group["right_generate"].sum()),
            "swap_all": _stats(sub["swapped"].sum(), len(sub)),
            "swap_answered_right": _stats(ok["swapped"].sum(), len(ok)),
        }
    ok_main = main[main["prompt_id"].isin(right_ids)]
    swap_all = _stats(main["swapped"].sum(), len(main))
    swap_right = _stats(ok_main["swapped"].sum(), len(ok_main))
    rnd = generations[generations["direction"].str.startswith("random")]
    rates_all = rnd.groupby("direction")["swapped"].mean().to_numpy()
    rates_right = (
        rnd[rnd["prompt_id"].isin(right_ids)]
        .groupby("direction")["swapped"]
        .mean()
        .reindex(sorted(set(rnd["direction"])))
        .fillna(0.0)
        .to_numpy()
    )
    tests = {}
    for name, st, rates in (
        ("answered_right", swap_right, rates_right),
        ("all", swap_all, rates_all),
    ):
        mean, sd = mean_sd(rates) if len(rates) else (float("nan"), float("nan"))
        floor = 0.5 / max(1, len(rates) * max(st["n"], 1))  # half a swap over all random trials
        p0 = float(max(mean, floor)) if len(rates) else float("nan")
        p = binomial_test(st["k"], st["n"], p0) if st["n"] and len(rates) else float("nan")
        tests[name] = {
            "random_mean": float(mean),
            "random_sd": float(sd),
            "random_rates": [float(r) for r in rates],
            "p0": p0,
            "p0_floored": bool(len(rates) and mean < floor),
            "binomial_p": p,
        }
    controls = _controls(baseline, generations, cfg)
    confirm = _confirm(generations, swap)
    fluency = fluency_report(baseline, generations, swap)
    class_rates = [c["swap_answered_right"]["rate"] for c in per_class.values()]
    extra = {}  # only in runs that have them: greedy answers to every question, a gate probe
    greedy = greedy_swap(right, generations, swap)
    if greedy is not None:
        extra["greedy"] = greedy
    gate = gate_accuracy(right, generations, directions_info["contrast"])
    if gate is not None:
        extra["gate"] = gate
    return {
        **extra,
        "bidirectional_swap": float(min(class_rates)) if class_rates else float("nan"),
        "model": cfg["model_name"],
        "steer": steer_info,
        "direction": directions_info,
        "unsteered": {
            "per_class": per_class,
            "right_by": right_col,
            "n_answered_right": len(right_ids),
            "n_questions": len(right),
        },
        "swap": {"answered_right": swap_right, "all": swap_all},
        "random_baseline": tests,
        "controls": controls,
        "confirm": confirm,
        "fluency": fluency,
        "original_study": ORIGINAL,
        "examples": _examples(baseline, generations, swap),
        "long_examples": long_examples(baseline, generations),
    }


def _controls(baseline, generations, cfg) -> dict:
    words = sorted(set(cfg["swap"]) | set(cfg["swap"].values()))
    base = baseline[baseline["condition"].isin(cfg["controls"])]
    steered = generations[
        (generations["direction"] == "main") & generations["condition"].isin(cfg["controls"])
    ]
    out: dict[str, Any] = {"n": int(base["prompt_id"].nunique())}
    for kind in ("logit", "generate"):
        b = base[base["scorer"] == kind].set_index("prompt_id")
        s = steered[steered["scorer"] == kind].set_index("prompt_id")
        if s.empty:
            continue
        b = b.loc[s.index]
        if kind == "logit":
            became = s["top_word"].isin(words) & ~b["top_word"].isin(words)
            out["logit_top_token_changed"] = _stats(
                (s["top_token"] != b["top_token"]).sum(), len(s)
            )
            out["logit_top_became_target_word"] = _stats(became.sum(), len(s))
        else:
            bleed = s["named"].isin(words) & ~b["named"].isin(words)
            out["generate_bleed"] = _stats(bleed.sum(), len(s))
            out["generate_answer_changed"] = _stats((s["answer"] != b["answer"]).sum(), len(s))
    return out


def _confirm(generations, swap) -> dict:
    main = generations[
        (generations["direction"] == "main") & generations["condition"].isin(list(swap))
    ]
    gen = main[main["scorer"] == "generate"].set_index("prompt_id")["swapped"]
    logit = main[main["scorer"] == "logit"].set_index("prompt_id")["swapped"]
    both = gen.index.intersection(logit.index)
    if not len(both):
        return {"n": 0}
    return {
        "n": len(both),
        "agreement": float((gen[both] == logit[both]).mean()),
        "generate_swap": _stats(gen[both].sum(), len(both)),
        "logit_swap": _stats(logit[both].sum(), len(both)),
    }


FLUENCY_KINDS = {"long": "fluency", "short": "generate"}  # report key -> scorer of the rows


def fluency_stats(rows: pd.DataFrame, swap: dict) -> dict:
    """Loop rate (Wilson CI), mean repetition and distinct-n of some generations; and how
    many name the target word of their class (NaN metrics of too-short texts are skipped)."""
    if rows.empty or "loop" not in rows:
        return {"n": 0}
    target = rows["condition"].map(swap)
    has_target = target.notna()
    names = rows["named"].eq(target) & has_target

    def mean(col: str) -> float:
        return (
            float(np.nanmean(rows[col].to_numpy(dtype=float)))
            if rows[col].notna().any()
            else float("nan")
        )

    return {
        "n": len(rows),
        "loop": _stats(rows["loop"].fillna(False).astype(bool).sum(), len(rows)),
        "repeated_ngram_share": mean("repeated_ngram_share"),
        "distinct_1": mean("distinct_1"),
        "distinct_2": mean("distinct_2"),
        "longest_repeat": mean("longest_repeat"),
        "n_tokens": mean("n_tokens"),
        "names_target": _stats(names.sum(), int(has_target.sum())),
    }


def fluency_report(baseline, generations, swap) -> dict:
    """Fluency of the main direction's generations and of the unsteered ones on the same
    prompts: ``{long|short: {steered, unsteered}}`` (long: the open-ended answers)."""
    out = {}
    for key, kind in FLUENCY_KINDS.items():
        steered = generations[
            (generations["direction"] == "main") & (generations["scorer"] == kind)
        ]
        base = baseline[baseline["scorer"] == kind]
        base = base[base["prompt_id"].isin(set(steered["prompt_id"]))]
        if steered.empty:
            continue
        out[key] = {"steered": fluency_stats(steered, swap), "unsteered": fluency_stats(base, swap)}
    return out


def _examples(baseline, generations, swap, n: int = 6) -> list[dict]:
    steered = generations[
        (generations["direction"] == "main") & (generations["scorer"] == "generate")
    ]
    base = baseline[baseline["scorer"] == "generate"].set_index("prompt_id")["answer"]
    rows = []
    for _, r in steered.head(n).iterrows():
        rows.append(
            {
                "prompt_id": r["prompt_id"],
                "condition": r["condition"],
                "unsteered": base.get(r["prompt_id"], ""),
                "steered": r["answer"],
            }
        )
    ctrl = steered[~steered["condition"].isin(list(swap))].head(2)
    for _, r in ctrl.iterrows():
        rows.append(
            {
                "prompt_id": r["prompt_id"],
                "condition": r["condition"],
                "unsteered": base.get(r["prompt_id"], ""),
                "steered": r["answer"],
            }
        )
    return rows


def long_examples(baseline, generations, n: int = 4) -> list[dict]:
    """The first ``n`` open-ended answers, steered beside unsteered, with their loop flags."""
    steered = generations[
        (generations["direction"] == "main") & (generations["scorer"] == "fluency")
    ].head(n)
    base = baseline[baseline["scorer"] == "fluency"].set_index("prompt_id")
    rows = []
    for _, r in steered.iterrows():
        b = base.loc[r["prompt_id"]] if r["prompt_id"] in base.index else None
        rows.append(
            {
                "prompt_id": r["prompt_id"],
                "condition": r["condition"],
                "unsteered": "" if b is None else b["answer"],
                "unsteered_loop": None if b is None else bool(b["loop"]),
                "steered": r["answer"],
                "steered_loop": bool(r["loop"]),
            }
        )
    return rows


def run(inputs: ReportInputs, upstream: dict[str, Path], out: Path) -> dict:
    """Stage entry: the report; needs directions, baseline, steer."""
    rcfg = {
        "swap": inputs.score.swap,
        "controls": inputs.score.controls,
        "model_name": inputs.model.name,
    }
    baseline = pd.read_parquet(upstream["baseline"] / "baseline.parquet")
    generations = pd.read_parquet(upstream["steer"] / "generations.parquet")
    directions_info = json.loads((upstream["directions"] / "directions.json").read_text())
    steer_info = json.loads((upstream["steer"] / "steer.json").read_text())
    report = compute_report(baseline, generations, directions_info, steer_info, rcfg)
    plots = []
    if inputs.report.plots:
        plots.append(plot_layers(directions_info, steer_info["layers"], out / "layers.png"))
        plots.append(plot_random_baseline(report, out / "swap_vs_random.png"))
    report["plots"] = [p.name for p in plots]
    (out / "report.json").write_text(json.dumps(report, indent=2, default=_np), encoding="utf-8")
    (out / "report.md").write_text(render_markdown(report), encoding="utf-8")
    long = report["fluency"].get("long", {}).get("steered", {})
    return {
        "swap_rate_answered_right": report["swap"]["answered_right"]["rate"],
        "swap_rate_all": report["swap"]["all"]["rate"],
        "binomial_p": report["random_baseline"]["answered_right"]["binomial_p"],
        "loop_rate": long["loop"]["rate"] if long.get("n") else None,
    }


def headline(summary: dict) -> Headline:
    """The swap rate on the questions the unsteered model answered right (and on all)."""
    rate = summary["swap_rate_answered_right"]
    return Headline(
        "swap rate (answered right unsteered)",
        rate,
        f"swap rate {rate:.3f} (answered right unsteered), {summary['swap_rate_all']:.3f} "
        f"(all), binomial p {summary['binomial_p']:.3g}",
    )


def _np(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value)}")


STAGE = Stage(
    name="report",
    run=run,
    inputs=ReportInputs,
    needs=("directions", "baseline", "steer"),
    writes=("report.json", "report.md"),
    report=("report.md", "report.json", "*.png"),
    headline=headline,
)
