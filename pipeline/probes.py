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
from typing import Any

import numpy as np

from pipeline.stats import finite_rows


class ProbeError(ValueError):
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
