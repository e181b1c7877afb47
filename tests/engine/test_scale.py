"""Scaling out and never losing work: launchers, sharded capture, locks, disk full."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mlx_interp.apps.cli import CONF_DIR, run_experiment
from mlx_interp.engine.cache import MANIFEST, ArtifactError, ArtifactStore
from mlx_interp.engine.dag import Stage, run_stages, stage_keys
from mlx_interp.engine.distributed import Shard, current_shard
from mlx_interp.io.activations import read_activations
from mlx_interp.stages import STAGES
from tests.helpers import DataInputs, compose_config, write_dataset

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def _dataset(tmp_path: Path, n: int = 6) -> Path:
    conditions = ("green", "red", "control")
    return write_dataset(tmp_path / "d.jsonl", n_per_class=n, conditions=conditions)


def _overrides(outputs: Path, dataset: Path, *extra: str) -> list[str]:
    return [
        "model=tiny_random",
        f"concept.dataset={dataset}",
        "concept.fewshot=[]",
        f"paths.outputs={outputs}",
        "steer.layer=2",
        "steer.n_random=2",
        "steer.confirm_n=2",
        *extra,
    ]


def _keys(targets: list[str], overrides: list[str]) -> dict[str, str]:
    """The artifact keys a run with these overrides would use (nothing is run)."""
    plain = OmegaConf.to_container(compose_config(overrides), resolve=True)
    return stage_keys(STAGES, targets, plain)


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _rows(capture_dir: Path) -> pd.DataFrame:
    rows = read_activations(capture_dir)
    return rows.sort_values(["prompt_id", "layer", "position"]).reset_index(drop=True)


# --- sharded stages: the build protocol, with two ranks as threads ---------------------------


class ThreadGroup:
    """A fake distributed group whose ranks are threads: vote = a sum over a barrier."""

    def __init__(self, rank: int, size: int, board: dict):
        self.rank, self.size, self._board = rank, size, board

    @property
    def shard(self) -> Shard:
        return Shard(self.rank, self.size)

    def vote(self, value: int) -> int:
        self._board["values"][self.rank] = int(value)
        self._board["barrier"].wait(timeout=60)
        total = sum(self._board["values"])
        self._board["barrier"].wait(timeout=60)
        return total


def _run_ranks(fn, size: int = 2) -> list:
    board = {"values": [0] * size, "barrier": threading.Barrier(size)}
    results: list = [None] * size

    def target(rank):
        try:
            results[rank] = fn(ThreadGroup(rank, size, board))
        except Exception as err:  # collected, asserted by the caller
            results[rank] = err

    threads = [threading.Thread(target=target, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a rank is stuck (deadlock)"
    return results


def _numbers_sharded(inputs, upstream, out):
    shard = current_shard()
    for i in range(inputs.data["n"]):
        if shard.owns(i):
            (out / f"part-{i}.json").write_text(json.dumps({"i": i, "rank": shard.rank}))
    return {"rank": shard.rank}


def test_sharded_stage_ranks_write_one_artifact_finalized_once(tmp_path):
    stages = {"numbers": Stage("numbers", _numbers_sharded, inputs=DataInputs, sharded=True)}
    store = ArtifactStore(tmp_path)
    cfg = {"data": {"n": 5}}
    results = _run_ranks(lambda g: run_stages(stages, ["numbers"], cfg, store, group=g))
    assert not any(isinstance(r, Exception) for r in results), results
    paths = {r["numbers"].path for r in results}
    assert len(paths) == 1 and not any(r["numbers"].cached for r in results)
    art = store.get("numbers", results[0]["numbers"].key)
    written = [json.loads((art.path / f"part-{i}.json").read_text()) for i in range(5)]
    assert [w["rank"] for w in written] == [0, 1, 0, 1, 0]  # both ranks wrote their share
    assert art.manifest["record"]["ranks"] == 2 and art.manifest["summary"] == {"rank": 0}
    again = _run_ranks(lambda g: run_stages(stages, ["numbers"], cfg, store, group=g))
    assert all(r["numbers"].cached for r in again)


def test_sharded_stage_failure_on_one_rank_fails_all_without_deadlock(tmp_path):
    def flaky(inputs, upstream, out):
        shard = current_shard()
        (out / f"ok-{shard.rank}.txt").write_text("done")
        if shard.rank == 1:
            raise RuntimeError("rank 1 broke")
        return {}

    stages = {"flaky": Stage("flaky", flaky, inputs=DataInputs, sharded=True)}
    store = ArtifactStore(tmp_path)
    results = _run_ranks(lambda g: run_stages(stages, ["flaky"], {"data": {}}, store, group=g))
    assert isinstance(results[1], RuntimeError)
    assert isinstance(results[0], ArtifactError) and "1 other rank" in str(results[0])
    finals = [p for p in (tmp_path / "flaky").iterdir() if len(p.name) == 64]
    assert finals == []  # never finalized
    partial = next((tmp_path / "flaky").glob("*.partial"))
    assert sorted(p.name for p in partial.iterdir()) == ["ok-0.txt", "ok-1.txt"]  # kept


def test_sharded_stage_rank0_unable_to_start_fails_all_without_deadlock(tmp_path):
    class NoLock(ArtifactStore):
        def lock(self, stage, key):
            raise ArtifactError("cannot write to the artifact store")

    stages = {"numbers": Stage("numbers", _numbers_sharded, inputs=DataInputs, sharded=True)}
    store = NoLock(tmp_path)
    results = _run_ranks(lambda g: run_stages(stages, ["numbers"], {"data": {"n": 2}}, store, g))
    assert isinstance(results[0], ArtifactError) and "cannot write" in str(results[0])
    assert isinstance(results[1], ArtifactError) and "rank 0 could not start" in str(results[1])


# --- sharded capture with MLX's distributed runtime (two processes, ring backend) ------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlx_launch_two_ranks_capture_equals_one_process(tmp_path):
    dataset = _dataset(tmp_path, n=7)  # 21 prompts, batch 3: 7 batches, 4 on rank 0, 3 on 1
    extra = ("experiment=capture_only", "capture.batch_size=3")
    cmd = [
        str(VENV_BIN / "mlx.launch"),
        "-n",
        "2",
        "--backend",
        "ring",
        "--starting-port",
        str(_free_port()),
        "--",
        sys.executable,
        "-m",
        "mlx_interp.apps.cli",
        *_overrides(tmp_path / "sharded", dataset, *extra),
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    done = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log_text = (tmp_path / "run" / "mlx_interp.log").read_text()
    assert "capture shard 0/2: 4 of 7 batches" in log_text
    assert "capture shard 1/2: 3 of 7 batches" in log_text
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    sharded_dir = Path(run["capture"]["path"])
    manifest = json.loads((sharded_dir / MANIFEST).read_text())
    assert manifest["record"]["ranks"] == 2

    one = run_experiment(
        compose_config(_overrides(tmp_path / "single", dataset, *extra)), tmp_path / "r1"
    )
    assert one["capture"]["key"] == run["capture"]["key"]  # interchangeable artifacts
    single_dir = Path(one["capture"]["path"])
    assert sorted(manifest["files"]) == sorted(
        json.loads((single_dir / MANIFEST).read_text())["files"]
    )
    sharded, single = _rows(sharded_dir), _rows(single_dir)
    assert len(sharded) == 21 * 4
    pd.testing.assert_frame_equal(
        sharded.drop(columns="vector"), single.drop(columns="vector"), check_dtype=True
    )
    assert np.array_equal(np.stack(sharded["vector"]), np.stack(single["vector"]))


# --- sweeps: joblib launcher, the artifact lock, the summary at the sweep root --------------


def _hold_lock(store_root: Path, stage: str, key: str) -> int:
    lock_dir = store_root / stage / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_dir / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _job_logs(sweep: Path) -> str:
    return "".join(p.read_text() for p in sorted(sweep.glob("*/mlx_interp.log")))


@pytest.mark.slow
def test_joblib_sweep_jobs_wait_on_the_artifact_lock_and_compute_once(tmp_path):
    dataset = _dataset(tmp_path)
    outputs, sweep = tmp_path / "outputs", tmp_path / "sweep"
    keys = _keys(["report"], _overrides(outputs, dataset))
    # Hold the prompts lock, so both parallel jobs are certain to meet at it.
    fd = _hold_lock(outputs / "artifacts", "prompts", keys["prompts"])
    cmd = [
        sys.executable,
        "-m",
        "mlx_interp.apps.cli",
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        *_overrides(outputs, dataset),
        "steer.alpha=0.5,1.5",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 300
        while _job_logs(sweep).count("being computed by another job") < 2:
            if proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        waiting = _job_logs(sweep).count(f"prompts/{keys['prompts']} is being computed")
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert waiting == 2  # both jobs were blocked on the one key
    logs = _job_logs(sweep)
    computed = {s: logs.count(f"stage {s}: computing") for s in keys}
    per_alpha = {"steer", "report"}  # the swept knob changes only these keys
    assert computed == {s: 2 if s in per_alpha else 1 for s in keys}
    assert {"prompts", "capture", "directions", "baseline"} <= set(keys)
    summary = pd.read_parquet(sweep / "summary.parquet")
    assert sorted(summary["steer.alpha"]) == [0.5, 1.5]
    assert all("steer.alpha=" in o for o in summary["overrides"])
    assert summary["swap_all"].between(0, 1).all()
    assert "steer.alpha" in (sweep / "summary.md").read_text()


# --- the SLURM launcher config (composed, not submitted) -------------------------------------


def _compose_hydra(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def test_slurm_launcher_config_composes_with_our_defaults():
    cfg = _compose_hydra(["hydra/launcher=slurm", "hydra.launcher.partition=cpu"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert cfg.hydra.runtime.choices["hydra/launcher"] == "slurm"
    assert launcher.partition == "cpu"
    assert launcher.cpus_per_task >= 1 and launcher.mem_gb >= 1 and launcher.timeout_min >= 1
    raw = OmegaConf.to_container(launcher, resolve=False)
    assert raw["submitit_folder"].startswith("${hydra.sweep.dir}/")  # job logs in the sweep
    built = instantiate(launcher)  # the launcher object, no submission
    assert type(built).__name__ == "SlurmLauncher"


def test_slurm_launcher_config_rejects_a_misspelt_field():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="partitoin"):
        _compose_hydra(["hydra/launcher=slurm", "hydra.launcher.partitoin=cpu"])


# --- never lose work: disk full -------------------------------------------------------------


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_in_a_stage_removes_its_partial_and_keeps_finished_artifacts(tmp_path):
    def numbers(inputs, upstream, out):
        (out / "numbers.json").write_text("[1, 2]")
        return {}

    def big(inputs, upstream, out):
        (out / "half.bin").write_bytes(b"x" * 100)
        _enospc()

    stages = {
        "numbers": Stage("numbers", numbers, inputs=DataInputs),
        "big": Stage("big", big, inputs=DataInputs, needs=("numbers",)),
    }
    store = ArtifactStore(tmp_path / "artifacts")
    with pytest.raises(ArtifactError, match="disk full while writing artifact big/") as info:
        run_stages(stages, ["big"], {"data": {}}, store)
    assert "paths.outputs=" in str(info.value) and "intact" in str(info.value)
    assert list((tmp_path / "artifacts" / "big").glob("*.partial")) == []  # space given back
    keys = stage_keys(stages, ["big"], {"data": {}})
    assert store.get("numbers", keys["numbers"]) is not None  # finished work is kept


def test_disk_full_writing_the_manifest_leaves_no_artifact(tmp_path, monkeypatch):
    stages = {"numbers": Stage("numbers", lambda c, i, o: {}, inputs=DataInputs)}
    store = ArtifactStore(tmp_path)
    monkeypatch.setattr("mlx_interp.engine.cache.write_json_atomic", _enospc)
    with pytest.raises(ArtifactError, match="disk full"):
        run_stages(stages, ["numbers"], {"data": {}}, store)
    assert [p.name for p in (tmp_path / "numbers").iterdir()] == [".locks"]


def test_disk_full_mid_capture_keeps_parts_and_the_rerun_resumes(tmp_path, monkeypatch):
    import mlx_interp.stages.capture as capture_stage

    dataset = _dataset(tmp_path)
    overrides = _overrides(tmp_path / "outputs", dataset, "experiment=capture_only")
    overrides.append("capture.batch_size=4")
    real_write = capture_stage.write_part
    calls = []

    def write_then_fill(table, path):
        calls.append(path.name)
        if len(calls) == 3:  # the disk fills up during the third part
            (path.with_name(f".{path.name}.tmp")).write_bytes(b"half a part")
            _enospc()
        real_write(table, path)

    monkeypatch.setattr(capture_stage, "write_part", write_then_fill)
    with pytest.raises(ArtifactError, match="disk full while writing artifact capture/"):
        run_experiment(compose_config(overrides), tmp_path / "r1")
    partial = next((tmp_path / "outputs" / "artifacts" / "capture").glob("*.partial"))
    names = sorted(p.name for p in (partial / "activations").iterdir())
    parts = [n for n in names if not n.endswith(".sha256")]
    assert parts == ["part-00000.parquet", "part-00001.parquet"]  # no temporary file left
    assert [n for n in names if n.endswith(".sha256")] == [f".{n}.sha256" for n in parts]
    keys = _keys(["capture"], overrides)
    assert ArtifactStore(tmp_path / "outputs" / "artifacts").get("prompts", keys["prompts"])

    monkeypatch.setattr(capture_stage, "write_part", real_write)
    resumed = run_experiment(compose_config(overrides), tmp_path / "r2")
    assert resumed["capture"]["summary"]["resumed_batches"] == 2
    fresh = run_experiment(
        compose_config(_overrides(tmp_path / "fresh", dataset, *overrides[-2:])), tmp_path / "r3"
    )
    a, b = _rows(Path(resumed["capture"]["path"])), _rows(Path(fresh["capture"]["path"]))
    assert a.drop(columns="vector").equals(b.drop(columns="vector"))
    assert np.array_equal(np.stack(a["vector"]), np.stack(b["vector"]))
