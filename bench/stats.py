"""Timing helpers of the benchmark: best-of timings, interleaved comparisons, ratios."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path


def best_of(fn: Callable[[], object], repeat: int = 5, budget_s: float | None = None) -> float:
    """Fastest of ``repeat`` timed calls after one warm-up call (graph build, allocations);
    stops early once ``budget_s`` seconds were spent timing (at least one timed call)."""
    fn()
    times: list[float] = []
    spent = 0.0
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        spent += times[-1]
        if budget_s is not None and spent >= budget_s:
            break
    return min(times)


def interleaved(
    fns: dict[str, Callable[[], object]], repeat: int = 3, rounds: dict | None = None
) -> dict[str, float]:
    """Best time of each function, calling them in turn (A B C A B C ...) after one warm-up
    each, so that load from other processes hits every side alike. ``rounds``, if given,
    receives every timing (name -> list, one per round) for paired ratios."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    if rounds is not None:
        rounds.update(times)
    return {name: min(t) for name, t in times.items()}


def paired_median(rounds: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """Median over rounds of ``time(denominator) / time(numerator)`` taken in the same round:
    a speed ratio that a slow drift of the machine's load moves less than a ratio of bests."""
    pairs = [d / n for n, d in zip(rounds[numerator], rounds[denominator], strict=True) if n]
    return float(statistics.median(pairs))


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, None when the denominator is 0 or missing or the numerator
    is missing (e.g. a stage that did not run)."""
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def repeated_dataset(source: Path, times: int, dest: Path, every: int = 1) -> Path:
    """A JSONL dataset holding every ``every``-th row of ``source`` ``times`` times (ids of
    the copies suffixed ``~k``)."""
    lines = [line for line in source.read_text(encoding="utf-8").splitlines() if line]
    rows = [json.loads(line) for line in lines[::every]]
    with dest.open("w", encoding="utf-8") as f:
        for k in range(times):
            for row in rows:
                f.write(json.dumps({**row, "id": f"{row['id']}~{k}" if k else row["id"]}) + "\n")
    return dest
