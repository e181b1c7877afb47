"""Real GGUF files (slow): Gemma 3 270M Q4_K_M, SmolLM2 and a Q4_K llama file made from it.

Hidden states are checked against tests/models/gguf_reference.py, a numpy float32 forward over the
gguf.quants decode of the same file (no MLX, no mlx-lm).
"""

import importlib.util

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGUFReader
from gguf.quants import dequantize
from mlx.utils import tree_flatten
from mlx_lm import generate

from mlx_interp.io.prompts import render
from mlx_interp.models.gguf import EMBEDDED, load_gguf
from mlx_interp.models.gguf_embedded import GEMMA_PACKAGE
from tests.models.gguf_reference import ReferenceGGUF, hidden_states, spm_reference
from tests.models.gguf_writer import reencode_gguf
from tests.tiny_models import embed_and_run_layers

pytestmark = pytest.mark.slow
needs_gemma = pytest.mark.skipif(
    importlib.util.find_spec(GEMMA_PACKAGE) is None,
    reason="Gemma 3 270M packages not installed (make setup-gemma; GEMMA=0 skips them)",
)
PROMPTS = [
    "What colour is grass? Answer with one word.",
    "The capital of France is",
    "Q: What colour is a ripe tomato?\nA:",
]
SHOTS = [
    ("What colour is a pumpkin? Answer with one word.", "Orange."),
    ("What is the capital of Germany? Answer with one word.", "Berlin."),
    ("What colour is a canary? Answer with one word.", "Yellow."),
    ("What colour is a blueberry? Answer with one word.", "Blue."),
]


def per_layer_cosines(model, arch: str, ref: ReferenceGGUF, ids: list[int]) -> list[float]:
    """Smallest cosine over positions, for each layer's residual stream."""
    expected = hidden_states(ref, ids)
    worst = []
    for layer, want in enumerate(expected):
        got = np.array(embed_and_run_layers(model, arch, mx.array([ids]), layer))[0]
        cos = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
        worst.append(float(cos.min()))
    return worst


@pytest.fixture(scope="module")
def gemma():
    path = EMBEDDED["gemma3_270m"]()
    model, tokenizer = load_gguf(path)
    return path, model, tokenizer


@needs_gemma
def test_gemma_model(gemma):
    _, model, tokenizer = gemma
    assert type(model).__module__ == "mlx_lm.models.gemma3_text"
    assert len(model.layers) == 18 and model.args.hidden_size == 640
    assert not hasattr(model, "lm_head")  # tied to the embedding
    assert tokenizer.chat_template is None  # a base model: prompts are plain text
    assert tokenizer.encode("hi")[0] == tokenizer.bos_token_id  # add_bos_token


@needs_gemma
def test_gemma_hidden_states_match_reference(gemma):
    path, model, tokenizer = gemma
    ref = ReferenceGGUF(path)
    for text in PROMPTS:
        ids = tokenizer.encode(text)
        assert min(per_layer_cosines(model, "gemma3_text", ref, ids)) >= 0.9999, text


@needs_gemma
def test_gemma_greedy_answers(gemma):
    _, model, tokenizer = gemma
    cases = {
        "What colour is grass?": "Green",
        "What colour is a ripe tomato?": "Red",
        "What colour is the sky on a clear day?": "Blue",
        "What is the capital of France?": "Paris",
    }
    for question, answer in cases.items():
        _, ids = render(tokenizer, question + " Answer with one word.", "plain", None, SHOTS)
        assert generate(model, tokenizer, ids, max_tokens=4).strip().startswith(answer)


@needs_gemma
def test_gemma_tokenizer_matches_spm_reference(gemma):
    """Plain text (runs of spaces aside: Gemma stores those tokens as real spaces, which the
    rebuilt tokenizer maps back as the original Gemma tokenizer does)."""
    path, _, tokenizer = gemma
    fields = GGUFReader(str(path)).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    scores = fields["tokenizer.ggml.scores"].contents()
    texts = [
        *PROMPTS,
        "Q: What colour is a ripe tomato?\nA: Red.\n\n",
        "naïve café — 東京 🚀 3.14159",
        "The quick brown fox's 42 jumps!!",
    ]
    for text in texts:
        assert tokenizer.encode(text, add_special_tokens=False) == spm_reference(
            text, tokens, scores
        )


def test_smollm2_hidden_states_match_reference():
    path = EMBEDDED["smollm2_135m"]()
    model, tokenizer = load_gguf(path)
    ref = ReferenceGGUF(path)
    ids = tokenizer.encode(PROMPTS[0])
    assert min(per_layer_cosines(model, "llama", ref, ids)) >= 0.9999


def test_q4_k_llama_file(tmp_path):
    """SmolLM2 with every ffn_down re-encoded as Q4_K (MLX's own reader decodes these with
    ~0.45 relative error): both load paths answer Paris with the same greedy tokens, and
    the kept Q4_K weights equal gguf.quants bit for bit."""
    path = tmp_path / "smollm2-q4k.gguf"
    changed = reencode_gguf(EMBEDDED["smollm2_135m"](), path, ("ffn_down",))
    assert len(changed) == 30
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    answers = []
    for keep in (False, True):
        model, tokenizer = load_gguf(path, keep_quantized=keep)
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        answers.append(generate(model, tokenizer, prompt, max_tokens=12))
    assert "Paris" in answers[0] and answers[0] == answers[1]
    params = dict(tree_flatten(model.parameters()))
    tensor = next(t for t in GGUFReader(str(path)).tensors if t.name == "blk.5.ffn_down.weight")
    down = "model.layers.5.mlp.down_proj"
    got = mx.dequantize(
        *(params[f"{down}.{k}"] for k in ("weight", "scales", "biases")), group_size=32, bits=4
    )
    assert np.array_equal(np.array(got), dequantize(np.asarray(tensor.data), tensor.tensor_type))
