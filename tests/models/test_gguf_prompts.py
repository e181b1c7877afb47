"""Base models (no chat template, e.g. Gemma 3 270M): model.prompt_format=plain."""

from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from omegaconf import OmegaConf

from mlx_interp.apps.cli import run_experiment
from mlx_interp.engine.dag import ConfigError, stage_inputs
from mlx_interp.stages import prompts
from tests.helpers import compose_config, write_dataset


def _run(tmp_path: Path, *extra: str) -> Path:
    dataset = write_dataset(tmp_path / "data.jsonl")
    cfg = compose_config(
        [
            "model=tiny_random",
            f"concept.dataset={dataset}",
            "concept.conditions=[green,red]",
            f"paths.outputs={tmp_path / 'outputs'}",
            "pipeline.stages=[prompts]",
            *extra,
        ]
    )
    run_experiment(cfg, tmp_path / "run")
    return next((tmp_path / "outputs" / "artifacts" / "prompts").glob("*/prompts.parquet"))


def test_model_prompt_format_plain_gives_few_shot_text(tmp_path):
    table = pd.read_parquet(_run(tmp_path, "model.prompt_format=plain"))
    text = table["chat_text"].iloc[0]
    assert text.startswith("Q: What colour is a pumpkin? Answer with one word.\nA: Orange.\n\n")
    assert text.endswith("\nA:") and "<|im_start|>" not in text


def test_gemma3_config_is_plain():
    cfg = compose_config(["model=gemma3_270m"])
    assert cfg.model.prompt_format == "plain" and cfg.model.embedded == "gemma3_270m"


def test_chat_format_without_template_is_named(tmp_path, monkeypatch):
    stub = SimpleNamespace(tokenizer=SimpleNamespace(chat_template=None))
    monkeypatch.setattr(prompts, "load_model", lambda cfg: stub)
    dataset = write_dataset(tmp_path / "data.jsonl")
    cfg = compose_config(["model=tiny_random", f"concept.dataset={dataset}"])
    plain = OmegaConf.to_container(cfg, resolve=True)
    with pytest.raises(ConfigError, match="no chat template.*model.prompt_format=plain"):
        prompts.run(stage_inputs(prompts.STAGE, plain), {}, tmp_path)


def test_sentencepiece_tokenizer_from_metadata():
    """A tiny SentencePiece (``llama``) vocabulary: ids equal llama.cpp's best-score merge,
    BOS prepended (add_bos_token absent: on, as in llama.cpp), byte fallback, round trip."""
    from mlx_interp.models.gguf_tokenizer import tokenizer_from_gguf
    from tests.models.gguf_reference import spm_reference

    pieces = ["\u2581", "t", "h", "e", "c", "a", "s", "\u2581t", "he", "\u2581the", "at"]
    pieces += ["\u2581c", "\u2581cat", "\u2581s", "\u2581sat", "\u2581he"]
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], *pieces]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    metadata = {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_space_prefix": True,
    }
    tokenizer = tokenizer_from_gguf(metadata, "llama")
    for text in ["the cat sat", "he sat", "the ü cat"]:
        ids = tokenizer.encode(text)
        assert ids[0] == 1
        assert ids[1:] == spm_reference(" " + text, tokens, scores)  # add_space_prefix
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
