"""Base models (no chat template, e.g. Gemma 3 270M): model.prompt_format=plain."""

from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from omegaconf import OmegaConf

from pipeline.cli import run_experiment
from pipeline.dag import ConfigError
from stages import prompts
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
        prompts.run(plain, {}, tmp_path)
