"""mlx-interp: capture, directions, probes and steering for MLX language models.

Importing this package loads an optimized BLAS before mlx (see ``pipeline.blas``).
"""

from pipeline.blas import ensure_fast_blas

ensure_fast_blas()

__all__ = ["ensure_fast_blas"]
