"""Interventions inside MLX models by class swap: capture, steering, sites, prefix reuse."""
