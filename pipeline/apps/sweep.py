"""Sweep summary: a Hydra callback that tabulates every job of a multirun at the sweep root.

Writes summary.parquet and summary.md (one row per job: its overrides and headline metrics)
and, when steer.alpha was swept, swap_vs_alpha.png (one line per steered layer).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

FAILED = "failed.json"  # written by mlx_interp.apps.cli.record_failure into a failed job's folder


def collect_jobs(sweep_dir: Path) -> pd.DataFrame:
    """One row per job folder that holds a report.json (or at least run.json)."""
    rows = []
    jobs = [p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    for job in sorted(jobs, key=lambda p: int(p.name)):
        overrides_file = job / ".hydra" / "overrides.yaml"
        overrides: list = list(OmegaConf.load(overrides_file)) if overrides_file.exists() else []
        row: dict[str, Any] = {"job": int(job.name), "overrides": " ".join(overrides)}
        for item in overrides:
            key, _, value = str(item).partition("=")
            row[key.lstrip("+~")] = _number(value)
        report = job / "report.json"
        r = json.loads(report.read_text()) if report.exists() else {}
        if "random_baseline" in r:  # the colour-swap report
            rb = r["random_baseline"]["answered_right"]
            row.update(
                {
                    "layer": _layers(r["steer"]["layers"]),
                    "alpha": r["steer"]["alpha"],
                    "mode": r["steer"]["mode"],
                    "positions": r["steer"].get("positions", "all"),
                    "swap_answered_right": r["swap"]["answered_right"]["rate"],
                    "n_answered_right": r["swap"]["answered_right"]["n"],
                    "swap_all": r["swap"]["all"]["rate"],
                    **{
                        f"swap_{cond}_to_{c['target']}": c["swap_answered_right"]["rate"]
                        for cond, c in r["unsteered"]["per_class"].items()
                    },
                    "random_mean": rb["random_mean"],
                    "random_sd": rb["random_sd"],
                    "binomial_p": rb["binomial_p"],
                    "control_bleed": r["controls"].get("generate_bleed", {}).get("rate"),
                    "controls_top_changed": r["controls"]
                    .get("logit_top_token_changed", {})
                    .get("rate"),
                }
            )
            row.update(_fluency_columns(r))
        elif (job / FAILED).exists():
            failure = json.loads((job / FAILED).read_text(encoding="utf-8"))
            row["status"] = "failed"
            row["error"] = failure.get("message", "")
            row["bad_input"] = bool(failure.get("bad_input"))
        elif (job / "run.json").exists():
            row.update(_report_headlines(json.loads((job / "run.json").read_text())))
        else:
            row["status"] = "failed or running"
        rows.append(row)
    return pd.DataFrame(rows)


def _report_headlines(run: dict) -> dict:
    """The headline of each report stage of a job (probes, contamination: the stages that
    declare one): its name, its value, and the probes' best CV accuracy per contrast; "no
    report" when none."""
    from mlx_interp.engine.dag import headlines
    from mlx_interp.stages import STAGES

    row: dict[str, Any] = {}
    for name, head in headlines(STAGES, run).items():
        row["headline"] = head.name
        row["headline_value"] = head.value
        best = (run[name].get("summary") or {}).get("best") or {}
        row.update({f"best_{c}": v for c, v in best.items()})
    return row or {"status": "no report"}


def _fluency_columns(report: dict) -> dict:
    """Loop rate, repetition and distinct-2 of the open-ended answers (steered; unsteered)."""
    long = report.get("fluency", {}).get("long", {})
    st, un = long.get("steered", {}), long.get("unsteered", {})
    if not st.get("n"):
        return {}
    return {
        "loop_rate": st["loop"]["rate"],
        "loop_rate_unsteered": un["loop"]["rate"] if un.get("n") else None,
        "repeated_ngram_share": st["repeated_ngram_share"],
        "distinct_2": st["distinct_2"],
        "long_names_target": st["names_target"]["rate"],
        "n_long": st["n"],
    }


def _layers(layers: list[int]) -> int | str:
    """A single steered layer as an int (sorts numerically), several as "a,b"."""
    return layers[0] if len(layers) == 1 else ",".join(map(str, layers))


def _number(value: str) -> Any:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def plot_sweep(table: pd.DataFrame, path: Path) -> Path | None:
    """Swap rate (answered right) against alpha, one line per layer; random mean dashed."""
    if "swap_answered_right" not in table or table["alpha"].nunique() < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for layer, group in table.sort_values("alpha").groupby("layer", sort=True):
        line = ax.plot(group["alpha"], group["swap_answered_right"], "o-", label=f"layer {layer}")
        ax.plot(group["alpha"], group["random_mean"], ls="--", color=line[0].get_color(), lw=1)
    ax.set_xlabel("alpha")
    ax.set_ylabel("swap rate (questions answered right unsteered)")
    ax.set_ylim(0, 1.02)
    ax.set_title("colour swap vs alpha (dashed: random directions of equal norm)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub markdown table (floats to 4 significant digits), without extra dependencies."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "" if v != v else f"{v:.4g}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + " --- |" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def write_summary(sweep_dir: Path) -> pd.DataFrame:
    table = collect_jobs(sweep_dir)
    if table.empty:
        return table
    table.to_parquet(sweep_dir / "summary.parquet", index=False)
    cols = [c for c in table.columns if c not in ("overrides",)]
    (sweep_dir / "summary.md").write_text(
        "# Sweep summary\n\n" + markdown_table(table[cols]) + "\n",
        encoding="utf-8",
    )
    plot_sweep(table, sweep_dir / "swap_vs_alpha.png")
    from mlx_interp.stages.report_plots import plot_swap_vs_loop

    plot_swap_vs_loop(table, sweep_dir / "swap_vs_loop.png")
    return table


def failed_jobs(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of jobs that failed (status "failed"), with their overrides and message."""
    if table.empty or "status" not in table:
        return table.iloc[:0]
    return table[table["status"] == "failed"]


class SweepSummary(Callback):
    """Hydra callback: write the sweep summary when a multirun ends; when some jobs failed,
    list them and exit with status 2 (all bad input) or 1 (some crashed)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        table = write_summary(sweep_dir)
        log.info("sweep summary: %d jobs -> %s", len(table), sweep_dir / "summary.md")
        print(f"sweep summary: {sweep_dir / 'summary.md'}")
        failed = failed_jobs(table)
        if len(failed):
            for row in failed.itertuples():
                print(f"failed job {row.job} ({row.overrides}): {row.error}", file=sys.stderr)
            rest = "; the others completed" if len(failed) < len(table) else ""
            print(
                f"error: {len(failed)} of {len(table)} sweep jobs failed (listed above and in "
                f"{sweep_dir / 'summary.md'}){rest}",
                file=sys.stderr,
            )
            sys.exit(2 if failed["bad_input"].all() else 1)
