"""Linear probes: how well each layer's activations predict the condition label.

Per layer, a probe (a small factory chosen by Hydra ``_target_``, default ``LogisticProbe``)
is scored by stratified k-fold accuracy, with a permutation p-value from refitting on
shuffled labels. ``transfer_scores`` fits one probe on all training rows and reports how often
held-out conditions are classified as the positive one: the confound diagnostic (a probe for
"pressure" that also fires on a neutral condition sharing its surface features is reading
those features, not pressure). Pure numpy and scikit-learn; the stage wiring lives elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from mlx_interp.analysis.stats import finite_rows
from mlx_interp.errors import MlxInterpError
from mlx_interp.factory import Registry, build


class ProbeError(MlxInterpError, ValueError):
    """A probe could not be fitted or scored; the message says what to change."""


class LogisticProbe:
    """Standardize features, then L2 logistic regression (lbfgs, deterministic given the seed).

    Standardizing inside the pipeline means each CV fold learns its scaling from its own
    training rows only, so nothing leaks from the test fold.
    """

    name = "logistic"

    def __init__(self, C: float = 1.0, max_iter: int = 2000):
        self.C = float(C)  # inverse L2 strength; smaller regularizes more
        self.max_iter = int(max_iter)

    def make(self, seed: int) -> Any:
        """A fresh, unfitted scikit-learn estimator."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        clf = LogisticRegression(C=self.C, max_iter=self.max_iter, random_state=int(seed))
        return make_pipeline(StandardScaler(), clf)


@dataclass(frozen=True)
class ProbeResult:
    """Cross-validated probe accuracy at one layer."""

    layer: int
    classes: tuple[str, ...]  # sorted label names
    n_per_class: dict[str, int]  # examples per label
    accuracy_mean: float  # mean over folds
    accuracy_sd: float  # sample SD over folds (ddof=1)
    fold_scores: tuple[float, ...]  # accuracy of each of the k folds
    permutation_p: float  # (1 + #perm >= observed) / (1 + n_permutations); nan when skipped
    n_permutations: int


def _as_matrix(x: Any, name: str) -> np.ndarray:
    """``x`` as a finite float64 matrix [n, d]."""
    arr = np.asarray(x)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ProbeError(f"{name} must be a non-empty matrix [n, d], got shape {arr.shape}")
    return finite_rows(arr, name, ProbeError)


def _as_labels(y: Any, n: int) -> tuple[np.ndarray, dict[str, int]]:
    """Labels as a str array [n] and the count per class (sorted by name)."""
    labels = np.asarray(y)
    if labels.ndim != 1 or len(labels) != n:
        raise ProbeError(f"labels must be a vector of {n} (one per row), got shape {labels.shape}")
    labels = labels.astype(str)
    names, counts = np.unique(labels, return_counts=True)
    return labels, {str(c): int(k) for c, k in zip(names, counts, strict=True)}


def _probe(probe: Any) -> Any:
    probe = LogisticProbe() if probe is None else probe
    if not hasattr(probe, "make"):
        raise ProbeError(f"a probe needs a make(seed) method returning an estimator, got {probe!r}")
    return probe


def cross_validate_layer(
    x: Any,
    y: Any,
    k: int = 5,
    seed: int = 0,
    n_permutations: int = 100,
    probe: Any = None,
    layer: int = -1,
) -> ProbeResult:
    """Stratified k-fold accuracy of ``probe`` on x [n, d] with str labels y [n].

    Folds are shuffled with ``seed``; the permutation test refits on ``n_permutations``
    label shuffles (seeded too) with the same folds, so equal inputs give equal numbers.
    ``n_permutations=0`` skips it (p is nan). ``layer`` is only recorded in the result.
    """
    from sklearn.model_selection import StratifiedKFold, cross_val_score, permutation_test_score

    x = _as_matrix(x, "activations")
    labels, counts = _as_labels(y, len(x))
    if int(k) != k or k < 2:
        raise ProbeError(f"probes.folds must be an integer >= 2, got {k}")
    if n_permutations < 0:
        raise ProbeError(f"n_permutations must be >= 0, got {n_permutations}")
    if len(counts) < 2:
        raise ProbeError(
            f"only one class ({', '.join(map(repr, counts)) or 'none'}) in the labels: a probe "
            "needs at least 2 conditions; check the concept's conditions and prompt split"
        )
    for name, count in counts.items():
        if count < k:
            raise ProbeError(
                f"class {name!r} has {count} examples, fewer than the {k} CV folds: "
                "add examples or lower probes.folds"
            )
    probe, k = _probe(probe), int(k)
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=int(seed))
    folds = cross_val_score(probe.make(seed), x, labels, cv=cv, scoring="accuracy")
    p_value = math.nan
    if n_permutations > 0:
        _, _, p_value = permutation_test_score(
            probe.make(seed),
            x,
            labels,
            cv=cv,
            n_permutations=int(n_permutations),
            random_state=int(seed),
            scoring="accuracy",
        )
    return ProbeResult(
        layer=int(layer),
        classes=tuple(counts),
        n_per_class=counts,
        accuracy_mean=float(np.mean(folds)),
        accuracy_sd=float(np.std(folds, ddof=1)),
        fold_scores=tuple(float(s) for s in folds),
        permutation_p=float(p_value),
        n_permutations=int(n_permutations),
    )


def probe_layers(acts: Mapping[int, Any], y: Any, **kw: Any) -> list[ProbeResult]:
    """``cross_validate_layer`` on each layer's x [n, d] (same labels, folds and seed), by layer."""
    if not acts:
        raise ProbeError("no layers to probe: capture at least one layer")
    return [cross_validate_layer(acts[layer], y, layer=int(layer), **kw) for layer in sorted(acts)]


def best_layer(results: Iterable[ProbeResult]) -> int:
    """The layer with the highest mean accuracy; ties go to the lower (earlier) layer."""
    results = list(results)
    if not results:
        raise ProbeError("no probe results: probe at least one layer")
    return min(results, key=lambda r: (-r.accuracy_mean, r.layer)).layer


def permutation_threshold(n_per_class: Mapping[str, int], alpha: float = 0.05) -> float:
    """Accuracy that chance exceeds with probability at most ``alpha``, for the plot's line.

    Under the null a classifier is right on each of the n = sum(n_per_class) test examples
    (k-fold CV tests every example once) with probability p = the majority-class share, the
    best a label-blind rule can do. The count correct is then Binomial(n, p), and the
    threshold is its (1 - alpha) quantile divided by n: P(accuracy > threshold) <= alpha.
    This is a quick reference line; the per-layer permutation p-value is the real test.
    """
    from scipy import stats

    counts = [int(c) for c in n_per_class.values()]
    if not counts or any(c < 0 for c in counts) or sum(counts) == 0:
        raise ProbeError(f"n_per_class needs positive counts, got {dict(n_per_class)}")
    if not 0 < alpha < 1:
        raise ProbeError(f"alpha must lie in (0, 1), got {alpha}")
    n = sum(counts)
    return float(stats.binom.ppf(1 - alpha, n, max(counts) / n)) / n


def transfer_scores(
    x_train: Any,
    y_train: Any,
    positive: str,
    others: Mapping[str, Any],
    seed: int = 0,
    probe: Any = None,
) -> dict[str, float]:
    """Fraction of each held-out condition's rows [m, d] that a ``positive``-vs-rest probe,
    fitted on all of x_train [n, d], calls positive. Near 1 for a condition that is not
    ``positive`` means the probe reads something the two share (a confound).
    """
    x = _as_matrix(x_train, "training activations")
    labels, counts = _as_labels(y_train, len(x))
    if positive not in counts:
        raise ProbeError(
            f"positive class {positive!r} is not among the training labels {sorted(counts)}: "
            "check probes.transfer.positive"
        )
    if counts[positive] == len(labels):
        raise ProbeError(
            f"every training row is {positive!r}: add rows of another condition to train against"
        )
    model = _probe(probe).make(seed).fit(x, labels == positive)
    scores: dict[str, float] = {}
    for name, rows in others.items():
        rows = _as_matrix(rows, f"held-out condition {name!r}")
        if rows.shape[1] != x.shape[1]:
            raise ProbeError(
                f"held-out condition {name!r} has d={rows.shape[1]} but training has "
                f"d={x.shape[1]}: use activations from the same layer and model"
            )
        scores[str(name)] = float(np.mean(model.predict(rows)))
    return scores


@dataclass(frozen=True)
class TransferResult:
    """How often a probe calls one condition's rows positive."""

    condition: str
    n: int
    n_positive: int
    in_training: bool  # True: rows of the probe's own contrast, scored by cross-validation

    @property
    def fraction(self) -> float:
        return self.n_positive / self.n if self.n else math.nan


def transfer_cv(
    x_by_condition: Mapping[str, Any],
    pos: Iterable[str],
    neg: Iterable[str],
    score_on: Iterable[str],
    k: int = 5,
    seed: int = 0,
    probe: Any = None,
) -> tuple[list[TransferResult], Any]:
    """Score conditions with a pos-vs-neg probe, honestly for the training conditions.

    The probe is fitted on every row of the ``pos`` and ``neg`` conditions. A condition outside
    the contrast is scored by that probe; a condition inside it is scored by cross-validated
    predictions (each row by the fold's probe that did not see it), so its rate is a held-out
    rate, not training accuracy. Returns the results in ``score_on`` order and the fitted probe.
    """
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    pos, neg, score_on = list(pos), list(neg), list(score_on)
    overlap = sorted(set(pos) & set(neg))
    if overlap:
        raise ProbeError(f"condition(s) {overlap} are on both sides of the contrast")
    missing = [c for c in pos + neg + score_on if c not in x_by_condition]
    if missing:
        raise ProbeError(
            f"no activations for condition(s) {sorted(set(missing))}; conditions present: "
            f"{sorted(x_by_condition)}. Fix probes.contrasts / probes.transfer or the concept"
        )
    train = pos + neg
    x = np.concatenate([_as_matrix(x_by_condition[c], f"condition {c!r}") for c in train])
    cond = np.concatenate([[c] * len(x_by_condition[c]) for c in train])
    y = np.isin(cond, pos)
    for side, names in (("pos", pos), ("neg", neg)):
        n = int(np.isin(cond, names).sum())
        if n < k:
            raise ProbeError(
                f"the {side} side ({names}) has {n} examples, fewer than the {k} CV folds: "
                "add examples or lower probes.folds"
            )
    probe = _probe(probe)
    cv = StratifiedKFold(n_splits=int(k), shuffle=True, random_state=int(seed))
    held_out = cross_val_predict(probe.make(seed), x, y, cv=cv)
    model = probe.make(seed).fit(x, y)
    results = []
    for name in score_on:
        if name in train:
            pred = held_out[cond == name]
        else:
            rows = _as_matrix(x_by_condition[name], f"condition {name!r}")
            if rows.shape[1] != x.shape[1]:
                raise ProbeError(
                    f"condition {name!r} has d={rows.shape[1]} but training has d={x.shape[1]}"
                )
            pred = model.predict(rows)
        results.append(TransferResult(str(name), len(pred), int(np.sum(pred)), name in train))
    return results, model


def linear_weights(model: Any) -> tuple[np.ndarray, float]:
    """(coef [d], intercept) of a fitted binary linear probe on the RAW features.

    A StandardScaler step is folded in: sigmoid(x @ coef + intercept) is the probe's
    probability of the positive class for an unscaled hidden state x.
    """
    steps = list(getattr(model, "named_steps", {"clf": model}).values())
    clf = steps[-1]
    coef = np.asarray(clf.coef_, dtype=np.float64)
    if coef.shape[0] != 1:
        raise ProbeError(f"linear_weights needs a binary probe, got {coef.shape[0]} classes")
    coef, intercept = coef[0], float(np.ravel(clf.intercept_)[0])
    for step in reversed(steps[:-1]):
        mean = getattr(step, "mean_", None)
        scale = getattr(step, "scale_", None)
        if mean is None and scale is None:
            raise ProbeError(f"cannot fold probe step {type(step).__name__} into linear weights")
        scale = np.ones_like(coef) if scale is None else np.asarray(scale, dtype=np.float64)
        mean = np.zeros_like(coef) if mean is None else np.asarray(mean, dtype=np.float64)
        coef = coef / scale
        intercept = intercept - float(coef @ mean)
    return coef, intercept


def mean_diff_cosines(
    x_by_condition: Mapping[str, Any],
    directions: Mapping[str, tuple[str, str]],
    n_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> list[dict]:
    """Cosine between every pair of mean-difference directions, with a bootstrap CI.

    ``directions`` maps a name to (pos, neg) conditions; direction = mean(pos) - mean(neg).
    Each resample draws every condition's rows with replacement (stratified), recomputes
    all directions and their cosines; the CI is the percentile interval. ``split_half`` is
    each pair's mean cosine between directions fitted on disjoint random halves of the
    prompts (a reliability reference: what the cosine of a direction with itself looks like
    at this sample size).
    """
    names = list(directions)
    if len(names) < 2:
        raise ProbeError("probes.directions needs at least two named directions to compare")
    conds = sorted({c for pair in directions.values() for c in pair})
    missing = [c for c in conds if c not in x_by_condition]
    if missing:
        raise ProbeError(f"probes.directions names condition(s) {missing} that have no rows")
    xs = {c: _as_matrix(x_by_condition[c], f"condition {c!r}") for c in conds}
    rng = np.random.default_rng(seed)

    def cosines(means: dict[str, np.ndarray]) -> np.ndarray:
        vecs = np.stack([means[p] - means[n] for p, n in (directions[k] for k in names)])
        norms = np.linalg.norm(vecs, axis=-1, keepdims=True)
        unit = vecs / np.where(norms == 0, 1, norms)
        return unit @ unit.T

    point = cosines({c: x.mean(0) for c, x in xs.items()})
    boots = np.empty((int(n_bootstrap), len(names), len(names)))
    for r in range(int(n_bootstrap)):
        means = {c: x[rng.integers(0, len(x), len(x))].mean(0) for c, x in xs.items()}
        boots[r] = cosines(means)
    halves = []
    for _ in range(20):
        perm = {c: rng.permutation(len(x)) for c, x in xs.items()}
        first = {c: xs[c][perm[c][: len(perm[c]) // 2]].mean(0) for c in conds}
        second = {c: xs[c][perm[c][len(perm[c]) // 2 :]].mean(0) for c in conds}
        vec = {
            h: np.stack([m[p] - m[n] for p, n in (directions[k] for k in names)])
            for h, m in (("a", first), ("b", second))
        }
        norm = {h: v / np.linalg.norm(v, axis=-1, keepdims=True) for h, v in vec.items()}
        halves.append(np.sum(norm["a"] * norm["b"], axis=-1))
    split_half = np.mean(halves, axis=0)
    lo_q, hi_q = (1 - confidence) / 2, 1 - (1 - confidence) / 2
    out = []
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if j <= i:
                continue
            lo, hi = np.quantile(boots[:, i, j], [lo_q, hi_q]) if n_bootstrap else (math.nan,) * 2
            out.append(
                {
                    "a": a,
                    "b": b,
                    "cosine": float(point[i, j]),
                    "lo": float(lo),
                    "hi": float(hi),
                    "split_half_a": float(split_half[i]),
                    "split_half_b": float(split_half[j]),
                }
            )
    return out


@runtime_checkable
class ProbeFactory(Protocol):
    """What a probe provides: ``make(seed)`` -> a fresh estimator for one fit."""

    def make(self, seed: int) -> Any: ...


PROBE_REGISTRY = Registry(
    what="probe",
    plural="probes",
    names={"logistic": LogisticProbe},
    error=ProbeError,
    accepts=lambda obj: isinstance(obj, ProbeFactory),
    example="mlx_interp.analysis.probes.LogisticProbe",
)


def make_probe(spec: Any) -> Any:
    """A probe from ``"logistic"`` (also None), a ``_target_`` config or an instance (the
    one factory, :func:`mlx_interp.factory.build`)."""
    return build("logistic" if spec is None else spec, PROBE_REGISTRY)
