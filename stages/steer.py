"""Stages `baseline` and `steer`: score the evaluation questions unsteered and steered.

baseline (reads model, score): unsteered logit scores and greedy answers for every prompt.
It does not depend on the steering setting, so a sweep over alpha and layer computes it once.
It also writes the unsteered states it computed (``states.safetensors``: each prompt's
keys/values, last-token logits and residuals, and the shared prefix's keys/values), which
the steer stage continues from: a steer stage in another process (a sweep point, a new
alpha) reads them instead of running every prompt again.

steer (reads model, score, steer, seed): the main direction, N random directions of equal
norm (same center) for the baseline rate, the controls for contamination, and greedy
generations on a seeded sample to confirm the logit verdicts. Writes generations.parquet:
prompt_id, condition, direction, scorer, margin, top_token, top_word, answer, named,
token_ids, the fluency metrics of every generation (mlx_interp.analysis.fluency), swapped.

Fluency (``score.fluency``): a seeded sample of the swap questions is also answered at length
(zero-shot chat, ``instruction``, ``max_tokens``), unsteered in baseline and steered in steer,
as rows of scorer ``fluency``: short colour answers cannot show whether steering makes the
model fall into loops. It lives in ``score`` so that the unsteered reference is computed once
per sweep.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from mlx_interp.analysis.directions import DirectionSet
from mlx_interp.analysis.scoring import (
    UNSTEERED,
    GenerateScorer,
    LogitScorer,
    ScoringError,
    Steering,
    make_scorer,
    word_token_ids,
)
from mlx_interp.analysis.settings import edits_for, keep_heads
from mlx_interp.analysis.sides import load_side
from mlx_interp.analysis.sweep import SITE_KIND, Gate, check_gate_precedes
from mlx_interp.engine.dag import Stage
from mlx_interp.engine.schema import ModelConfig, ScoreConfig, SteerConfig
from mlx_interp.interventions.capture import resolve_layers
from mlx_interp.interventions.modes import mode_name
from mlx_interp.interventions.positions import object_spans
from mlx_interp.interventions.sites import head_shape
from mlx_interp.interventions.steering import SteeringError, make_mode
from mlx_interp.interventions.unsteered import load_states, save_states
from mlx_interp.models.loading import load_model, model_fingerprint
from mlx_interp.stages.direction_sites import lens_plausibility, read_at, role_spans
from mlx_interp.stages.steer_rows import add_fluency, fluency_prompts, fluency_spec

log = logging.getLogger(__name__)

STATES_FILE = "states.safetensors"  # the baseline's unsteered states (optional: 0 computed)

__all__ = ["add_fluency", "fluency_prompts", "fluency_spec", "run_baseline", "run_steer"]


@dataclass(frozen=True)
class BaselineInputs:
    model: ModelConfig
    score: ScoreConfig


@dataclass(frozen=True)
class SteerInputs:
    model: ModelConfig
    score: ScoreConfig
    steer: SteerConfig
    seed: int


def eval_prompts(prompts: pd.DataFrame, score: ScoreConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(swap questions, control questions) of the evaluation split."""
    if score.eval_split != "all":
        prompts = prompts[prompts["split"] == score.eval_split]
    swap = prompts[prompts["condition"].isin(list(score.swap))].reset_index(drop=True)
    controls = prompts[prompts["condition"].isin(score.controls)].reset_index(drop=True)
    if swap.empty:
        raise ScoringError(
            f"no prompts of the swap conditions {list(score.swap)} in split "
            f"{score.eval_split!r}; fix score.swap or score.eval_split"
        )
    return swap, controls


def check_controls(prompts: pd.DataFrame, score: ScoreConfig) -> None:
    """Every ``score.controls`` condition is one the prompts have: else the controls would be
    silently unchecked (``{'n': 0}`` in the report)."""
    known = sorted(set(prompts["condition"]))
    unknown = [c for c in score.controls if c not in known]
    if unknown:
        raise ScoringError(
            f"score.controls names condition(s) {unknown} that the prompts do not have; they "
            f"have {known}: fix score.controls (e.g. score.controls=[{known[-1]}], or [] for "
            "none) or concept.conditions"
        )


def words_of(score: ScoreConfig) -> list[str]:
    """The target words the scorers look for (the swap conditions' words)."""
    return sorted(set(score.swap) | set(score.swap.values()))


def _score(
    scorer,
    lm,
    df: pd.DataFrame,
    score: ScoreConfig,
    settings: list[Steering],
    pad: int,
    pairs: list[tuple[int, int]] | None = None,
) -> list[dict]:
    """One dict per (row of ``df``, setting) pair (default: every row under every setting),
    all settings as rows of batched forwards on the rows' unsteered states where possible
    (``Scorer.score_settings``)."""
    # controls have no own swap word: they get placeholder words, and their margin is unused
    original = [c if c in score.swap else words_of(score)[0] for c in df["condition"]]
    target = [score.swap.get(c, words_of(score)[-1]) for c in df["condition"]]
    tokens = [list(map(int, t)) for t in df["tokens"]]
    spans = None
    if any(s.edits and s.positions == "object" for s in settings):
        spans = object_spans(lm.tokenizer, tokens, df["meta"].tolist(), df["prompt_id"].tolist())
    return scorer.score_settings(
        lm, tokens, original, target, words_of(score), settings, pairs, pad_id=pad, spans=spans
    )


def _rows(df: pd.DataFrame, results: list[dict], direction: str, kind: str) -> pd.DataFrame:
    out = pd.DataFrame(results)
    out.insert(0, "prompt_id", df["prompt_id"].to_numpy())
    out.insert(1, "condition", df["condition"].to_numpy())
    out.insert(2, "direction", direction)
    out.insert(3, "scorer", kind)
    out.insert(4, "split", df["split"].to_numpy() if "split" in df else "train")
    if "variant" in df and df["variant"].ne("").any():  # rows of a dataset's own variants
        out.insert(5, "variant", df["variant"].to_numpy())  # (e.g. another wording)
    return out


def _fluency_rows(lm, sample, score, settings, direction, side_of=None) -> list[pd.DataFrame]:
    """Open-ended answers of ``sample`` (:func:`fluency_prompts`) under the main direction's
    setting(s)."""
    if sample.empty:
        return []
    gen = GenerateScorer(max_tokens=score.fluency.max_tokens)
    settings, pairs = _main_pairs(settings, side_of, sample["prompt_id"])
    answers = _score(gen, lm, sample, score, settings, lm.pad_id, pairs)
    return [_rows(sample, answers, direction, "fluency")]


def _main_pairs(settings, side_of, prompt_ids) -> tuple[list, list | None]:
    """(settings, pairs) that steer each prompt by the main direction: its one setting, or,
    with a gate (``side_of``), the setting of each prompt's side."""
    if side_of is None:
        return [settings[0]], None
    return settings, [(p, side_of(pid, 0)) for p, pid in enumerate(prompt_ids)]


def fingerprint(inputs: BaselineInputs | SteerInputs) -> dict:
    return {"model": model_fingerprint(inputs.model)}


def run_baseline(inputs: BaselineInputs, upstream: dict[str, Path], out: Path) -> dict:
    """Stage `baseline`: unsteered logit scores, greedy answers, long answers for fluency."""
    score = inputs.score
    lm = load_model(inputs.model)
    prompts = pd.read_parquet(upstream["prompts"] / "prompts.parquet")
    swap, controls = eval_prompts(prompts, score)
    both = pd.concat([swap, controls], ignore_index=True)
    logit = LogitScorer(batch_size=score.batch_size)
    gen = GenerateScorer(max_tokens=score.max_tokens)
    with tqdm(total=3, desc="baseline", unit="step", leave=False) as bar:
        bar.set_postfix_str("logit scores")
        frames = [
            _rows(both, _score(logit, lm, both, score, [UNSTEERED], lm.pad_id), "none", "logit")
        ]
        bar.update()
        bar.set_postfix_str("greedy answers")
        answers = _score(gen, lm, both, score, [UNSTEERED], lm.pad_id)
        frames.append(_rows(both, answers, "none", "generate"))
        bar.update()
        bar.set_postfix_str("long answers (fluency)")
        long_prompts = fluency_prompts(swap, score, lm.tokenizer, lm.prompt_format)
        frames += _fluency_rows(lm, long_prompts, score, [UNSTEERED], "none")
        bar.update()
    table = add_fluency(pd.concat(frames, ignore_index=True), fluency_spec(score))
    table.to_parquet(out / "baseline.parquet", index=False)
    seqs = [list(map(int, t)) for t in [*both["tokens"], *long_prompts["tokens"]]]
    nbytes = save_states(out / STATES_FILE, lm.model, seqs)
    log.info("baseline: %.1f MiB of unsteered states kept for the steer stage", nbytes / 2**20)
    return {"n_questions": len(swap), "n_controls": len(controls)}


def steer_layers(steer: SteerConfig, ds: DirectionSet, n_layers: int) -> list[int]:
    """The steered layers (int or list in config), checked against the direction set."""
    raw = steer.layer
    layers = resolve_layers([raw] if isinstance(raw, int) else list(raw), n_layers)
    missing = [layer for layer in layers if layer not in ds.vectors]
    if missing:
        raise SteeringError(
            f"no direction for layer(s) {missing}: directions exist for {ds.layers}; "
            "capture those layers (capture.layers) or pick steer.layer among them"
        )
    return layers


def run_steer(inputs: SteerInputs, upstream: dict[str, Path], out: Path) -> dict:
    """Stage `steer`: main + random directions on the questions, controls, confirmation."""
    score, steer = inputs.score, inputs.steer
    spec = fluency_spec(score)  # bad fluency settings fail before the model loads
    alpha = float(steer.alpha)
    lm = load_model(inputs.model)
    states = upstream["baseline"] / STATES_FILE
    if states.is_file():  # the baseline's unsteered states (already held in its own process)
        loaded = load_states(states, lm.model)
        if loaded:
            log.info("steer: unsteered states of %d prompts read from the baseline", loaded)
    prompts = pd.read_parquet(upstream["prompts"] / "prompts.parquet")
    check_controls(prompts, score)
    swap, controls = eval_prompts(prompts, score)
    ds = DirectionSet.load(upstream["directions"] / "directions.safetensors")
    layers = steer_layers(steer, ds, lm.n_layers)
    mode = make_mode(steer.mode)
    scorer = make_scorer(score.scorer)
    pad = lm.pad_id
    positions = steer.positions
    kind = SITE_KIND[ds.meta.get("kind", "resid")]  # edited where the direction was read
    both = pd.concat([swap, controls], ignore_index=True)
    sides, gate_info = read_sides(lm, upstream["directions"], both)
    if gate_info:  # the gate reads what precedes the first edit (one forward could do both)
        gate = Gate(gate_info["measured"], int(gate_info["layer"]))
        check_gate_precedes(gate, kind, layers, positions, "directions.gate with steer.layer")
    randoms = [same_heads(r, ds, lm) for r in ds.random_like(steer.n_random, seed=inputs.seed)]
    settings, side_of = _sided_settings([ds, *randoms], layers, kind, mode, alpha, positions, sides)
    # the main direction on every question and control, each random one on the questions:
    # all as rows of batched forwards that reuse the questions' unsteered states
    n_swap = len(swap)
    ids = both["prompt_id"].tolist()
    pairs = [(p, side_of(ids[p], 0)) for p in range(len(both))]
    pairs += [(p, side_of(ids[p], d)) for d in range(1, len(randoms) + 1) for p in range(n_swap)]
    results = _score(scorer, lm, both, score, settings, pad, pairs)
    gated = side_of if sides is not None else None
    frames = [_rows(swap, results[:n_swap], "main", scorer.kind)]
    if len(controls):
        frames.append(_rows(controls, results[n_swap : len(both)], "main", scorer.kind))
    for i in range(len(randoms)):
        at = len(both) + i * n_swap
        frames.append(_rows(swap, results[at : at + n_swap], f"random-{i:02d}", scorer.kind))
    confirm_n = min(steer.confirm_n, len(swap))
    if confirm_n and scorer.kind != "generate":
        rng = np.random.default_rng(inputs.seed)
        sample = swap.iloc[np.sort(rng.choice(len(swap), confirm_n, replace=False))]
        sample = pd.concat([sample, controls], ignore_index=True)
        gen = GenerateScorer(max_tokens=score.max_tokens)
        main_settings, main_pairs = _main_pairs(settings, gated, sample["prompt_id"])
        answers = _score(gen, lm, sample, score, main_settings, pad, main_pairs)
        frames.append(_rows(sample, answers, "main", "generate"))
    long_prompts = fluency_prompts(swap, score, lm.tokenizer, lm.prompt_format)
    frames += _fluency_rows(lm, long_prompts, score, settings, "main", gated)
    table = add_fluency(pd.concat(frames, ignore_index=True), spec)
    table["swapped"] = _swapped(table, score)
    if sides is not None:
        table["side"] = table["prompt_id"].map(sides)
    table.to_parquet(out / "generations.parquet", index=False)
    info = {
        "layers": layers,
        "alpha": alpha,
        "mode": mode_name(mode),
        "positions": positions,
        "n_random": len(randoms),
        "scorer": scorer.kind,
        "fluency": dataclasses.asdict(score.fluency),
    }
    if kind != "resid":
        info["site"] = ds.meta["kind"]
        if "heads" in ds.meta:
            info["heads"] = {str(layer): ds.meta["heads"][str(layer)] for layer in layers}
    if gate_info:
        info["gate"] = gate_info
    (out / "steer.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return info


def _sided_settings(sets, layers, kind, mode, alpha, positions, sides):
    """(settings, side_of): the Steering settings of each direction set in ``sets`` and a
    function ``side_of(prompt_id, set index) -> setting index``. Without ``sides`` one setting
    per set; with them two per set (the edit toward the other class, for prompts read as pos
    and as neg) and one unsteered setting for prompts read as neither class."""

    def steering(d: DirectionSet, side: str | None) -> Steering:
        return Steering(edits_for(d, layers, kind, side), mode, alpha, positions)

    if sides is None:
        return [steering(d, None) for d in sets], lambda _pid, i: i
    settings = [UNSTEERED] + [steering(d, side) for d in sets for side in ("pos", "neg")]

    def side_of(pid, i: int) -> int:
        side = sides[pid]
        return 0 if side == "other" else 1 + 2 * i + (side == "neg")

    return settings, side_of


def read_sides(lm, directions: Path, df: pd.DataFrame) -> tuple[dict | None, dict]:
    """prompt_id -> side (pos / neg / other) read by the directions' gate, if it has one (its
    settings from directions.json); (None, {}) otherwise."""
    path = directions / "gate.safetensors"
    if not path.is_file():
        return None, {}
    info = json.loads((directions / "directions.json").read_text())
    gate = info["gate"]
    tokens = [list(map(int, t)) for t in df["tokens"]]
    spans = role_spans(lm, df, gate["measured"])
    x = read_at(lm, tokens, spans, [int(gate["layer"])])[int(gate["layer"])]
    ids = [i for w in info["contrast"] for i in word_token_ids(lm.tokenizer, w)]
    side = load_side(path, plausible=lens_plausibility(lm, ids))
    return dict(zip(df["prompt_id"], side.predict(x), strict=True)), gate


def same_heads(rnd: DirectionSet, ds: DirectionSet, lm) -> DirectionSet:
    """A random set restricted to the heads its direction set keeps (if it keeps some)."""
    heads = ds.meta.get("heads")
    if not heads:
        return rnd
    n_heads = head_shape(lm.model, ds.layers[0])[0]
    vectors = {
        layer: keep_heads(rnd, heads[str(layer)], n_heads).vectors[layer] for layer in rnd.layers
    }
    return DirectionSet(vectors, rnd.pos_means, rnd.neg_means, rnd.method, rnd.contrast, rnd.meta)


def _swapped(table: pd.DataFrame, score: ScoreConfig) -> pd.Series:
    """Swap verdict per row: logit margin > 0, or the answer names the target word."""
    target = table["condition"].map(score.swap)
    by_logit = table["margin"].gt(0) if "margin" in table else False
    by_name = table["named"].eq(target) if "named" in table else False
    verdict = np.where(table["scorer"] == "logit", by_logit, by_name)
    return pd.Series(verdict, index=table.index).where(target.notna(), False).astype(bool)


BASELINE = Stage(
    name="baseline",
    run=run_baseline,
    inputs=BaselineInputs,
    needs=("prompts",),
    fingerprint=fingerprint,
    writes=("baseline.parquet",),
)
STAGE = Stage(
    name="steer",
    run=run_steer,
    inputs=SteerInputs,
    needs=("prompts", "directions", "baseline"),
    fingerprint=fingerprint,
    writes=("generations.parquet", "steer.json"),
)
