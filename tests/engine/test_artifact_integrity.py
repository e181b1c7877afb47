"""Artifacts prove their content: sha256 per file in the manifest, seals on resumable parts.

Issue 11 rows 1 and 11: a capture part with flipped signs (same size) must not feed the next
stage, and a partial folder holding a truncated part or junk must not be sealed into an
artifact or copied into a run folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mlx_interp.analysis.directions import DirectionSet
from mlx_interp.apps.cli import run_experiment
from mlx_interp.engine.cache import MANIFEST, ArtifactStore
from mlx_interp.engine.integrity import (
    clear_unsealed,
    listing,
    listing_problem,
    seal,
    sealed_intact,
)
from tests.helpers import compose_config, write_dataset


def _overrides(root: Path, *extra: str) -> list[str]:
    return [
        "model=tiny_random",
        f"concept.dataset={root / 'd.jsonl'}",
        "concept.fewshot=[]",
        f"paths.outputs={root / 'outputs'}",
        "capture.batch_size=4",
        *extra,
    ]


@pytest.fixture
def root(tmp_path) -> Path:
    write_dataset(tmp_path / "d.jsonl", n_per_class=4, conditions=("green", "red", "control"))
    return tmp_path


def _flip_signs(part: Path) -> None:
    """Negate every vector of a capture part in place, keeping the file's size."""
    table = pq.read_table(part)
    field = table.schema.field("vector")
    raw = np.frombuffer(table.column("vector").combine_chunks().buffers()[1], np.uint8).copy()
    raw[3::4] ^= 0x80  # the sign bit of each little-endian float32
    import pyarrow as pa

    flipped = pa.FixedSizeBinaryArray.from_buffers(
        field.type, len(table), [None, pa.py_buffer(raw)]
    )
    table = table.set_column(table.schema.get_field_index("vector"), field, flipped)
    size = part.stat().st_size
    pq.write_table(
        table,
        part,
        compression="none",
        use_dictionary=["prompt_id"],
        write_statistics=["prompt_id", "layer", "position"],
    )
    assert part.stat().st_size == size  # the manifest's old size check could not see it


def test_listing_detects_a_changed_byte_a_missing_and_an_extra_file(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"\x00\x01\x02")
    files = listing(tmp_path)
    assert listing_problem(tmp_path, files) is None
    (tmp_path / "a.bin").write_bytes(b"\x00\x01\x03")  # same size
    assert "does not match its checksum" in listing_problem(tmp_path, files)
    (tmp_path / "a.bin").write_bytes(b"\x00\x01\x02")
    (tmp_path / "junk.txt").write_text("x")
    assert "not in the manifest ['junk.txt']" in listing_problem(tmp_path, files)
    (tmp_path / "junk.txt").unlink()
    (tmp_path / "a.bin").unlink()
    assert "files missing ['a.bin']" in listing_problem(tmp_path, files)
    assert "no content checksums" in listing_problem(tmp_path, {"a.bin": 3})  # old manifest


def test_seals_keep_only_intact_parts(tmp_path):
    good, bad, junk = tmp_path / "p0.parquet", tmp_path / "p1.parquet", tmp_path / "notes.txt"
    good.write_bytes(b"complete part")
    bad.write_bytes(b"complete part too")
    seal(good), seal(bad)
    bad.write_bytes(b"truncat")
    junk.write_text("stray")
    assert sealed_intact(good) and not sealed_intact(bad) and not sealed_intact(junk)
    moved = clear_unsealed(tmp_path, keep_sealed=True)
    assert moved == ["notes.txt", "p1.parquet"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".p0.parquet.sha256", "p0.parquet"]
    aside = next(tmp_path.parent.glob(f"{tmp_path.name}.junk-*"))
    assert (aside / "p1.parquet").read_bytes() == b"truncat"  # moved, not deleted


def test_flipped_signs_in_a_part_are_recomputed_not_read(root):
    """Row 1: the corrupt part is moved aside; the next directions equal a fresh store's."""
    first = run_experiment(compose_config(_overrides(root, "experiment=capture_only")), root / "r1")
    capture_dir = Path(first["capture"]["path"])
    part = sorted((capture_dir / "activations").glob("part-*.parquet"))[0]
    _flip_signs(part)

    again = run_experiment(
        compose_config(_overrides(root, "pipeline.stages=[directions]")), root / "r2"
    )
    assert not again["capture"]["cached"]  # the key matched, the content did not
    assert again["prompts"]["cached"]
    aside = list(capture_dir.parent.glob("*.invalid-*"))
    assert len(aside) == 1 and (aside[0] / "activations" / part.name).exists()

    fresh_root = root / "fresh"
    fresh_root.mkdir()
    (fresh_root / "d.jsonl").write_bytes((root / "d.jsonl").read_bytes())
    fresh = run_experiment(
        compose_config(_overrides(fresh_root, "pipeline.stages=[directions]")), root / "r3"
    )
    got = DirectionSet.load(Path(again["directions"]["path"]) / "directions.safetensors")
    want = DirectionSet.load(Path(fresh["directions"]["path"]) / "directions.safetensors")
    for layer in want.layers:
        assert np.array_equal(got.vectors[layer], want.vectors[layer])


def test_manifest_holds_a_checksum_of_every_file(root):
    first = run_experiment(compose_config(_overrides(root, "experiment=capture_only")), root / "r1")
    folder = Path(first["capture"]["path"])
    manifest = json.loads((folder / MANIFEST).read_text())
    on_disk = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST
    )
    assert sorted(manifest["files"]) == on_disk  # no seal or temporary file was sealed
    assert all(len(v["sha256"]) == 64 for v in manifest["files"].values())


def test_truncated_part_and_junk_in_partial_are_not_sealed(root):
    """Row 11: a truncated sealed part is recomputed; junk is neither sealed nor copied."""
    overrides = _overrides(root, "experiment=capture_only")
    first = run_experiment(compose_config(overrides), root / "r1")
    store = ArtifactStore(root / "outputs" / "artifacts")
    key = first["capture"]["key"]
    final = store.path("capture", key)
    partial = store.partial_path("capture", key)
    final.rename(partial)  # as if the run had been killed before sealing
    (partial / MANIFEST).unlink()
    parts = sorted((partial / "activations").glob("part-*.parquet"))
    for each in parts:  # sealed as the interrupted attempt had written them
        seal(each)
    part = parts[1]
    part.write_bytes(part.read_bytes()[:100])  # truncated after it was sealed
    (partial / "activations" / "junk.parquet").write_bytes(b"not a part")
    (partial / "notes.md").write_text("scratch")

    again = run_experiment(compose_config(overrides), root / "r2")
    assert not again["capture"]["cached"]
    assert (
        again["capture"]["summary"]["resumed_batches"]
        == first["capture"]["summary"]["n_batches"] - 1
    )  # every other part was kept
    manifest = json.loads((final / MANIFEST).read_text())
    assert "notes.md" not in manifest["files"]
    assert "activations/junk.parquet" not in manifest["files"]
    assert store.get("capture", key) is not None
    assert not (root / "r2" / "notes.md").exists()
    junk = list(final.parent.glob(f"{key}.junk-*"))
    assert len(junk) == 1 and (junk[0] / "notes.md").read_text() == "scratch"
    fresh = run_experiment(
        compose_config([*overrides[:3], f"paths.outputs={root / 'fresh'}", *overrides[4:]]),
        root / "r3",
    )
    got = pq.read_table(final / "activations").sort_by([("prompt_id", "ascending")])
    want = pq.read_table(Path(fresh["capture"]["path"]) / "activations")
    assert got.equals(want.sort_by([("prompt_id", "ascending")]))
