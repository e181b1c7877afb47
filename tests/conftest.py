"""Shared fixtures. Importing ``pipeline`` first loads the optimized BLAS before mlx."""

import mlx_interp  # noqa: F401  (loads the optimized BLAS before mlx)
