"""A tiny model with a planted answer for the steering stages' tests.

The tiny random llama reads plain prompts whose last word is the object; the object's
embedding row is planted as a multiple of its class word's (tied head), so the unsteered
model answers every question right and the class lives in the last token's residual.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from omegaconf import OmegaConf

from mlx_interp.models.loading import load_model

OBJECTS = {"green": " grass", "red": " blood"}  # single tokens of the embedded tokenizer


def planted_dataset(path: Path, wordings: bool = False) -> Path:
    """12 train and 3 test questions per class, 6 + 3 controls; ``wordings``: every test
    question once more in another wording (variant rows)."""
    rows = []
    for cond, obj in (*OBJECTS.items(), ("control", " stone")):
        n_train = 6 if cond == "control" else 12
        for i in range(n_train + 3):
            filler = " ".join(["very"] * (i % 3))
            rows.append(
                {
                    "id": f"{cond}-{i}",
                    "text": f"Say the {filler} colour of thing {i}:{obj}",
                    "condition": cond,
                    "answer": cond if cond != "control" else "grey",
                    "object": obj.strip(),
                    "split": "train" if i < n_train else "test",
                }
            )
            if wordings and i >= n_train:
                rows.append(
                    {
                        **rows[-1],
                        "id": f"{cond}-{i}|wording",
                        "text": f"Tell me which colour, thing {i}:{obj}",
                        "variant": "wording",
                        "base_id": f"{cond}-{i}",
                    }
                )
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def plant(cfg) -> None:
    """Each object's embedding row := 4 x its class word's (the process's model cache)."""
    lm = load_model(OmegaConf.to_container(cfg.model, resolve=True))
    emb = lm.model.model.embed_tokens
    weight = np.array(emb.weight)
    for word, obj in OBJECTS.items():
        (src,) = lm.tokenizer.encode(f" {word}", add_special_tokens=False)
        (dst,) = lm.tokenizer.encode(obj, add_special_tokens=False)
        weight[dst] = 4.0 * weight[src]
    emb.weight = mx.array(weight)


def planted_overrides(root: Path, dataset: Path) -> list[str]:
    """The planted model (a tiny seed of its own: its weights stay out of other tests) on
    plain prompts ending in the object."""
    return [
        "model=tiny_random",
        "model.tiny.seed=7",
        f"concept.dataset={dataset}",
        "concept.fewshot=[]",
        "concept.instruction='{text}'",
        "prompts.format=plain",
        "model.prompt_format=plain",
        "score.swap={green: red, red: green}",
        "score.controls=[control]",
        "score.fluency.max_tokens=6",
        f"paths.outputs={root / 'outputs'}",
    ]
