"""Load an optimized BLAS into the process before ``mlx.core`` is imported (Linux only).

The ``mlx[cpu]`` wheel links a bundled reference BLAS (about 6-8 GFLOP/s for a 2048^2
float32 matmul on our 2-core machines). MLX resolves ``cblas_*`` symbols through the
global symbol scope, so a library with standard CBLAS symbols loaded first with
``RTLD_GLOBAL`` takes over every matmul (MKL: 200-400 GFLOP/s on the same machine).

Python loads extension modules with ``RTLD_NOW``, so once ``mlx.core`` is imported its BLAS
symbols are bound for good: a fast BLAS loaded later changes nothing (measured: 3.5 against
37 GFLOP/s for a 1024^2 matmul on a busy 2-core machine, ``make bench``). Importing
``mlx_interp`` after ``mlx`` therefore fails with :class:`BlasOrderError`, naming the fix,
instead of running 10-20x slower in silence. ``MLX_INTERP_BLAS=none`` accepts the
reference BLAS; a fast BLAS in ``LD_PRELOAD`` is bound before anything, so it is accepted.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_interp.errors import MlxInterpError

log = logging.getLogger(__name__)

ENV_VAR = "MLX_INTERP_BLAS"  # a library path, or "none" to keep the reference BLAS
FIX = (
    "install one: `pip install mkl` (no root, Linux x86_64) or "
    "`apt-get install libopenblas0-pthread`; or point MLX_INTERP_BLAS at a library "
    "that exports cblas_sgemm"
)


@dataclass(frozen=True)
class BlasInfo:
    """Which BLAS serves MLX's CPU matmuls in this process, and why."""

    name: str  # "mkl", "openblas", "accelerate", "reference", ...
    path: str | None  # the library loaded, when we loaded one
    reason: str  # one line for the log


_INFO: BlasInfo | None = None


class BlasOrderError(MlxInterpError, ImportError):
    """``mlx.core`` was imported before ``mlx_interp``, so MLX is bound to the slow BLAS."""


def _candidates() -> list[str]:
    """Paths of optimized CBLAS libraries, best first (MKL from the venv, then system)."""
    found: list[str] = []
    prefixes = dict.fromkeys([sys.prefix, sys.base_prefix, os.environ.get("CONDA_PREFIX", "")])
    for prefix in filter(None, prefixes):
        found += sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")), reverse=True)
    for name in ("openblas", "openblasp", "blis", "mkl_rt"):
        lib = ctypes.util.find_library(name)
        if lib:
            found.append(lib)
    found += sorted(glob.glob("/usr/lib/*-linux-gnu/libopenblas*.so*"), reverse=True)
    found += sorted(glob.glob("/usr/lib/*-linux-gnu/openblas*/libblas.so*"), reverse=True)
    return list(dict.fromkeys(found))


def _kind(path: str) -> str:
    base = Path(path).name.lower()
    for name in ("mkl", "openblas", "blis"):
        if name in base or name in path.lower():
            return name
    return "custom"


def _try_load(path: str) -> bool:
    try:
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as err:
        log.debug("BLAS candidate %s failed to load: %s", path, err)
        return False
    return hasattr(lib, "cblas_sgemm")


def ensure_fast_blas() -> BlasInfo:
    """Load the best optimized BLAS once, before mlx; return what is in use."""
    global _INFO
    if _INFO is not None:
        return _INFO
    if sys.platform == "darwin":
        _INFO = BlasInfo("accelerate", None, "macOS: MLX uses Accelerate and Metal")
        return _INFO
    if not sys.platform.startswith("linux"):
        _INFO = BlasInfo("unknown", None, f"platform {sys.platform}: BLAS left as shipped")
        return _INFO
    late = "mlx.core" in sys.modules
    override = os.environ.get(ENV_VAR, "").strip()
    if override.lower() == "none":
        _INFO = BlasInfo("reference", None, f"{ENV_VAR}=none: reference BLAS kept on purpose")
        return _INFO
    preloaded = [p for p in os.environ.get("LD_PRELOAD", "").split() if "blas" in p or "mkl" in p]
    if late and preloaded:
        _INFO = BlasInfo(_kind(preloaded[0]), preloaded[0], "LD_PRELOAD, bound before mlx")
        return _INFO
    candidates = [override] if override else _candidates()
    for path in candidates:
        if _try_load(path):
            if late:
                raise BlasOrderError(
                    "mlx.core was imported before mlx_interp, so MLX is bound to its reference "
                    "BLAS and every CPU matmul runs 10-20x slower. Fix: restart Python and "
                    "`import mlx_interp` before mlx or mlx_lm (or start Python with "
                    f"LD_PRELOAD={path}); to accept the slow BLAS, set {ENV_VAR}=none"
                )
            _INFO = BlasInfo(_kind(path), path, f"loaded {path}")
            return _INFO
    if override:  # entry points turn this into one error line (check_blas), not an import crash
        _INFO = BlasInfo(
            "unusable",
            None,
            f"{ENV_VAR}={override!r} does not load or has no cblas_sgemm; fix the path, unset "
            f"it, or set {ENV_VAR}=none; {FIX}",
        )
        return _INFO
    _INFO = BlasInfo("reference", None, f"no optimized BLAS found: CPU matmuls are slow; {FIX}")
    return _INFO


def usable_blas() -> BlasInfo:
    """The BLAS in use; a :class:`~mlx_interp.errors.ConfigError` naming the fix when the one
    ``MLX_INTERP_BLAS`` names does not load. The entry points call it at start (through
    :func:`log_blas`) and the library before it loads a model, so a wrong path is never a
    silent 10-20x slower run."""
    info = ensure_fast_blas()
    if info.name == "unusable":
        from mlx_interp.errors import ConfigError

        raise ConfigError(info.reason)
    return info


_THREAD_CALLS = {  # BLAS name -> (get the thread count, set it): global, every thread
    "mkl": ("MKL_Get_Max_Threads", "MKL_Set_Num_Threads"),
    "openblas": ("openblas_get_num_threads", "openblas_set_num_threads"),
}


def _thread_calls() -> tuple[Callable[[], int], Callable[[int], Any]] | None:
    info = _INFO
    calls = _THREAD_CALLS.get(info.name) if info is not None and info.path else None
    if info is None or info.path is None or calls is None:
        return None
    try:
        lib = ctypes.CDLL(info.path)
        return getattr(lib, calls[0]), getattr(lib, calls[1])
    except (OSError, AttributeError):
        return None


@contextmanager
def blas_threads(n: int) -> Iterator[None]:
    """Inside, the BLAS loaded here (MKL, OpenBLAS) uses at most ``n`` threads; restored on
    exit; other BLAS libraries are left alone. For many small matmuls (activation patching:
    a few rows x positions per forward) one thread is faster and uses a third of the CPU time
    of two on a busy 2-core machine (measured: a SmolLM2 heatmap in 3 s of CPU instead of
    5-32 s): MKL's threads spin waiting for each other when the cores are shared."""
    calls = _thread_calls()
    before = calls[0]() if calls is not None else 0
    if calls is None or before <= n:
        yield
        return
    calls[1](n)
    try:
        yield
    finally:
        calls[1](before)


def log_blas() -> BlasInfo:
    """Log which BLAS is in use; a warning with the fix when it is the reference one; a
    :class:`~mlx_interp.errors.ConfigError` when the one ``MLX_INTERP_BLAS`` names is unusable."""
    info = usable_blas()
    if info.name == "reference" and sys.platform.startswith("linux"):
        log.warning("BLAS: %s", info.reason)
    else:
        log.info("BLAS: %s (%s)", info.name, info.reason)
    return info
