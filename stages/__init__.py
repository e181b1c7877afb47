"""The stages of the DAG and what each reads; ``STAGES`` is the registry the runner uses."""

if __name__ != "mlx_interp.stages":  # the folder stages/ is installed as mlx_interp.stages
    raise ImportError(f"import mlx_interp.stages, not {__name__!r} (pip install -e .)")

from mlx_interp.engine.dag import Stage
from mlx_interp.stages import (
    capture,
    contamination,
    directions,
    localize,
    probe_report,
    probes,
    prompts,
    report,
    steer,
    sweep,
    sweep_report,
)

STAGES: dict[str, Stage] = {
    "prompts": Stage(
        name="prompts",
        run=prompts.run,
        reads=("concept", "prompts", "model", "seed"),
        version=prompts.VERSION,
        fingerprint=prompts.fingerprint,
    ),
    "capture": Stage(
        name="capture",
        run=capture.run,
        reads=("model", "capture"),
        needs=("prompts",),
        version=capture.VERSION,
        fingerprint=capture.fingerprint,
        resumable=True,  # part files of a killed attempt are reused
        sharded=True,  # under mlx.launch each rank captures its share of the batches
    ),
    "directions": Stage(
        name="directions",
        run=directions.run,
        reads=("directions", "seed", "model"),
        needs=("prompts", "capture"),
        version=directions.VERSION,
        fingerprint=directions.fingerprint,
    ),
    "baseline": Stage(
        name="baseline",
        run=steer.run_baseline,
        reads=("model", "score"),
        needs=("prompts",),
        version=steer.VERSION,
        fingerprint=steer.fingerprint,
    ),
    "steer": Stage(
        name="steer",
        run=steer.run_steer,
        reads=("model", "score", "steer", "seed"),
        needs=("prompts", "directions"),
        version=steer.VERSION,
        fingerprint=steer.fingerprint,
    ),
    "report": Stage(
        name="report",
        run=report.run,
        reads=("model", "score", "report"),
        needs=("directions", "baseline", "steer"),
        version=report.VERSION,
    ),
    "probes": Stage(
        name="probes",
        run=probes.run,
        reads=("probes", "seed"),
        needs=("prompts", "capture"),
        version=probes.VERSION,
    ),
    "probe_report": Stage(
        name="probe_report",
        run=probe_report.run_probes,
        reads=("model", "report"),
        needs=("probes",),
        version=probe_report.VERSION,
    ),
    "contamination": Stage(
        name="contamination",
        run=contamination.run,
        reads=("contamination", "seed"),
        needs=("prompts", "capture"),
        version=contamination.VERSION,
    ),
    "contamination_report": Stage(
        name="contamination_report",
        run=probe_report.run_contamination,
        reads=("model", "report"),
        needs=("contamination",),
        version=probe_report.VERSION,
    ),
    "sweep": Stage(
        name="sweep",
        run=sweep.run,
        reads=("model", "score", "sweep", "seed"),
        needs=("prompts",),
        version=sweep.VERSION,
        fingerprint=sweep.fingerprint,
        resumable=True,  # points of a killed run are kept (progress/) and reused
    ),
    "sweep_report": Stage(
        name="sweep_report",
        run=sweep_report.run,
        reads=("model", "report"),
        needs=("sweep",),
        version=sweep_report.VERSION,
    ),
    "logit_lens": Stage(
        name="logit_lens",
        run=localize.run_logit_lens,
        reads=("model", "score"),
        needs=("prompts",),
        version=localize.VERSION,
        fingerprint=localize.fingerprint,
    ),
    "patching": Stage(
        name="patching",
        run=localize.run_patching,
        reads=("model", "score", "localize"),
        needs=("prompts",),
        version=localize.VERSION,
        fingerprint=localize.fingerprint,
    ),
    "localization_report": Stage(
        name="localization_report",
        run=localize.run_report,
        reads=("model", "report"),
        needs=("logit_lens", "patching", "steer", "report"),
        version=localize.VERSION,
    ),
}
