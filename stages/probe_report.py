"""Stages `probe_report` and `contamination_report`: report.md, report.json and PNG plots.

probe_report (sycophancy_3way, sycophancy_confound): per contrast the best layer's CV
accuracy with its permutation p-value and the chance line, the per-layer accuracy plot,
the transfer table (the confound diagnostic) and the cosines between difference directions
(heatmap). contamination_report (rubric_contamination): mean cosine to the clean prompt per
domain and variant with bootstrap CIs, and which paired differences are significant.

``report.reference`` (from the experiment config) holds the original study's figures, shown
beside the measured ones; they are never used in a computation.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd

from mlx_interp.engine.dag import Stage
from mlx_interp.engine.schema import ModelConfig, ReportConfig

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

VERSION = "1"


@dataclass(frozen=True)
class ReportInputs:
    model: ModelConfig  # its name
    report: ReportConfig  # plots, and the original study's figures shown beside ours


def _f(x: float, nd: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _p(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.3g}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


# --- probes -------------------------------------------------------------------------------


def compute_probe_report(
    probes: pd.DataFrame,
    transfer: pd.DataFrame,
    cosines: pd.DataFrame,
    info: dict,
    inputs: ReportInputs,
) -> dict:
    """The report dict: best layers, per-layer accuracy, transfer at the best layer, cosines."""
    alpha = float(info["alpha"])
    layers = list(info["layers"])
    best = info["best"]
    contrasts = {}
    for name, group in probes.groupby("contrast", sort=False):
        group = group.sort_values("layer")
        sig = group["permutation_p"] < alpha
        contrasts[name] = {
            **best[name],
            "kind": str(group["kind"].iloc[0]),
            "pos": str(group["pos"].iloc[0]),
            "neg": str(group["neg"].iloc[0]),
            "n_layers_significant": int(sig.sum()),
            "per_layer": {
                int(r.layer): {
                    "accuracy_mean": float(r.accuracy_mean),
                    "accuracy_sd": float(r.accuracy_sd),
                    "permutation_p": float(r.permutation_p),
                }
                for r in group.itertuples()
            },
        }
    transfer_out = {}
    for name, group in transfer.groupby("contrast", sort=False):
        layer = best[name]["layer"]
        at = group[group["layer"] == layer]
        transfer_out[name] = {
            "layer": int(layer),
            "conditions": {
                r.condition: {
                    "fraction_positive": float(r.fraction_positive),
                    "ci95": [float(r.lo), float(r.hi)],
                    "n": int(r.n),
                    "n_positive": int(r.n_positive),
                    "in_training": bool(r.in_training),
                }
                for r in at.itertuples()
            },
            "per_layer": {
                cond: g.sort_values("layer")["fraction_positive"].round(4).tolist()
                for cond, g in group.groupby("condition", sort=False)
            },
        }
    cos_out = {}
    late = [x for x in layers if x >= layers[len(layers) // 2]]
    for (a, b), group in cosines.groupby(["a", "b"], sort=False):
        group = group.sort_values("layer")
        in_late = group[group["layer"].isin(late)]
        peak = group.loc[group["cosine"].idxmax()]
        cos_out[f"{a}~{b}"] = {
            "a": a,
            "b": b,
            "mean_mid_to_late": float(in_late["cosine"].mean()),
            "mid_to_late_layers": [int(late[0]), int(late[-1])],
            "max": float(peak["cosine"]),
            "max_layer": int(peak["layer"]),
            "max_ci95": [float(peak["lo"]), float(peak["hi"])],
            "per_layer": {
                int(r.layer): {
                    "cosine": float(r.cosine),
                    "ci95": [float(r.lo), float(r.hi)],
                    "split_half": [float(r.split_half_a), float(r.split_half_b)],
                }
                for r in group.itertuples()
            },
        }
    return {
        "model": inputs.model.name,
        "folds": int(info["folds"]),
        "n_permutations": int(info["n_permutations"]),
        "alpha": alpha,
        "layers": layers,
        "conditions": info["conditions"],
        "contrasts": contrasts,
        "transfer": transfer_out,
        "cosines": cos_out,
        "reference": inputs.report.reference,
    }


def probe_markdown(r: dict) -> str:
    ref = r["reference"]
    lines = [
        f"# Probes: {r['model']}",
        "",
        f"Logistic probes on the last-token residual stream, {r['folds']}-fold stratified CV, "
        f"{r['n_permutations']} label permutations per layer (p-value), layers "
        f"{r['layers'][0]}-{r['layers'][-1]}. The chance threshold is the binomial "
        f"{1 - r['alpha']:.0%} quantile of a majority-class guesser's accuracy.",
        "",
        "## Best layer per contrast",
        "",
    ]
    rows = []
    for name, c in r["contrasts"].items():
        rows.append(
            [
                name,
                c["n"],
                c["layer"],
                f"{_f(c['accuracy_mean'])} ± {_f(c['accuracy_sd'])}",
                _p(c["permutation_p"]),
                _f(c["chance_threshold"]),
                f"{c['n_layers_significant']}/{len(c['per_layer'])}"
                if r["n_permutations"]
                else "not run",
                ref.get("accuracy", {}).get(name, ""),
            ]
        )
    lines += _table(
        [
            "contrast",
            "prompts",
            "best layer",
            "CV accuracy (mean ± sd)",
            "permutation p",
            "chance threshold",
            f"layers with p < {r['alpha']}",
            "original (Qwen 7B)",
        ],
        rows,
    )
    lines += ["", "Per-layer accuracy: `probe_accuracy.png`.", ""]
    for name, t in r["transfer"].items():
        orig = ref.get("transfer", {}).get(name, {})
        lines += [
            f"## Transfer: the `{name}` probe at layer {t['layer']} scored on each condition",
            "",
            "Share of each condition's prompts the probe calls positive (95% Wilson CI). "
            "Training conditions are scored by cross-validated predictions.",
            "",
        ]
        own = r["contrasts"].get(name, {})
        if own.get("permutation_p", 0.0) >= r["alpha"]:
            lines += [
                f"**This probe is not better than chance at its best layer (permutation p "
                f"{_p(own['permutation_p'])}), so these rates say nothing about the "
                "conditions.**",
                "",
            ]
        rows = []
        for cond, c in t["conditions"].items():
            lo, hi = c["ci95"]
            rows.append(
                [
                    cond + (" (training)" if c["in_training"] else ""),
                    f"{c['n_positive']}/{c['n']}",
                    f"{100 * c['fraction_positive']:.0f}% ({100 * lo:.0f}-{100 * hi:.0f}%)",
                    f"{orig[cond]}%" if cond in orig else "",
                ]
            )
        lines += _table(["condition", "positive", "rate (95% CI)", "original (Qwen 7B)"], rows)
        lines += [""]
    if r["cosines"]:
        lines += [
            "## Cosines between mean-difference directions",
            "",
            "Bootstrap 95% CI over prompts (1 resample = every condition redrawn). Split-half: "
            "the cosine of each direction with itself fitted on disjoint halves of the prompts "
            "(how high a cosine can get at this sample size).",
            "",
        ]
        rows = []
        for c in r["cosines"].values():
            pl = c["per_layer"][c["max_layer"]]
            rows.append(
                [
                    f"{c['a']} vs {c['b']}",
                    f"{_f(c['mean_mid_to_late'], 2)} (layers {c['mid_to_late_layers'][0]}-"
                    f"{c['mid_to_late_layers'][1]})",
                    f"{_f(c['max'], 2)} at layer {c['max_layer']} "
                    f"({_f(c['max_ci95'][0], 2)}-{_f(c['max_ci95'][1], 2)})",
                    f"{_f(pl['split_half'][0], 2)} / {_f(pl['split_half'][1], 2)}",
                    ref.get("cosine", {}).get(f"{c['a']}~{c['b']}", ""),
                ]
            )
        lines += _table(
            [
                "directions",
                "mean cosine, mid-to-late layers",
                "max (95% CI)",
                "split-half at max",
                "original (Qwen 7B)",
            ],
            rows,
        )
        lines += ["", "Per layer: `cosines.png`.", ""]
    return "\n".join(lines) + "\n"


def plot_probe_accuracy(r: dict, path: Path) -> Path:
    """Accuracy ± sd per layer for each contrast; dashed: chance threshold; filled: p < alpha."""
    names = list(r["contrasts"])
    fig, ax = plt.subplots(figsize=(9, 4.8))
    colors = plt.cm.tab10(np.linspace(0, 1, 10))
    for i, name in enumerate(names):
        c = r["contrasts"][name]
        layers = sorted(c["per_layer"])
        mean = np.array([c["per_layer"][k]["accuracy_mean"] for k in layers])
        sd = np.array([c["per_layer"][k]["accuracy_sd"] for k in layers])
        p = np.array([c["per_layer"][k]["permutation_p"] for k in layers])
        col = colors[i % 10]
        ax.plot(layers, mean, "-", color=col, label=name)
        ax.fill_between(layers, mean - sd, mean + sd, color=col, alpha=0.12)
        sig = p < r["alpha"]
        ax.scatter(np.array(layers)[sig], mean[sig], color=col, s=18, zorder=3)
        ax.scatter(
            np.array(layers)[~sig], mean[~sig], facecolors="white", edgecolors=col, s=18, zorder=3
        )
        ax.axhline(c["chance_threshold"], color=col, ls="--", lw=0.8, alpha=0.7)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"{r['folds']}-fold CV accuracy (± sd)")
    ax.set_ylim(0, 1.02)
    ax.set_title(
        f"Probe accuracy per layer ({r['model']}); dashed: chance threshold (alpha "
        f"{r['alpha']}); filled: permutation p < {r['alpha']}",
        fontsize=9,
    )
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_cosines(r: dict, path: Path) -> Path:
    """Left: cosine matrix of the directions at the middle layer.
    Right: every pair's cosine per layer with its bootstrap CI."""
    pairs = list(r["cosines"].values())
    names = list(dict.fromkeys([p["a"] for p in pairs] + [p["b"] for p in pairs]))
    layers = sorted(pairs[0]["per_layer"])
    layer = layers[len(layers) // 2]  # the middle layer (start of "mid-to-late")
    mat = np.eye(len(names))
    for p in pairs:
        i, j = names.index(p["a"]), names.index(p["b"])
        mat[i, j] = mat[j, i] = p["per_layer"][layer]["cosine"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [1, 1.5]})
    im = ax1.imshow(mat, vmin=-1, vmax=1, cmap="RdBu_r")
    ax1.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax1.set_yticks(range(len(names)), names, fontsize=8)
    for i in range(len(names)):
        for j in range(len(names)):
            color = "white" if abs(mat[i, j]) > 0.6 else "black"
            ax1.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=8, color=color)
    ax1.set_title(f"cosine at layer {layer}", fontsize=9)
    fig.colorbar(im, ax=ax1, fraction=0.046)
    for p in pairs:
        layers = sorted(p["per_layer"])
        cos = [p["per_layer"][k]["cosine"] for k in layers]
        lo = [p["per_layer"][k]["ci95"][0] for k in layers]
        hi = [p["per_layer"][k]["ci95"][1] for k in layers]
        (line,) = ax2.plot(layers, cos, "o-", ms=3, label=f"{p['a']} vs {p['b']}")
        ax2.fill_between(layers, lo, hi, color=line.get_color(), alpha=0.15)
    ax2.axhline(0, color="grey", lw=0.8, ls=":")
    ax2.set_ylim(-1, 1)
    ax2.set_xlabel("layer")
    ax2.set_ylabel("cosine (95% bootstrap CI)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_transfer(r: dict, path: Path) -> Path:
    """Per transfer probe: the positive rate of each condition at its best layer (Wilson CI)."""
    items = list(r["transfer"].items())
    fig, axes = plt.subplots(1, len(items), figsize=(5.5 * len(items), 4.2), squeeze=False)
    for ax, (name, t) in zip(axes[0], items, strict=True):
        conds = list(t["conditions"])
        rate = np.array([t["conditions"][c]["fraction_positive"] for c in conds])
        lo = np.array([t["conditions"][c]["ci95"][0] for c in conds])
        hi = np.array([t["conditions"][c]["ci95"][1] for c in conds])
        colors = ["tab:red" if t["conditions"][c]["in_training"] else "tab:blue" for c in conds]
        ax.bar(
            range(len(conds)),
            100 * rate,
            color=colors,
            yerr=100 * np.vstack([rate - lo, hi - rate]),
            capsize=3,
        )
        orig = r["reference"].get("transfer", {}).get(name, {})
        for i, c in enumerate(conds):
            if c in orig:
                ax.plot(i, orig[c], "k_", ms=18, mew=2)
        ax.set_xticks(range(len(conds)), conds, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 105)
        ax.set_ylabel("% called positive (95% CI)")
        ax.set_title(
            f"{name} probe, layer {t['layer']}\n(red: training, black bar: original)", fontsize=9
        )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_probes(inputs: ReportInputs, upstream: dict[str, Path], out: Path) -> dict:
    """Stage entry: the probes' report; needs probes."""
    src = upstream["probes"]
    info = json.loads((src / "probes.json").read_text())
    r = compute_probe_report(
        pd.read_parquet(src / "probes.parquet"),
        pd.read_parquet(src / "transfer.parquet"),
        pd.read_parquet(src / "cosines.parquet"),
        info,
        inputs,
    )
    if inputs.report.plots:
        plot_probe_accuracy(r, out / "probe_accuracy.png")
        if r["cosines"]:
            plot_cosines(r, out / "cosines.png")
        if r["transfer"]:
            plot_transfer(r, out / "transfer.png")
    (out / "report.json").write_text(json.dumps(r, indent=2))
    (out / "report.md").write_text(probe_markdown(r))
    first = next(iter(r["contrasts"]))
    return {
        "headline": {
            "name": f"{first} best CV accuracy",
            "value": r["contrasts"][first]["accuracy_mean"],
        },
        "best": {n: c["accuracy_mean"] for n, c in r["contrasts"].items()},
    }


# --- contamination --------------------------------------------------------------------------


def compute_contamination_report(
    table: pd.DataFrame, diffs: pd.DataFrame, info: dict, inputs: ReportInputs
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
    lines += _table(["domain", *variants], rows)
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
    lines += _table(["difference", "domain", "prompts", f"mean ({conf} CI)", "significant"], rows)
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
        cos = np.array([c["cosine"] for c in vals])
        err = np.array([[c["cosine"] - c["ci95"][0], c["ci95"][1] - c["cosine"]] for c in vals])
        ax2.bar(np.arange(len(domains)) + i * width, cos, width, yerr=err.T, capsize=2, label=v)
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


def run_contamination(inputs: ReportInputs, upstream: dict[str, Path], out: Path) -> dict:
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


PROBE_REPORT = Stage(
    name="probe_report",
    run=run_probes,
    inputs=ReportInputs,
    needs=("probes",),
    version=VERSION,
)
CONTAMINATION_REPORT = Stage(
    name="contamination_report",
    run=run_contamination,
    inputs=ReportInputs,
    needs=("contamination",),
    version=VERSION,
)
