"""Parts of the steering report that appear only when a run has them (helper of `report`):

- the swap counted on greedy answers, when every question was answered greedily steered
  (``steer.confirm_n`` at least the number of questions), beside the logit verdict;
- a dataset's variants (e.g. the same test questions in other wordings: rows with a
  ``variant``), each reported in its own column, never part of the headline's questions;
- a gate probe's accuracy (two-way steering: each prompt's side read by a probe), the bound
  of its swap rate, as the own-side share bounds a reflection's.
"""

from __future__ import annotations

import pandas as pd

from mlx_interp.analysis.stats import SwapStats


def _stats(k: int, n: int) -> dict:
    s = SwapStats.from_counts(int(k), int(n))
    return {"k": s.k, "n": s.n, "rate": s.rate, "ci95": [s.ci_lo, s.ci_hi]}


def main_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of the dataset's original questions (no variant)."""
    if "variant" not in frame:
        return frame
    return frame[frame["variant"].fillna("") == ""].drop(columns="variant")


def variant_names(frame: pd.DataFrame) -> list[str]:
    if "variant" not in frame:
        return []
    return sorted(set(frame["variant"].dropna()) - {""})


def variant_rows(frame: pd.DataFrame, name: str) -> pd.DataFrame:
    return frame[frame["variant"] == name].drop(columns="variant")


def greedy_swap(right: pd.DataFrame, generations: pd.DataFrame, swap: dict) -> dict | None:
    """Per class: steered greedy answers naming the target among the questions whose
    unsteered greedy answer names their own word; None unless every question was answered."""
    gen = generations[
        (generations["direction"] == "main")
        & (generations["scorer"] == "generate")
        & generations["condition"].isin(list(swap))
    ]
    if gen.empty or not set(right["prompt_id"]) <= set(gen["prompt_id"]):
        return None
    ok_ids = set(right.loc[right["right_generate"], "prompt_id"])
    per_class = {}
    for cond in sorted(swap):
        sub = gen[(gen["condition"] == cond) & gen["prompt_id"].isin(ok_ids)]
        per_class[cond] = _stats(sub["swapped"].sum(), len(sub))
    rates = [c["rate"] for c in per_class.values() if c["n"]]
    return {
        "per_class": per_class,
        "bidirectional": float(min(rates)) if len(rates) == len(per_class) else float("nan"),
        "all": _stats(
            gen[gen["prompt_id"].isin(ok_ids)]["swapped"].sum(),
            int(gen["prompt_id"].isin(ok_ids).sum()),
        ),
    }


def gate_accuracy(right: pd.DataFrame, generations: pd.DataFrame, contrast) -> dict | None:
    """Share of the questions answered right (logit) that the gate probe read on their own
    side (the bound of a gated swap), per class and overall; None without a gate."""
    if "side" not in generations:
        return None
    sides = generations.drop_duplicates("prompt_id").set_index("prompt_id")["side"]
    pos, neg = contrast
    ok = right[right["right_logit"]]
    own = ok["condition"].map({pos: "pos", neg: "neg"})
    read = ok["prompt_id"].map(sides)
    hit = (read == own).to_numpy()
    out = {"all": _stats(hit.sum(), len(hit))}
    for cond in (pos, neg):
        mask = (ok["condition"] == cond).to_numpy()
        out[cond] = _stats(hit[mask].sum(), int(mask.sum()))
    return out


def _pct(s: dict | float | None) -> str:
    if s is None:
        return "n/a"
    if isinstance(s, dict):
        if not s.get("n"):
            return "n/a"
        lo, hi = s["ci95"]
        return f"{s['k']}/{s['n']} = {100 * s['rate']:.1f}% ({100 * lo:.1f}-{100 * hi:.1f})"
    return "n/a" if s != s else f"{100 * s:.1f}%"


def _right(c: dict | None) -> str:
    if not c:
        return "n/a"
    return f"{c['unsteered_right_logit']}/{c['n']} / {c['unsteered_right_generate']}/{c['n']}"


def setting_lines(st: dict) -> list[str]:
    """Where the edit acts and how its side is decided, when not the residual stream by one
    direction (the default's text stays as it was)."""
    parts = []
    if st.get("site"):
        parts.append(f"the edit acts at the `{st['site']}` site (the direction was read there)")
    if st.get("heads"):
        parts.append(f"heads kept per layer: {st['heads']}")
    if st.get("gate"):
        g = st["gate"]
        reader = {
            "probe": "a probe",
            "unembed": "the answer words' axis",
            "lens": "the answer words' axis (and the logit lens for neither class)",
        }.get(g.get("method", "probe"), f"a {g.get('method')} reader")
        parts.append(
            f"two-way: {reader}"
            f" on the residual after layer {g['layer']} at the {g['measured']} "
            f"tokens reads each prompt's class (cross-validated on the fitting split: "
            f"{100 * g['cv_accuracy']:.1f}%), and the edit moves it toward the other class; "
            "prompts it reads as neither class are left unsteered"
        )
    return ["", "Setting: " + "; ".join(parts) + "."] if parts else []


def headline_lines(r: dict) -> list[str]:
    """The headline table: bidirectional swap by logit and by greedy answer, per class,
    random directions, bleed and loops; held out, each variant, and in-sample."""
    if not r.get("greedy") and not r.get("variants"):
        return []
    columns = [("held out (test)", r)]
    columns += [
        (f"{name} (test, never used to choose)", v) for name, v in r.get("variants", {}).items()
    ]
    ins = r.get("in_sample")
    lines = [
        "",
        "## Headline",
        "",
        "| measure | "
        + " | ".join(name for name, _ in columns)
        + (" | in-sample (train) |" if ins else " |"),
        "| --- | " + "--- | " * len(columns) + ("--- |" if ins else ""),
    ]

    def row(label, get, train=None):
        cells = [get(c) for _, c in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + (f" | {train} |" if ins else " |"))

    for cond in r["unsteered"]["per_class"]:
        row(
            f"{cond}: answered right unsteered (logit / greedy answer)",
            lambda x, cond=cond: _right(x["unsteered"]["per_class"].get(cond)),
            "" if ins else None,
        )
    row(
        "bidirectional swap, logit",
        lambda c: _pct(c["bidirectional_swap"]),
        _pct(ins["bidirectional_swap"]) if ins else None,
    )
    row(
        "bidirectional swap, greedy answer",
        lambda c: _pct((c.get("greedy") or {}).get("bidirectional")),
        _pct((ins.get("greedy") or {}).get("bidirectional")) if ins else None,
    )
    for cond, c in r["unsteered"]["per_class"].items():
        row(
            f"{cond} -> {c['target']}, logit",
            lambda x, cond=cond: _pct(x["unsteered"]["per_class"][cond]["swap_answered_right"]),
            _pct(ins["per_class"].get(cond)) if ins else None,
        )
        row(
            f"{cond} -> {c['target']}, greedy answer",
            lambda x, cond=cond: _pct(((x.get("greedy") or {}).get("per_class") or {}).get(cond)),
            _pct(((ins.get("greedy") or {}).get("per_class") or {}).get(cond)) if ins else None,
        )
    row(
        "random directions (mean)",
        lambda c: _pct(c["random_baseline"]["answered_right"]["random_mean"]),
        _pct(ins["random_mean"]) if ins else None,
    )
    row(
        "control bleed, greedy answer names a swap word",
        lambda c: _pct(c["controls"].get("generate_bleed")),
        _pct(ins["controls"].get("generate_bleed")) if ins else None,
    )
    row(
        "control bleed, top token became a swap word",
        lambda c: _pct(c["controls"].get("logit_top_became_target_word")),
        _pct(ins["controls"].get("logit_top_became_target_word")) if ins else None,
    )
    if r.get("gate"):
        row(
            "gate probe reads the class (the bound)",
            lambda c: _pct((c.get("gate") or {}).get("all")),
            _pct((ins.get("gate") or {}).get("all")) if ins else None,
        )
    long = (r.get("fluency") or {}).get("long", {})
    if long.get("steered", {}).get("n"):
        lines.append(
            f"| loops of open-ended answers, steered (unsteered) | {_pct(long['steered']['loop'])} "
            f"({_pct(long['unsteered'].get('loop'))}) |"
            + " |" * (len(columns) - 1)
            + (" |" if ins else "")
        )
    return lines
