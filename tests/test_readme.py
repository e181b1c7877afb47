"""The README's first Python block runs verbatim on the embedded model (the library example)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def first_python_block() -> str:
    match = re.search(r"^```python\n(.*?)^```", README.read_text(), re.S | re.M)
    assert match, "the README has no ```python block"
    return match.group(1)


@pytest.mark.slow
def test_the_readme_library_example_runs_verbatim(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    exec(compile(first_python_block(), str(README), "exec"), namespace)
    mi, model, mood = namespace["mi"], namespace["model"], namespace["mood"]
    assert namespace["cache"]["resid_post", 8].shape == (2, model.d_model)
    assert namespace["happy"] != namespace["sad"]  # the two signs steer apart
    back = mi.Direction.load(tmp_path / "mood.safetensors")
    assert back.layers == mood.layers == [12]
    plain = model.generate("How was your weekend?", max_tokens=24)  # the model was restored
    assert plain not in (namespace["happy"], namespace["sad"])
