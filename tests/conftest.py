"""Shared fixtures. Importing ``pipeline`` first loads the optimized BLAS before mlx."""

import pipeline  # noqa: F401  (BLAS before mlx)
