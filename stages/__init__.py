"""The stages of the DAG; ``STAGES`` is the registry the runner uses.

Each stage module declares its stages (``Stage(...)``: inputs dataclass, upstream stages,
fingerprint); this module only collects them by name.
"""

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
)

STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        prompts.STAGE,
        capture.STAGE,
        directions.STAGE,
        steer.BASELINE,
        steer.STAGE,
        report.STAGE,
        probes.STAGE,
        probe_report.PROBE_REPORT,
        contamination.STAGE,
        probe_report.CONTAMINATION_REPORT,
        localize.LOGIT_LENS,
        localize.PATCHING,
        localize.LOCALIZATION_REPORT,
    )
}
