"""Model loading: a local folder saved by mlx-lm, CPU dequantization, BLAS selection, errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models import llama
from mlx_lm.utils import save_config, save_model

from mlx_interp.models.gguf import embedded_gguf_path
from mlx_interp.models.gguf_tokenizer import tokenizer_from_gguf
from mlx_interp.models.loading import ModelLoadError, load_model

ROOT = Path(__file__).resolve().parents[2]
TOKENS = [[1, 504, 3458, 314, 260, 5453, 30]]


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A tiny llama saved the way mlx-lm saves hub models (weights, config, tokenizer)."""
    folder = tmp_path_factory.mktemp("mlx_model")
    _, meta = mx.load(str(embedded_gguf_path()), return_metadata=True)
    tokenizer = tokenizer_from_gguf(meta)
    config = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 3,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": True,
    }
    mx.random.seed(7)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    save_model(folder, model)
    save_config(dict(config), folder / "config.json")
    tokenizer._tokenizer.save_pretrained(folder)
    logits = np.array(model(mx.array(TOKENS)))
    return folder, logits


def test_local_mlx_lm_folder_loads_through_mlx_lm_load(saved_folder):
    folder, expected = saved_folder
    lm = load_model(
        {"name": "local", "source": "mlx_lm", "path": str(folder), "dequantize": "auto"}
    )
    assert lm.n_layers == 3 and lm.d_model == 64
    np.testing.assert_array_equal(np.array(lm.model(mx.array(TOKENS))), expected)
    text = "What colour is grass?"
    assert lm.tokenizer.decode(lm.tokenizer.encode(text, add_special_tokens=False)) == text


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not an mlx-lm model folder"):
        load_model({"name": "x", "source": "mlx_lm", "path": str(tmp_path / "nope")})
    with pytest.raises(ModelLoadError, match="unknown model.source"):
        load_model({"name": "x", "source": "ftp"})
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load_model({"name": "x", "source": "gguf", "path": str(tmp_path / "m.gguf")})


def test_dequantize_auto_on_cpu_gives_float32_with_quantized_answers():
    quant = load_model({"name": "q", "source": "embedded", "dequantize": "false"})
    full = load_model({"name": "f", "source": "embedded", "dequantize": "auto"})
    assert not quant.dequantized and full.dequantized
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in full.model.named_modules())
    assert full.model.model.layers[0].self_attn.q_proj.weight.dtype == mx.float32
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in quant.model.named_modules())
    tokens = mx.array(TOKENS)
    a, b = np.array(quant.model(tokens)), np.array(full.model(tokens))
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.8  # same weights, other arithmetic
    np.testing.assert_allclose(a, b, atol=0.5)


def _blas_in_subprocess(env_extra: dict) -> subprocess.CompletedProcess:
    code = "import mlx_interp.blas as b; i = b.ensure_fast_blas(); print(i.name)"
    return _order_in_subprocess(code, env_extra)


def _order_in_subprocess(code: str, env_extra: dict) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (the BLAS is chosen once per process)."""
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env_extra},
        cwd=ROOT,
        capture_output=True,
        text=True,
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="BLAS loading is Linux only")
def test_blas_selection():
    fast = _blas_in_subprocess({})
    assert fast.returncode == 0 and fast.stdout.strip() in ("mkl", "openblas", "blis")
    ref = _blas_in_subprocess({"MLX_INTERP_BLAS": "none"})
    assert ref.stdout.strip() == "reference"
    bad = _blas_in_subprocess({"MLX_INTERP_BLAS": "/nonexistent/libblas.so"})
    assert bad.returncode != 0 and "pip install mkl" in bad.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="BLAS loading is Linux only")
def test_importing_mlx_first_fails_loudly_with_the_fix_or_is_accepted_on_request():
    late = "import mlx.core; import mlx_interp"
    err = _order_in_subprocess(late, {}).stderr
    assert "BlasOrderError" in err and "import mlx_interp` before mlx" in err
    assert "MLX_INTERP_BLAS=none" in err and "LD_PRELOAD=" in err
    ok = _order_in_subprocess(late + "; print(mlx_interp.blas.ensure_fast_blas().name)", {})
    assert ok.returncode != 0
    accepted = _order_in_subprocess(
        late + "; print(mlx_interp.blas.ensure_fast_blas().name)", {"MLX_INTERP_BLAS": "none"}
    )
    assert accepted.returncode == 0 and accepted.stdout.strip() == "reference"
    first = _order_in_subprocess("import mlx_interp; import mlx.core; print('ok')", {})
    assert first.returncode == 0 and first.stdout.strip() == "ok"


def test_dequantize_option_accepts_what_the_command_line_gives():
    from mlx_interp.models.loading import ModelLoadError, should_dequantize

    assert should_dequantize("False") is False and should_dequantize("TRUE") is True
    assert should_dequantize(False) is False and should_dequantize("true") is True
    with pytest.raises(ModelLoadError, match="must be auto, true or false"):
        should_dequantize("maybe")
