"""The stages of the DAG and what each reads; ``STAGES`` is the registry the runner uses."""

from pipeline.dag import Stage
from stages import capture, prompts

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
}
