"""Shared fixtures. Importing ``pipeline`` first loads the optimized BLAS before mlx."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

import pipeline  # noqa: F401  (BLAS before mlx)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """One folder per module: the dataset and an artifact store shared by the cases."""
    from tests.helpers import write_dataset

    root = tmp_path_factory.mktemp("bad_input")
    write_dataset(root / "d.jsonl", n_per_class=4, conditions=("green", "red", "control"))
    return root


@pytest.fixture
def cli_run(workdir, monkeypatch, capsys):
    """Run ``mlx-interp <base overrides> <extra>`` in-process: (exit status, stderr).

    A failing run (exit status not 0) must leave every artifact completed before it as it
    was: the store is snapshotted (sha256 of every file) before and compared after.
    """
    import pipeline.cli as cli
    from tests.helpers import _base, changed_artifacts, store_snapshot

    root_logger = logging.getLogger()
    handlers, level = list(root_logger.handlers), root_logger.level

    def run(*extra: str, base: list[str] | None = None) -> tuple[int, str]:
        given = {e.split("=", 1)[0].lstrip("+") for e in extra}  # extra replaces a base one
        base = [b for b in (base or _base(workdir)) if b.split("=", 1)[0] not in given]
        flags = [e for e in extra if e.startswith("-")]  # -m and the like go first
        argv = [*flags, *base, *(e for e in extra if not e.startswith("-"))]
        outputs = next((a.split("=", 1)[1] for a in argv if a.startswith("paths.outputs=")), None)
        store = Path(outputs or workdir / "outputs").expanduser() / "artifacts"
        before = store_snapshot(store)
        monkeypatch.setattr(sys, "argv", ["mlx-interp", *argv])
        try:
            cli.main()
            code = 0
        except SystemExit as stop:
            code = stop.code
        finally:
            root_logger.handlers[:] = handlers  # Hydra reconfigures logging per run
            root_logger.setLevel(level)
        err = capsys.readouterr().err
        if code not in (0, None):
            changed = changed_artifacts(before, store_snapshot(store))
            assert not changed, f"a failed run changed earlier artifacts: {changed[:5]}"
        return code, err

    return run
