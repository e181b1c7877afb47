"""The model load cache (mlx_interp.models.gguf_cache): a second load of the same GGUF is
served from the prepared entry and equals a fresh load; a changed file or a damaged entry is
never served; concurrent writers leave one complete entry."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from mlx.utils import tree_flatten

import mlx_interp.models.gguf as gguf_module
from mlx_interp.models import gguf_cache
from mlx_interp.models.gguf import load_gguf
from tests.models.gguf_writer import ARCH_DIMS, GGUF_DIMS, write_gguf
from tests.tiny_models import tiny_model

T = GGMLQuantizationType
TOKENS = mx.array([[1, 17, 200, 33, 5, 99, 120, 7, 64, 3]])
TEXTS = ["What colour is grass? 123", "  spaced\tout\n", "ünïcödé ✓"]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "model-cache"
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(root))
    return root


def _write(tmp_path: Path, arch: str, qtype=T.Q8_0, seed: int = 0) -> Path:
    model = tiny_model(arch, seed, **GGUF_DIMS, **ARCH_DIMS[arch])
    path = tmp_path / f"{arch}-{seed}.gguf"
    write_gguf(model, arch, path, qtype, seed=seed)
    return path


def _params(model) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def _same(a, b) -> None:
    """Identical parameters (bit for bit), logits, tokenizer and chat template."""
    (ma, ta), (mb, tb) = a, b
    pa, pb = _params(ma), _params(mb)
    assert sorted(pa) == sorted(pb)
    for name in pa:
        assert pa[name].dtype == pb[name].dtype and np.array_equal(pa[name], pb[name]), name
    assert np.array_equal(np.array(ma(TOKENS)), np.array(mb(TOKENS)))
    for text in TEXTS:
        assert ta.encode(text) == tb.encode(text)
        assert ta.decode(ta.encode(text)) == tb.decode(tb.encode(text))
    assert ta.eos_token_ids == tb.eos_token_ids
    assert ta.chat_template == tb.chat_template


def _entries(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if not p.name.startswith("."))


def _no_reading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the GGUF was parsed although a cache entry exists")

    monkeypatch.setattr(gguf_module, "read_gguf", refuse)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
@pytest.mark.parametrize("keep_quantized", [False, True])
def test_second_load_is_served_from_the_cache_and_equals_a_fresh_load(
    tmp_path, cache_dir, monkeypatch, arch, keep_quantized
):
    path = _write(tmp_path, arch)
    fresh = load_gguf(path, keep_quantized=keep_quantized, cache=False)
    first = load_gguf(path, keep_quantized=keep_quantized)  # builds and stores the entry
    assert len(_entries(cache_dir)) == 1
    _no_reading(monkeypatch)
    second = load_gguf(path, keep_quantized=keep_quantized)
    _same(fresh, first)
    _same(fresh, second)


def test_keep_quantized_and_dequantized_are_separate_entries(tmp_path, cache_dir):
    path = _write(tmp_path, "llama", T.Q4_1)
    load_gguf(path, keep_quantized=False)
    load_gguf(path, keep_quantized=True)
    assert len(_entries(cache_dir)) == 2


def test_a_changed_file_is_never_served_from_the_cache(tmp_path, cache_dir):
    path = _write(tmp_path, "llama", seed=0)
    before = load_gguf(path)
    other = _write(tmp_path, "llama", seed=1)
    other.replace(path)  # same path, new content (size may even be equal)
    after = load_gguf(path)
    _same(after, load_gguf(path, cache=False))
    assert not np.array_equal(np.array(before[0](TOKENS)), np.array(after[0](TOKENS)))
    assert len(_entries(cache_dir)) == 2


def test_the_key_follows_the_conversion_code(monkeypatch):
    key = gguf_cache.entry_key("ab" * 32, False)
    monkeypatch.setattr(gguf_cache, "_CONVERTER", "another converter")
    assert gguf_cache.entry_key("ab" * 32, False) != key


@pytest.mark.parametrize("damage", ["flip", "truncate", "manifest", "missing"])
def test_a_damaged_entry_is_detected_rebuilt_and_never_served(
    tmp_path, cache_dir, monkeypatch, damage
):
    path = _write(tmp_path, "llama")
    fresh = load_gguf(path, cache=False)
    load_gguf(path)
    (entry,) = _entries(cache_dir)
    weights = entry / "weights.safetensors"
    if damage == "flip":  # one byte in the middle of the tensors: same size, other values
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "manifest":
        (entry / "manifest.json").write_text("{not json")
    else:
        (entry / "tokenizer.json").unlink()
    parsed = []
    real_read = gguf_module.read_gguf
    monkeypatch.setattr(gguf_module, "read_gguf", lambda p: parsed.append(p) or real_read(p))
    rebuilt = load_gguf(path)
    assert parsed == [path]  # rebuilt from the GGUF, not served
    _same(fresh, rebuilt)
    (entry_again,) = _entries(cache_dir)  # the damaged one was replaced by a good one
    _no_reading(monkeypatch)
    _same(fresh, load_gguf(path))
    manifest = json.loads((entry_again / "manifest.json").read_text())
    assert sorted(manifest["files"]) == sorted(gguf_cache.FILES)


def test_a_second_writer_keeps_the_first_entry_and_leaves_no_temporary_folder(tmp_path, cache_dir):
    path = _write(tmp_path, "llama")
    model, _ = load_gguf(path)
    (entry,) = _entries(cache_dir)
    manifest = (entry / "manifest.json").read_text()
    parts = gguf_module.tokenizer_parts(gguf_module.read_gguf(path).metadata, "llama")
    model_json = json.loads((entry / "model.json").read_text())
    assert gguf_cache.write_entry(cache_dir, entry.name, model, model_json, parts) is None
    assert (entry / "manifest.json").read_text() == manifest
    assert [p.name for p in cache_dir.iterdir()] == [entry.name]


CHILD = """
import sys
import mlx_interp
import mlx.core as mx
import numpy as np
from mlx_interp.models.gguf import load_gguf
model, _ = load_gguf(sys.argv[1])
print(float(np.array(model(mx.array([[1, 17, 200, 33, 5]]))).sum()))
"""


def test_concurrent_loads_of_a_new_file_leave_one_complete_entry(tmp_path, cache_dir):
    path = _write(tmp_path, "llama")
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    outputs = [child.communicate(timeout=300)[0] for child in children]
    assert [child.returncode for child in children] == [0, 0, 0]
    assert len({out.split()[-1] for out in outputs}) == 1
    (entry,) = _entries(cache_dir)
    assert [p.name for p in cache_dir.iterdir()] == [entry.name]  # no temporary folders left
    assert gguf_cache._checked(entry) is not None


def test_off_disables_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(gguf_cache.CACHE_ENV, "off")
    assert gguf_cache.cache_root() is None
    load_gguf(_write(tmp_path, "llama"))  # nothing written anywhere (no folder to check)


def test_sentencepiece_tokenizer_round_trips_through_its_files(tmp_path):
    """The SentencePiece (``naive`` detokenizer) parts written and read back as the cache
    does give the same ids, text and special tokens."""
    from mlx_interp.models.gguf_tokenizer import TokenizerParts, tokenizer_parts, wrap_tokenizer

    pieces = ["\u2581", "t", "h", "e", "c", "a", "s", "\u2581t", "he", "\u2581the", "at"]
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], *pieces]
    metadata = {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(pieces))],
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(pieces),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_space_prefix": True,
    }
    parts = tokenizer_parts(metadata, "llama")
    parts.raw.save(str(tmp_path / "tokenizer.json"))
    settings = json.loads(json.dumps(parts.settings()))
    again = wrap_tokenizer(TokenizerParts(raw=tmp_path / "tokenizer.json", **settings))
    fresh = wrap_tokenizer(parts)
    for text in ["the cat sat", "he sat", "the ü cat"]:
        assert again.encode(text) == fresh.encode(text)
        assert again.decode(again.encode(text)) == fresh.decode(fresh.encode(text))
    assert (again.bos_token, again.eos_token_ids) == (fresh.bos_token, fresh.eos_token_ids)


@pytest.mark.slow
def test_smollm2_second_load_equals_a_fresh_load(cache_dir, monkeypatch):
    from mlx_interp.models.gguf import embedded_gguf_path

    path = embedded_gguf_path()
    fresh = load_gguf(path, cache=False)
    load_gguf(path)
    _no_reading(monkeypatch)
    _same(fresh, load_gguf(path))
