"""PNG plots of the report: per-layer direction norm and separability; swap vs random; logit
lens and activation patching heatmaps."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_layers(directions_info: dict, steered: list[int], path: Path) -> Path:
    """Direction norm and separability (d', CV accuracy) per layer; steered layers marked."""
    per = {int(k): v for k, v in directions_info["per_layer"].items()}
    layers = sorted(per)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax1.plot(layers, [per[k]["norm"] for k in layers], "o-", color="tab:blue")
    ax1.set_ylabel("|mean(pos) - mean(neg)|")
    pos, neg = directions_info["contrast"]
    ax1.set_title(f"{pos} - {neg} direction ({directions_info['method']}) per layer")
    ax2.plot(
        layers,
        [per[k]["cv_accuracy"] for k in layers],
        "o-",
        color="tab:green",
        label="5-fold CV accuracy along the direction",
    )
    ax2.set_ylim(0.4, 1.02)
    ax2.set_ylabel("accuracy")
    ax2.axhline(0.5, color="grey", lw=0.8, ls=":")
    twin = ax2.twinx()
    twin.plot(
        layers,
        [per[k]["d_prime"] for k in layers],
        "s--",
        color="tab:orange",
        label="d' of projections",
    )
    twin.set_ylabel("d'")
    for layer in steered:
        for ax in (ax1, ax2):
            ax.axvline(layer, color="red", alpha=0.3, lw=6)
    lines = ax2.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    labels = ax2.get_legend_handles_labels()[1] + twin.get_legend_handles_labels()[1]
    ax2.legend(lines, labels, loc="lower right", fontsize=8)
    ax2.set_xlabel("layer (red band: steered)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_random_baseline(report: dict, path: Path) -> Path:
    """Swap rate of the main direction (Wilson 95% CI) beside each random direction."""
    test = report["random_baseline"]["answered_right"]
    main = report["swap"]["answered_right"]
    rates = test["random_rates"]
    per_class = report["unsteered"]["per_class"]
    fig, ax = plt.subplots(figsize=(9, 4))
    labels, xs_named = [], []
    bars = [("all", main)] + [
        (f"{c}\n-> {v['target']}", v["swap_answered_right"]) for c, v in per_class.items()
    ]
    for j, (label, stat) in enumerate(bars):
        x = j - len(bars) - 0.5
        ax.bar(
            [x],
            [stat["rate"]],
            color="tab:red",
            width=0.8,
            alpha=1.0 if j == 0 else 0.55,
            label="concept direction" if j == 0 else None,
        )
        lo, hi = stat["ci95"]
        ax.errorbar(
            [x],
            [stat["rate"]],
            yerr=[[stat["rate"] - lo], [hi - stat["rate"]]],
            color="black",
            capsize=4,
        )
        labels.append(label)
        xs_named.append(x)
    xs = list(range(len(rates)))
    ax.bar(xs, rates, color="tab:grey", width=0.8, label="random directions, equal norm")
    ax.axhline(test["random_mean"], color="tab:grey", ls="--", lw=1)
    ax.set_xticks([*xs_named, *xs], [*labels, *[f"r{i}" for i in xs]], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("swap rate")
    steer = report["steer"]
    ax.set_title(
        f"swap rate over the {main['n']} questions answered right unsteered "
        f"(layer {steer['layers']}, alpha {steer['alpha']}, {steer['mode']})",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_swap_vs_loop(table, path: Path) -> Path | None:
    """Sweep plot: swap rate and loop rate against alpha per mode, and swap against loop.

    ``table`` is the sweep summary (columns mode, alpha, swap_answered_right, loop_rate,
    loop_rate_unsteered); None when it has no loop rates or fewer than two alphas.
    """
    need = {"mode", "alpha", "swap_answered_right", "loop_rate"}
    if not need <= set(table.columns) or table["alpha"].nunique() < 2:
        return None
    table = table.dropna(subset=["loop_rate"]).sort_values("alpha")
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 4.3))
    for mode, group in table.groupby("mode", sort=True):
        line = ax1.plot(group["alpha"], group["swap_answered_right"], "o-", label=mode)
        color = line[0].get_color()
        ax2.plot(group["alpha"], group["loop_rate"], "o-", color=color, label=mode)
        ax3.plot(group["loop_rate"], group["swap_answered_right"], "o-", color=color, label=mode)
        for _, row in group.iterrows():
            ax3.annotate(
                f"{row['alpha']:g}",
                (row["loop_rate"], row["swap_answered_right"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    if "loop_rate_unsteered" in table and table["loop_rate_unsteered"].notna().any():
        base = float(table["loop_rate_unsteered"].dropna().iloc[0])
        ax2.axhline(base, color="grey", ls="--", lw=1, label=f"unsteered ({100 * base:.0f}%)")
    ax2.axhline(0.05, color="tab:red", ls=":", lw=1, label="5% goal")
    ax1.set(xlabel="alpha", ylabel="swap rate (answered right unsteered)", ylim=(0, 1.02))
    ax2.set(xlabel="alpha", ylabel="loop rate (open-ended answers)", ylim=(-0.02, 1.02))
    ax3.set(xlabel="loop rate", ylabel="swap rate", xlim=(-0.02, 1.02), ylim=(0, 1.02))
    ax1.set_title("colour swap vs alpha", fontsize=10)
    ax2.set_title("answers that end in a token loop", fontsize=10)
    ax3.set_title("swap against loop rate (labels: alpha)", fontsize=10)
    for ax in (ax1, ax2, ax3):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_lens(lens: pd.DataFrame, path: Path) -> Path:
    """Logit lens heatmaps, one per class: mean logit difference (own colour minus the other)
    per layer and position role."""
    classes = sorted(lens["condition"].unique())
    roles = list(dict.fromkeys(lens["role"]))
    fig, axes = plt.subplots(1, len(classes), figsize=(4 * len(classes) + 1, 5), squeeze=False)
    for ax, cond in zip(axes[0], classes, strict=True):
        mean = (
            lens[lens["condition"] == cond]
            .groupby(["layer", "role"])["logit_diff"]
            .mean()
            .unstack("role")[roles]
        )
        lim = float(np.nanmax(np.abs(mean.to_numpy()))) or 1.0
        im = ax.imshow(mean.to_numpy(), aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_xticks(range(len(roles)), roles)
        ax.set_ylabel("layer")
        ax.set_title(f"{cond} questions: logit({cond}) - other")
        fig.colorbar(im, ax=ax)
    fig.suptitle("Logit lens (final norm + unembedding of each layer's residual)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_patching(patching: pd.DataFrame, title: str, path: Path) -> Path:
    """Activation patching heatmap: share of the logit difference recovered per layer x role."""
    if "site" in patching and patching["site"].nunique() > 1:
        patching = patching[patching["site"] == "resid"]
    roles = list(dict.fromkeys(patching["role"]))
    mean = patching.pivot(index="layer", columns="role", values="recovery")[roles]
    fig, ax = plt.subplots(figsize=(5, 6))
    im = ax.imshow(mean.to_numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(roles)), roles)
    ax.set_yticks(range(len(mean.index)), [str(i) for i in mean.index], fontsize=7)
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="share of logit difference recovered")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
