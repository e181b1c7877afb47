"""`make bench` sections of issue 18: the default experiment's stages against its capture
stage, sweeps after a cached run, and the second model load.

Every figure is a ratio of timings taken in one run of `make bench` on this machine; the
stage times come from the run's own log (``stage X computed in Ns``). The default experiment
runs ``ROUNDS`` times, each in a fresh store: its figures are the median of the per-round
ratios (the capture stage, the denominator, moved 12.1-14.7 s between runs of one evening),
and the sweeps are measured against the rounds' median capture time. ``positions: all``
(nothing to reuse: batching alone) repeats the steer figures.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

STAGE_LINE = re.compile(r"stage (\w+)\s+computed in ([\d.]+)s")
SWEEP_ALPHAS = "2.0,2.5,3.0"  # 3.0 is the default: cached after the default run
ROUNDS = 3  # default runs in fresh stores: a stage's time swings ~10% run to run here


def stage_seconds(run_dir: Path) -> dict[str, float]:
    """Seconds of every stage a run computed (its mlx_interp.log)."""
    out: dict[str, float] = {}
    for log in run_dir.rglob("*.log"):
        for match in STAGE_LINE.finditer(log.read_text(errors="replace")):
            out[match.group(1)] = out.get(match.group(1), 0.0) + float(match.group(2))
    return out


def _run_dir(stdout: str) -> Path:
    found = re.search(r"run directory: (\S+)", stdout)
    if not found:
        raise RuntimeError(f"no run directory in the CLI's output:\n{stdout[-2000:]}")
    return Path(found.group(1))


def section_stages(tmp: Path, run_cli: Callable[..., tuple[float, str]]) -> dict:
    """The default experiment in a fresh store (every stage computed), a 3-alpha sweep after
    it (2 new points), and the same two with ``steer.positions=all``; wall times and stage
    times."""
    result: dict = {"rounds": []}
    for r in range(ROUNDS):  # the last round's store serves the sweeps below
        out = tmp / f"stages-{r}"
        base = [f"paths.outputs={out}"]
        wall, stdout = run_cli(base)
        result["rounds"].append({"wall_s": wall, "stages": stage_seconds(_run_dir(stdout))})
    start = time.perf_counter()
    run_cli(["-m", *base, f"steer.alpha={SWEEP_ALPHAS}"])
    result["sweep"] = {"wall_s": time.perf_counter() - start, "alphas": SWEEP_ALPHAS}
    wall, stdout = run_cli([*base, "steer.positions=all"])
    result["all"] = {"wall_s": wall, "stages": stage_seconds(_run_dir(stdout))}
    start = time.perf_counter()
    run_cli(["-m", *base, "steer.positions=all", f"steer.alpha={SWEEP_ALPHAS}"])
    result["all_sweep"] = {"wall_s": time.perf_counter() - start, "alphas": SWEEP_ALPHAS}
    return result


def worker_load() -> dict:
    """Seconds of one ``load_model`` of SmolLM2 in this process (imports done before), with
    the model load cache ``MLX_INTERP_MODEL_CACHE`` as the parent set it."""
    from mlx_interp.blas import ensure_fast_blas

    ensure_fast_blas()
    import mlx_lm.models.llama  # noqa: F401  (imports are not the load)
    import mlx_lm.tokenizer_utils  # noqa: F401
    import transformers  # noqa: F401

    from mlx_interp.models.loading import load_model

    start = time.perf_counter()
    load_model({"name": "smollm2_135m", "source": "embedded", "dequantize": "auto"})
    return {"seconds": time.perf_counter() - start}


def section_load(tmp: Path, run_worker: Callable[..., dict]) -> dict:
    """First load into an empty model load cache, then the best of two second loads, each
    in a fresh process; and a load with the cache off."""
    env = {"MLX_INTERP_MODEL_CACHE": str(tmp / "model-cache")}
    first = run_worker("load", env)["seconds"]
    second = min(run_worker("load", env)["seconds"] for _ in range(2))
    off = run_worker("load", {"MLX_INTERP_MODEL_CACHE": "off"})["seconds"]
    return {"first_s": first, "second_s": second, "off_s": off}


def figures(res: dict, ratio: Callable) -> list[tuple[str, float | None, str, str]]:
    """(figure, value, goal, note) rows of these sections (``ratio``: bench.stats.ratio,
    None for a stage that did not run)."""
    rows = []
    st = res.get("stages")
    if st:
        rounds = st["rounds"]
        caps = [r["stages"].get("capture") for r in rounds]
        cap = _median([c for c in caps if c])

        def paired(name: str) -> tuple[float | None, str]:
            """The median of the per-round ratios of ``name`` to capture, and their range."""
            per = [ratio(_time(r, name), c) for r, c in zip(rounds, caps, strict=True)]
            got = [p for p in per if p is not None]
            spread = f" (rounds {min(got):.2f}-{max(got):.2f})" if len(got) > 1 else ""
            return _median(got), spread

        for title, name, goal in (
            ("steer stage / capture stage (default experiment, positions last)", "steer", "<= 1.0"),
            ("baseline stage / capture stage", "baseline", "<= 1.5"),
            ("whole default run (fresh store, set up) / capture stage", "wall", "<= 4"),
        ):
            value, spread = paired(name)
            seconds = _median([t for t in (_time(r, name) for r in rounds) if t])
            note = f"median of {len(rounds)}: {seconds or 0:.1f} vs {cap or 0:.1f} s{spread}"
            rows.append((title, value, goal, note))
        every = st["all"]["stages"]
        rows += [
            (
                f"3-alpha sweep ({st['sweep']['alphas']}) after the default run / capture stage",
                ratio(st["sweep"]["wall_s"], cap),
                "<= 3",
                f"{st['sweep']['wall_s']:.1f} s for 2 new points",
            ),
            (
                "positions all: steer stage / capture stage (batching alone)",
                ratio(every.get("steer"), cap),
                "",
                f"{every.get('steer', 0):.1f} s",
            ),
            (
                "positions all: 3-alpha sweep after its run / capture stage",
                ratio(st["all_sweep"]["wall_s"], cap),
                "",
                f"{st['all_sweep']['wall_s']:.1f} s for 2 new points",
            ),
        ]
    load = res.get("load")
    if load:
        rows += [
            (
                "second model load of SmolLM2, seconds (model load cache)",
                load["second_s"],
                "<= 1.5",
                f"first {load['first_s']:.1f} s, cache off {load['off_s']:.1f} s",
            ),
            (
                "model load without the cache / second load",
                ratio(load["off_s"], load["second_s"]),
                "",
                "",
            ),
        ]
    return rows


def _time(round_: dict, name: str) -> float | None:
    """A round's seconds of stage ``name`` (``wall``: the whole run's)."""
    return round_["wall_s"] if name == "wall" else round_["stages"].get(name)


def _median(values: list[float]) -> float | None:
    return float(statistics.median(values)) if values else None
