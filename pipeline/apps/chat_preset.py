"""Config and presets for ``mlx-interp-chat``: the composed root config, the colour-blind demo.

The colour-blind preset is the default experiment's steering: the green/red direction of the
``directions`` stage at the layer, alpha and mode the composed config names (for SmolLM2:
reflect, layer 8, alpha 2 from conf/model_concept/). It reads the cached directions artifact
of the default run when there is one; else it runs the DAG up to ``directions`` capturing only
that layer (last token, mean difference), which caches its own artifact for the next time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from mlx_interp.analysis.directions import DirectionSet
from mlx_interp.resources import CONF_DIR  # noqa: E402


def compose(overrides: list[str]) -> dict:
    """The root config composed like ``mlx-interp`` would, as a resolved plain dict, checked
    by the same validator (a bad ``--override`` fails at start, not in a command)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from mlx_interp.engine.schema import register_configs
    from mlx_interp.engine.validate import validate_config

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    plain = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
    validate_config(plain)
    return plain


@dataclass
class Preset:
    """A direction set and the steering setting to use it with."""

    dirset: DirectionSet
    source: str
    layer: int
    alpha: float
    mode: Any  # a MODES name or a ``_target_`` config
    positions: str = "all"  # steer.positions; the chat applies all and last, refuses others


def mode_spec(mode_cfg: Any) -> Any:
    """A ``steer.mode`` config as the chat keeps it: the MODES name when the config is just
    ``{_target_: <a named mode class>}``, else the config itself (``steer`` builds it)."""
    from mlx_interp.interventions.steering import MODES

    if isinstance(mode_cfg, str):
        return mode_cfg
    target = str(mode_cfg.get("_target_", ""))
    for name, cls in MODES.items():
        if set(mode_cfg) == {"_target_"} and target.rsplit(".", 1)[-1] == cls.__name__:
            return name
    return dict(mode_cfg)


def colorblind_preset(cfg: dict, say: Callable[[str], None] = print) -> Preset:
    """The green/red direction for ``cfg``'s model, and the experiment's steering setting."""
    from mlx_interp.engine.cache import ArtifactStore
    from mlx_interp.engine.dag import run_stages, stage_keys
    from mlx_interp.engine.inputs import typed
    from mlx_interp.engine.schema import SteerConfig
    from mlx_interp.stages import STAGES

    steer = typed(SteerConfig, cfg["steer"])
    layers = steer.layer if isinstance(steer.layer, list) else [steer.layer]
    layer, alpha, mode = int(layers[0]), steer.alpha, mode_spec(steer.mode)
    positions = str(steer.positions)
    store = ArtifactStore(Path(cfg["paths"]["artifacts"]).expanduser().resolve())
    fast = {
        **cfg,
        "capture": {**cfg["capture"], "layers": [layer]},
        "directions": {**cfg["directions"], "compare_methods": False},
    }
    for candidate in (cfg, fast):  # the full default run first, then an earlier fast one
        key = stage_keys(STAGES, ["directions"], candidate)["directions"]
        found = store.get("directions", key)
        if found is not None:
            dirset = DirectionSet.load(found.path / "directions.safetensors")
            if layer in dirset.vectors:
                say(f"using the cached directions artifact {found.path}")
                dirset.meta.setdefault("artifact_key", key)
                return Preset(dirset, str(found.path), layer, alpha, mode, positions)
    say(f"no cached directions: capturing layer {layer} for the {cfg['concept']['name']} prompts")
    results = run_stages(STAGES, ["directions"], fast, store)
    path = results["directions"].path
    dirset = DirectionSet.load(path / "directions.safetensors")
    dirset.meta.setdefault("artifact_key", results["directions"].key)
    say(f"computed and cached {path}")
    return Preset(dirset, str(path), layer, alpha, mode, positions)
