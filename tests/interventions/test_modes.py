"""The mode contract and the one factory: every conf/steer/mode file is a registered name,
every mode is a SteeringMode, and modes, methods, scorers and probes fail alike."""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from omegaconf import OmegaConf

from mlx_interp.analysis.directions import DirectionError, make_method
from mlx_interp.analysis.probes import ProbeError, make_probe
from mlx_interp.analysis.scoring import ScoringError, make_scorer
from mlx_interp.interventions.modes import (
    MODES,
    PLAIN_MODES,
    CallableMode,
    Mode,
    SteeringError,
    SteeringMode,
    WrappingMode,
    make_mode,
)
from mlx_interp.interventions.steering import LayerEdit, steer
from mlx_interp.resources import CONF_DIR
from tests.tiny_models import tiny_model

MODE_FILES = sorted(Path(CONF_DIR, "steer", "mode").glob("*.yaml"))


def _kind(mode):
    return (type(mode), _kind(mode.inner) if isinstance(mode, WrappingMode) else None)


@pytest.mark.parametrize("path", MODE_FILES, ids=lambda p: p.stem)
def test_every_mode_file_is_a_registered_name(path):
    assert path.stem in MODES
    cfg = OmegaConf.to_container(OmegaConf.load(path))
    if "???" in str(cfg.values()):  # needs the user's probe file: compare the class
        assert MODES[path.stem].__name__ == cfg["_target_"].rsplit(".", 1)[1]
        return
    assert _kind(make_mode(path.stem)) == _kind(make_mode(cfg))


def test_only_the_probe_mode_needs_arguments():
    assert [name for name in MODES if name not in PLAIN_MODES] == ["conditional"]
    with pytest.raises(SteeringError, match="exactly one probe source"):
        make_mode("conditional")


@pytest.mark.parametrize("name", PLAIN_MODES)
def test_every_mode_is_a_steering_mode(name):
    mode = make_mode(name)
    assert isinstance(mode, SteeringMode) and isinstance(mode, Mode)
    assert isinstance(mode.needs_center, bool) and isinstance(mode.every_layer, bool)
    assert mode.for_layer(3) is mode


def test_plain_functions_and_duck_typed_objects_are_adapted():
    model = tiny_model("llama")
    tokens = mx.array([[5, 9, 17, 3]])
    vector = np.ones(32, np.float32)
    function = make_mode(lambda h, v, c, alpha: h + alpha * v)
    assert isinstance(function, CallableMode) and not function.needs_center

    class Duck:
        needs_center = True

        def __call__(self, h, v, c, alpha):
            return h - c

    duck = make_mode(Duck())
    assert isinstance(duck, CallableMode) and duck.needs_center
    with pytest.raises(SteeringError, match="needs a center"):
        with steer(model, [LayerEdit(1, vector)], Duck(), 1.0):
            pass
    with steer(model, [LayerEdit(1, vector)], function, 2.0):
        by_function = np.array(model(tokens))
    with steer(model, [LayerEdit(1, vector)], "add", 2.0):
        np.testing.assert_array_equal(by_function, np.array(model(tokens)))


FACTORIES = [
    (make_mode, SteeringError, "steering mode", "modes", "add, subtract"),
    (make_method, DirectionError, "method", "methods", "mean_diff, pca"),
    (make_scorer, ScoringError, "scorer", "scorers", "logit, generate"),
    (make_probe, ProbeError, "probe", "probes", "logistic"),
]


@pytest.mark.parametrize(("make", "error", "what", "plural", "names"), FACTORIES)
def test_one_factory_one_error_shape(make, error, what, plural, names):
    with pytest.raises(error, match=rf"unknown {what} 'nope'; valid {plural}: {names}.*choose"):
        make("nope")
    with pytest.raises(error, match=rf"a {what} config needs a `_target_` \(e\.g\."):
        make({"name": "x"})
    with pytest.raises(error, match=rf"cannot build the {what} .*valid {plural}"):
        make({"_target_": "mlx_interp.no_such_module.Thing"})
    with pytest.raises(error, match=rf"a {what} must be a name .* got int"):
        make(3)


def test_the_class_swap_core_is_the_only_place_that_swaps_classes():
    """No module of the site/steering/capture path assigns ``__class__`` itself."""
    root = Path(__file__).resolve().parents[2]
    folder = root / "pipeline" / "interventions"
    mine = ["attention", "capture", "edits", "site_hooks", "sites", "steering", "cache_run"]
    for name in mine:
        assert ".__class__ =" not in (folder / f"{name}.py").read_text(), name
    assert "__class__ =" not in (root / "pipeline" / "api.py").read_text()
