"""mlx-interp: capture, directions, probes and steering for MLX language models.

The whole public face is four names (see ``mlx_interp.api``)::

    import mlx_interp as mi

    model = mi.load("smollm2_135m")
    direction = mi.Direction.train(model, ["I love this"], ["I hate this"], layers=[8])
    with direction.apply(model, alpha=4.0):
        print(model.generate("Tell me about your day."))

Importing this package loads an optimized BLAS before mlx (see ``mlx_interp.blas``); the
API itself is imported on first use.
"""

if __name__ != "mlx_interp":  # the folder pipeline/ is installed as mlx_interp
    raise ImportError(
        f"this package is imported as 'mlx_interp', not {__name__!r}; "
        "install the project (pip install -e .) and `import mlx_interp`"
    )

from mlx_interp.blas import ensure_fast_blas  # noqa: E402

ensure_fast_blas()

__all__ = ["ActivationCache", "Direction", "Model", "load"]


def __getattr__(name: str):
    """The public names, imported on first use (``import mlx_interp`` stays light)."""
    if name in __all__:
        from mlx_interp import api

        return getattr(api, name)
    raise AttributeError(f"module 'mlx_interp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
