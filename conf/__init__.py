"""Hydra configs of mlx-interp, shipped as package data (``mlx_interp.conf``)."""
