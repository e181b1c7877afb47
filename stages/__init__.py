"""The stages of the DAG and what each reads; ``STAGES`` is the registry the runner uses."""

from pipeline.dag import Stage
from stages import capture, directions, prompts, report, steer

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
    ),
    "directions": Stage(
        name="directions",
        run=directions.run,
        reads=("directions", "seed"),
        needs=("prompts", "capture"),
        version=directions.VERSION,
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
}
