"""`mlx-interp-chat` driven as a person would: through a pseudo-terminal with pexpect."""

import re
import sys
from pathlib import Path

import numpy as np
import pytest

from mlx_interp.analysis.directions import DirectionSet
from mlx_interp.apps.chat import ChatError, model_overrides, parse_steer_args
from tests.helpers import compose_config

pexpect = pytest.importorskip("pexpect")

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "you> "
ANSWER = re.compile(r"model(?: \[[^\]]*\])?> ")


def spawn_chat(*args: str, timeout: int = 120):
    """The chat in a pseudo-terminal (``python -m mlx_interp.apps.chat``: the script's code)."""
    child = pexpect.spawn(
        sys.executable,
        ["-m", "mlx_interp.apps.chat", *args],
        cwd=str(ROOT),
        encoding="utf-8",
        timeout=timeout,
        dimensions=(50, 400),  # wide: the terminal does not wrap long answers
    )
    child.expect_exact(PROMPT)
    return child


def command(child, line: str) -> str:
    """Type ``line``; return what the chat printed before the next prompt."""
    child.sendline(line)
    child.expect_exact(PROMPT)
    return child.before.split("\n", 1)[-1].strip()  # drop the echoed input line


def ask(child, question: str) -> str:
    """Type a question; return the streamed answer (text after the ``model ...>`` label)."""
    child.sendline(question)
    child.expect(ANSWER)
    child.expect_exact(PROMPT)
    return child.before.strip()


def tiny_set(path: Path, layers, d: int) -> Path:
    rng = np.random.default_rng(0)
    vectors = {k: rng.standard_normal(d) for k in layers}
    pos = {k: rng.standard_normal(d) for k in layers}
    neg = {k: rng.standard_normal(d) for k in layers}
    DirectionSet(vectors, pos, neg, "mean_diff", ("a", "b")).save(path)
    return path


def test_parse_steer_args():
    assert parse_steer_args(["d.safetensors", "layer=8,9", "alpha=2"]) == (
        "d.safetensors",
        {"layer": "8,9", "alpha": "2"},
    )
    assert parse_steer_args(["layers=3", "mode=add"]) == (None, {"layer": "3", "mode": "add"})
    with pytest.raises(ChatError, match="unknown option 'alhpa'"):
        parse_steer_args(["alhpa=2"])
    with pytest.raises(ChatError, match="one direction file at a time"):
        parse_steer_args(["a.safetensors", "b.safetensors"])


def test_model_overrides():
    assert model_overrides(None) == []
    assert model_overrides("tiny_random") == ["model=tiny_random"]
    assert model_overrides("/m/x.gguf")[:2] == ["model=gguf", "model.path=/m/x.gguf"]
    assert "model.path=/m/folder" in model_overrides("/m/folder")


def test_commands_and_errors_keep_the_chat_alive(tmp_path):
    """Tiny random model: every bad command prints one clear error and the chat goes on."""
    good = tiny_set(tmp_path / "tiny.safetensors", range(8), d=32)  # layers 4-7: past the model
    wide = tiny_set(tmp_path / "wide.safetensors", [1], d=576)
    child = spawn_chat("--model", "tiny_random", "--max-tokens", "4")
    out = command(child, f"/steer {tmp_path / 'missing.safetensors'} layer=1")
    assert "error: no direction file at" in out
    assert "error: say which layer" in command(child, f"/steer {good}")
    assert "error: no direction for layer(s) [9]" in command(child, f"/steer {good} layer=9")
    assert re.search(r"error: .*layer.*7", command(child, f"/steer {good} layer=7"))
    assert "hidden size (d_model) is 32" in command(child, f"/steer {wide} layer=1")
    assert "unknown steering mode 'bogus'" in command(child, f"/steer {good} layer=1 mode=bogus")
    assert "error: alpha must be a number" in command(child, f"/steer {good} layer=1 alpha=x")
    assert "error: unknown command /bogus" in command(child, "/bogus")
    assert "usage: /temp" in command(child, "/temp hot")
    assert "error: no steering loaded" in command(child, "/on")
    assert "steering: off (nothing loaded)" in command(child, "/status")
    child.sendline("hello there")
    child.expect_exact("model> ")  # unsteered label
    child.expect_exact(PROMPT)
    out = command(child, f"/steer {good} layer=1,2 alpha=2 mode=reflect")
    assert "steering on: reflect L1,2 a2" in out
    child.sendline("hello again")
    child.expect_exact("model [reflect L1,2 a2]> ")
    child.expect_exact(PROMPT)
    assert "steering on: add L1,2 a3" in command(child, "/steer alpha=3 mode=add")
    status = command(child, "/status")
    assert "steering: on: add L1,2 a3" in status and "history: 2 turn(s)" in status
    assert "steering off" in command(child, "/off")
    assert "history cleared" in command(child, "/reset")
    assert "history: 0 turn(s)" in command(child, "/status")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.slow
def test_colorblind_preset_changes_the_answer(tmp_path):
    """SmolLM2: ask, switch the colour-blind preset on, ask again: green becomes red."""
    question = "What colour is grass? Answer with one word."
    child = spawn_chat("--fewshot", "--override", f"paths.outputs={tmp_path}", timeout=600)
    before = ask(child, question)
    out = command(child, "/preset colorblind")
    steer = compose_config([]).steer  # the default experiment's setting (model_concept)
    where = "" if steer.positions == "all" else f" @{steer.positions}"
    assert f"steering on: reflect L{steer.layer} a{steer.alpha:g}{where}" in out
    assert "computed and cached" in out  # a fresh artifact store: computed, then cached
    after = ask(child, question)
    assert "green" in before.lower()
    assert after != before and "red" in after.lower()
    assert "steering off" in command(child, "/off")
    assert "history cleared" in command(child, "/reset")
    assert ask(child, question) == before  # unsteered again: the same greedy answer
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    # a second session finds the cached artifact instead of computing it
    child = spawn_chat("--override", f"paths.outputs={tmp_path}", timeout=600)
    assert "using the cached directions artifact" in command(child, "/preset colorblind")
    child.sendline("/quit")
    child.expect(pexpect.EOF)


def test_mode_spec_names_plain_configs_and_keeps_others():
    from mlx_interp.apps.chat_preset import mode_spec

    assert mode_spec({"_target_": "mlx_interp.interventions.steering.ReflectMode"}) == "reflect"
    assert mode_spec("add") == "add"
    cfg = {"_target_": "mlx_interp.interventions.steering.NormPreservingMode", "inner": "add"}
    assert mode_spec(cfg) == cfg


def test_session_steering_changes_the_streamed_reply(tmp_path):
    """In process, tiny model: a strong edit changes the greedy reply; /off restores it."""
    import io

    from mlx_interp.apps.chat import ChatSession
    from mlx_interp.apps.chat_preset import compose
    from mlx_interp.models.loading import load_model

    cfg = compose(["model=tiny_random"])
    out = io.StringIO()
    session = ChatSession(cfg, load_model(cfg["model"]), temp=0.0, max_tokens=6, out=out)
    path = tiny_set(tmp_path / "d.safetensors", range(4), d=32)
    plain = session.answer("hello")
    assert plain and out.getvalue().startswith("model> ")
    session.handle("/reset")
    assert session.handle(f"/steer {path} layer=1 alpha=50 mode=add")
    assert "steering on: add L1 a50" in out.getvalue()
    steered = session.answer("hello")
    assert steered != plain
    session.handle("/off")
    session.handle("/reset")
    assert session.answer("hello") == plain
    assert session.handle("/quit") is False
