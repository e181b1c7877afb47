"""GGUF loading on synthetic files: every architecture x tensor type, no downloads.

Each tiny random mlx-lm model is written as a llama.cpp-style GGUF (tests/models/gguf_writer.py) and
its weights set to the file's decoded values; the loaded model must give the same logits, and
every loaded tensor must equal ``gguf.quants.dequantize`` of the stored bytes.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step

from mlx_interp.models.gguf import load_gguf
from mlx_interp.models.gguf_arch import ARCHITECTURES, mlx_name
from mlx_interp.models.gguf_decode import AFFINE_BITS, SUPPORTED_TYPES
from tests.models.gguf_writer import ARCH_DIMS, GGUF_ARCH, GGUF_DIMS, write_gguf
from tests.tiny_models import tiny_model

T = GGMLQuantizationType
TOKENS = mx.array([[1, 17, 200, 33, 5, 99, 120, 7, 64, 3]])  # longer than gemma3's window 4


def source_model(arch: str, seed: int = 0) -> nn.Module:
    return tiny_model(arch, seed, **GGUF_DIMS, **ARCH_DIMS[arch])


def max_rel_diff(a: mx.array, b: mx.array) -> float:
    a, b = np.array(a, dtype=np.float64), np.array(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("arch", list(GGUF_ARCH))
def test_logits_match_source(tmp_path, arch, qtype):
    model = source_model(arch)
    path = tmp_path / f"{arch}-{qtype.name}.gguf"
    write_gguf(model, arch, path, qtype)
    loaded, _ = load_gguf(path)
    assert type(loaded).__module__ == type(model).__module__  # mlx-lm's own class
    assert max_rel_diff(loaded(TOKENS), model(TOKENS)) < 1e-4


@pytest.mark.parametrize("qtype", list(AFFINE_BITS), ids=lambda t: t.name)
@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_kept_quantized_matches_source(tmp_path, arch, qtype):
    model = source_model(arch)
    path = tmp_path / "q.gguf"
    write_gguf(model, arch, path, qtype)
    loaded, _ = load_gguf(path, keep_quantized=True)
    q_proj = loaded.layers[0].self_attn.q_proj
    assert isinstance(q_proj, nn.QuantizedLinear) and q_proj.bits == AFFINE_BITS[qtype]
    assert isinstance(loaded.model.embed_tokens, nn.QuantizedEmbedding)
    assert max_rel_diff(loaded(TOKENS), model(TOKENS)) < 1e-4


def _loaded_tensor(params: dict, name: str) -> np.ndarray:
    """A loaded weight as float32: plain, or mx.dequantize of the kept affine parts."""
    stem = name.rpartition(".")[0]
    if f"{stem}.scales" in params:
        mod = {k: params[f"{stem}.{k}"] for k in ("weight", "scales", "biases")}
        bits = mod["weight"].shape[-1] * 32 // mod["scales"].shape[-1] // 32
        return np.array(
            mx.dequantize(mod["weight"], mod["scales"], mod["biases"], group_size=32, bits=bits)
        )
    return np.array(params[name])


@pytest.mark.parametrize("keep", [False, True], ids=["float32", "kept"])
@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda t: t.name)
def test_every_tensor_equals_gguf_quants(tmp_path, qtype, keep):
    """Bit for bit: loaded weights == gguf.quants.dequantize(stored bytes) (gemma: minus 1)."""
    arch = "gemma3_text"  # all stems a gemma3 file has, and the norm offset
    path = tmp_path / "t.gguf"
    write_gguf(source_model(arch), arch, path, qtype)
    loaded, _ = load_gguf(path, keep_quantized=keep)
    params = dict(tree_flatten(loaded.parameters()))
    spec = ARCHITECTURES["gemma3"]
    for tensor in GGUFReader(str(path)).tensors:
        kind = GGMLQuantizationType(int(tensor.tensor_type))
        expected = dequantize(np.asarray(tensor.data), kind).reshape(tensor.data.shape[0], -1)
        if tensor.name.endswith("norm.weight"):
            expected = expected.reshape(-1) - np.float32(1.0)
        got = _loaded_tensor(params, mlx_name(tensor.name, spec))
        assert np.array_equal(got.reshape(expected.shape), expected), tensor.name


def greedy(model: nn.Module, prompt: mx.array, n: int = 12) -> list[int]:
    out = []
    for token, _ in generate_step(prompt, model, max_tokens=n):
        out.append(int(token))
    return out


def test_q4_k_llama_greedy_equals_gguf_quants(tmp_path):
    """A llama file of Q4_K matrices: greedy tokens equal those of the source model holding the
    gguf.quants-decoded weights, on both load paths."""
    model = source_model("llama", seed=3)
    path = tmp_path / "llama-q4k.gguf"
    write_gguf(model, "llama", path, T.Q4_K)
    prompt = TOKENS[0]
    reference = greedy(model, prompt)
    assert greedy(load_gguf(path)[0], prompt) == reference
    assert greedy(load_gguf(path, keep_quantized=True)[0], prompt) == reference


def test_llama_rope_freqs(tmp_path):
    """Llama 3 rope scaling: llama.cpp's rope_freqs factors reproduce mlx-lm's llama3 RoPE."""
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    model = source_model("llama")
    model = tiny_model("llama", 0, **GGUF_DIMS, **ARCH_DIMS["llama"], rope_scaling=scaling)
    dims = 64
    # llama.cpp convert_hf_to_gguf (LlamaModel.generate_extra_tensors), from the HF formula:
    freqs = 1.0 / (10000.0 ** (np.arange(0, dims, 2) / dims))
    low_wavelen = scaling["original_max_position_embeddings"] / scaling["low_freq_factor"]
    high_wavelen = scaling["original_max_position_embeddings"] / scaling["high_freq_factor"]
    factors = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(scaling["factor"])
        else:
            smooth = (scaling["original_max_position_embeddings"] / wavelen - 1.0) / 3.0
            factors.append(1 / ((1 - smooth) / scaling["factor"] + smooth))
    extra = {"rope_freqs.weight": (np.array(factors, np.float32), T.F32)}
    path = tmp_path / "llama3.gguf"
    write_gguf(model, "llama", path, T.F32, extra=extra)
    loaded, _ = load_gguf(path)
    long = mx.array(np.arange(1, 201).reshape(1, -1) % 250)  # positions past the wavelengths
    assert max_rel_diff(loaded(long), model(long)) < 1e-4
    without = tmp_path / "plain.gguf"
    write_gguf(model, "llama", without, T.F32)
    assert max_rel_diff(load_gguf(without)[0](long), model(long)) > 1e-3  # the test can fail
