"""mlx_interp.interventions.steering: class-swap residual-stream steering on tiny models."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from omegaconf import OmegaConf

from mlx_interp.interventions.capture import LayerIndexError, capture_layers
from mlx_interp.interventions.steering import (
    MODES,
    PLAIN_MODES,
    AblateAllLayersMode,
    AblateMode,
    AddMode,
    ConditionalMode,
    LayerEdit,
    NormPreservingMode,
    ReflectMode,
    SteeringError,
    SubtractMode,
    generate_steered,
    make_mode,
    steer,
    steered_last_logits,
)
from tests.tiny_models import embed_and_run_layers, tiny_model

CORE_ARCHS = ["llama", "qwen2", "gemma2", "gpt2"]
TOKENS = [[5, 9, 17, 3, 44, 2, 99, 12, 7]]
PROMPT = [5, 9, 17, 3]
LAYER = 1  # middle layer of the 3-layer tiny models
N_GEN = 12
ONE_LAYER_MODES = [name for name in PLAIN_MODES if name != "ablate_all"]  # only their layer


class StubTokenizer:
    """Just what generate_steered needs from a tokenizer: EOS ids and decode."""

    def __init__(self, eos: set[int] | None = None) -> None:
        self.eos_token_ids = eos or set()

    def decode(self, ids: list[int]) -> str:
        return " ".join(str(i) for i in ids)


@pytest.fixture(scope="module", params=CORE_ARCHS)
def core_model(request):
    return request.param, tiny_model(request.param)


STEERING = "mlx_interp.interventions.steering"


def _d(model) -> int:
    args = model.args
    return getattr(args, "hidden_size", None) or args.n_embd


def _direction(model, seed: int = 0, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """A random [d_model] vector and center, float32."""
    rng = np.random.default_rng(seed)
    d = _d(model)
    vector = (rng.standard_normal(d) * scale).astype(np.float32)
    center = rng.standard_normal(d).astype(np.float32) * 0.1
    return vector, center


def _edits(model, layer: int = LAYER, scale: float = 1.0) -> list[LayerEdit]:
    vector, center = _direction(model, scale=scale)
    return [LayerEdit(layer, vector, center)]


def _uncached_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding that recomputes the whole sequence every step (no KV cache)."""
    tokens = list(prompt)
    for _ in range(n):
        logits = model(mx.array([tokens]))[0, -1]
        tokens.append(int(mx.argmax(logits).item()))
    return tokens[len(prompt) :]


def _np_unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def _np_reference(mode: str, h: np.ndarray, v: np.ndarray, c: np.ndarray, alpha: float):
    u = _np_unit(v)
    if mode == "add":
        return h + alpha * v
    if mode == "subtract":
        return h - alpha * v
    if mode == "reflect":
        return h - 2 * alpha * ((h - c) @ u)[..., None] * u
    if mode in ("reflect_norm", "add_norm"):
        edited = _np_reference(mode.removesuffix("_norm"), h, v, c, alpha)
        scale = np.linalg.norm(h, axis=-1) / np.linalg.norm(edited, axis=-1)
        return edited * scale[..., None]
    return h - alpha * (h @ u)[..., None] * u


# --- pure mode arithmetic ---------------------------------------------------------------


def test_reflect_swaps_class_means():
    rng = np.random.default_rng(1)
    pos, neg = rng.standard_normal(16) * 3, rng.standard_normal(16) * 3
    vector, center = mx.array(pos - neg), mx.array((pos + neg) / 2)
    points = mx.array(np.stack([pos, neg, (pos + neg) / 2])[None])  # [1, 3, d]
    out = np.array(ReflectMode()(points, vector, center, 1.0))[0]
    np.testing.assert_allclose(out[0], neg, atol=1e-5)
    np.testing.assert_allclose(out[1], pos, atol=1e-5)
    np.testing.assert_allclose(out[2], (pos + neg) / 2, atol=1e-5)  # on the hyperplane
    half = np.array(ReflectMode()(points, vector, center, 0.5))[0]
    np.testing.assert_allclose(half[0], (pos + neg) / 2, atol=1e-5)  # alpha .5 -> center


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("name", PLAIN_MODES)  # conditional needs a probe: tested below
def test_alpha_zero_arithmetic_is_identity_and_keeps_dtype(name, dtype):
    rng = np.random.default_rng(2)
    h = mx.array(rng.standard_normal((2, 5, 24)) * 10).astype(dtype)
    vector = mx.array(rng.standard_normal(24)).astype(dtype)
    center = mx.array(rng.standard_normal(24)).astype(dtype)
    mode = MODES[name]()
    same = mode(h, vector, center, 0.0)
    assert same.dtype == dtype
    assert np.array_equal(np.array(same.astype(mx.float32)), np.array(h.astype(mx.float32)))
    assert mode(h, vector, center, 1.5).dtype == dtype


def test_make_mode_names_configs_and_errors():
    assert isinstance(make_mode("add"), AddMode)
    assert isinstance(make_mode("subtract"), SubtractMode)
    assert isinstance(make_mode({"_target_": STEERING + ".AblateMode"}), AblateMode)
    cfg = OmegaConf.create({"_target_": "mlx_interp.interventions.steering.ReflectMode"})
    assert isinstance(make_mode(cfg), ReflectMode)
    mode = AddMode()
    assert make_mode(mode) is mode
    assert isinstance(make_mode(SubtractMode), SubtractMode)
    with pytest.raises(ValueError, match="add, subtract, reflect, ablate"):
        make_mode("amplify")
    with pytest.raises(ValueError, match="_target_"):
        make_mode({"name": "add"})
    norm = make_mode({"_target_": STEERING + ".NormPreservingMode", "inner": "add"})
    assert isinstance(norm.inner, AddMode) and not norm.needs_center
    nested = {"_target_": "mlx_interp.interventions.steering.ReflectMode"}
    norm = make_mode({"_target_": STEERING + ".NormPreservingMode", "inner": nested})
    assert isinstance(norm.inner, ReflectMode) and norm.needs_center
    assert isinstance(make_mode("ablate_all"), AblateAllLayersMode)
    with pytest.raises(ValueError, match="exactly one probe source"):
        make_mode({"_target_": "mlx_interp.interventions.steering.ConditionalMode"})


# --- edits inside real forwards ---------------------------------------------------------


@pytest.mark.parametrize("name", ONE_LAYER_MODES)
def test_steered_layer_output_is_exactly_the_edit(arch_model, name):
    arch, model = arch_model
    tokens = mx.array(TOKENS)
    vector, center = _direction(model)
    alpha = 1.5
    h_prev = np.array(embed_and_run_layers(model, arch, tokens, LAYER - 1))
    h = np.array(embed_and_run_layers(model, arch, tokens, LAYER))
    plain = np.array(model(tokens))
    with steer(model, [LayerEdit(LAYER, vector, center)], name, alpha):
        with capture_layers(model, [LAYER - 1, LAYER]) as recorder:
            steered = np.array(model(tokens))
    edited = np.array(recorder.outputs[LAYER])
    np.testing.assert_array_equal(np.array(recorder.outputs[LAYER - 1]), h_prev)
    expected = _np_reference(name, h.astype(np.float64), vector, center, alpha)
    np.testing.assert_allclose(edited, expected, rtol=1e-6, atol=1e-5)
    if name == "add":
        np.testing.assert_allclose(edited, h + alpha * vector, rtol=1e-6, atol=1e-6)
    assert not np.allclose(steered, plain, atol=1e-4)


def test_ablate_alpha_one_removes_the_direction(arch_model):
    arch, model = arch_model
    tokens = mx.array(TOKENS)
    vector, _ = _direction(model)
    u = _np_unit(vector)
    h = np.array(embed_and_run_layers(model, arch, tokens, LAYER))
    assert np.abs(h @ u).max() > 1e-2  # the direction was there before
    with steer(model, [LayerEdit(LAYER, vector)], "ablate", 1.0):
        with capture_layers(model, [LAYER]) as recorder:
            model(tokens)
    np.testing.assert_allclose(np.array(recorder.outputs[LAYER]) @ u, 0.0, atol=1e-5)


def test_negative_layer_and_stacked_edits(core_model):
    _, model = core_model
    tokens = mx.array(TOKENS)
    vector, _ = _direction(model)
    with steer(model, [LayerEdit(-1, vector)], "add", 2.0):
        last = np.array(model(tokens))
    with steer(model, [LayerEdit(len(model.layers) - 1, vector)], "add", 2.0):
        np.testing.assert_array_equal(np.array(model(tokens)), last)
    twice = [LayerEdit(LAYER, vector), LayerEdit(LAYER, vector)]
    with steer(model, twice, "add", 1.0):
        stacked = np.array(model(tokens))
    with steer(model, [LayerEdit(LAYER, vector)], "add", 2.0):
        np.testing.assert_allclose(np.array(model(tokens)), stacked, atol=1e-5)


# --- generation -------------------------------------------------------------------------


@pytest.mark.parametrize("name", PLAIN_MODES)  # conditional needs a probe: tested below
def test_cached_generation_matches_uncached_recompute(arch_model, name):
    _, model = arch_model
    edits = _edits(model, scale=2.0)
    text, cached = generate_steered(
        model, StubTokenizer(), PROMPT, edits, name, 1.0, max_tokens=N_GEN
    )
    with steer(model, edits, name, 1.0):
        uncached = _uncached_greedy(model, PROMPT, N_GEN)
    assert cached == uncached
    assert len(cached) == N_GEN
    assert text == " ".join(map(str, cached))


@pytest.mark.parametrize("name", PLAIN_MODES)  # conditional needs a probe: tested below
def test_alpha_zero_is_bit_identical_to_no_steering(core_model, name):
    _, model = core_model
    tokens = mx.array(TOKENS)
    edits = _edits(model)
    plain = np.array(model(tokens))
    with steer(model, edits, name, 0.0):
        zero = np.array(model(tokens))
    assert np.array_equal(zero, plain)
    _, unsteered = generate_steered(model, StubTokenizer(), PROMPT, [], name, 0.0, N_GEN)
    _, steered = generate_steered(model, StubTokenizer(), PROMPT, edits, name, 0.0, N_GEN)
    assert steered == unsteered


def test_huge_alpha_changes_generation_through_the_class_swap(core_model):
    _, model = core_model
    calls: list[tuple[int, ...]] = []

    class SpyAdd(AddMode):
        def __call__(self, h, vector, center, alpha):
            calls.append(tuple(h.shape))
            return super().__call__(h, vector, center, alpha)

    edits = _edits(model)
    _, plain = generate_steered(model, StubTokenizer(), PROMPT, [], "add", 0.0, N_GEN)
    _, steered = generate_steered(model, StubTokenizer(), PROMPT, edits, SpyAdd(), 50.0, N_GEN)
    assert steered != plain
    # the whole prompt in one forward (a per-row position mask needs it whole), then
    # one-token steps through the KV cache: N_GEN tokens take N_GEN forwards
    assert calls[0] == (1, len(PROMPT), _d(model))
    assert all(shape == (1, 1, _d(model)) for shape in calls[1:])
    assert len(calls) == N_GEN


def test_generation_stops_at_eos(core_model):
    _, model = core_model
    _, full = generate_steered(model, StubTokenizer(), PROMPT, [], "add", 1.0, N_GEN)
    stop = full[len(full) // 2]
    _, cut = generate_steered(model, StubTokenizer({stop}), PROMPT, [], "add", 1.0, N_GEN)
    assert cut == full[: full.index(stop)]


def test_steered_last_logits_with_padding_matches_unpadded(arch_model):
    _, model = arch_model
    sequences = [[11, 4, 60], [11, 4, 60, 23, 8, 101, 77, 5], [7]]
    edits = _edits(model)
    batched = steered_last_logits(model, sequences, edits, "reflect", 1.0, pad_id=3)
    assert batched.dtype == np.float32 and batched.shape == (3, 128)
    with steer(model, edits, "reflect", 1.0):
        for row, seq in enumerate(sequences):
            alone = np.array(model(mx.array([seq]))[0, -1])
            np.testing.assert_allclose(batched[row], alone, rtol=1e-5, atol=1e-5)


# --- restoration and errors -------------------------------------------------------------


def test_classes_and_logits_restored_after_exit_and_exception(core_model):
    _, model = core_model
    tokens = mx.array(TOKENS)
    classes = [type(layer) for layer in model.layers]
    names = [name for name, _ in tree_flatten(model.parameters())]
    before = np.array(model(tokens))
    with steer(model, _edits(model), "add", 3.0):
        assert type(model.layers[LAYER]) is not classes[LAYER]
        assert isinstance(model.layers[LAYER], classes[LAYER])
        assert [name for name, _ in tree_flatten(model.parameters())] == names
        model(tokens)
    assert [type(layer) for layer in model.layers] == classes
    assert np.array_equal(np.array(model(tokens)), before)
    with pytest.raises(RuntimeError, match="boom"):
        with steer(model, _edits(model), "reflect", 3.0):
            model(tokens)
            raise RuntimeError("boom")
    assert [type(layer) for layer in model.layers] == classes
    assert np.array_equal(np.array(model(tokens)), before)
    with steer(model, [], "add", 3.0):  # no edits: a no-op
        assert [type(layer) for layer in model.layers] == classes


def test_runtime_width_check_without_model_args():
    model = tiny_model("llama")
    classes = [type(layer) for layer in model.layers]

    class Bare:  # exposes layers but no args, so only the run-time check can catch it
        layers = model.layers

        def __call__(self, tokens):
            return model(tokens)

    bare = Bare()
    with pytest.raises(SteeringError, match="d_model=32"):
        with steer(bare, [LayerEdit(0, np.ones(7, np.float32))], "add", 1.0):
            bare(mx.array(TOKENS))
    assert [type(layer) for layer in model.layers] == classes
    mixed = [LayerEdit(0, np.ones(7, np.float32)), LayerEdit(1, np.ones(8, np.float32))]
    with pytest.raises(SteeringError, match="hidden size"):
        with steer(bare, mixed, "add", 1.0):
            pytest.fail("the body must not run")


@pytest.mark.parametrize(
    ("edit", "mode", "alpha", "error", "match"),
    [
        (LayerEdit(1, np.zeros(32)), "add", 1.0, SteeringError, "all zeros"),
        (LayerEdit(1, np.r_[np.nan, np.ones(31)]), "add", 1.0, SteeringError, "NaN or inf"),
        (LayerEdit(1, np.ones(32)), "add", float("nan"), SteeringError, "finite alpha"),
        (LayerEdit(1, np.ones(32)), "add", float("inf"), SteeringError, "finite alpha"),
        (LayerEdit(1, np.ones(48)), "add", 1.0, SteeringError, "hidden size"),
        (LayerEdit(1, np.ones(32), np.ones(5)), "reflect", 1.0, SteeringError, "hidden size"),
        (LayerEdit(3, np.ones(32)), "add", 1.0, LayerIndexError, "out of range"),
        (LayerEdit(-4, np.ones(32)), "add", 1.0, LayerIndexError, "out of range"),
        (LayerEdit(1, np.ones(32)), "boost", 1.0, ValueError, "valid modes"),
        (LayerEdit(1, np.ones(32)), "reflect", 1.0, SteeringError, "needs a center"),
    ],
)
def test_invalid_requests_fail_before_touching_the_model(edit, mode, alpha, error, match):
    model = tiny_model("llama")
    classes = [type(layer) for layer in model.layers]
    with pytest.raises(error, match=match):
        with steer(model, [edit], mode, alpha):
            pytest.fail("the body must not run")
    assert [type(layer) for layer in model.layers] == classes


def test_reflect_mode_without_center_raises():
    with pytest.raises(ValueError, match="needs a center"):
        ReflectMode()(mx.ones((1, 2, 4)), mx.ones(4), None, 1.0)


# --- norm-preserving, every-layer ablation, conditional steering ------------------------


def test_norm_preserving_keeps_each_positions_norm_and_turns_like_inner(core_model):
    arch, model = core_model
    tokens = mx.array(TOKENS)
    vector, center = _direction(model, scale=3.0)
    h = np.array(embed_and_run_layers(model, arch, tokens, LAYER))
    mode = NormPreservingMode("add")
    with steer(model, [LayerEdit(LAYER, vector, center)], mode, 2.0):
        with capture_layers(model, [LAYER]) as recorder:
            model(tokens)
    edited = np.array(recorder.outputs[LAYER])
    np.testing.assert_allclose(
        np.linalg.norm(edited, axis=-1), np.linalg.norm(h, axis=-1), rtol=1e-5
    )
    added = h + 2.0 * vector  # same direction as the plain add, rescaled
    cos = (
        (edited * added).sum(-1) / np.linalg.norm(edited, axis=-1) / np.linalg.norm(added, axis=-1)
    )
    np.testing.assert_allclose(cos, 1.0, atol=1e-5)
    assert np.linalg.norm(added, axis=-1).max() > 1.5 * np.linalg.norm(h, axis=-1).max()


def test_ablate_all_layers_matches_a_hand_forward_with_ablation_after_each_layer():
    from mlx_lm.models.base import create_attention_mask

    model = tiny_model("llama")
    tokens = mx.array(TOKENS)
    vector, _ = _direction(model)
    u = mx.array(_np_unit(vector))
    n = len(model.layers)
    with steer(model, [LayerEdit(LAYER, vector)], "ablate_all", 1.0):
        assert all(type(layer).__name__.startswith("Steering") for layer in model.layers)
        with capture_layers(model, list(range(n))) as recorder:
            steered_logits = np.array(model(tokens))
    h = model.model.embed_tokens(tokens)
    mask = create_attention_mask(h, None)
    for i, layer in enumerate(model.layers):  # classes are restored: the plain layers
        h = layer(h, mask, None)
        h = h - (h @ u)[..., None] * u
        np.testing.assert_allclose(np.array(recorder.outputs[i]), np.array(h), atol=1e-5)
        np.testing.assert_allclose(np.array(recorder.outputs[i]) @ np.array(u), 0.0, atol=1e-5)
    with steer(model, [LayerEdit(LAYER, vector)], "ablate", 1.0):
        one_layer = np.array(model(tokens))
    assert not np.allclose(steered_logits, one_layer, atol=1e-4)


def _probe_on(model, arch, vector):
    """A hand-made probe along ``vector`` whose boundary splits layer LAYER's positions."""
    h = np.array(embed_and_run_layers(model, arch, mx.array(TOKENS), LAYER))[0]
    coef = _np_unit(vector).astype(np.float32)
    scores = h @ coef
    ordered = np.sort(scores)
    half = len(ordered) // 2  # boundary midway between two positions: about half fire
    intercept = -float(ordered[half - 1] + ordered[half]) / 2
    return h, coef, intercept, scores + intercept > 0


@pytest.mark.parametrize("inner", ["add", "reflect"])
def test_conditional_edits_exactly_where_the_probe_fires(core_model, inner):
    arch, model = core_model
    vector, center = _direction(model)
    h, coef, intercept, fires = _probe_on(model, arch, vector)
    assert fires.any() and not fires.all()
    mode = ConditionalMode(inner, threshold=0.5, coef=coef, intercept=intercept)
    with steer(model, [LayerEdit(LAYER, vector, center)], mode, 1.5):
        with capture_layers(model, [LAYER]) as recorder:
            model(mx.array(TOKENS))
    edited = np.array(recorder.outputs[LAYER])[0]
    np.testing.assert_array_equal(edited[~fires], h[~fires])
    expected = _np_reference(inner, h.astype(np.float64), vector, center, 1.5)
    np.testing.assert_allclose(edited[fires], expected[fires], rtol=1e-6, atol=1e-5)
    assert np.abs(edited[fires] - h[fires]).max() > 1e-2


def test_conditional_threshold_never_firing_and_alpha_zero_are_bit_identical(core_model):
    arch, model = core_model
    tokens = mx.array(TOKENS)
    vector, center = _direction(model)
    _, coef, intercept, _ = _probe_on(model, arch, vector)
    plain = np.array(model(tokens))
    edits = [LayerEdit(LAYER, vector, center)]
    never = ConditionalMode("add", threshold=1.0, coef=coef, intercept=intercept)
    with steer(model, edits, never, 50.0):
        assert np.array_equal(np.array(model(tokens)), plain)
    some = ConditionalMode("reflect", threshold=0.5, coef=coef, intercept=intercept)
    with steer(model, edits, some, 0.0):
        assert np.array_equal(np.array(model(tokens)), plain)
    with steer(model, edits, some, 2.0):
        assert not np.allclose(np.array(model(tokens)), plain, atol=1e-4)


def test_conditional_cached_generation_matches_uncached_recompute(core_model):
    arch, model = core_model
    vector, center = _direction(model, scale=4.0)
    _, coef, intercept, _ = _probe_on(model, arch, vector)
    edits = [LayerEdit(LAYER, vector, center)]
    mode = ConditionalMode("add", coef=coef, intercept=intercept)
    _, cached = generate_steered(model, StubTokenizer(), PROMPT, edits, mode, 1.0, N_GEN)
    with steer(model, edits, mode, 1.0):
        uncached = _uncached_greedy(model, PROMPT, N_GEN)
    assert cached == uncached


def test_conditional_probe_from_a_probes_file(core_model, tmp_path):
    from safetensors.numpy import save_file

    arch, model = core_model
    vector, _ = _direction(model)
    h, coef, intercept, fires = _probe_on(model, arch, vector)
    path = tmp_path / "probes.safetensors"
    save_file(
        {
            f"red_vs_green/{LAYER}/coef": coef,
            f"red_vs_green/{LAYER}/intercept": np.array([intercept], np.float32),
            "red_vs_green/0/coef": -coef,
            "red_vs_green/0/intercept": np.array([0.0], np.float32),
        },
        str(path),
    )
    cfg = {"_target_": "mlx_interp.interventions.steering.ConditionalMode", "probe_path": str(path)}
    mode = make_mode(cfg)  # no probe_layer: the probe of the steered layer is picked
    with steer(model, [LayerEdit(LAYER, vector)], mode, 1.0):
        with capture_layers(model, [LAYER]) as recorder:
            model(mx.array(TOKENS))
    edited = np.array(recorder.outputs[LAYER])[0]
    np.testing.assert_array_equal(edited[~fires], h[~fires])
    np.testing.assert_allclose(edited[fires], h[fires] + vector, rtol=1e-6, atol=1e-5)

    classes = [type(layer) for layer in model.layers]
    wrong_layer = make_mode({**cfg, "probe_layer": 0, "contrast": "red_vs_green"})
    with pytest.raises(SteeringError, match="fitted at layer 0 but the edit is at layer 1"):
        with steer(model, [LayerEdit(LAYER, vector)], wrong_layer, 1.0):
            pytest.fail("the body must not run")
    missing = make_mode(cfg)
    with pytest.raises(SteeringError, match="no probe 'red_vs_green/2'"):
        with steer(model, [LayerEdit(LAYER, vector), LayerEdit(2, vector)], missing, 1.0):
            pytest.fail("the body must not run")
    assert [type(layer) for layer in model.layers] == classes
    with pytest.raises(SteeringError, match="no_such_contrast"):
        make_mode({**cfg, "contrast": "no_such_contrast", "probe_layer": 1})
    with pytest.raises(SteeringError, match="does not exist"):
        make_mode({**cfg, "probe_path": str(tmp_path / "nope.safetensors"), "probe_layer": 1})


def test_conditional_rejects_bad_probes():
    with pytest.raises(SteeringError, match=r"threshold must be in \[0, 1\]"):
        ConditionalMode("add", threshold=1.5, coef=np.ones(4), intercept=0.0)
    with pytest.raises(SteeringError, match="exactly one probe source"):
        ConditionalMode("add", coef=np.ones(4), probe_path="x.safetensors")
    with pytest.raises(SteeringError, match="finite"):
        ConditionalMode("add", coef=np.r_[np.nan, 1.0], intercept=0.0)
    mode = ConditionalMode("add", coef=np.ones(4), intercept=0.0)
    with pytest.raises(SteeringError, match="d_model=8"):
        mode(mx.ones((1, 2, 8)), mx.ones(8), None, 1.0)


@pytest.mark.parametrize("name", ["reflect_norm", "ablate_all"])
def test_new_modes_restore_classes_after_an_exception(core_model, name):
    _, model = core_model
    tokens = mx.array(TOKENS)
    classes = [type(layer) for layer in model.layers]
    before = np.array(model(tokens))
    with pytest.raises(RuntimeError, match="boom"):
        with steer(model, _edits(model), name, 3.0):
            model(tokens)
            raise RuntimeError("boom")
    assert [type(layer) for layer in model.layers] == classes
    assert np.array_equal(np.array(model(tokens)), before)


# --- the real embedded model ------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_steered_generation_cache_matches_recompute(smollm2):
    model, tokenizer = smollm2
    prompt = tokenizer.encode("My favourite animal is the")
    middle = len(model.layers) // 2
    happy, sad = tokenizer.encode(" happy")[0], tokenizer.encode(" sad")[0]
    embeddings = np.array(model.model.embed_tokens(mx.array([happy, sad])).astype(mx.float32))
    with capture_layers(model, [middle], stop_after_last=True) as recorder:
        recorder.run(model, mx.array([prompt]))
    norm = float(np.median(np.linalg.norm(np.array(recorder.outputs[middle][0]), axis=-1)))
    direction = embeddings[0] - embeddings[1]
    edits = [LayerEdit(middle, direction / np.linalg.norm(direction) * norm)]

    text, cached = generate_steered(model, tokenizer, prompt, edits, "add", 1.0, N_GEN)
    with steer(model, edits, "add", 1.0):
        uncached = _uncached_greedy(model, prompt, len(cached))
    assert cached == uncached
    assert len(cached) >= N_GEN // 2 and text == tokenizer.decode(cached)
    _, plain = generate_steered(model, tokenizer, prompt, [], "add", 1.0, N_GEN)
    assert cached != plain
