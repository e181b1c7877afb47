"""Stage `sweep_report`: the sweep's frontier and choice as sweep.md and frontier.png (reads
model, report, sweep; needs sweep).

sweep.md: the chosen setting (the best point passing every rule), and per intervention (site
kind, where its direction is read, method, mode, gate) its ceiling (the best bidirectional
rate at any bleed), the best within the bleed bound and the best passing every rule, beside
its bound (own-side share of a reflection, or the gate probe's accuracy); then every checked
point and the bounds per layer. Every rate is cross-validated on the sweep's split.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from mlx_interp.analysis.sweep import Rules, frontier, ranked  # noqa: E402
from mlx_interp.engine.dag import Stage, summary_headline  # noqa: E402
from mlx_interp.engine.schema import ReportConfig  # noqa: E402

SETTING = ["site", "measured", "method", "mode", "positions", "layer", "alpha", "heads", "gate"]


def _pct(x) -> str:
    return "n/a" if x is None or x != x else f"{100 * float(x):.1f}%"


def _at(rate, where: str) -> str:
    return f"{_pct(rate)} ({where})" if where else "none"


def _setting(row) -> str:
    parts = [
        f"{row['site']} at layer {row['layer']}",
        f"direction {row['method']} read at {row['measured']}",
        f"{row['mode']} at {row['positions']}",
        f"alpha {row['alpha']:g}",
    ]
    if row.get("heads"):
        parts.append(f"heads {row['heads']}")
    if row.get("gate"):
        parts.append(f"gated by a probe at {row['gate']}")
    return ", ".join(parts)


def render(table: pd.DataFrame, bounds: pd.DataFrame, info: dict, classes: list[str]) -> str:
    rules = Rules(**info["rules"])
    unsteered = float(info["loops_unsteered"])
    chosen = table[table["chosen"]]
    lines = [
        f"# Steering sweep: {info['model']}",
        "",
        f"Split `{info['split']}` only, {info['folds']}-fold cross-validated: questions "
        + ", ".join(
            f"{c} {info['n_questions'][c]} ({info['n_right'][c]} answered right unsteered)"
            for c in classes
        )
        + f", {info['n_controls']} controls; {info['points']} points. Rules: bleed <= "
        f"{_pct(rules.max_bleed)}, random directions <= {_pct(rules.max_random)}, loops below "
        f"{_pct(rules.max_loops)} or no more than unsteered ({_pct(unsteered)}).",
        "",
        "## Chosen",
        "",
    ]
    if len(chosen):
        row = chosen.iloc[0]
        lines.append(
            f"{_setting(row)}: bidirectional {_pct(row['bidirectional'])} ("
            + ", ".join(f"{c} {_pct(row[f'swap_{c}'])}" for c in classes)
            + f"), bleed {_pct(row['bleed'])}, random {_pct(row['random'])}, loops "
            f"{_pct(row['loops'])}, bound {_pct(row.get('bound'))}."
        )
    else:
        lines.append("No point passes every rule: see the frontier below.")
    front = frontier(table, rules, unsteered)
    lines += [
        "",
        "## Frontier and ceiling of each intervention",
        "",
        "| intervention | points | ceiling (any bleed) | within the bleed bound | passing every "
        "rule | bound |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in front.to_dict("records"):
        lines.append(
            f"| {r['family']} | {r['points']} | {_pct(r['ceiling'])} ({r['ceiling_at']}; bleed "
            f"{_pct(r['ceiling_bleed'])}) | {_at(r['within_bleed'], r['within_bleed_at'])} | "
            f"{_at(r['passing'], r['passing_at'])} | {_pct(r['bound'])} |"
        )
    checked = ranked(table.dropna(subset=["random"]), Rules(max_bleed=1.0))
    lines += [
        "",
        "## Points checked for random directions and loops (rank order)",
        "",
        "| setting | " + " | ".join(classes) + " | bidirectional | bleed | random | loops "
        "| passes |",
        "| --- | " + "--- | " * len(classes) + "--- | --- | --- | --- | --- |",
    ]
    passing = rules.passing(checked, unsteered)
    for i, row in checked.iterrows():
        lines.append(
            f"| {_setting(row)} | "
            + " | ".join(_pct(row[f"swap_{c}"]) for c in classes)
            + f" | {_pct(row['bidirectional'])} | {_pct(row['bleed'])} | {_pct(row['random'])} | "
            f"{_pct(row['loops'])} | {'yes' if passing[i] else 'no'} |"
        )
    lines += _bound_lines(bounds)
    lines += ["", "![frontier](frontier.png)", ""]
    return "\n".join(lines)


def _bound_lines(bounds: pd.DataFrame) -> list[str]:
    if bounds.empty:
        return []
    lines = [
        "",
        "## Bounds",
        "",
        "Own side: the share of the questions answered right whose projection on the direction "
        "fitted without them lies on their own side of its centre (a reflection cannot swap the "
        "others). Gate: the side probe's cross-validated accuracy on those questions.",
        "",
    ]
    own = bounds[bounds["kind"] == "own_side"]
    if len(own):
        pivot = own.pivot_table(
            index="layer", columns=["site", "measured", "method"], values="share"
        ).round(2)
        names = [" ".join(c) for c in pivot.columns]
        lines += ["| layer | " + " | ".join(names) + " |", "| --- " * (len(names) + 1) + "|"]
        for layer, values in pivot.iterrows():
            cells = ["" if v != v else f"{v:.2f}" for v in values]
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
        lines.append("")
    gate = bounds[bounds["kind"] == "gate"]
    for r in gate.to_dict("records"):
        lines.append(
            f"- gate ({r['method']}) at the {r['measured']} tokens, layer {r['layer']}: "
            f"{_pct(r['share'])} of the questions answered right read on their side"
        )
    return lines


def plot_frontier(table: pd.DataFrame, path: Path, rules: Rules, unsteered: float) -> Path:
    """Bidirectional swap rate against bleed (every point) and against loops (the points
    checked), one colour per intervention; the chosen point ringed, the rules dotted."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    for family, group in table.groupby("family", sort=True):
        ax1.plot(group["bleed"], group["bidirectional"], "o", alpha=0.7, label=family)
        checked = group.dropna(subset=["loops"])
        ax2.plot(checked["loops"], checked["bidirectional"], "o", alpha=0.7, label=family)
    chosen = table[table["chosen"]]
    for ax, x in ((ax1, "bleed"), (ax2, "loops")):
        if len(chosen):
            ax.plot(
                chosen[x],
                chosen["bidirectional"],
                "o",
                ms=14,
                mfc="none",
                mec="black",
                label="chosen",
            )
        ax.axhline(0.8, color="grey", lw=0.8, ls=":")
        ax.set_ylim(-0.02, 1.02)
    ax1.axvline(rules.max_bleed, color="grey", lw=0.8, ls=":")
    ax2.axvline(max(rules.max_loops, unsteered), color="grey", lw=0.8, ls=":")
    ax1.set_xlabel("control bleed (controls whose top token became a swap word)")
    ax2.set_xlabel("loop rate of open-ended steered answers")
    ax1.set_ylabel("bidirectional swap, cross-validated")
    ax1.set_title("every point")
    ax2.set_title("points checked for random directions and loops")
    ax2.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@dataclass(frozen=True)
class SweepReportInputs:
    report: ReportConfig  # plots or not


def run(inputs: SweepReportInputs, upstream: dict[str, Path], out: Path) -> dict:
    """Stage entry: sweep.md and frontier.png; needs sweep."""
    table = pd.read_parquet(upstream["sweep"] / "sweep.parquet")
    bounds = pd.read_parquet(upstream["sweep"] / "bounds.parquet")
    info = json.loads((upstream["sweep"] / "sweep.json").read_text())
    classes = sorted(info["n_questions"])
    (out / "sweep.md").write_text(render(table, bounds, info, classes), encoding="utf-8")
    if inputs.report.plots:
        rules = Rules(**info["rules"])
        plot_frontier(table, out / "frontier.png", rules, float(info["loops_unsteered"]))
    chosen = info.get("chosen")
    value = float(chosen["bidirectional"]) if chosen else float(np.nan)
    return {"headline": {"name": "chosen bidirectional swap (cross-validated)", "value": value}}


STAGE = Stage(
    name="sweep_report",
    run=run,
    inputs=SweepReportInputs,
    needs=("sweep",),
    writes=("sweep.md",),
    report=("sweep.md", "*.png"),
    headline=summary_headline,
)
