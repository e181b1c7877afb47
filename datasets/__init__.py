"""Prompt datasets of the experiments, shipped as package data (``mlx_interp.datasets``)."""
