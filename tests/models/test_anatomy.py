"""mlx_interp.models.anatomy: every part found where mlx-lm's own module tree has it.

The expected parts are written here from mlx-lm's model sources (models/llama.py, gemma2.py,
gemma3_text.py, qwen3.py, phi3.py, gpt2.py, olmo2.py), as accessors on the module tree, and
compared by identity; the sizes against each tiny model's config; the embedding and the
unembedding against the model's own forward.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_interp.models.anatomy import AnatomyError, NoLayersError, anatomy_of
from tests.tiny_models import _CONFIGS, ODD_ANATOMY, _embed, embed_and_run_layers, odd_model

TOKENS = mx.array([[5, 9, 17, 3, 44, 2, 99, 12, 7]])

_LLAMA = {
    "attn": lambda b: b.self_attn,
    "mlp": lambda b: b.mlp,
    "q_proj": lambda b: b.self_attn.q_proj,
    "k_proj": lambda b: b.self_attn.k_proj,
    "v_proj": lambda b: b.self_attn.v_proj,
    "qkv_proj": lambda b: None,
    "o_proj": lambda b: b.self_attn.o_proj,
    "rope": lambda b: b.self_attn.rope,
    "gate_proj": lambda b: b.mlp.gate_proj,
    "up_proj": lambda b: b.mlp.up_proj,
    "gate_up_proj": lambda b: None,
    "down_proj": lambda b: b.mlp.down_proj,
    "input_norm": lambda b: b.input_layernorm,
    "post_attn_norm": lambda b: None,
    "pre_mlp_norm": lambda b: b.post_attention_layernorm,  # llama's name for the pre-MLP norm
    "post_mlp_norm": lambda b: None,
    "q_norm": lambda b: None,
}
_GEMMA = {
    **_LLAMA,
    "post_attn_norm": lambda b: b.post_attention_layernorm,
    "pre_mlp_norm": lambda b: b.pre_feedforward_layernorm,
    "post_mlp_norm": lambda b: b.post_feedforward_layernorm,
}
PARTS = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": {**_LLAMA, "q_norm": lambda b: b.self_attn.q_norm},
    "gemma2": _GEMMA,
    "gemma3_text": {**_GEMMA, "q_norm": lambda b: b.self_attn.q_norm},
    "phi3": {
        **_LLAMA,
        "q_proj": lambda b: None,
        "k_proj": lambda b: None,
        "v_proj": lambda b: None,
        "qkv_proj": lambda b: b.self_attn.qkv_proj,
        "gate_proj": lambda b: None,
        "up_proj": lambda b: None,
        "gate_up_proj": lambda b: b.mlp.gate_up_proj,
    },
    "gpt2": {
        **_LLAMA,
        "attn": lambda b: b.attn,
        "q_proj": lambda b: None,
        "k_proj": lambda b: None,
        "v_proj": lambda b: None,
        "qkv_proj": lambda b: b.attn.c_attn,
        "o_proj": lambda b: b.attn.c_proj,
        "rope": lambda b: None,
        "gate_proj": lambda b: None,
        "up_proj": lambda b: b.mlp.c_fc,
        "down_proj": lambda b: b.mlp.c_proj,
        "input_norm": lambda b: b.ln_1,
        "pre_mlp_norm": lambda b: b.ln_2,
    },
    "olmo2": {
        **_LLAMA,
        "q_norm": lambda b: b.self_attn.q_norm,
        "input_norm": lambda b: None,
        "post_attn_norm": lambda b: b.post_attention_layernorm,
        "pre_mlp_norm": lambda b: None,
        "post_mlp_norm": lambda b: b.post_feedforward_layernorm,
    },
}


def _expected_sizes(arch: str) -> dict:
    cfg = _CONFIGS[arch]
    if arch == "gpt2":
        d = cfg["n_embd"]
        return {"d_model": d, "n_heads": cfg["n_head"], "n_kv_heads": cfg["n_head"], "d_mlp": 4 * d}
    heads = cfg["num_attention_heads"]
    return {
        "d_model": cfg["hidden_size"],
        "n_heads": heads,
        "n_kv_heads": cfg.get("num_key_value_heads", heads),
        "head_dim": cfg.get("head_dim", cfg["hidden_size"] // heads),
        "d_mlp": cfg["intermediate_size"],
    }


def test_every_part_is_the_module_mlx_lm_holds(arch_model):
    arch, model = arch_model
    anatomy = anatomy_of(model)
    assert anatomy_of(model) is anatomy  # resolved once per model object
    gpt2 = arch == "gpt2"
    assert anatomy.body is model.model
    assert anatomy.layers == list(model.model.h if gpt2 else model.model.layers)
    assert anatomy.embed is (model.model.wte if gpt2 else model.model.embed_tokens)
    assert anatomy.pos_embed is (model.model.wpe if gpt2 else None)
    assert anatomy.final_norm is (model.model.ln_f if gpt2 else model.model.norm)
    assert anatomy.lm_head is (model.lm_head if "lm_head" in model else None)
    for index, block in enumerate(anatomy.layers):
        parts = anatomy.layer(index)
        assert parts.block is block and parts.index == index
        for role, expected in PARTS[arch].items():
            assert getattr(parts, role) is expected(block), f"{arch} layer {index} {role}"
    for name, value in _expected_sizes(arch).items():
        assert getattr(anatomy, name) == value, name
    assert anatomy.vocab_size == 128 and anatomy.n_layers == 3
    assert anatomy.layer(-1).index == 2


def test_attention_settings_and_windows(arch_model):
    arch, model = arch_model
    anatomy = anatomy_of(model)
    parts = anatomy.layer(1)
    sizes = _expected_sizes(arch)
    head_dim = sizes.get("head_dim", sizes["d_model"] // sizes["n_heads"])
    scalar = _CONFIGS[arch].get("query_pre_attn_scalar", head_dim)  # gemma: its own scalar
    assert parts.scale == pytest.approx(scalar**-0.5)
    softcap = {"gemma2": 50.0}.get(arch)
    assert parts.attn_softcap == softcap
    assert anatomy.final_softcap == ({"gemma2": 30.0}.get(arch))
    assert parts.qk_norm == {"qwen3": "head", "gemma3_text": "head", "olmo2": "full"}.get(arch)
    assert parts.gated == (arch != "gpt2")
    assert anatomy.activation == ("gelu_approx" if arch.startswith(("gemma", "gpt2")) else "silu")
    windows = [anatomy.sliding_window(i) for i in range(3)]
    assert windows == ([4, None, 4] if arch == "gemma3_text" else [None] * 3)
    assert anatomy.plain_cache == (arch != "gemma3_text")
    assert [anatomy.mask_kind(i) for i in range(3)][1] == "causal"


def test_embedding_and_unembedding_are_the_models_own(arch_model):
    arch, model = arch_model
    anatomy = anatomy_of(model)
    np.testing.assert_array_equal(
        np.array(anatomy.embed_tokens(TOKENS)), np.array(_embed(model, arch, TOKENS))
    )
    last = embed_and_run_layers(model, arch, TOKENS, -1)
    np.testing.assert_allclose(
        np.array(anatomy.unembed(last)), np.array(model(TOKENS)), rtol=1e-5, atol=1e-5
    )
    head = model.lm_head.weight if "lm_head" in model else anatomy.embed.weight
    np.testing.assert_array_equal(np.array(anatomy.head_rows([3, 7])), np.array(head[[3, 7]]))


def test_quantized_head_rows_are_dequantized():
    from tests.tiny_models import tiny_model

    model = tiny_model("mistral", hidden_size=64, intermediate_size=128)
    plain = np.array(anatomy_of(model).head_rows([1, 5]))
    nn.quantize(model, group_size=32, bits=8)
    quantized = anatomy_of(model)
    assert isinstance(quantized.lm_head, nn.QuantizedLinear)  # looked up again: the new module
    np.testing.assert_allclose(np.array(quantized.head_rows([1, 5])), plain, atol=0.02)
    assert quantized.d_mlp == 128 and quantized.vocab_size == 128


def test_an_odd_layout_is_described_by_model_anatomy():
    model = odd_model()
    with pytest.raises(NoLayersError, match=r"model\.anatomy") as err:
        anatomy_of(model)
    assert "\n" not in str(err.value) and isinstance(err.value, TypeError)
    assert "backbone, head" in str(err.value)  # what the model does have
    anatomy = anatomy_of(model, ODD_ANATOMY)
    assert anatomy_of(model) is anatomy  # kept with its overrides
    body = model.backbone
    assert anatomy.body is body and anatomy.layers == body.blocks
    assert anatomy.embed is body.tok and anatomy.final_norm is body.final
    parts = anatomy.layer(2)
    block = body.blocks[2]
    assert parts.q_proj is block.mixer.query and parts.o_proj is block.mixer.out
    assert parts.down_proj is block.ffn.w_out and parts.pre_mlp_norm is block.norm2
    assert (parts.n_heads, parts.n_kv_heads, parts.head_dim) == (4, 4, 8)
    logits = model(TOKENS)
    h = anatomy.embed_tokens(TOKENS)
    from mlx_lm.models.base import create_attention_mask

    mask = create_attention_mask(h, None)
    for block in anatomy.layers:
        h = block(h, mask, None)
    np.testing.assert_allclose(np.array(anatomy.unembed(h)), np.array(logits), atol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"mlpp": "ffn"}, "unknown role 'mlpp'; roles: body"),
        ({"mlp": 3}, "must be an attribute path"),
        ({"activation": 1}, "must be a name"),
        ({"layers": "backbone.nope"}, "no decoder layers at backbone.nope"),
    ],
)
def test_bad_layouts_give_one_line_errors(overrides, match):
    with pytest.raises(AnatomyError, match=match) as err:
        anatomy_of(odd_model(), overrides)
    assert "\n" not in str(err.value) and "model.anatomy" in str(err.value)


def test_a_missing_part_names_its_role_and_the_config_key():
    anatomy = anatomy_of(odd_model(), {"layers": "backbone.blocks"})
    parts = anatomy.layer(0)
    assert parts.mlp is None
    with pytest.raises(AnatomyError, match=r"no MLP submodule named mlp or feed_forward") as err:
        anatomy.require(parts.mlp, "mlp", "MLP", 0)
    assert "its children are: ffn, mixer, norm1, norm2" in str(err.value)
    assert "model.anatomy (role 'mlp'" in str(err.value)


def test_model_anatomy_config_key_reaches_the_loaded_model():
    from mlx_interp.models.loading import load_model, model_config

    cfg = model_config("tiny_random")
    assert cfg["anatomy"] == {}  # the schema's default
    cfg["anatomy"] = {"final_norm": "model.norm", "n_heads": 4}
    loaded = load_model(cfg)
    anatomy = anatomy_of(loaded.model)
    assert anatomy.layout.overrides == {"final_norm": "model.norm", "n_heads": 4}
    cfg["anatomy"] = {"nope": "x"}
    with pytest.raises(AnatomyError, match="unknown role 'nope'"):
        load_model(cfg)


def test_composed_config_accepts_model_anatomy():
    from tests.helpers import compose_config

    cfg = compose_config(
        ["model=tiny_random", "+model.anatomy.mlp=mlp", "+model.anatomy.n_heads=4"]
    )
    assert dict(cfg["model"]["anatomy"]) == {"mlp": "mlp", "n_heads": 4}
    cfg = compose_config(["model=tiny_random", "++model.anatomy={attn: self_attn}"])
    assert dict(cfg["model"]["anatomy"]) == {"attn": "self_attn"}
