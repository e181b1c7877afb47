"""Two-way steering whose side each prompt decides: a probe reads which class a prompt is on,
and the edit moves it toward the other class.

A reflection about one direction swaps only the prompts that lie on their own side of its
centre; a fixed push (``add``) moves every prompt the same way. Here a :class:`SideProbe`
(multinomial logistic regression on one site's activations, e.g. the object's tokens at a
middle layer) reads each prompt's class, ``pos``, ``neg`` or ``other`` (prompts of neither
class, such as controls, when the probe was fitted with some), and :func:`toward_other` gives
the edit of each side: the direction pointing at the other class (``vector``, for ``add``)
and the other class's mean (``center``, for ``reflect``: a reflection about the other mean
with alpha 0.5 sets a prompt's coordinate along the direction to that mean's). Prompts read
as ``other`` are left unsteered. The probe's accuracy on held-out prompts bounds the swap
rate: a prompt read on the wrong side is pushed further into its own class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mlx_interp.analysis.directions import DirectionSet
from mlx_interp.errors import MlxInterpError

SIDES = ("pos", "neg", "other")


class SideError(MlxInterpError, ValueError):
    """A side probe that cannot be fitted or applied (a class without rows, a wrong width)."""


@dataclass
class SideProbe:
    """Standardized multinomial L2 logistic regression on ``[n, d]`` activations.

    Attributes:
        C: inverse regularization strength.
        seed: the solver's seed (lbfgs is deterministic; kept for the record).
        classes: the side names seen in fitting (``pos``, ``neg`` and maybe ``other``).
    """

    C: float = 1.0
    seed: int = 0
    classes: list[str] = field(default_factory=list)
    _model: Any = field(default=None, repr=False)

    def fit(self, x: np.ndarray, sides: np.ndarray) -> SideProbe:
        """Fit on rows ``x [n, d]`` with labels ``sides [n]`` (values of :data:`SIDES`)."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        sides = np.asarray(sides).astype(str)
        unknown = sorted(set(sides) - set(SIDES))
        if unknown:
            raise SideError(f"side labels must be among {SIDES}, got {unknown}")
        for needed in ("pos", "neg"):
            if (sides == needed).sum() < 2:
                raise SideError(f"a side probe needs at least 2 {needed!r} rows to fit")
        clf = LogisticRegression(C=float(self.C), max_iter=2000, random_state=int(self.seed))
        self._model = make_pipeline(StandardScaler(), clf).fit(np.asarray(x, np.float64), sides)
        self.classes = [str(c) for c in self._model.classes_]
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Side of each row of ``x [n, d]`` (str ``[n]``)."""
        arrays = self.arrays()
        x = np.asarray(x, np.float64)
        if x.ndim != 2 or x.shape[1] != arrays["mean"].shape[0]:
            raise SideError(
                f"the probe was fitted on width {arrays['mean'].shape[0]}, got {x.shape}"
            )
        logits = ((x - arrays["mean"]) / arrays["scale"]) @ arrays["coef"].T + arrays["intercept"]
        if logits.shape[1] == 1:  # two classes: one logit for the second
            logits = np.concatenate([np.zeros_like(logits), logits], axis=1)
        return np.asarray(self.classes)[np.argmax(logits, axis=1)]

    def arrays(self) -> dict[str, np.ndarray]:
        """The fitted probe as arrays: scaler ``mean``/``scale`` [d], ``coef`` [k, d],
        ``intercept`` [k] (k = 1 for two classes), raw space ``(x - mean) / scale``."""
        if self._model is None:
            raise SideError("the side probe is not fitted: call fit first")
        if isinstance(self._model, dict):
            return self._model
        scaler, clf = self._model.named_steps.values()
        return {
            "mean": np.asarray(scaler.mean_, np.float64),
            "scale": np.asarray(scaler.scale_, np.float64),
            "coef": np.asarray(clf.coef_, np.float64),
            "intercept": np.asarray(clf.intercept_, np.float64),
        }

    def save(self, path) -> None:
        """A safetensors file of :meth:`arrays`, the classes and C in its metadata."""
        from safetensors.numpy import save_file

        arrays = {k: np.ascontiguousarray(v, np.float32) for k, v in self.arrays().items()}
        meta = {"classes": ",".join(self.classes), "C": str(self.C)}
        save_file(arrays, str(path), metadata=meta)

    @classmethod
    def load(cls, path) -> SideProbe:
        from safetensors import safe_open

        with safe_open(str(path), "np") as f:
            meta = f.metadata()
            arrays = {k: np.asarray(f.get_tensor(k), np.float64) for k in f.keys()}  # noqa: SIM118
        probe = cls(C=float(meta["C"]), classes=meta["classes"].split(","))
        probe._model = arrays
        return probe


@dataclass
class AxisSide:
    """A side read along a fixed axis (e.g. the answer words' unembedding, no weights fitted):
    ``pos`` when ``x . axis`` exceeds the midpoint of the two classes' mean projections (the
    one number fitted), else ``neg``. With ``plausible`` (a function ``x [n, d] -> [n]``, e.g.
    how close the class words come to the top of the logit lens) a row on the other rows'
    side of the midpoint between their mean score and the classes' is ``other`` (unsteered)."""

    axis: np.ndarray
    threshold: float = 0.0
    plausible: Any = None
    other_threshold: float | None = None
    other_below: bool = True  # the other rows score below the threshold (fitted)
    classes: list[str] = field(default_factory=lambda: ["neg", "other", "pos"])

    def fit(self, x: np.ndarray, sides: np.ndarray) -> AxisSide:
        sides = np.asarray(sides).astype(str)
        proj = np.asarray(x, np.float64) @ np.asarray(self.axis, np.float64)
        for needed in ("pos", "neg"):
            if (sides == needed).sum() < 1:
                raise SideError(f"an axis side needs {needed!r} rows to place its threshold")
        self.threshold = float((proj[sides == "pos"].mean() + proj[sides == "neg"].mean()) / 2)
        if self.plausible is not None:
            if not (sides == "other").any():
                raise SideError("reading 'other' needs rows of neither class to place it")
            score = np.asarray(self.plausible(x), np.float64)
            two = sides != "other"
            self.other_threshold = float((score[two].mean() + score[~two].mean()) / 2)
            self.other_below = bool(score[~two].mean() <= score[two].mean())
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.axis):
            raise SideError(f"the axis has width {len(self.axis)}, got {x.shape}")
        side = np.where(x @ np.asarray(self.axis, np.float64) > self.threshold, "pos", "neg")
        if self.other_threshold is not None:
            if self.plausible is None:
                raise SideError("this side reader reads 'other': load it with its plausible=")
            above = np.asarray(self.plausible(x)) > self.other_threshold
            side = np.where(above == self.other_below, side, "other")
        return side

    def save(self, path) -> None:
        from safetensors.numpy import save_file

        meta = {"kind": "axis", "threshold": repr(self.threshold)}
        if self.other_threshold is not None:
            meta["other_threshold"] = repr(self.other_threshold)
            meta["other_below"] = str(self.other_below)
        save_file({"axis": np.ascontiguousarray(self.axis, np.float32)}, str(path), metadata=meta)


def load_side(path, plausible: Any = None) -> SideProbe | AxisSide:
    """A saved :class:`SideProbe` or :class:`AxisSide` (``plausible``: the function an axis
    side that reads ``other`` needs)."""
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        meta = f.metadata() or {}
        if meta.get("kind") == "axis":
            other = meta.get("other_threshold")
            return AxisSide(
                np.asarray(f.get_tensor("axis")),
                float(meta["threshold"]),
                plausible,
                None if other is None else float(other),
                meta.get("other_below", "True") == "True",
            )
    return SideProbe.load(path)


def side_labels(conditions: np.ndarray, pos: str, neg: str) -> np.ndarray:
    """``pos`` / ``neg`` / ``other`` per row from its condition."""
    conditions = np.asarray(conditions).astype(str)
    return np.where(conditions == pos, "pos", np.where(conditions == neg, "neg", "other"))


def toward_other(ds: DirectionSet, layer: int, side: str) -> tuple[np.ndarray, np.ndarray]:
    """(vector, center) of the edit at ``layer`` for prompts read as ``side``: the direction
    from their class to the other one, and the other class's mean."""
    if side == "neg":
        return ds.vectors[layer], ds.pos_means[layer]
    if side == "pos":
        return -ds.vectors[layer], ds.neg_means[layer]
    raise SideError(f"only pos and neg prompts are moved, not {side!r}")
