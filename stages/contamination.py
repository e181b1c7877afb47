"""Stage `contamination`: how far a rubric in the prompt moves the last-token state.

The prompts stage built every task prompt in several variants (concept.variants: clean,
rubric, padding of equal token length, wrong-domain rubric), tied by ``base_id``. Per layer
and base prompt this stage takes the cosine between the clean prompt's last-token state and
each variant's, then per (domain, variant, layer) the mean cosine with a bootstrap CI over
prompts, and per compared pair (e.g. rubric vs padding) the paired difference of cosines
with its bootstrap CI: significant when the CI excludes 0.

Writes cosines.parquet (one row per base prompt, variant, layer), contamination.parquet
(summary per domain incl. "all", variant, layer), differences.parquet (pairs), and
contamination.json (headline layer and settings).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from mlx_interp.analysis.stats import bootstrap_ci
from mlx_interp.engine.dag import Stage
from mlx_interp.engine.schema import ContaminationConfig
from mlx_interp.errors import ConfigError
from mlx_interp.io.activations import layer_matrices, resolve_probe_layers


@dataclass(frozen=True)
class ContaminationInputs:
    contamination: ContaminationConfig
    seed: int


class ContaminationError(ConfigError):
    """The prompts have no variants to compare; the message says what to set."""


def paired_cosines(prompts: pd.DataFrame, acts: dict[int, np.ndarray], reference: str):
    """DataFrame base_id, domain, variant, layer, cosine (variant vs the reference variant)."""
    ids = prompts["prompt_id"].tolist()
    index = {pid: i for i, pid in enumerate(ids)}
    ref = prompts[prompts["variant"] == reference].set_index("base_id")
    others = prompts[prompts["variant"] != reference]
    missing = sorted(set(others["base_id"]) - set(ref.index))
    if missing:
        raise ContaminationError(
            f"prompt(s) {missing[:3]} have no {reference!r} variant to compare with; keep "
            f"{reference!r} in concept.variants.kinds"
        )
    rows = []
    for layer, x in acts.items():
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)
        for r in others.itertuples():
            cos = float(unit[index[r.prompt_id]] @ unit[index[ref.loc[r.base_id, "prompt_id"]]])
            rows.append(
                {
                    "base_id": r.base_id,
                    "domain": r.condition,
                    "variant": r.variant,
                    "layer": int(layer),
                    "cosine": cos,
                }
            )
    return pd.DataFrame(rows)


def summarize(cos: pd.DataFrame, n_boot: int, confidence: float, seed: int) -> pd.DataFrame:
    """Mean cosine and its bootstrap CI per (domain, variant, layer); domain "all" pools."""
    rows = []
    pooled = cos.assign(domain="all")
    groups = pd.concat([cos, pooled]).groupby(["domain", "variant", "layer"], sort=True)
    for (domain, variant, layer), g in tqdm(groups, desc="cosine CIs", leave=False):
        ci = bootstrap_ci(
            g["cosine"].to_numpy(), n_resamples=n_boot, confidence=confidence, seed=seed
        )
        rows.append(
            {
                "domain": domain,
                "variant": variant,
                "layer": int(layer),
                "n": len(g),
                "cosine": ci.estimate,
                "lo": ci.lo,
                "hi": ci.hi,
                "shift": 1 - ci.estimate,
            }
        )
    return pd.DataFrame(rows)


def differences(
    cos: pd.DataFrame, compare: list, n_boot: int, confidence: float, seed: int
) -> pd.DataFrame:
    """Paired difference cos(a) - cos(b) over base prompts, per (domain, layer), with its CI.

    Negative means variant a moved the state further from the clean prompt than b did.
    """
    wide = cos.pivot_table(index=["domain", "layer", "base_id"], columns="variant", values="cosine")
    rows = []
    for a, b in compare:
        for col in (a, b):
            if col not in wide.columns:
                raise ContaminationError(
                    f"contamination.compare names variant {col!r}, not among the prompts' "
                    f"variants {sorted(wide.columns)}; fix contamination.compare"
                )
        diff = (wide[a] - wide[b]).rename("diff").reset_index()
        pooled = diff.assign(domain="all")
        groups = pd.concat([diff, pooled]).groupby(["domain", "layer"])
        for (domain, layer), g in tqdm(groups, desc=f"CIs {a} - {b}", leave=False):
            ci = bootstrap_ci(
                g["diff"].to_numpy(), n_resamples=n_boot, confidence=confidence, seed=seed
            )
            rows.append(
                {
                    "a": a,
                    "b": b,
                    "domain": domain,
                    "layer": int(layer),
                    "n": len(g),
                    "diff": ci.estimate,
                    "lo": ci.lo,
                    "hi": ci.hi,
                    "significant": bool(ci.lo > 0 or ci.hi < 0),
                }
            )
    return pd.DataFrame(rows)


def run(inputs: ContaminationInputs, upstream: dict[str, Path], out: Path) -> dict:
    """Stage entry: cosines of each variant to the reference; needs prompts and capture."""
    ccfg, seed = inputs.contamination, inputs.seed
    prompts = pd.read_parquet(upstream["prompts"] / "prompts.parquet")
    if "variant" not in prompts or not (prompts["variant"] != "").any():
        raise ContaminationError(
            "the prompts have no variants: use a concept with variants (e.g. "
            "concept=rubric_contamination, or set concept.variants.rubrics=<file.json>)"
        )
    reference = ccfg.reference
    layers, acts = layer_matrices(upstream["capture"], ccfg.layers, prompts["prompt_id"].tolist())
    cos = paired_cosines(prompts, acts, reference)
    n_boot, conf = ccfg.n_bootstrap, ccfg.confidence
    table = summarize(cos, n_boot, conf, seed)
    diffs = differences(cos, [list(p) for p in ccfg.compare], n_boot, conf, seed)
    head = ccfg.layer
    head = layers[len(layers) // 2] if head is None else resolve_probe_layers([head], layers)[0]
    tokens = prompts.groupby("variant")["n_tokens"].mean().round(1).to_dict()
    cos.to_parquet(out / "cosines.parquet", index=False)
    table.to_parquet(out / "contamination.parquet", index=False)
    diffs.to_parquet(out / "differences.parquet", index=False)
    info = {
        "reference": reference,
        "layers": layers,
        "layer": int(head),
        "n_bootstrap": n_boot,
        "confidence": conf,
        "compare": [list(p) for p in ccfg.compare],
        "mean_tokens_per_variant": tokens,
        "domains": sorted(prompts["condition"].unique().tolist()),
        "n_base_prompts": int(prompts["base_id"].nunique()),
    }
    (out / "contamination.json").write_text(json.dumps(info, indent=2))
    return {"layer": int(head), "n_base_prompts": info["n_base_prompts"]}


STAGE = Stage(
    name="contamination",
    run=run,
    inputs=ContaminationInputs,
    needs=("prompts", "capture"),
    writes=(
        "cosines.parquet",
        "contamination.parquet",
        "differences.parquet",
        "contamination.json",
    ),
)
