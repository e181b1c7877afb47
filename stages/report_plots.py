"""PNG plots of the report: per-layer direction norm and separability; swap vs random."""

from __future__ import annotations

from pathlib import Path

import matplotlib

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
