"""Stage `contamination_report`: the rubric contamination's report.md, report.json and plot.

Used by rubric_contamination: mean cosine to the clean prompt per domain and variant with
bootstrap CIs, and which paired differences are significant.

``report.reference`` (from the experiment config) holds the original study's figures, shown
beside the measured ones; they are never used in a computation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd

from mlx_interp.engine.dag import Stage, summary_headline
from mlx_interp.engine.schema import ModelConfig, ReportConfig
from mlx_interp.stages.tables import md_table

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@dataclass(frozen=True)
class ContaminationReportInputs:
    model: ModelConfig  # its name
    report: ReportConfig  # plots, and the original study's figures shown beside ours


def compute_contamination_report(
    table: pd.DataFrame, diffs: pd.DataFrame, info: dict, inputs: ContaminationReportInputs
) -> dict:
    layer = int(info["layer"])
    at = table[table["layer"] == layer]
    cells = {
        f"{r.domain}|{r.variant}": {
            "domain": r.domain,
            "variant": r.variant,
            "n": int(r.n),
            "cosine": float(r.cosine),
            "ci95": [float(r.lo), float(r.hi)],
            "shift": float(r.shift),
        }
        for r in at.itertuples()
    }
    d_at = diffs[diffs["layer"] == layer]
    differences = [
        {
            "a": r.a,
            "b": r.b,
            "domain": r.domain,
            "n": int(r.n),
            "diff": float(r.diff),
            "ci95": [float(r.lo), float(r.hi)],
            "significant": bool(r.significant),
        }
        for r in d_at.itertuples()
    ]
    pooled = table[table["domain"] == "all"]
    per_layer = {
        v: {int(r.layer): [float(r.cosine), float(r.lo), float(r.hi)] for r in g.itertuples()}
        for v, g in pooled.groupby("variant")
    }
    sig_layers = {
        f"{a}-{b}": sorted(
            diffs[
                (diffs["a"] == a)
                & (diffs["b"] == b)
                & (diffs["domain"] == "all")
                & diffs["significant"]
            ]["layer"]
            .astype(int)
            .tolist()
        )
        for a, b in info["compare"]
    }
    return {
        "model": inputs.model.name,
        "layer": layer,
        "layers": info["layers"],
        "reference_variant": info["reference"],
        "n_bootstrap": info["n_bootstrap"],
        "confidence": info["confidence"],
        "n_base_prompts": info["n_base_prompts"],
        "domains": info["domains"],
        "mean_tokens_per_variant": info["mean_tokens_per_variant"],
        "cells": cells,
        "differences": differences,
        "per_layer_pooled": per_layer,
        "significant_layers_pooled": sig_layers,
        "reference": inputs.report.reference,
    }


def contamination_markdown(r: dict) -> str:
    conf = f"{r['confidence']:.0%}"
    variants = sorted({c["variant"] for c in r["cells"].values()})
    domains = [*r["domains"], "all"]
    lines = [
        f"# Rubric contamination: {r['model']}",
        "",
        f"Cosine between the last-token state of each task prompt and the same prompt with "
        f"a rubric, random padding of equal token length, or a wrong-domain rubric, at layer "
        f"{r['layer']} ({r['n_base_prompts']} task prompts over {len(r['domains'])} domains). "
        f"{conf} bootstrap CIs from {r['n_bootstrap']} resamples of the prompts. Mean tokens "
        f"per prompt: "
        + ", ".join(f"{k or 'none'} {v}" for k, v in r["mean_tokens_per_variant"].items())
        + ".",
        "",
        f"## Cosine to the {r['reference_variant']} prompt (1 = unchanged)",
        "",
    ]
    rows = []
    for d in domains:
        row = [d]
        for v in variants:
            c = r["cells"].get(f"{d}|{v}")
            row.append(f"{c['cosine']:.3f} ({c['ci95'][0]:.3f}-{c['ci95'][1]:.3f})" if c else "")
        rows.append(row)
    lines += md_table(["domain", *variants], rows)
    lines += [
        "",
        "## Paired differences of cosine (a - b; negative: a moved the state further)",
        "",
    ]
    rows = [
        [
            f"{d['a']} - {d['b']}",
            d["domain"],
            d["n"],
            f"{d['diff']:+.4f} ({d['ci95'][0]:+.4f} to {d['ci95'][1]:+.4f})",
            "yes" if d["significant"] else "no",
        ]
        for d in r["differences"]
    ]
    lines += md_table(["difference", "domain", "prompts", f"mean ({conf} CI)", "significant"], rows)
    lines += ["", "Layers where the pooled difference is significant:", ""]
    for k, v in r["significant_layers_pooled"].items():
        lines.append(f"- {k}: {v if v else 'none'}")
    ref = r["reference"]
    if ref:
        lines += ["", "Original study (Qwen 7B): " + json.dumps(ref)]
    lines += ["", "Per layer: `contamination.png`."]
    return "\n".join(lines) + "\n"


def plot_contamination(r: dict, path: Path) -> Path:
    """Left: pooled cosine per layer for each variant (CI band). Right: by domain at the
    headline layer."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for v, per in sorted(r["per_layer_pooled"].items()):
        layers = sorted(per)
        cos = [per[k][0] for k in layers]
        (line,) = ax1.plot(layers, cos, "o-", ms=3, label=v)
        ax1.fill_between(
            layers,
            [per[k][1] for k in layers],
            [per[k][2] for k in layers],
            color=line.get_color(),
            alpha=0.2,
        )
    ax1.axvline(r["layer"], color="grey", ls=":", lw=1)
    ax1.set_xlabel("layer")
    ax1.set_ylabel(f"cosine to {r['reference_variant']} prompt")
    ax1.set_title("all domains pooled (band: 95% CI)", fontsize=9)
    ax1.legend(fontsize=8)
    variants = sorted({c["variant"] for c in r["cells"].values()})
    domains = r["domains"]
    width = 0.8 / max(len(variants), 1)
    for i, v in enumerate(variants):
        vals = [r["cells"][f"{d}|{v}"] for d in domains]
        bars = np.array([c["cosine"] for c in vals])
        err = np.array([[c["cosine"] - c["ci95"][0], c["ci95"][1] - c["cosine"]] for c in vals])
        ax2.bar(np.arange(len(domains)) + i * width, bars, width, yerr=err.T, capsize=2, label=v)
    ax2.set_xticks(
        np.arange(len(domains)) + width * (len(variants) - 1) / 2,
        domains,
        rotation=20,
        ha="right",
        fontsize=8,
    )
    lo = min(c["ci95"][0] for c in r["cells"].values())
    ax2.set_ylim(max(0.0, lo - 0.05), 1.0)
    ax2.set_title(f"by domain at layer {r['layer']}", fontsize=9)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(inputs: ContaminationReportInputs, upstream: dict[str, Path], out: Path) -> dict:
    """Stage entry: the contamination report; needs contamination."""
    src = upstream["contamination"]
    info = json.loads((src / "contamination.json").read_text())
    r = compute_contamination_report(
        pd.read_parquet(src / "contamination.parquet"),
        pd.read_parquet(src / "differences.parquet"),
        info,
        inputs,
    )
    if inputs.report.plots:
        plot_contamination(r, out / "contamination.png")
    (out / "report.json").write_text(json.dumps(r, indent=2))
    (out / "report.md").write_text(contamination_markdown(r))
    rubric = r["cells"].get("all|rubric")
    return {
        "headline": {
            "name": f"rubric shift (1 - cosine) at layer {r['layer']}",
            "value": rubric["shift"] if rubric else float("nan"),
        }
    }


STAGE = Stage(
    name="contamination_report",
    run=run,
    inputs=ContaminationReportInputs,
    needs=("contamination",),
    writes=("report.json", "report.md"),
    report=("report.md", "report.json", "*.png"),
    headline=summary_headline,
)
