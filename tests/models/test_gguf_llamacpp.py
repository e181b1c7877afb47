"""llama.cpp itself (llama-cpp-python, optional extra ``llamacpp``) as an external reference.

Next-token logits of the same ids, this project (float32 MLX) against llama.cpp on the CPU.
llama.cpp quantizes activations to 8 bits in its CPU matmuls, so the two differ by its own
noise (issue 12 measured KL <= 6.5e-3 and top-1 7/9 on SmolLM2; on Gemma one prompt of nine
reaches KL 0.073, where the independent float32 numpy reference of tests/models/gguf_reference.py
differs from llama.cpp by the same 0.073 and from this project by 3e-5). The bounds allow
that noise and no more. Skipped when llama_cpp is not installed.
"""

import importlib.util

import mlx.core as mx
import numpy as np
import pytest

from mlx_interp.models.gguf import EMBEDDED, load_gguf
from mlx_interp.models.gguf_embedded import GEMMA_PACKAGE
from tests.models.gguf_writer import reencode_gguf

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llama_cpp") is None,
        reason="llama-cpp-python not installed (pip install -e '.[llamacpp]')",
    ),
]
PROMPTS = [
    "The capital of France is",
    "What colour is grass? Answer with one word.",
    "Q: What colour is a ripe tomato?\nA:",
    "One, two, three, four,",
    "The quick brown fox jumps over the",
    "def add(a, b):\n    return",
    "Water boils at a temperature of",
    "The opposite of hot is",
    "My favourite fruit is the",
]


def softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max()
    return np.exp(x) / np.exp(x).sum()


def compare(path) -> tuple[list[float], int, list[bool]]:
    """(KL(project || llama.cpp) per prompt, top-1 agreements, tokenizers equal per prompt)."""
    from llama_cpp import Llama

    model, tokenizer = load_gguf(path)
    llm = Llama(model_path=str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False)
    kls, agree, same_ids = [], 0, []
    for text in PROMPTS:
        ids = tokenizer.encode(text)
        same_ids.append(
            llm.tokenize(text.encode(), add_bos=ids[0] == tokenizer.bos_token_id) == ids
        )
        ours = np.array(model(mx.array([ids]))[0, -1].astype(mx.float32))
        llm.reset()
        llm.eval(ids)
        theirs = np.array(llm.scores[len(ids) - 1], dtype=np.float32)[: ours.shape[0]]
        p, q = softmax(ours), softmax(theirs)
        kls.append(float((p * (np.log(p + 1e-30) - np.log(q + 1e-30))).sum()))
        agree += int(ours.argmax() == theirs.argmax())
    return kls, agree, same_ids


def check(kls: list[float], agree: int) -> None:
    assert max(kls) <= 0.1 and np.mean(kls) <= 0.02, kls
    assert agree >= 6, agree


def test_smollm2_matches_llama_cpp():
    kls, agree, same_ids = compare(EMBEDDED["smollm2_135m"]())
    check(kls, agree)


def test_q4_k_llama_file_matches_llama_cpp(tmp_path):
    path = tmp_path / "smollm2-q4k.gguf"
    reencode_gguf(EMBEDDED["smollm2_135m"](), path, ("ffn_down",))
    kls, agree, _ = compare(path)
    check(kls, agree)


@pytest.mark.skipif(importlib.util.find_spec(GEMMA_PACKAGE) is None, reason="Gemma not installed")
def test_gemma_matches_llama_cpp():
    kls, agree, same_ids = compare(EMBEDDED["gemma3_270m"]())
    check(kls, agree)
    assert all(same_ids)  # SentencePiece ids equal llama.cpp's on these prompts
