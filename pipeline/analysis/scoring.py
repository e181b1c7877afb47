"""Scorers for steering: does the steered model name the target word instead of the original?

Two scorers behind one interface (chosen by Hydra ``_target_``), each mapping prompts (token
ids) plus a steering setting to one row per prompt:

- ``LogitScorer`` (default): one batched forward; at the answer position, the logit margin
  of the target word over the original word (max over each word's first-token variants:
  "red", "Red", " red", " Red", "RED"), and the top token.
- ``GenerateScorer``: greedy generation, then the first target word the answer names; the
  generated token ids are kept (``token_ids``) for the fluency metrics.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlx_interp.analysis.stats import require_finite
from mlx_interp.errors import ConfigError, UntrustedResultError
from mlx_interp.factory import Registry, build
from mlx_interp.interventions.batched_steering import FastPathRefused, steer_rows
from mlx_interp.interventions.positions import (
    PER_ROW,
    POSITIONS,
    GatedMode,
    PositionGate,
    position_mask,
)
from mlx_interp.interventions.prefix import (
    MIN_PREFIX,
    batchable,
    batched_last_logits,
    common_prefix_len,
    eos_ids,
    greedy_generate,
    shared_prefix,
)
from mlx_interp.interventions.sites import SiteEdit, steer_sites
from mlx_interp.interventions.steering import LayerEdit, make_mode, steer

log = logging.getLogger(__name__)


class ScoringError(ConfigError):
    """An unknown or misconfigured scorer or steering setting; the message lists valid ones."""


def word_token_ids(tokenizer: Any, word: str) -> list[int]:
    """First-token ids of the usual spellings of ``word`` at the start of an answer."""
    variants = {word, word.lower(), word.capitalize(), word.upper()}
    ids = set()
    for v in variants:
        for text in (v, " " + v):
            toks = tokenizer.encode(text, add_special_tokens=False)
            if toks:
                ids.add(int(toks[0]))
    return sorted(ids)


def named_word(text: str, words: Sequence[str]) -> str | None:
    """The first of ``words`` that ``text`` names (whole word, any case), else None."""
    pattern = r"\b(" + "|".join(re.escape(w) for w in words) + r")\b"
    found = re.search(pattern, text, flags=re.IGNORECASE)
    return found.group(1).lower() if found else None


@dataclass(frozen=True)
class Steering:
    """One steering setting: edits at layers, a mode object, alpha (empty edits = unsteered).

    positions: "all" edits every token; "suffix" leaves the prompts' shared prefix (system
    prompt, few-shot turns) unsteered and edits the rest of the prompt and every new token;
    "last" edits the last prompt token and every new token; "object" only the object's
    tokens (the scorers then need each prompt's object span).
    See :mod:`mlx_interp.interventions.positions`.
    """

    edits: tuple[LayerEdit | SiteEdit, ...]
    mode: Any
    alpha: float
    positions: str = "all"

    def __post_init__(self):
        if self.positions not in POSITIONS:
            raise ScoringError(
                f"steer.positions must be one of {POSITIONS}, not {self.positions!r}"
            )


def steering_context(model: Any, edits: Sequence[Any], mode: Any, alpha: float):
    """``steer`` for residual edits (:class:`LayerEdit`), ``steer_sites`` for edits at sites
    inside the layers (:class:`~mlx_interp.interventions.sites.SiteEdit`)."""
    if edits and all(isinstance(e, SiteEdit) for e in edits):
        return steer_sites(model, list(edits), mode, alpha)
    return steer(model, list(edits), mode, alpha)


def _run_steered(lm: Any, tokens: list[list[int]], steering: Steering, fn):
    """Run ``fn(prefix)`` under the steering; the shared prefix is run steered or not."""
    prefix = shared_prefix(lm.model, tokens) if steering.positions == "suffix" else None
    with steering_context(lm.model, steering.edits, steering.mode or "add", steering.alpha):
        return fn(prefix)


def _run_per_row(lm, tokens, steering: Steering, spans, batch_size: int, fn) -> list[dict]:
    """Run ``fn(rows, prefix)`` batch by batch (rows sorted by length, so the batched helpers
    keep their order), with the gate set to each batch's position mask; the shared prefix is
    run unsteered (no per-row rule edits it). ``suffix`` comes here on models whose prefix
    cache cannot be shared: its prefix is then masked, not run apart."""
    if steering.positions == "object" and (spans is None or len(spans) != len(tokens)):
        raise ScoringError("steer.positions=object needs each prompt's object span")
    gate = PositionGate(generated=steering.positions in ("last", "suffix"))
    suffix_from = common_prefix_len(tokens) if len(tokens) > 1 else 0
    suffix_from = suffix_from if suffix_from >= MIN_PREFIX else 0
    mode = GatedMode(make_mode(steering.mode or "add"), gate)
    together = batchable(lm.model)  # else each prompt decodes alone: a mask of one row each
    if not together:
        batch_size = 1
    prefix = shared_prefix(lm.model, tokens) if len(tokens) > 1 and together else (0, None)
    order = [int(i) for i in np.argsort([len(t) for t in tokens], kind="stable")]
    out: list[dict | None] = [None] * len(tokens)
    with steering_context(lm.model, steering.edits, mode, steering.alpha):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            if len(rows) == 1 and together:  # run a lone prompt twice in one batch, so it
                rows = rows * 2  # takes the batched path like the others
            lengths = [len(tokens[i]) for i in rows]
            row_spans = None if spans is None else [spans[i] for i in rows]
            mask = position_mask(steering.positions, lengths, prefix[0], row_spans, suffix_from)
            gate.set(mask)
            try:
                results = fn(rows, prefix)
            finally:
                gate.set(None)
            for i, result in zip(rows, results, strict=True):
                out[i] = result  # a duplicated lone prompt writes the same result twice
    done = [r for r in out if r is not None]
    assert len(done) == len(out), "every row is scored once"
    return done


UNSTEERED = Steering(edits=(), mode=None, alpha=0.0)


class Scorer:
    """Base of the scorers: run ``score`` under a steering setting (prefix handled here)."""

    kind = ""
    batch_size = 16  # prompts per forward (the per-row position rules run batch by batch)

    def __call__(
        self,
        lm: Any,
        tokens: list[list[int]],
        original: list[str],
        target: list[str],
        words: Sequence[str],
        steering: Steering = UNSTEERED,
        pad_id: int = 0,
        spans: Sequence[tuple[int, int]] | None = None,
    ) -> list[dict]:
        """One dict per prompt (token ids), with its original and target word; ``spans``:
        each prompt's object ``[start, end)`` (needed by ``positions=object``)."""
        per_row = steering.positions in PER_ROW
        if steering.positions == "suffix" and not batchable(lm.model):
            per_row = True  # no shared prefix cache: the prefix is masked instead
        if steering.edits and per_row:

            def run_rows(rows, prefix):
                toks, orig, targ = ([seq[i] for i in rows] for seq in (tokens, original, target))
                return self.score(lm, toks, orig, targ, words, pad_id, prefix)

            rows = _run_per_row(lm, tokens, steering, spans, self.batch_size, run_rows)
        else:

            def run(prefix):
                return self.score(lm, tokens, original, target, words, pad_id, prefix)

            rows = _run_steered(lm, tokens, steering, run)
        self.check(rows)
        return rows

    def score(self, lm, tokens, original, target, words, pad_id, prefix) -> list[dict]:
        raise NotImplementedError

    def check(self, rows: list[dict]) -> None:
        """Refuse the rows of one setting that cannot be trusted (all answers empty...)."""

    @property
    def max_new(self) -> int:
        """Greedy tokens the fast path generates per row (GenerateScorer: its length)."""
        return 0

    def score_settings(
        self,
        lm: Any,
        tokens: list[list[int]],
        original: list[str],
        target: list[str],
        words: Sequence[str],
        settings: Sequence[Steering],
        pairs: Sequence[tuple[int, int]] | None = None,
        pad_id: int = 0,
        spans: Sequence[tuple[int, int]] | None = None,
        fast: bool = True,
    ) -> list[dict]:
        """One dict per ``(prompt index, setting index)`` pair (default: every prompt under
        every setting), as ``__call__`` would give it. With ``fast`` the pairs are rows of
        batched forwards that reuse each prompt's unsteered states
        (:func:`~mlx_interp.interventions.batched_steering.steer_rows`); where that path
        refuses (its reason is logged) each setting runs on the plain path."""
        if pairs is None:
            pairs = [(p, s) for s in range(len(settings)) for p in range(len(tokens))]
        pairs = [(int(p), int(s)) for p, s in pairs]
        steered = [s for s in settings if s.edits]
        sites_inside = any(isinstance(e, SiteEdit) for s in steered for e in s.edits)
        if fast and sites_inside:  # the rows path edits the residual stream only
            _note_refusal("edits at sites inside the layers")
        elif fast and _one_kind(steered):
            try:
                return self._fast(
                    lm, tokens, original, target, words, settings, pairs, pad_id, spans
                )
            except FastPathRefused as err:
                _note_refusal(str(err))
        elif fast:
            _note_refusal("settings with different modes or position rules")
        return self._plain(lm, tokens, original, target, words, settings, pairs, pad_id, spans)

    def _fast(self, lm, tokens, original, target, words, settings, pairs, pad_id, spans):
        steered = [s for s in settings if s.edits]
        results = steer_rows(
            lm.model,
            tokens,
            pairs,
            settings,
            mode=(steered[0].mode or "add") if steered else "add",
            positions=steered[0].positions if steered else "all",
            spans=spans,
            max_tokens=self.max_new,
            eos=eos_ids(lm.tokenizer),
            pad_id=pad_id,
            batch_size=self.batch_size,
        )
        prompts = [p for p, _ in pairs]
        rows = self.from_rows(
            lm, results, [original[p] for p in prompts], [target[p] for p in prompts], words
        )
        for s in sorted({s for _, s in pairs}):
            self.check([row for row, (_, q) in zip(rows, pairs, strict=True) if q == s])
        return rows

    def _plain(self, lm, tokens, original, target, words, settings, pairs, pad_id, spans):
        out: dict[tuple[int, int], dict] = {}
        for s, setting in enumerate(settings):
            mine = [p for p, q in pairs if q == s]
            if not mine:
                continue
            toks, orig, targ = ([seq[p] for p in mine] for seq in (tokens, original, target))
            rows = self(
                lm,
                toks,
                orig,
                targ,
                words,
                setting,
                pad_id=pad_id,
                spans=None if spans is None else [spans[p] for p in mine],
            )
            out.update({(p, s): row for p, row in zip(mine, rows, strict=True)})
        return [out[pair] for pair in pairs]

    def from_rows(self, lm, results, original, target, words) -> list[dict]:
        """This scorer's dicts from the fast path's per-row logits and tokens."""
        raise NotImplementedError


def _one_kind(steered: Sequence[Steering]) -> bool:
    """Steered settings the fast path batches together: one mode object, one position rule."""
    return len({id(s.mode) for s in steered}) <= 1 and len({s.positions for s in steered}) <= 1


_REFUSALS: set[str] = set()


def _note_refusal(reason: str) -> None:
    if reason not in _REFUSALS:
        _REFUSALS.add(reason)
        log.info("steering settings run one at a time (plain path): %s", reason)


class LogitScorer(Scorer):
    """Logit margin of the target word over the original at the answer position."""

    kind = "logit"

    def __init__(self, batch_size: int = 16):
        self.batch_size = int(batch_size)

    def score(self, lm, tokens, original, target, words, pad_id, prefix) -> list[dict]:
        """margin (target - original, max over spellings), top_token, top_word."""
        logits = batched_last_logits(lm.model, tokens, pad_id, self.batch_size, prefix)
        return self.from_logits(lm, logits, original, target, words)

    def from_rows(self, lm, results, original, target, words) -> list[dict]:
        logits = np.stack([r.logits for r in results]) if results else np.zeros((0, 0))
        return self.from_logits(lm, logits, original, target, words)

    def from_logits(self, lm, logits: np.ndarray, original, target, words) -> list[dict]:
        """margin, top_token, top_word from float32 ``[n, vocab]`` answer logits."""
        ids = {w: word_token_ids(lm.tokenizer, w) for w in words}
        word_of = {i: w for w, toks in ids.items() for i in toks}
        require_finite(
            logits,
            "the answer logits",
            "the steering overflowed the residual stream: lower steer.alpha (or use a "
            "unit-norm mode), or check the direction",
        )
        rows = []
        for i, row in enumerate(logits):
            top = int(np.argmax(row))
            margin = float(row[ids[target[i]]].max() - row[ids[original[i]]].max())
            rows.append(
                {
                    "margin": margin,
                    "top_token": lm.tokenizer.decode([top]),
                    "top_word": word_of.get(top),
                }
            )
        return rows


class GenerateScorer(Scorer):
    """Greedy generation; the answer text, its token ids and the first word it names."""

    kind = "generate"

    def __init__(self, max_tokens: int = 8, batch_size: int = 16):
        self.max_tokens = int(max_tokens)
        self.batch_size = int(batch_size)

    @property
    def max_new(self) -> int:
        return self.max_tokens

    def score(self, lm, tokens, original, target, words, pad_id, prefix) -> list[dict]:
        answers = greedy_generate(
            lm.model, lm.tokenizer, tokens, self.max_tokens, prefix, batch_size=self.batch_size
        )
        return self.from_answers(answers, words)

    def from_rows(self, lm, results, original, target, words) -> list[dict]:
        answers = [(lm.tokenizer.decode(r.tokens), list(r.tokens)) for r in results]
        return self.from_answers(answers, words)

    def check(self, rows: list[dict]) -> None:
        if rows and not any(row["answer"].strip() for row in rows):
            raise UntrustedResultError(
                f"all {len(rows)} generated answers are empty (the model ended at once), so "
                "nothing can be scored: lower steer.alpha, or raise score.max_tokens "
                f"(now {self.max_tokens})"
            )

    def from_answers(self, answers: list[tuple[str, list[int]]], words) -> list[dict]:
        """answer, named, token_ids from greedy (text, ids) answers."""
        return [
            {"answer": text, "named": named_word(text, words), "token_ids": list(ids)}
            for text, ids in answers
        ]


SCORERS = {"logit": LogitScorer, "generate": GenerateScorer}


SCORER_REGISTRY = Registry(
    what="scorer",
    plural="scorers",
    names=SCORERS,
    error=ScoringError,
    accepts=lambda obj: isinstance(obj, Scorer),
    example="mlx_interp.analysis.scoring.LogitScorer",
)


def make_scorer(cfg: Any) -> Scorer:
    """A scorer from a name or a ``_target_`` config (the one factory)."""
    return build(cfg, SCORER_REGISTRY)
