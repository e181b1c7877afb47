"""Stage `probe_report`: the probes' report.md, report.json and PNG plots.

Used by sycophancy_3way and sycophancy_confound: per contrast the best layer's CV accuracy
with its permutation p-value and the chance line, the per-layer accuracy plot, the transfer
table (the confound diagnostic) and the cosines between difference directions (heatmap).

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
from mlx_interp.stages.tables import fmt, fmt_p, md_table

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@dataclass(frozen=True)
class ProbeReportInputs:
    model: ModelConfig  # its name
    report: ReportConfig  # plots, and the original study's figures shown beside ours


def compute_probe_report(
    probes: pd.DataFrame,
    transfer: pd.DataFrame,
    cosines: pd.DataFrame,
    info: dict,
    inputs: ProbeReportInputs,
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
                f"{fmt(c['accuracy_mean'])} ± {fmt(c['accuracy_sd'])}",
                fmt_p(c["permutation_p"]),
                fmt(c["chance_threshold"]),
                f"{c['n_layers_significant']}/{len(c['per_layer'])}"
                if r["n_permutations"]
                else "not run",
                ref.get("accuracy", {}).get(name, ""),
            ]
        )
    lines += md_table(
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
                f"{fmt_p(own['permutation_p'])}), so these rates say nothing about the "
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
        lines += md_table(["condition", "positive", "rate (95% CI)", "original (Qwen 7B)"], rows)
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
                    f"{fmt(c['mean_mid_to_late'], 2)} (layers {c['mid_to_late_layers'][0]}-"
                    f"{c['mid_to_late_layers'][1]})",
                    f"{fmt(c['max'], 2)} at layer {c['max_layer']} "
                    f"({fmt(c['max_ci95'][0], 2)}-{fmt(c['max_ci95'][1], 2)})",
                    f"{fmt(pl['split_half'][0], 2)} / {fmt(pl['split_half'][1], 2)}",
                    ref.get("cosine", {}).get(f"{c['a']}~{c['b']}", ""),
                ]
            )
        lines += md_table(
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


def run(inputs: ProbeReportInputs, upstream: dict[str, Path], out: Path) -> dict:
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


STAGE = Stage(
    name="probe_report",
    run=run,
    inputs=ProbeReportInputs,
    needs=("probes",),
    writes=("report.json", "report.md"),
    report=("report.md", "report.json", "*.png"),
    headline=summary_headline,
)
