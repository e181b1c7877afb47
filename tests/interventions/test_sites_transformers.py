"""SmolLM2's attention patterns and hidden states against transformers' on the same GGUF.

transformers loads the embedded GGUF itself (``gguf_file=``, dequantized by the gguf
package) and runs eager attention with ``output_attentions``/``output_hidden_states``; the
same token ids go through ``run_with_cache``. Needs the bench extra (``pip install -e
'.[bench]'``, torch as a CPU build); skipped with the reason otherwise. Run with ``-s`` to
see the max abs error and cosine per quantity.
"""

import mlx.core as mx
import numpy as np
import pytest

PROMPT = "When Mary and John went to the store, John gave a drink to"


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.slow
def test_smollm2_patterns_and_hidden_states_match_transformers():
    torch = pytest.importorskip(
        "torch", reason="bench extra not installed (pip install -e '.[bench]')"
    )
    transformers = pytest.importorskip("transformers", reason="bench extra not installed")
    pytest.importorskip("gguf", reason="bench extra not installed")
    import mlx_interp as mi
    from mlx_interp.models.gguf import embedded_gguf_path

    transformers.utils.logging.set_verbosity_error()
    path = embedded_gguf_path()
    try:
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
        ).eval()
    except Exception as err:  # accelerate missing, or this transformers cannot read the GGUF
        pytest.skip(f"transformers cannot load the GGUF: {type(err).__name__}: {err}")
    model = mi.load("smollm2_135m")
    ids = model.tokens(PROMPT)
    logits, cache = model.run_with_cache(
        ids, sites=["resid_pre", "pattern", "resid_post"], as_numpy=True
    )
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_attentions=True, output_hidden_states=True)
    n = model.n_layers
    ours_hidden = [cache["resid_pre", i][0] for i in range(n)]
    final = model.anatomy.final_norm(mx.array(cache["resid_post", n - 1]))  # HF's last entry
    ours_hidden.append(np.array(final[0]))
    hidden_err = max(
        float(np.abs(ours - out.hidden_states[i][0].numpy()).max())
        for i, ours in enumerate(ours_hidden)
    )
    hidden_cos = min(
        _cosine(ours, out.hidden_states[i][0].numpy()) for i, ours in enumerate(ours_hidden)
    )
    pattern_err = max(
        float(np.abs(cache["pattern", i][0] - out.attentions[i][0].numpy()).max()) for i in range(n)
    )
    pattern_cos = min(
        _cosine(cache["pattern", i][0], out.attentions[i][0].numpy()) for i in range(n)
    )
    logit_err = float(np.abs(logits[0] - out.logits[0].numpy()).max())
    report = {
        "hidden_states max abs err": hidden_err,
        "hidden_states min cosine": hidden_cos,
        "patterns max abs err": pattern_err,
        "patterns min cosine": pattern_cos,
        "logits max abs err": logit_err,
        "hidden scale (max abs)": float(max(np.abs(h).max() for h in ours_hidden)),
    }
    print("\nSmolLM2 vs transformers (same GGUF, float32):", report)
    assert len(out.hidden_states) == n + 1 and len(out.attentions) == n
    assert hidden_cos > 0.99999 and pattern_cos > 0.99999
    assert pattern_err < 1e-3 and hidden_err < 1e-3 * report["hidden scale (max abs)"]
