"""mlx-interp: capture, directions, probes and steering for MLX language models.

Importing this package loads an optimized BLAS before mlx (see ``mlx_interp.blas``).
"""

if __name__ != "mlx_interp":  # the folder pipeline/ is installed as mlx_interp
    raise ImportError(
        f"this package is imported as 'mlx_interp', not {__name__!r}; "
        "install the project (pip install -e .) and `import mlx_interp`"
    )

from mlx_interp.blas import ensure_fast_blas  # noqa: E402

ensure_fast_blas()

__all__ = ["ensure_fast_blas"]
