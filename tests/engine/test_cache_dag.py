"""The artifact store and the DAG runner on toy stages (no model)."""

from __future__ import annotations

import json
import multiprocessing as mp
from dataclasses import dataclass
from pathlib import Path

import pytest

from mlx_interp.engine.cache import MANIFEST, ArtifactStore, hash_key
from mlx_interp.engine.dag import PipelineError, Stage, execution_order, run_stages
from tests.helpers import DataInputs

CALLS: list[str] = []


@dataclass(frozen=True)
class ScaleInputs:
    scale: dict


@dataclass(frozen=True)
class NoInputs:
    pass


def _numbers(inputs, upstream, out):
    CALLS.append("numbers")
    values = list(range(inputs.data["n"]))
    (out / "numbers.json").write_text(json.dumps(values))
    return {"n": len(values)}


def _scaled(inputs, upstream, out):
    CALLS.append("scaled")
    values = json.loads((upstream["numbers"] / "numbers.json").read_text())
    (out / "scaled.json").write_text(json.dumps([v * inputs.scale["factor"] for v in values]))
    return {"sum": sum(v * inputs.scale["factor"] for v in values)}


STAGES = {
    "numbers": Stage("numbers", _numbers, inputs=DataInputs),
    "scaled": Stage("scaled", _scaled, inputs=ScaleInputs, needs=("numbers",)),
}


@pytest.fixture(autouse=True)
def _reset_calls():
    CALLS.clear()


def test_hash_key_is_canonical():
    assert hash_key({"a": 1, "b": [1, 2]}) == hash_key({"b": [1, 2], "a": 1})
    assert hash_key({"a": 1}) != hash_key({"a": 2})


def test_second_run_recomputes_nothing(store):
    cfg = {"data": {"n": 5}, "scale": {"factor": 3}}
    first = run_stages(STAGES, ["scaled"], cfg, store)
    assert CALLS == ["numbers", "scaled"]
    assert not any(r.cached for r in first.values())
    second = run_stages(STAGES, ["scaled"], cfg, store)
    assert CALLS == ["numbers", "scaled"]  # nothing new
    assert all(r.cached for r in second.values())
    assert second["scaled"].summary == {"sum": 30}


def test_downstream_knob_keeps_upstream_cached(store):
    run_stages(STAGES, ["scaled"], {"data": {"n": 5}, "scale": {"factor": 3}}, store)
    CALLS.clear()
    res = run_stages(STAGES, ["scaled"], {"data": {"n": 5}, "scale": {"factor": 4}}, store)
    assert CALLS == ["scaled"]
    assert res["numbers"].cached and not res["scaled"].cached
    # an upstream change changes every downstream key
    CALLS.clear()
    res2 = run_stages(STAGES, ["scaled"], {"data": {"n": 6}, "scale": {"factor": 4}}, store)
    assert CALLS == ["numbers", "scaled"]
    assert res2["scaled"].key != res["scaled"].key


def test_folder_without_manifest_is_not_an_artifact(tmp_path):
    store = ArtifactStore(tmp_path)
    cfg = {"data": {"n": 3}, "scale": {"factor": 1}}
    res = run_stages(STAGES, ["numbers"], cfg, store)
    (res["numbers"].path / MANIFEST).unlink()
    CALLS.clear()
    again = run_stages(STAGES, ["numbers"], cfg, store)
    assert CALLS == ["numbers"] and not again["numbers"].cached


def test_hand_edited_artifact_is_recomputed_and_kept_aside(tmp_path):
    store = ArtifactStore(tmp_path)
    cfg = {"data": {"n": 3}, "scale": {"factor": 1}}
    res = run_stages(STAGES, ["numbers"], cfg, store)
    (res["numbers"].path / "numbers.json").write_text("[99, 98, 97, 96]")  # edited by hand
    CALLS.clear()
    again = run_stages(STAGES, ["numbers"], cfg, store)
    assert CALLS == ["numbers"]
    assert json.loads((again["numbers"].path / "numbers.json").read_text()) == [0, 1, 2]
    aside = list((tmp_path / "numbers").glob("*.invalid-*"))
    assert len(aside) == 1 and (aside[0] / "numbers.json").read_text() == "[99, 98, 97, 96]"


def test_failed_stage_leaves_no_artifact(tmp_path):
    def boom(inputs, upstream, out):
        (out / "half.txt").write_text("partial")
        raise RuntimeError("crash")

    stages = {"boom": Stage("boom", boom, inputs=DataInputs)}
    store = ArtifactStore(tmp_path)
    with pytest.raises(RuntimeError):
        run_stages(stages, ["boom"], {"data": {}}, store)
    key_dirs = [p for p in (tmp_path / "boom").iterdir() if not p.name.startswith(".")]
    assert all(p.name.endswith(".partial") for p in key_dirs)  # never renamed into place


def test_a_declared_file_the_stage_did_not_write_fails_it(tmp_path):
    def forgetful(inputs, upstream, out):
        (out / "one.json").write_text("1")

    declared = Stage("forgetful", forgetful, inputs=DataInputs, writes=("one.json", "two.*"))
    with pytest.raises(RuntimeError, match=r"did not write \['two.\*'\]"):
        run_stages({"forgetful": declared}, ["forgetful"], {"data": {}}, ArtifactStore(tmp_path))
    assert not [p for p in (tmp_path / "forgetful").iterdir() if len(p.name) == 64]


def test_unknown_stage_and_cycle_are_named_errors():
    with pytest.raises(PipelineError, match="unknown stage 'nope'"):
        execution_order(STAGES, ["nope"])
    cyclic = {
        "a": Stage("a", _numbers, inputs=NoInputs, needs=("b",)),
        "b": Stage("b", _numbers, inputs=NoInputs, needs=("a",)),
    }
    with pytest.raises(PipelineError, match="cycle"):
        execution_order(cyclic, ["a"])
    assert execution_order(STAGES, ["scaled"]) == ["numbers", "scaled"]


def test_missing_config_key_fails_before_any_stage_runs(tmp_path):
    with pytest.raises(PipelineError, match="scale"):
        run_stages(STAGES, ["scaled"], {"data": {"n": 2}}, ArtifactStore(tmp_path))
    assert CALLS == []


def _slow_counted(inputs, upstream, out):
    import time

    with open(inputs.data["counter"], "a") as f:
        f.write("x")
    time.sleep(0.5)
    (out / "done").write_text("1")


def _build_in_process(root: str, counter: str) -> str:
    stages = {"slow": Stage("slow", _slow_counted, inputs=DataInputs)}
    res = run_stages(stages, ["slow"], {"data": {"counter": counter}}, ArtifactStore(root))
    return res["slow"].key


def test_parallel_jobs_compute_a_shared_artifact_once(tmp_path):
    counter = tmp_path / "counter.txt"
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        keys = pool.starmap(_build_in_process, [(str(tmp_path / "a"), str(counter))] * 2)
    assert keys[0] == keys[1]
    assert Path(counter).read_text() == "x"  # computed once; the other job waited


def test_the_stages_run_in_one_order_whatever_the_hash_seed():
    """The order came from a set of stage names: it changed with PYTHONHASHSEED, so one run
    computed the baseline before the capture and the next after (and their times moved)."""
    import ast
    import os
    import subprocess
    import sys

    code = (
        "from mlx_interp.engine.dag import execution_order\n"
        "from mlx_interp.stages import STAGES\n"
        "print(execution_order(STAGES, ['report', 'probe_report', 'contamination_report']))\n"
    )
    orders = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in range(4)
    }
    assert len(orders) == 1, orders
    order = ast.literal_eval(orders.pop())
    assert order.index("capture") < order.index("baseline") < order.index("steer")
