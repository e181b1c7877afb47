"""Direction sets in and out of llama.cpp control vectors (GGUF), and ``mlx-interp-cv``.

A llama.cpp control vector is a GGUF file with ``general.architecture = controlvector``,
``controlvector.model_hint`` (the model's architecture, e.g. ``llama``),
``controlvector.layer_count`` (int32, the number of direction tensors) and one 1-D F32
tensor ``direction.N`` per steered layer; this is what llama.cpp's ``cvector-generator`` and
repeng write. llama.cpp (``--control-vector FILE`` / ``--control-vector-scaled FILE SCALE``)
adds ``scale * direction.N`` to the output of 0-based decoder block ``N``, at every token:
its loader stores ``direction.N`` at buffer row ``N - 1`` and its adapter fills block ``il``
from row ``il - 1`` (common/common.cpp ``common_control_vector_load_one``,
src/llama-adapter.cpp ``llama_adapter_cvec::apply``; ``build_cvec(cur, il)`` runs after block
``il``'s FFN residual add). So ``direction.N`` is exactly our decoder-layer index ``N`` (the
residual stream after ``model.layers[N]``), with no shift; layer 0 cannot be expressed (the
loader rejects ``direction.0``), and a tensor not named ``direction.N`` makes it skip the
whole file, so everything else this module stores goes in ``mlx_interp.*`` metadata.

Scale: llama.cpp only adds, so the export writes ``alpha * vector`` (``unit=False``: the raw
mean-difference vector, whose norm is the distance between the class means) or
``alpha * vector / |vector|`` (``unit=True``). Adding it equals our ``AddMode`` at that alpha
on every position; reflect and ablate have no llama.cpp equivalent.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mlx_interp.analysis.directions import DirectionError, DirectionSet

log = logging.getLogger(__name__)

ARCH = "controlvector"
OURS = "mlx_interp"  # prefix of the metadata keys only this module reads
FILE_NAME = "directions.safetensors"


def resolve_directions_path(ref: str | Path) -> Path:
    """The direction file ``ref`` names: a ``.safetensors`` or ``.gguf`` file, a directions
    artifact folder, or a run folder (``<run>/artifacts/directions``)."""
    path = Path(ref).expanduser()
    candidates = [path, path / FILE_NAME, path / "artifacts" / "directions" / FILE_NAME]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DirectionError(
        f"no direction file at {path}: give a directions .safetensors file, a control-vector "
        ".gguf, a directions artifact folder (outputs/artifacts/directions/<key>) or a run "
        "folder (outputs/runs/<date>/<time>)"
    )


def _artifact_provenance(path: Path) -> dict[str, str]:
    """artifact_key and model of the directions artifact folder holding ``path``, if any."""
    manifest_path = path.parent / "_manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    out = {"artifact_key": str(manifest.get("key", ""))}
    capture_key = manifest.get("record", {}).get("upstream", {}).get("capture")
    capture_meta = path.resolve().parent.parent.parent / "capture" / str(capture_key) / "meta.json"
    try:
        out["model"] = str(json.loads(capture_meta.read_text(encoding="utf-8"))["model"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return {k: v for k, v in out.items() if v}


def load_directions(ref: str | Path) -> DirectionSet:
    """A DirectionSet from a directions file, artifact or run folder, or a control-vector GGUF.

    For an artifact folder the manifest's key (and the model named by its capture artifact)
    fill ``meta['artifact_key']`` / ``meta['model']`` where the file itself lacks them.
    """
    path = resolve_directions_path(ref)
    if path.suffix == ".gguf":
        return import_control_vector(path)
    dirset = DirectionSet.load(path)
    for key, value in _artifact_provenance(path).items():
        dirset.meta.setdefault(key, value)
    return dirset


def _export_layers(dirset: DirectionSet, layers: Sequence[int] | None) -> list[int]:
    """Layers to write: all but 0 by default; an explicit 0 or unknown layer is an error."""
    if layers is None:
        chosen = [layer for layer in dirset.layers if layer != 0]
        if 0 in dirset.layers:
            log.warning("layer 0 skipped: llama.cpp control vectors cannot steer block 0")
    else:
        chosen = sorted({int(layer) for layer in layers})
        missing = [layer for layer in chosen if layer not in dirset.vectors]
        if missing:
            raise DirectionError(
                f"layers {missing} are not in the direction set; it has {dirset.layers}"
            )
        if 0 in chosen:
            raise DirectionError(
                "layer 0 cannot be exported: llama.cpp applies direction.N after block N and "
                "rejects direction.0 (it never steers block 0); choose layers >= 1"
            )
    if not chosen:
        raise DirectionError(f"nothing to export: the set has only layers {dirset.layers}")
    return chosen


def export_control_vector(
    dirset: DirectionSet,
    path: str | Path,
    alpha: float = 1.0,
    unit: bool = False,
    layers: Sequence[int] | None = None,
    model_hint: str = "llama",
) -> list[int]:
    """Write ``dirset`` as a llama.cpp control vector GGUF; returns the layers written.

    Each ``direction.L`` is ``alpha * vector[L]`` (or ``alpha * unit(vector[L])`` with
    ``unit``), float32 ``[d_model]``. Class means, method, contrast, alpha and norms go in
    ``mlx_interp.*`` metadata so :func:`import_control_vector` can rebuild the set.
    """
    import gguf

    alpha = float(alpha)
    if not np.isfinite(alpha) or alpha == 0.0:
        raise DirectionError(f"alpha is {alpha}; export needs a finite, non-zero alpha")
    chosen = _export_layers(dirset, layers)
    norms = dirset.norms()
    writer = gguf.GGUFWriter(str(path), ARCH)  # sets general.architecture = controlvector
    writer.add_string(f"{ARCH}.model_hint", str(model_hint))
    writer.add_int32(f"{ARCH}.layer_count", len(chosen))
    writer.add_string(f"{OURS}.method", dirset.method)
    writer.add_string(f"{OURS}.contrast", json.dumps(list(dirset.contrast)))
    writer.add_string(f"{OURS}.meta", json.dumps(dirset.meta, sort_keys=True, default=str))
    writer.add_float32(f"{OURS}.alpha", alpha)
    writer.add_bool(f"{OURS}.unit", bool(unit))
    for layer in chosen:
        vector = dirset.vectors[layer].astype(np.float32)
        scaled = (vector / np.float32(norms[layer]) if unit else vector) * np.float32(alpha)
        writer.add_tensor(f"direction.{layer}", scaled.astype(np.float32))
        writer.add_float32(f"{OURS}.norm.{layer}", norms[layer])
        writer.add_array(f"{OURS}.pos_mean.{layer}", dirset.pos_means[layer].tolist())
        writer.add_array(f"{OURS}.neg_mean.{layer}", dirset.neg_means[layer].tolist())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return chosen


def _field(reader: Any, key: str) -> Any:
    """A metadata value of a ``gguf.GGUFReader`` (str, number, bool or list), or None."""
    field = reader.get_field(key)
    return None if field is None else field.contents()


def import_control_vector(path: str | Path, unscale: bool = True) -> DirectionSet:
    """A DirectionSet from a control-vector GGUF (ours, repeng's or llama.cpp's).

    With ``unscale`` a file written by :func:`export_control_vector` gives back the original
    vectors (the export's alpha and unit scaling undone); a foreign file gives its tensors as
    they are. Without stored class means the centers are zero (reflect then mirrors through
    the origin), recorded as ``meta['centers_known'] = False``.
    """
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, struct.error, OSError ...
        raise DirectionError(f"{path}: not a readable GGUF file ({e})") from e
    arch = _field(reader, "general.architecture")
    if arch != ARCH:
        raise DirectionError(
            f"{path}: general.architecture is {arch!r}, not {ARCH!r}: not a control vector "
            "(a model GGUF goes to --model, not to /steer or import)"
        )
    vectors: dict[int, np.ndarray] = {}
    for tensor in reader.tensors:
        prefix, _, index = tensor.name.partition(".")
        if prefix != "direction" or not index.isdigit():
            raise DirectionError(
                f"{path}: tensor {tensor.name!r} is not named direction.<layer> "
                "(llama.cpp would skip this file)"
            )
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32 or len(tensor.shape) != 1:
            raise DirectionError(f"{path}: {tensor.name} must be a 1-D F32 tensor")
        vectors[int(index)] = np.array(tensor.data, dtype=np.float32)
    if not vectors:
        raise DirectionError(f"{path}: no direction.<layer> tensors")
    ours = _field(reader, f"{OURS}.alpha") is not None
    meta: dict[str, Any] = {}
    if ours:
        meta = json.loads(_field(reader, f"{OURS}.meta") or "{}")
    meta.update({"source": str(path), "model_hint": _field(reader, f"{ARCH}.model_hint")})
    if ours and unscale:
        alpha, unit = np.float32(_field(reader, f"{OURS}.alpha")), _field(reader, f"{OURS}.unit")
        for layer in vectors:
            vectors[layer] = vectors[layer] / alpha
            if unit:
                vectors[layer] = vectors[layer] * np.float32(_field(reader, f"{OURS}.norm.{layer}"))
    elif ours:
        meta.update({"exported_alpha": float(_field(reader, f"{OURS}.alpha"))})
    pos, neg = {}, {}
    for layer, vector in vectors.items():
        p, n = (
            _field(reader, f"{OURS}.pos_mean.{layer}"),
            _field(reader, f"{OURS}.neg_mean.{layer}"),
        )
        if p is None or n is None or not unscale:
            pos[layer], neg[layer] = vector / 2, -vector / 2
            meta["centers_known"] = False
        else:
            pos[layer], neg[layer] = np.asarray(p, np.float32), np.asarray(n, np.float32)
    method = _field(reader, f"{OURS}.method") if ours else "control_vector"
    contrast = tuple(json.loads(_field(reader, f"{OURS}.contrast"))) if ours else ("pos", "neg")
    return DirectionSet(vectors, pos, neg, method, contrast, meta)
