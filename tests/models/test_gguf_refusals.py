"""Unsupported GGUF files are refused before any weight is decoded, naming what is wrong."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter

import mlx_interp.models.gguf_decode as gguf_decode
from mlx_interp.models.gguf import GGUFError, load_gguf
from tests.models.gguf_writer import ARCH_DIMS, GGUF_DIMS, write_gguf
from tests.tiny_models import tiny_model

T = GGMLQuantizationType


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail the test if any tensor is decoded (refusals must come first)."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a weight was decoded before the file was refused")

    monkeypatch.setattr("mlx_interp.models.gguf.decode_float32", forbidden)
    monkeypatch.setattr("mlx_interp.models.gguf.decode_affine", forbidden)


def llama_file(tmp_path, **extra):
    model = tiny_model("llama", 0, **GGUF_DIMS, **ARCH_DIMS["llama"])
    path = tmp_path / "llama.gguf"
    write_gguf(model, "llama", path, T.Q8_0, extra=extra)
    return path


def test_unsupported_tensor_type_named(tmp_path, no_decoding):
    raw = np.random.default_rng(0).integers(0, 256, size=(4, 8 * 18), dtype=np.uint8)
    path = llama_file(tmp_path, **{"blk.0.extra.weight": (raw, T.IQ4_NL)})
    with pytest.raises(GGUFError, match=r"IQ4_NL \(1 tensors, e\.g\. blk\.0\.extra\.weight\)"):
        load_gguf(path)


def test_every_supported_type_is_tested():
    """The synthetic tests parametrize over SUPPORTED_TYPES; this pins the list they cover."""
    assert {t.name for t in gguf_decode.SUPPORTED_TYPES} == {
        "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
        "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    }  # fmt: skip


def _bare_file(path, arch: str, tokenizer: str = "gpt2"):
    writer = GGUFWriter(str(path), arch)
    writer.add_tokenizer_model(tokenizer)
    writer.add_token_list(["a", "b"])
    writer.add_tensor("token_embd.weight", np.zeros((2, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_architecture_named(tmp_path, no_decoding):
    with pytest.raises(GGUFError, match=r"architecture 'mamba' is not supported.*gemma3"):
        load_gguf(_bare_file(tmp_path / "m.gguf", "mamba"))


def test_unsupported_tokenizer_named(tmp_path, no_decoding):
    with pytest.raises(GGUFError, match=r"tokenizer model 'bert' is not supported"):
        load_gguf(_bare_file(tmp_path / "b.gguf", "llama", tokenizer="bert"))


def test_unsupported_rope_scaling_named(tmp_path, no_decoding, monkeypatch):
    path = llama_file(tmp_path)
    from mlx_interp.models import gguf_read

    real = gguf_read.read_gguf

    def with_yarn(p):
        gguf = real(p)
        gguf.metadata["llama.rope.scaling.type"] = "yarn"
        return gguf

    monkeypatch.setattr("mlx_interp.models.gguf.read_gguf", with_yarn)
    with pytest.raises(GGUFError, match=r"rope scaling 'yarn'"):
        load_gguf(path)


def test_missing_tensor_named(tmp_path, monkeypatch):
    """A qwen2 file relabelled qwen3 lacks qwen3's q/k norms: named before decoding."""
    model = tiny_model("qwen2", 0, **GGUF_DIMS, **ARCH_DIMS["qwen2"])
    path = tmp_path / "qwen2.gguf"
    write_gguf(model, "qwen2", path, T.F32)
    from mlx_interp.models import gguf_read

    real = gguf_read.read_gguf

    def as_qwen3(p):
        gguf = real(p)
        renamed = {k.replace("qwen2.", "qwen3.", 1): v for k, v in gguf.metadata.items()}
        gguf.metadata = {**renamed, "general.architecture": "qwen3"}
        return gguf

    monkeypatch.setattr("mlx_interp.models.gguf.read_gguf", as_qwen3)
    monkeypatch.setattr("mlx_interp.models.gguf.decode_float32", None)  # must not be reached
    with pytest.raises(GGUFError, match=r"lacks required tensor\(s\).*blk\.0\.attn_k_norm"):
        load_gguf(path)


def test_truncated_file_named(tmp_path):
    path = llama_file(tmp_path)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:4096])
    with pytest.raises(GGUFError, match="truncated or corrupt"):
        load_gguf(cut)


def test_unknown_tensor_named(tmp_path, no_decoding):
    path = llama_file(tmp_path, **{"blk.0.attn_sinks.weight": (np.ones(4, np.float32), T.F32)})
    with pytest.raises(GGUFError, match=r"blk\.0\.attn_sinks\.weight have no counterpart"):
        load_gguf(path)
