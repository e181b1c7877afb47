"""Stages `logit_lens` and `patching`: where the colour is decided in the model.

logit_lens (reads model, score, localize; needs prompts): for every swap question, per layer
and position role (the object's last token, the tokens after it, the last token), the logit
difference own colour minus the other colour read through the final norm and unembedding
(mlx_interp.analysis.lens). Writes lens.parquet (prompt_id, condition, layer, role, logit_diff).

patching (reads model, score, localize; needs prompts): clean questions (``localize.clean``)
paired with corrupted ones (``localize.corrupt``) of the same template (the text with the
object replaced) and token count; per (site, layer, role) the share of the
clean-minus-corrupted logit difference recovered by patching the clean output in
(interventions/patching.py): sites ``localize.kinds`` of resid (the residual after a layer),
attn and mlp (the block outputs). Writes patching.parquet (site, layer, role, recovery) and
pairs.json.

localization_report (reads model, report; needs logit_lens, patching, steer, report):
localization.md/json and the two heatmaps, with the patching ceiling at the steered site
beside the steering result; its files go into the run directory next to report.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mlx_interp.analysis.lens import lens_logit_diff
from mlx_interp.analysis.scoring import word_token_ids
from mlx_interp.engine.dag import ConfigError, Stage
from mlx_interp.engine.schema import LocalizeConfig, ModelConfig, ReportConfig, ScoreConfig
from mlx_interp.interventions.capture import resolve_layers
from mlx_interp.interventions.patching import patching_recovery
from mlx_interp.interventions.positions import ROLES, object_spans
from mlx_interp.models.loading import load_model, model_fingerprint
from mlx_interp.stages.report_plots import plot_lens, plot_patching
from mlx_interp.stages.report_text import render_localization

ROLE_OF_POSITIONS = {"object": "object", "last": "last", "suffix": "all", "all": "all"}


@dataclass(frozen=True)
class LensInputs:
    model: ModelConfig
    score: ScoreConfig  # the swap words


@dataclass(frozen=True)
class PatchingInputs:
    model: ModelConfig
    score: ScoreConfig  # the swap words
    localize: LocalizeConfig


@dataclass(frozen=True)
class LocalizationReportInputs:
    model: ModelConfig  # its name
    report: ReportConfig


def fingerprint(inputs: LensInputs | PatchingInputs) -> dict:
    return {"model": model_fingerprint(inputs.model)}


def _swap_prompts(prompts: pd.DataFrame, score: ScoreConfig) -> pd.DataFrame:
    swap = prompts[prompts["condition"].isin(list(score.swap))].reset_index(drop=True)
    if swap.empty:
        raise ConfigError(f"no prompts of the swap conditions {list(score.swap)}")
    return swap


def run_logit_lens(inputs: LensInputs, upstream: dict[str, Path], out: Path) -> dict:
    """Stage entry: the lens logit difference (own minus other colour) per layer and role."""
    score = inputs.score
    lm = load_model(inputs.model)
    swap = _swap_prompts(pd.read_parquet(upstream["prompts"] / "prompts.parquet"), score)
    tokens = [list(map(int, t)) for t in swap["tokens"]]
    spans = object_spans(lm.tokenizer, tokens, swap["meta"].tolist(), swap["prompt_id"].tolist())
    ids = {w: word_token_ids(lm.tokenizer, w) for w in set(score.swap) | set(score.swap.values())}
    plus = [ids[c] for c in swap["condition"]]
    minus = [ids[score.swap[c]] for c in swap["condition"]]
    diff = lens_logit_diff(lm.model, tokens, spans, plus, minus, lm.pad_id)  # [n, L, roles]
    n, n_layers, n_roles = diff.shape
    table = pd.DataFrame(
        {
            "prompt_id": np.repeat(swap["prompt_id"].to_numpy(), n_layers * n_roles),
            "condition": np.repeat(swap["condition"].to_numpy(), n_layers * n_roles),
            "layer": np.tile(np.repeat(np.arange(n_layers), n_roles), n),
            "role": np.tile(np.array(ROLES), n * n_layers),
            "logit_diff": diff.reshape(-1),
        }
    )
    table.to_parquet(out / "lens.parquet", index=False)
    last = table[(table["role"] == "last") & (table["layer"] == n_layers - 1)]
    return {
        "n_questions": n,
        "n_layers": n_layers,
        "final_mean_logit_diff": float(last["logit_diff"].mean()),
    }


def template_of(text: str, obj: str) -> str:
    """The question with its object replaced by ``{}`` (case-insensitive, last occurrence)."""
    at = text.lower().rfind(obj.lower())
    return text if at < 0 else text[:at] + "{}" + text[at + len(obj) :]


def make_pairs(
    prompts: pd.DataFrame, clean: str, corrupt: str, max_pairs: int
) -> list[tuple[int, int]]:
    """(clean row, corrupted row) index pairs: same template and token count, each row used
    once, in table order, at most ``max_pairs``."""
    objects = [json.loads(m).get("object", "") for m in prompts["meta"]]
    keys = [
        (template_of(t, o), n)
        for t, o, n in zip(prompts["text"], objects, prompts["n_tokens"], strict=True)
    ]
    free: dict[tuple, list[int]] = {}
    for i, c in enumerate(prompts["condition"]):
        if c == corrupt:
            free.setdefault(keys[i], []).append(i)
    pairs = []
    for i, c in enumerate(prompts["condition"]):
        if c == clean and free.get(keys[i]):
            pairs.append((i, free[keys[i]].pop(0)))
    return pairs[:max_pairs]


def run_patching(inputs: PatchingInputs, upstream: dict[str, Path], out: Path) -> dict:
    """Stage entry: share of the clean-vs-corrupted logit difference recovered per site."""
    score, loc = inputs.score, inputs.localize
    lm = load_model(inputs.model)
    prompts = pd.read_parquet(upstream["prompts"] / "prompts.parquet")
    pairs = make_pairs(prompts, loc.clean, loc.corrupt, loc.max_pairs)
    if len(pairs) < 2:
        raise ConfigError(
            f"only {len(pairs)} {loc.clean}/{loc.corrupt} question pair(s) share a template "
            "and token count; patching needs at least 2 (add questions of one template, e.g. "
            "'What colour is {}?', or fix localize.clean/corrupt)"
        )
    tokens = [list(map(int, t)) for t in prompts["tokens"]]
    clean = [tokens[a] for a, _ in pairs]
    corrupt = [tokens[b] for _, b in pairs]
    metas = prompts["meta"].tolist()
    spans_c = object_spans(lm.tokenizer, clean, [metas[a] for a, _ in pairs])
    spans_x = object_spans(lm.tokenizer, corrupt, [metas[b] for _, b in pairs])
    keep = [i for i, (a, b) in enumerate(zip(spans_c, spans_x, strict=True)) if a == b]
    if len(keep) < 2:
        raise ConfigError("fewer than 2 pairs have object spans at the same token positions")
    words_c = word_token_ids(lm.tokenizer, score.swap.get(loc.corrupt, loc.clean))
    words_x = word_token_ids(lm.tokenizer, score.swap.get(loc.clean, loc.corrupt))
    layers = resolve_layers(loc.layers, lm.n_layers)
    kinds = list(dict.fromkeys(loc.kinds))  # checked by engine.validate
    res = patching_recovery(
        lm.model,
        [clean[i] for i in keep],
        [corrupt[i] for i in keep],
        [spans_c[i] for i in keep],
        [words_c] * len(keep),
        [words_x] * len(keep),
        layers,
        lm.pad_id,
        ROLES,  # `all` recovers 1 by construction (tested); not worth its forwards here
        kinds,
    )
    rec = res["by_kind"][kinds[0]]
    table = pd.concat(
        pd.DataFrame(
            {
                "site": kind,
                "layer": np.repeat(res["layers"], len(res["roles"])),
                "role": np.tile(res["roles"], len(res["layers"])),
                "recovery": values.reshape(-1),
            }
        )
        for kind, values in res["by_kind"].items()
    )
    table.to_parquet(out / "patching.parquet", index=False)
    info = {
        "clean": loc.clean,
        "corrupt": loc.corrupt,
        "pairs": [
            [prompts["prompt_id"].iloc[pairs[i][0]], prompts["prompt_id"].iloc[pairs[i][1]]]
            for i in keep
        ],
        "ld_clean_mean": float(res["ld_clean"].mean()),
        "ld_corrupt_mean": float(res["ld_corrupt"].mean()),
    }
    (out / "pairs.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    best = np.unravel_index(np.nanargmax(rec), rec.shape)  # [layer, role] of the largest share
    return {
        "n_pairs": len(keep),
        "best_single_role_site": {
            "layer": int(res["layers"][best[0]]),
            "role": res["roles"][best[1]],
            "recovery": float(rec[best]),
        },
        "kinds": kinds,
    }


def localization(lens: pd.DataFrame, patching: pd.DataFrame, pairs: dict, steer_info) -> dict:
    """Logit lens and patching summaries, and the patching ceiling at the steered site."""
    by_role = lens.groupby(["role", "layer"])["logit_diff"].mean()
    lens_out = {}
    for role in dict.fromkeys(lens["role"]):
        series = by_role[role].dropna()
        if series.empty:
            continue
        positive = series[series > 0]
        lens_out[role] = {
            "final_layer_mean": float(series.iloc[-1]),
            "max_layer": int(series.idxmax()),
            "max_mean": float(series.max()),
            "first_positive_layer": int(positive.index[0]) if len(positive) else None,
        }
    if "site" not in patching:  # artifacts from before site patching: residual only
        patching = patching.assign(site="resid")
    kinds = {}
    for kind, rows in patching[patching["role"] != "all"].groupby("site", sort=False):
        rows = rows.dropna(subset=["recovery"])
        if len(rows):
            top = rows.loc[rows["recovery"].idxmax()]
            kinds[kind] = {
                "layer": int(top["layer"]),
                "role": top["role"],
                "recovery": float(top["recovery"]),
            }
    patching = patching[patching["site"] == "resid"]
    single = patching[patching["role"] != "all"].dropna(subset=["recovery"])
    best = single.loc[single["recovery"].idxmax()] if len(single) else None
    role = ROLE_OF_POSITIONS.get(steer_info.get("positions", "all"), "all")
    at = patching[patching["layer"].isin(steer_info["layers"]) & (patching["role"] == role)]
    return {
        "lens": lens_out,
        "patching": {
            "n_pairs": len(pairs["pairs"]),
            "ld_clean_mean": pairs["ld_clean_mean"],
            "ld_corrupt_mean": pairs["ld_corrupt_mean"],
            "best_site": None
            if best is None
            else {
                "layer": int(best["layer"]),
                "role": best["role"],
                "recovery": float(best["recovery"]),
            },
            "steered_site": {
                "layers": steer_info["layers"],
                "role": role,
                "recovery": float(at["recovery"].max()) if len(at) else None,
            },
            "best_by_site": kinds,
        },
    }


def run_report(inputs: LocalizationReportInputs, upstream: dict[str, Path], out: Path) -> dict:
    """Stage entry: localization.md/json and the lens and patching heatmaps."""
    lens = pd.read_parquet(upstream["logit_lens"] / "lens.parquet")
    patching = pd.read_parquet(upstream["patching"] / "patching.parquet")
    pairs = json.loads((upstream["patching"] / "pairs.json").read_text())
    steer_info = json.loads((upstream["steer"] / "steer.json").read_text())
    report = json.loads((upstream["report"] / "report.json").read_text())
    result = {
        "model": inputs.model.name,
        "localization": localization(lens, patching, pairs, steer_info),
        "bidirectional_swap": report["bidirectional_swap"],
        "evaluated_on": report.get("evaluated_on", "all"),
        "plots": [],
    }
    if inputs.report.plots:
        title = f"patching {len(pairs['pairs'])} {pairs['clean']} -> {pairs['corrupt']} pairs"
        result["plots"] = [
            plot_lens(lens, out / "logit_lens.png").name,
            plot_patching(patching, title, out / "patching.png").name,
        ]
        if "site" in patching:
            for kind in [k for k in dict.fromkeys(patching["site"]) if k != "resid"]:
                rows = patching[patching["site"] == kind]
                path = out / f"patching_{kind}.png"
                result["plots"].append(plot_patching(rows, f"{title}: {kind} output", path).name)
    (out / "localization.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    (out / "localization.md").write_text(render_localization(result), encoding="utf-8")
    return {"best_site": result["localization"]["patching"]["best_site"]}


LOGIT_LENS = Stage(
    name="logit_lens",
    run=run_logit_lens,
    inputs=LensInputs,
    needs=("prompts",),
    fingerprint=fingerprint,
    writes=("lens.parquet",),
)
PATCHING = Stage(
    name="patching",
    run=run_patching,
    inputs=PatchingInputs,
    needs=("prompts",),
    fingerprint=fingerprint,
    writes=("patching.parquet", "pairs.json"),
)
LOCALIZATION_REPORT = Stage(
    name="localization_report",
    run=run_report,
    inputs=LocalizationReportInputs,
    needs=("logit_lens", "patching", "steer", "report"),
    writes=("localization.json", "localization.md"),
    report=("localization.md", "localization.json", "*.png"),
)
