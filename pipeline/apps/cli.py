"""`mlx-interp`: the Hydra entry point. Compose the config, run the DAG, say where things are."""

from __future__ import annotations

import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, cast

import hydra  # noqa: E402  (after the BLAS)
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.experimental.callback import Callback  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

import mlx_interp  # noqa: F401  (loads the optimized BLAS before mlx)
from mlx_interp.apps.sweep import FAILED
from mlx_interp.blas import log_blas
from mlx_interp.engine.schema import register_configs
from mlx_interp.errors import MlxInterpError, report_error

log = logging.getLogger("mlx_interp")

PROVENANCE = "provenance.json"  # in a run folder: versions, BLAS, seed, model checksum

register_configs()

from mlx_interp.resources import CONF_DIR  # noqa: E402


def run_experiment(cfg: DictConfig, run_dir: Path) -> dict:
    """Run the configured target stages; link their artifacts into the run directory."""
    from mlx_interp.engine.cache import ArtifactStore
    from mlx_interp.engine.dag import run_stages
    from mlx_interp.engine.distributed import world
    from mlx_interp.engine.validate import validate_config
    from mlx_interp.stages import STAGES

    plain = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
    validate_config(plain)  # every knob checked before anything is computed
    store = ArtifactStore(Path(plain["paths"]["artifacts"]).expanduser().resolve())
    store.check_writable()
    group = world()  # one rank unless started by mlx.launch
    results = run_stages(STAGES, plain["pipeline"]["stages"], plain, store, group=group)
    summary = {
        name: {"key": r.key, "path": str(r.path), "cached": r.cached, "summary": r.summary}
        for name, r in results.items()
    }
    if group.rank != 0:  # rank 0 alone writes the (shared) run directory
        return summary
    try:
        _fill_run_dir(run_dir, results, summary, STAGES)
        from mlx_interp.engine.cache import write_json_atomic

        write_json_atomic(run_dir / PROVENANCE, provenance(plain))
    except OSError as err:
        from mlx_interp.engine.cache import ArtifactError

        raise ArtifactError(
            f"could not write the run folder {run_dir} ({err.strerror}); every artifact is "
            f"complete under {store.root}, so re-running recomputes nothing; free space or "
            "set paths.outputs=<a writable folder>"
        ) from err
    return summary


def _fill_run_dir(run_dir: Path, results: dict, summary: dict, stages: dict) -> None:
    """Links to the artifacts, the reports' files and run.json in the run directory."""
    from mlx_interp.engine.cache import MANIFEST, write_json_atomic

    links = run_dir / "artifacts"
    links.mkdir(parents=True, exist_ok=True)
    for name, res in results.items():
        link = links / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(res.path, target_is_directory=True)
    for name, res in results.items():  # a report's files belong in the run directory itself
        for pattern in stages[name].report:
            for src in sorted(res.path.glob(pattern)):
                if src.is_file() and src.name != MANIFEST:
                    shutil.copy2(src, run_dir / src.name)
    write_json_atomic(run_dir / "run.json", summary)


def main() -> float | None:
    """The console script: refuse an override Hydra's parser would reject without a hint
    (a non-ASCII value outside quotes), then run :func:`hydra_main`."""
    problem = unquoted_non_ascii(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    return hydra_main()


def unquoted_non_ascii(args: list[str]) -> str | None:
    """An override whose non-ASCII value Hydra's lexer rejects: quoting the value fixes it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    for arg in args:
        if arg.startswith("-") or "=" not in arg or arg.isascii():
            continue
        try:
            OverridesParser.create().parse_overrides([arg])
        except OverrideParseException:
            key, value = arg.split("=", 1)
            return (
                f"the override {arg} has non-ASCII characters outside quotes, which Hydra's "
                f"override parser rejects; quote the value, in the shell as "
                f"\"{key}='{value}'\" (in a sweep, quote each value)"
            )
    return None


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    log.info("run directory: %s", run_dir)
    sweep_job = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        info = log_blas()
        summary = run_experiment(cfg, run_dir)
    except MlxInterpError as err:  # bad input: one clear line, no traceback
        log.error("%s: %s", type(err).__name__, err)
        if sweep_job:  # the other points of the sweep run on; the summary lists this one
            record_failure(run_dir, err)
            return None
        sys.exit(report_error(err))
    except KeyboardInterrupt:
        log.error("interrupted")
        print(
            "error: interrupted; completed artifacts are kept, and re-running the same command "
            "resumes (a capture keeps its completed parts)",
            file=sys.stderr,
        )
        sys.exit(130)
    except Exception as err:  # a bug: under a sweep keep the other points, else the traceback
        if not sweep_job:
            raise
        log.exception("job failed")
        record_failure(run_dir, err)
        return None
    from mlx_interp.engine.dag import headlines
    from mlx_interp.engine.distributed import world
    from mlx_interp.stages import STAGES

    if world().rank != 0:  # under mlx.launch: rank 0 reports for all
        return None
    all_cached = all(s["cached"] for s in summary.values())
    for name, s in summary.items():
        state = "cached" if s["cached"] else "computed"
        print(f"[{state:8s}] {name:10s} {s['path']}")
    if all_cached:
        print("every stage was cached: nothing recomputed")
    if "capture" in summary:
        meta = summary["capture"]["summary"]
        print(
            f"activations: {run_dir / 'artifacts' / 'capture' / 'activations'} "
            f"({meta.get('n_prompts')} prompts x {len(meta.get('layers', []))} layers, "
            f"d_model {meta.get('d_model')}, positions={meta.get('positions')})"
        )
    heads = headlines(STAGES, summary)
    for name, head in heads.items():  # each report stage's headline, as it declares it
        print(f"report: {run_dir / STAGES[name].report[0]}  {head.line()}")
    print(f"run directory: {run_dir}  (config: .hydra/config.yaml, log: {_log_name()})")
    log.info("BLAS in use: %s", info.name)
    return next((float(h.value) for h in heads.values()), None)  # the first, for sweepers


def record_failure(run_dir: Path, err: BaseException) -> None:
    """Write ``failed.json`` (error type and message) into a sweep job's folder, print the
    one line, and return: the sweep summary lists the point and sets the exit status."""
    from mlx_interp.engine.cache import write_json_atomic
    from mlx_interp.errors import one_line

    user_error = isinstance(err, MlxInterpError)
    if user_error:
        report_error(err)
    else:
        print(f"error: {one_line(err)}", file=sys.stderr)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        run_dir / FAILED,
        {"error": type(err).__name__, "message": one_line(err), "bad_input": user_error},
    )
    return None


def provenance(cfg: dict) -> dict:
    """What a reproduction needs besides the config: versions, BLAS, seed, model checksum."""
    from importlib.metadata import PackageNotFoundError, version

    from mlx_interp.blas import ensure_fast_blas
    from mlx_interp.models.loading import model_fingerprint

    def ver(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    blas = ensure_fast_blas()
    return {
        "packages": {n: ver(n) for n in ("mlx-interp", "mlx", "mlx-lm", "numpy", "pyarrow")},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "blas": {"name": blas.name, "path": blas.path},
        "seed": cfg.get("seed"),
        "model": {"name": cfg["model"].get("name"), **model_fingerprint(cfg["model"])},
    }


class Preflight(Callback):
    """Hydra callback: one clear line (exit 2) for a bad command line or unwritable outputs.

    Runs before Hydra creates the run (or sweep) folder, which would otherwise fail with a
    traceback, and before any stage: nothing is computed for a command line that is wrong.
    """

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _preflight(config, config.hydra.run.dir)
        _claim_job_dir(config, "run")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _preflight(config, config.hydra.sweep.dir)
        _claim_job_dir(config, "sweep")


def _claim_job_dir(config: DictConfig, kind: str) -> None:
    """Give this run (or sweep) a folder of its own, with ``~`` expanded as for artifacts.

    The default, timestamped folder is claimed by an exclusive ``mkdir``: a second run started
    in the same second gets ``<time>-1`` (then -2, ...). A folder given on the command line
    (``hydra.run.dir=...``) that holds an earlier run (a ``.hydra`` folder; never the working
    directory or above it) has that run moved to a sibling
    ``<dir>.previous-<ns>``, so the reports of two runs never mix. Under ``mlx.launch`` the
    ranks share the folder as before.
    """
    from omegaconf import open_dict, read_write

    key = f"hydra.{kind}.dir"
    wanted = Path(str(OmegaConf.select(config, key))).expanduser()
    explicit = any(o.split("=", 1)[0].lstrip("+~") == key for o in config.hydra.overrides.hydra)
    from mlx_interp.engine.distributed import _LAUNCH_ENV

    if any(name in os.environ for name in _LAUNCH_ENV):
        folder = wanted  # under mlx.launch every rank shares one run folder (rank 0 writes it)
    elif explicit:
        folder = wanted
        cwd = Path.cwd().resolve()
        earlier_run = (folder / ".hydra").is_dir() or (folder / "multirun.yaml").is_file()
        if earlier_run and folder.resolve() not in (cwd, *cwd.parents):
            aside = folder.with_name(f"{folder.name}.previous-{time.time_ns()}")
            os.replace(folder, aside)
            log.warning("%s %s held an earlier run: moved to %s", key, folder, aside.name)
    else:
        folder, n = wanted, 0
        wanted.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                folder.mkdir()
                break
            except FileExistsError:
                n += 1
                folder = wanted.with_name(f"{wanted.name}-{n}")
    with read_write(config), open_dict(config):
        OmegaConf.update(config, key, str(folder), merge=False)


def _preflight(config: DictConfig, job_dir: str) -> None:
    from mlx_interp.engine.cache import disk_full_problem, writable_problem

    problem = duplicate_overrides(list(config.hydra.overrides.task))
    problem = problem or conflicting_experiments(_experiment_list(config.hydra.overrides.task))
    for path in (config.paths.outputs, config.paths.artifacts, job_dir):
        why = None if problem else writable_problem(path) or disk_full_problem(path)
        if why:
            problem = (
                f"the outputs folder {path} {why}; make it writable or set "
                "paths.outputs=<a writable folder>"
            )
    for note in forced_groups(list(config.hydra.overrides.task)):
        log.warning("%s", note)
        print(f"warning: {note}", file=sys.stderr)
    if problem:
        log.error("%s", problem)
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)


def duplicate_overrides(overrides: list[str]) -> str | None:
    """A key given twice on the command line: Hydra would silently keep the last value."""
    seen: dict[str, str] = {}
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if key in seen:
            hint = (
                "to merge experiments give them as a list, experiment=[a,b]"
                if key == "experiment"
                else f"to sweep, give one {key}=a,b with -m"
            )
            return (
                f"{key} is given twice on the command line ({seen[key]} and {item}); only the "
                f"last would be used: give it once ({hint})"
            )
        seen[key] = item
    return None


def _experiment_list(overrides) -> list[str] | None:
    """The names of ``experiment=[a,b]`` on the command line (None for one or none)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for item in OverridesParser.create().parse_overrides(list(overrides)):
        value = item.value()
        if item.key_or_group == "experiment" and isinstance(value, list):
            return [str(v) for v in value]
    return None


def conflicting_experiments(choice) -> str | None:
    """Two experiment overlays (experiment=[a,b]) that set the same key to different values."""
    if choice is None or isinstance(choice, str) or len(choice) < 2:
        return None
    values: dict[str, tuple[str, object]] = {}
    for name in choice:
        path = Path(CONF_DIR) / "experiment" / f"{name}.yaml"
        if not path.is_file():
            continue
        for key, value in _flat_settings(OmegaConf.to_container(OmegaConf.load(path))).items():
            if key in values and values[key][1] != value:
                other, before = values[key]
                return (
                    f"experiments {other} and {name} both set {key} ({before!r} vs {value!r}); "
                    f"merged in order, {name} would silently win: use one, or write an "
                    "experiment in conf/experiment/ that combines them"
                )
            values[key] = (name, value)
    return None


def forced_groups(overrides: list[str]) -> list[str]:
    """Groups an experiment overrides that the command line also sets (the command line wins)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    given: dict[str, str] = {}
    for o in parsed:
        chosen = o.value()
        if isinstance(chosen, str):
            given[o.key_or_group] = chosen
    names = _experiment_list(overrides) or ([given["experiment"]] if "experiment" in given else [])
    notes = []
    for name in names:
        path = Path(CONF_DIR) / "experiment" / f"{name}.yaml"
        if not path.is_file():
            continue
        settings = _flat_settings(OmegaConf.to_container(OmegaConf.load(path)))
        for key, value in settings.items():
            group = key[1:] if key.startswith("/") else None
            if group and group in given and given[group] != value:
                notes.append(
                    f"experiment {name} sets {group}={value} but the command line gives "
                    f"{group}={given[group]}: the command line wins"
                )
    return notes


def _flat_settings(node, prefix: str = "") -> dict[str, object]:
    """Dotted key -> value of an experiment file; `override /group: x` entries as /group."""
    out: dict[str, object] = {}
    for item in node.pop("defaults", []) if not prefix else []:
        if isinstance(item, dict):
            for key, value in item.items():
                out[key.replace("override ", "").strip()] = value
    for key, value in node.items():
        if isinstance(value, dict) and value:
            out.update(_flat_settings(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _log_name() -> str:
    job = HydraConfig.get().job.name
    return f"{job}.log"


if __name__ == "__main__":
    main()
