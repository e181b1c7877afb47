"""Direction extraction: a vector per layer pointing from the neg condition to the pos one.

Methods are small classes chosen by Hydra ``_target_``
(``mlx_interp.analysis.directions.MeanDiff`` ...),
each with ``fit(pos [n_pos, d], neg [n_neg, d], pairs=None) -> [d]``. Every method returns a
vector whose norm is that of the mean difference, so directions from different methods are
comparable as steering vectors. ``DirectionSet`` holds one vector per layer plus the class
means, with repeng-style arithmetic and a safetensors file format.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from mlx_interp.analysis.stats import finite_rows
from mlx_interp.errors import MlxInterpError
from mlx_interp.factory import Registry, build

FORMAT = "mlx-interp.directions/1"
PREFIXES = ("direction", "pos_mean", "neg_mean")  # tensor names: f"{prefix}.{layer}"
# Optional header strings that trace a file to its run: the model config name, the hash of the
# config that made it, and the content key of the directions artifact it came from.
PROVENANCE = ("model", "config_key", "artifact_key")


class DirectionError(MlxInterpError, ValueError):
    """Directions could not be fitted or read; the message says what to change."""


def _as_matrix(x: Any, name: str) -> np.ndarray:
    """``x`` as a finite float64 matrix [n, d] with at least 2 rows."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise DirectionError(f"{name} must be a matrix [n, d], got shape {arr.shape}")
    if arr.shape[0] < 2:
        raise DirectionError(
            f"class {name!r} has {arr.shape[0]} row(s); a direction needs at least 2 per class: "
            "add prompts for this condition or check the contrast names"
        )
    return finite_rows(arr, f"class {name!r}", DirectionError)


def _check_pair(pos: Any, neg: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated (pos [n_pos, d], neg [n_neg, d], mean difference [d]) in float64."""
    pos, neg = _as_matrix(pos, "pos"), _as_matrix(neg, "neg")
    if pos.shape[1] != neg.shape[1]:
        raise DirectionError(
            f"pos has d={pos.shape[1]} but neg has d={neg.shape[1]}: "
            "both classes must come from the same layer of the same model"
        )
    diff = pos.mean(axis=0) - neg.mean(axis=0)
    scale = max(1.0, float(np.abs(pos).max()), float(np.abs(neg).max()))
    if float(np.linalg.norm(diff)) <= 1e-12 * scale * np.sqrt(diff.size):
        raise DirectionError(
            "the two conditions have identical means: choose another layer or contrast"
        )
    return pos, neg, diff


def _scaled_like(vec: np.ndarray, mean_diff: np.ndarray, orient: bool) -> np.ndarray:
    """``vec`` rescaled to the norm of ``mean_diff``, flipped to agree with it if ``orient``."""
    norm = float(np.linalg.norm(vec))
    if norm == 0.0 or not np.isfinite(norm):
        raise DirectionError("the fitted direction has zero norm: choose another layer or contrast")
    if orient and float(vec @ mean_diff) < 0:
        vec = -vec
    return vec * (float(np.linalg.norm(mean_diff)) / norm)


class MeanDiff:
    """mean(pos) - mean(neg), unnormalized: its norm is the natural steering scale."""

    name = "mean_diff"

    def fit(self, pos: np.ndarray, neg: np.ndarray, pairs: np.ndarray | None = None) -> np.ndarray:
        """[n_pos, d], [n_neg, d] -> [d]; ``pairs`` is ignored (means need no pairing)."""
        return _check_pair(pos, neg)[2]


class PCADiff:
    """First principal component of paired differences pos[i] - neg[j], uncentered.

    Uncentered (as in repeng) so the mean of the differences is the signal; variance that
    pos and neg share within a pair cancels. Oriented and scaled like the mean difference.
    Without ``pairs`` every pos row is paired with every neg row, exactly: the Gram matrix of
    all n_pos * n_neg differences has a closed form, so nothing is sampled or materialized.
    """

    name = "pca"

    def __init__(self, seed: int = 0):
        self.seed = int(seed)  # nothing is random; accepted so configs can pass the run seed

    def fit(self, pos: np.ndarray, neg: np.ndarray, pairs: np.ndarray | None = None) -> np.ndarray:
        """[n_pos, d], [n_neg, d], pairs int [n_pairs, 2] of (pos_index, neg_index) -> [d]."""
        pos, neg, mean_diff = _check_pair(pos, neg)
        mid = (pos.mean(axis=0) + neg.mean(axis=0)) / 2  # shift both: differences unchanged,
        pos, neg = pos - mid, neg - mid  # and the Gram sums below lose no precision to offsets
        if pairs is None:  # sum_ij (p_i - n_j)(p_i - n_j)^T
            s_pos, s_neg = pos.sum(axis=0), neg.sum(axis=0)
            cross = np.outer(s_pos, s_neg)
            gram = len(neg) * (pos.T @ pos) + len(pos) * (neg.T @ neg) - cross - cross.T
        else:
            pairs = _check_pairs(pairs, pos, neg)
            gram = np.zeros((pos.shape[1], pos.shape[1]))
            for start in range(0, len(pairs), 4096):  # chunks bound memory at 4096 x d
                chunk = pairs[start : start + 4096]
                diffs = pos[chunk[:, 0]] - neg[chunk[:, 1]]
                gram += diffs.T @ diffs
        return _scaled_like(_top_eigenvector(gram, mean_diff), mean_diff, orient=True)


def _check_pairs(pairs: Any, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    arr = np.asarray(pairs)
    shape_ok = arr.ndim == 2 and arr.shape[1] == 2 and len(arr) > 0
    if not shape_ok or not np.issubdtype(arr.dtype, np.integer):
        raise DirectionError(f"pairs must be a non-empty int array [n_pairs, 2], got {arr.shape}")
    if (arr < 0).any() or (arr[:, 0] >= len(pos)).any() or (arr[:, 1] >= len(neg)).any():
        raise DirectionError(
            f"pairs index past the classes (n_pos={len(pos)}, n_neg={len(neg)}): "
            "pairs hold (pos_index, neg_index) within each class, not global row numbers"
        )
    return arr


def _top_eigenvector(gram: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Eigenvector [d] of the largest eigenvalue of a symmetric PSD matrix [d, d]."""
    from scipy import linalg, sparse

    d = gram.shape[0]
    if d <= 512:
        return linalg.eigh(gram, subset_by_index=[d - 1, d - 1])[1][:, 0]
    # Large d: Lanczos from the mean difference (deterministic, few iterations when it dominates).
    return sparse.linalg.eigsh(gram, k=1, which="LA", v0=start)[1][:, 0]


class LogisticDirection:
    """Weight of a logistic regression pos-vs-neg on raw activations, scaled to the mean diff.

    Features are centered and divided by one global scale before fitting: this leaves the
    weight a direction in activation space (no per-feature standardization) while keeping
    ``C`` meaningful across models whose activations differ in magnitude.
    """

    name = "logistic"

    def __init__(self, C: float = 1.0, seed: int = 0, max_iter: int = 1000):
        self.C = float(C)
        self.seed = int(seed)
        self.max_iter = int(max_iter)

    def fit(self, pos: np.ndarray, neg: np.ndarray, pairs: np.ndarray | None = None) -> np.ndarray:
        """[n_pos, d], [n_neg, d] -> [d]; ``pairs`` is ignored."""
        from sklearn.linear_model import LogisticRegression

        pos, neg, mean_diff = _check_pair(pos, neg)
        x = np.vstack([pos, neg])
        x = x - x.mean(axis=0)
        x /= max(float(x.std()), 1e-30)
        y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
        clf = LogisticRegression(C=self.C, max_iter=self.max_iter, random_state=self.seed)
        weight = clf.fit(x, y).coef_[0]  # y=1 is pos, so the weight already points pos-ward
        return _scaled_like(weight, mean_diff, orient=False)


METHODS: dict[str, type] = {"mean_diff": MeanDiff, "pca": PCADiff, "logistic": LogisticDirection}


@runtime_checkable
class DirectionMethod(Protocol):
    """What a direction method provides: ``fit(pos, neg, pairs) -> [d]``."""

    def fit(self, pos: np.ndarray, neg: np.ndarray, pairs: np.ndarray | None = None) -> Any: ...


METHOD_REGISTRY = Registry(
    what="method",
    plural="methods",
    names=METHODS,
    error=DirectionError,
    accepts=lambda obj: isinstance(obj, DirectionMethod),
    example="mlx_interp.analysis.directions.PCADiff",
)


def make_method(name_or_cfg: Any) -> Any:
    """A method from a name (``"pca"``), a ``{"_target_": ...}`` config, or an instance
    (the one factory, :func:`mlx_interp.factory.build`)."""
    return build(name_or_cfg, METHOD_REGISTRY)


@dataclass(eq=False)  # arrays have no single truth value; == is identity
class DirectionSet:
    """One direction [d] per layer, with the class means [d] it was fitted from.

    Arithmetic (``a + b``, ``a - b``, ``2 * a``, ``-a``) acts on the vectors like repeng's
    ControlVector. Derived sets (arithmetic, ``random_like``) keep the center and set the
    class means to center +/- vector / 2; ``-a`` swaps pos and neg.
    """

    vectors: dict[int, np.ndarray]
    pos_means: dict[int, np.ndarray]
    neg_means: dict[int, np.ndarray]
    method: str
    contrast: tuple[str, str]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        def f32(d):
            return {int(layer): np.asarray(v, dtype=np.float32) for layer, v in d.items()}

        self.vectors, self.pos_means, self.neg_means = map(
            f32, (self.vectors, self.pos_means, self.neg_means)
        )
        self.contrast = (str(self.contrast[0]), str(self.contrast[1]))
        layers = set(self.vectors)
        if not layers or set(self.pos_means) != layers or set(self.neg_means) != layers:
            raise DirectionError("vectors, pos_means and neg_means must cover the same layers")
        for layer, v in self.vectors.items():
            shapes = {v.shape, self.pos_means[layer].shape, self.neg_means[layer].shape}
            if len(shapes) != 1 or v.ndim != 1:
                raise DirectionError(f"layer {layer}: vectors and means must be [d], got {shapes}")

    @property
    def layers(self) -> list[int]:
        return sorted(self.vectors)

    def norms(self) -> dict[int, float]:
        return {layer: float(np.linalg.norm(self.vectors[layer])) for layer in self.layers}

    def unit(self, layer: int) -> np.ndarray:
        """The direction at ``layer`` with norm 1 [d]."""
        v = self.vectors[layer]
        return v / np.linalg.norm(v)

    def center(self, layer: int) -> np.ndarray:
        """Midpoint of the two class means [d] (the origin for reflect/ablate steering)."""
        return (self.pos_means[layer] + self.neg_means[layer]) / 2

    def cosine(self, other: DirectionSet, layer: int) -> float:
        return float(self.unit(layer) @ other.unit(layer))

    def _derived(self, vectors, centers, method, contrast, meta) -> DirectionSet:
        pos = {layer: centers[layer] + vectors[layer] / 2 for layer in vectors}
        neg = {layer: centers[layer] - vectors[layer] / 2 for layer in vectors}
        return type(self)(vectors, pos, neg, method, contrast, meta)  # subclasses stay themselves

    def _check_layers(self, other: Any) -> DirectionSet:
        if not isinstance(other, DirectionSet):
            raise TypeError(f"cannot combine a DirectionSet with {type(other).__name__}")
        if self.layers != other.layers:
            raise DirectionError(f"layers differ: {self.layers} vs {other.layers}")
        return other

    def __add__(self, other: DirectionSet) -> DirectionSet:
        other = self._check_layers(other)
        vectors = {k: self.vectors[k] + other.vectors[k] for k in self.layers}
        centers = {k: (self.center(k) + other.center(k)) / 2 for k in self.layers}
        method = self.method if self.method == other.method else f"{self.method}+{other.method}"
        contrast = tuple(f"{a}+{b}" for a, b in zip(self.contrast, other.contrast, strict=True))
        return self._derived(vectors, centers, method, contrast, {"op": "add"})

    def __neg__(self) -> DirectionSet:
        vectors = {k: -v for k, v in self.vectors.items()}
        swapped = (self.contrast[1], self.contrast[0])
        return type(self)(
            vectors, self.neg_means, self.pos_means, self.method, swapped, dict(self.meta)
        )

    def __sub__(self, other: DirectionSet) -> DirectionSet:
        return self + (-self._check_layers(other))

    def __mul__(self, scalar: float) -> DirectionSet:
        if not isinstance(scalar, int | float | np.integer | np.floating):
            return NotImplemented
        if scalar < 0:
            return -(self * -scalar)
        vectors = {k: v * float(scalar) for k, v in self.vectors.items()}
        centers = {k: self.center(k) for k in self.layers}
        return self._derived(vectors, centers, self.method, self.contrast, dict(self.meta))

    __rmul__ = __mul__

    def random_like(self, n: int, seed: int) -> list[DirectionSet]:
        """``n`` Gaussian random directions with this set's per-layer norms and centers."""
        rng = np.random.default_rng(seed)
        norms, centers, out = self.norms(), {k: self.center(k) for k in self.layers}, []
        for i in range(n):
            vectors = {}
            for layer in self.layers:
                g = rng.standard_normal(self.vectors[layer].shape[0])
                vectors[layer] = g * (norms[layer] / np.linalg.norm(g))
            meta = {"random_of": self.method, "seed": int(seed), "index": i}
            out.append(self._derived(vectors, centers, "random", self.contrast, meta))
        return out

    def save(self, path: str | Path, **provenance: Any) -> None:
        """Write a safetensors file: ``direction.L``, ``pos_mean.L``, ``neg_mean.L`` + metadata.

        The header carries format, method, contrast, layers, d_model and ``meta`` (JSON), plus
        the provenance keys in :data:`PROVENANCE` (``model``, ``config_key``, ``artifact_key``)
        as plain strings, taken from ``provenance`` or else from ``self.meta``, so a file can be
        traced to its run without loading it (:func:`read_header`).
        """
        from safetensors.numpy import save_file

        unknown = sorted(set(provenance) - set(PROVENANCE))
        if unknown:
            raise DirectionError(f"unknown provenance {unknown}: use {list(PROVENANCE)}")
        path = Path(path).expanduser()
        folder = path.parent
        if not folder.is_dir():  # else safetensors' error names a temporary file
            what = "is a file, not a folder" if folder.exists() else "does not exist"
            raise DirectionError(
                f"cannot save directions to {path}: the folder {folder} {what}; create it "
                f"first (mkdir -p {folder}) or give a path in an existing folder"
            )
        tensors = {}
        for prefix, arrays in zip(
            PREFIXES, (self.vectors, self.pos_means, self.neg_means), strict=True
        ):
            tensors.update({f"{prefix}.{layer}": v for layer, v in arrays.items()})
        metadata = {
            "format": FORMAT,
            "method": self.method,
            "contrast": json.dumps(list(self.contrast)),
            "layers": json.dumps(self.layers),
            "d_model": str(self.vectors[self.layers[0]].shape[0]),
            "meta": json.dumps(self.meta, sort_keys=True, default=str),
        }
        for key in PROVENANCE:
            value = provenance.get(key, self.meta.get(key))
            if value is not None:
                metadata[key] = str(value)
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> DirectionSet:
        """Read a file written by ``save``; a missing tensor or field is a DirectionError.

        Files from before the provenance keys load unchanged; header provenance that ``meta``
        lacks is copied into ``meta``.
        """
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # SafetensorError derives from Exception only
            raise DirectionError(f"{path}: not a readable safetensors file ({e})") from e
        header = _parse_header(path, metadata)
        layers, meta = header["layers"], header["meta"]
        for key in PROVENANCE:
            if key in header:
                meta.setdefault(key, header[key])
        expected = {f"{p}.{layer}" for p in PREFIXES for layer in layers}
        if set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            raise DirectionError(
                f"{path}: tensors do not match layers {layers}: "
                f"missing {missing}, unexpected {extra}"
            )
        vec, pos, neg = ({k: tensors[f"{p}.{k}"] for k in layers} for p in PREFIXES)
        return cls(vec, pos, neg, header["method"], header["contrast"], meta)


def _parse_header(path: str | Path, metadata: dict[str, str]) -> dict[str, Any]:
    """The typed header of a directions file (layers, contrast, meta parsed from JSON)."""
    if metadata.get("format") != FORMAT:
        raise DirectionError(
            f"{path}: not a directions file (format {metadata.get('format')}); write one with "
            "DirectionSet.save or the directions stage"
        )
    try:
        header: dict[str, Any] = {
            "format": metadata["format"],
            "method": metadata["method"],
            "contrast": tuple(json.loads(metadata["contrast"])),
            "layers": [int(x) for x in json.loads(metadata["layers"])],
            "meta": json.loads(metadata["meta"]),
        }
        if "d_model" in metadata:
            header["d_model"] = int(metadata["d_model"])
    except (KeyError, ValueError, TypeError) as e:
        raise DirectionError(f"{path}: bad metadata ({e!r}): rewrite it with save()") from e
    if len(header["contrast"]) != 2 or not isinstance(header["meta"], dict):
        raise DirectionError(f"{path}: bad metadata (contrast or meta): rewrite it with save()")
    header.update({key: metadata[key] for key in PROVENANCE if key in metadata})
    return header


def read_header(path: str | Path) -> dict[str, Any]:
    """A directions file's header (method, contrast, layers, d_model, meta, provenance) only.

    Reads no tensor data, so it is cheap for listing or checking a file before loading it.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
    except Exception as e:  # SafetensorError derives from Exception only
        raise DirectionError(f"{path}: not a readable safetensors file ({e})") from e
    return _parse_header(path, metadata)


def extract(
    acts: Mapping[int, np.ndarray],
    is_pos: np.ndarray,
    is_neg: np.ndarray,
    method: Any = "mean_diff",
    contrast: tuple[str, str] = ("pos", "neg"),
    pairs: np.ndarray | None = None,
) -> DirectionSet:
    """Fit one direction per layer from ``acts`` (layer -> [n, d]) and row masks [n] (bool).

    ``pairs`` (int [n_pairs, 2]) index within the pos and neg rows, in row order.
    """
    fitter = make_method(method)
    is_pos, is_neg = np.asarray(is_pos, dtype=bool), np.asarray(is_neg, dtype=bool)
    if (is_pos & is_neg).any():
        raise DirectionError(
            f"{int((is_pos & is_neg).sum())} rows are both {contrast[0]!r} and "
            f"{contrast[1]!r}: the two conditions must be disjoint"
        )
    for name, mask in zip(contrast, (is_pos, is_neg), strict=True):
        if mask.sum() < 2:
            raise DirectionError(
                f"condition {name!r} has {int(mask.sum())} prompt(s); need >= 2: "
                "add prompts for it or fix the contrast names"
            )
    vectors, pos_means, neg_means = {}, {}, {}
    for layer in sorted(acts):
        x = np.asarray(acts[layer])
        if x.ndim != 2 or len(x) != len(is_pos) or len(x) != len(is_neg):
            raise DirectionError(
                f"layer {layer}: activations {x.shape} do not match "
                f"masks of length {len(is_pos)}/{len(is_neg)}"
            )
        pos, neg = x[is_pos], x[is_neg]
        try:
            vectors[layer] = fitter.fit(pos, neg, pairs)
        except DirectionError as e:
            raise DirectionError(f"at layer {layer} ({contrast[0]} vs {contrast[1]}): {e}") from e
        pos_means[layer] = pos.astype(np.float64).mean(axis=0)
        neg_means[layer] = neg.astype(np.float64).mean(axis=0)
    params = {k: v for k, v in vars(fitter).items() if isinstance(v, (int, float, str, bool))}
    meta = {"n_pos": int(is_pos.sum()), "n_neg": int(is_neg.sum()), "params": params}
    name = getattr(fitter, "name", type(fitter).__name__)
    return DirectionSet(vectors, pos_means, neg_means, name, (contrast[0], contrast[1]), meta)


def cosine_matrix(sets: Mapping[str, DirectionSet], layer: int) -> tuple[list[str], np.ndarray]:
    """Names and the [k, k] matrix of cosines between the named sets' directions at ``layer``."""
    names = list(sets)
    units = np.stack([sets[n].unit(layer).astype(np.float64) for n in names])
    return names, np.clip(units @ units.T, -1.0, 1.0)
