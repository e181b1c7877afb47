"""The stage DAG: stages declare what they read; the runner orders, keys and caches them.

A stage is a pure function ``run(inputs, upstream, out) -> summary``: ``inputs`` is its
declared inputs dataclass (schema types, built by :mod:`mlx_interp.engine.inputs` from its
own config slice), ``upstream`` maps upstream stage names to their artifact folders, ``out``
is the folder it writes into. Its cache key hashes {stage, the hash of its code (its module
and the project modules it imports, :mod:`mlx_interp.engine.code_hash`), the plain config
slice (the inputs' fields), fingerprints of the files the inputs name, upstream keys}; the
artifact's manifest records those parts, so a changed key can be explained.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from graphlib import CycleError, TopologicalSorter
from pathlib import Path
from typing import Any

from mlx_interp.engine.cache import Artifact, ArtifactStore, hash_key
from mlx_interp.engine.code_hash import code_digest, stage_sources
from mlx_interp.engine.distributed import Group, current_shard
from mlx_interp.engine.inputs import input_keys, typed
from mlx_interp.errors import ConfigError

log = logging.getLogger(__name__)

StageFn = Callable[[Any, dict[str, Path], Path], dict | None]


class PipelineError(ConfigError):
    """The stage graph or its config is wrong; raised before any stage runs."""


__all__ = [
    "ConfigError",
    "Headline",
    "PipelineError",
    "Stage",
    "StageResult",
    "run_stages",
    "stage_inputs",
    "stage_keys",
]


@dataclass(frozen=True)
class Headline:
    """A report stage's headline number: printed by the CLI, returned to sweepers."""

    name: str  # what the number is, e.g. "pressure best CV accuracy"
    value: float
    text: str = ""  # the CLI's line after the report's path; default "<name> <value:.3f>"

    def line(self) -> str:
        return self.text or f"{self.name} {self.value:.3f}"


def summary_headline(summary: dict) -> Headline | None:
    """The headline a stage put in its summary as ``{"headline": {"name", "value"}}``."""
    head = summary.get("headline")
    return Headline(str(head["name"]), float(head["value"])) if head else None


def headlines(stages: Mapping[str, Stage], run: Mapping[str, Any]) -> dict[str, Headline]:
    """Stage name -> Headline of every stage of a run that declares one, in run order; ``run``
    maps stage names to their ``run.json`` entries (``{"summary": ..., ...}``)."""
    out = {}
    for name, entry in run.items():
        stage = stages.get(name)
        if stage is not None and stage.headline is not None:
            head = stage.headline(entry.get("summary") or {})
            if head is not None:
                out[name] = head
    return out


@dataclass(frozen=True)
class Stage:
    """One node of the DAG, declared by its stage module (``STAGE = Stage(...)``).

    run: ``run(inputs, upstream, out) -> summary`` (see the module docstring).
    inputs: a frozen dataclass whose fields are the top-level config keys the stage reads,
        typed by the schema (``model: ModelConfig``, ``seed: int``); :attr:`reads` is derived.
    needs: upstream stage names whose artifacts this stage reads.
    fingerprint: inputs -> dict of content hashes of files they name (dataset, weights).
    resumable: the stage reuses complete files of an interrupted attempt (kept on disk full).
    sharded: under mlx.launch every rank computes its share (``distributed.current_shard()``)
        into the one artifact; otherwise one rank computes it and the others wait.
    writes: the files (glob patterns, relative to the artifact folder) every run of the stage
        writes; the runner refuses to complete an artifact that lacks one.
    report: the files (glob patterns) copied into the run folder: set for a report stage.
    headline: summary -> the report's headline number (or None), for the CLI and sweepers;
        a function of the summary, so a cached artifact has it too.
    """

    name: str
    run: StageFn
    inputs: type
    needs: tuple[str, ...] = ()
    fingerprint: Callable[[Any], dict] | None = None
    resumable: bool = False
    sharded: bool = False
    writes: tuple[str, ...] = ()
    report: tuple[str, ...] = ()
    headline: Callable[[dict], Headline | None] | None = None

    @property
    def reads(self) -> tuple[str, ...]:
        """The top-level config keys that form this stage's slice: its inputs' fields."""
        return input_keys(self.inputs)

    @property
    def sources(self) -> dict[str, str]:
        """Module -> sha256 of the file, for the module of ``run`` and the project modules
        it imports (transitively); computed once per process."""
        return stage_sources(self.run.__module__)

    @property
    def code(self) -> str:
        """One hash of :attr:`sources`: the code part of the stage's cache key."""
        return code_digest(self.sources)


@dataclass
class StageResult:
    """What the runner did for one stage."""

    stage: str
    key: str
    path: Path
    cached: bool
    seconds: float
    summary: dict = field(default_factory=dict)


def execution_order(stages: Mapping[str, Stage], targets: Iterable[str]) -> list[str]:
    """Stages needed for ``targets``, upstream first; unknown names and cycles are errors."""
    wanted: set[str] = set()
    todo = list(targets)
    while todo:
        name = todo.pop()
        if name in wanted:
            continue
        if name not in stages:
            raise PipelineError(
                f"unknown stage {name!r}; known stages: {sorted(stages)}. "
                "Fix pipeline.stages in the experiment config."
            )
        wanted.add(name)
        todo.extend(stages[name].needs)
    # in the registry's order, never a set's: the order stages run in (and so their logs and
    # times) must not change with the process's string hash seed
    graph = {name: list(stages[name].needs) for name in stages if name in wanted}
    try:
        return list(TopologicalSorter(graph).static_order())
    except CycleError as err:
        raise PipelineError(f"the stage graph has a cycle: {err.args[1]}") from err


def config_slice(cfg: Mapping[str, Any], stage: Stage) -> dict:
    """The plain-dict slice of the composed config this stage may read."""
    missing = [k for k in stage.reads if k not in cfg]
    if missing:
        raise PipelineError(f"stage {stage.name!r} reads config keys {missing} that are not set")
    return {k: cfg[k] for k in stage.reads}


def stage_inputs(stage: Stage, cfg_slice: Mapping[str, Any]) -> Any:
    """The stage's typed inputs, built from its plain config slice."""
    return typed(stage.inputs, cfg_slice)


def key_parts(
    stage: Stage, cfg_slice: dict, upstream_keys: Mapping[str, str], inputs: Any = None
) -> dict:
    """What a stage's key hashes: its name, its code's hash, its config slice, the
    fingerprints of the files its inputs name and its upstream keys (``inputs``: the typed
    slice, when already built)."""
    if stage.fingerprint is None:
        fingerprints = {}
    else:
        fingerprints = stage.fingerprint(
            stage_inputs(stage, cfg_slice) if inputs is None else inputs
        )
    return {
        "stage": stage.name,
        "code": stage.code,
        "config": cfg_slice,
        "files": fingerprints,
        "inputs": dict(sorted(upstream_keys.items())),
    }


def stage_key(
    stage: Stage, cfg_slice: dict, upstream_keys: Mapping[str, str], inputs: Any = None
) -> str:
    """Content key of a stage's artifact: the hash of :func:`key_parts`."""
    return hash_key(key_parts(stage, cfg_slice, upstream_keys, inputs))


def stage_keys(
    stages: Mapping[str, Stage], targets: Iterable[str], cfg: Mapping[str, Any]
) -> dict[str, str]:
    """The artifact key of every stage the targets need, without running anything."""
    keys: dict[str, str] = {}
    for name in execution_order(stages, targets):
        stage = stages[name]
        upstream = {n: keys[n] for n in stage.needs}
        keys[name] = stage_key(stage, config_slice(cfg, stage), upstream)
    return keys


def check_writes(stage: Stage, out: Path) -> None:
    """Every file the stage declares it writes is in ``out`` (a stage bug otherwise)."""
    missing = [pattern for pattern in stage.writes if not any(out.glob(pattern))]
    if missing:
        raise RuntimeError(
            f"stage {stage.name!r} did not write {missing} into {out}, though its Stage "
            "declares them (writes=...): fix the stage or its declaration"
        )


def run_stages(
    stages: Mapping[str, Stage],
    targets: Iterable[str],
    cfg: Mapping[str, Any],
    store: ArtifactStore,
    group: Group | None = None,
) -> dict[str, StageResult]:
    """Run (or find cached) every stage the targets need, in DAG order.

    ``group``: the ranks of an mlx.launch job; sharded stages are computed by all of them.
    """
    order = execution_order(stages, targets)
    slices = {name: config_slice(cfg, stages[name]) for name in order}  # fail before running
    typed_inputs = {name: stage_inputs(stages[name], slices[name]) for name in order}
    keys: dict[str, str] = {}
    results: dict[str, StageResult] = {}
    for name in order:
        stage = stages[name]
        upstream = {n: keys[n] for n in stage.needs}
        parts = key_parts(stage, slices[name], upstream, typed_inputs[name])
        key = hash_key(parts)
        keys[name] = key
        paths = {n: results[n].path for n in stage.needs}
        started = time.time()

        def compute(out: Path, stage=stage, name=name, paths=paths) -> dict | None:
            log.info("stage %s: computing -> %s", name, out)
            summary = stage.run(typed_inputs[name], paths, out)
            if current_shard().rank == 0:  # under mlx.launch rank 0 writes the shared files
                check_writes(stage, out)
            return summary

        # the key's parts, so that a changed key can be explained (mlx-interp-reproduce)
        record = {
            "upstream": upstream,
            "code": stage.sources,
            "config": slices[name],
            "files": parts["files"],
        }
        if stage.sharded and group is not None and group.size > 1:
            art: Artifact = store.build_sharded(name, key, compute, group, record=record)
        else:
            art = store.build(name, key, compute, record=record, resumable=stage.resumable)
        seconds = time.time() - started
        state = "cached" if art.cached else f"computed in {seconds:.1f}s"
        log.info("stage %-10s %s  %s", name, state, art.path)
        results[name] = StageResult(
            name, key, art.path, art.cached, seconds, art.manifest.get("summary", {})
        )
    return results
