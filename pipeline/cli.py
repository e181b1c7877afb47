"""`mlx-interp`: the Hydra entry point. Compose the config, run the DAG, say where things are."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import hydra  # noqa: E402  (after the BLAS)
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

import pipeline  # noqa: F401  (loads the optimized BLAS before mlx)
from pipeline.blas import log_blas
from pipeline.schema import register_configs

log = logging.getLogger("mlx_interp")

register_configs()

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")  # a file path: conf/ is data


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (config, data, model), reported without a traceback."""
    from pipeline.cache import ArtifactError
    from pipeline.capture import LayerIndexError
    from pipeline.dag import PipelineError
    from pipeline.directions import DirectionError
    from pipeline.gguf import GGUFError
    from pipeline.models import ModelLoadError
    from pipeline.scoring import ScoringError
    from pipeline.steering import SteeringError
    from stages.capture import PromptTooLongError
    from stages.datasets import DatasetError

    return (
        ArtifactError,
        LayerIndexError,
        PipelineError,
        GGUFError,
        ModelLoadError,
        PromptTooLongError,
        DatasetError,
        DirectionError,
        ScoringError,
        SteeringError,
    )


def run_experiment(cfg: DictConfig, run_dir: Path) -> dict:
    """Run the configured target stages; link their artifacts into the run directory."""
    from pipeline.cache import ArtifactStore, write_json_atomic
    from pipeline.dag import run_stages
    from stages import STAGES

    plain = OmegaConf.to_container(cfg, resolve=True)
    store = ArtifactStore(Path(plain["paths"]["artifacts"]).expanduser().resolve())
    results = run_stages(STAGES, plain["pipeline"]["stages"], plain, store)
    links = run_dir / "artifacts"
    links.mkdir(parents=True, exist_ok=True)
    for name, res in results.items():
        link = links / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(res.path, target_is_directory=True)
    if "report" in results:  # the report's files belong in the run directory itself
        for src in sorted(results["report"].path.iterdir()):
            if src.suffix in (".md", ".json", ".png"):
                shutil.copy2(src, run_dir / src.name)
    summary = {
        name: {"key": r.key, "path": str(r.path), "cached": r.cached, "summary": r.summary}
        for name, r in results.items()
    }
    write_json_atomic(run_dir / "run.json", summary)
    return summary


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    info = log_blas()
    log.info("run directory: %s", run_dir)
    try:
        summary = run_experiment(cfg, run_dir)
    except _user_errors() as err:  # bad input: one clear line, no traceback
        log.error("%s: %s", type(err).__name__, err)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
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
    if "report" in summary:
        head = summary["report"]["summary"]
        print(
            f"report: {run_dir / 'report.md'}  swap rate {head['swap_rate_answered_right']:.3f} "
            f"(answered right unsteered), {head['swap_rate_all']:.3f} (all), "
            f"binomial p {head['binomial_p']:.3g}"
        )
    print(f"run directory: {run_dir}  (config: .hydra/config.yaml, log: {_log_name()})")
    log.info("BLAS in use: %s", info.name)
    if "report" in summary:
        return float(summary["report"]["summary"]["swap_rate_answered_right"])
    return None


def _log_name() -> str:
    job = HydraConfig.get().job.name
    return f"{job}.log"


if __name__ == "__main__":
    main()
