"""The sweep summary lists every job: colour-swap columns, or the headline of a probe or
contamination report (so `-m model=a,b experiment=sycophancy_confound` compares models)."""

from __future__ import annotations

import json

from mlx_interp.apps.sweep import write_summary


def _job(root, n, overrides, run, report=None):
    folder = root / str(n)
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(
        "".join(f"- {o}\n" for o in overrides), encoding="utf-8"
    )
    (folder / "run.json").write_text(json.dumps(run))
    if report is not None:  # a probe report's own report.json (not the colour-swap schema)
        (folder / "report.json").write_text(json.dumps(report))


def test_probe_headlines_give_one_row_per_model(tmp_path):
    for n, (model, acc) in enumerate([("smollm2_135m", 1.0), ("gemma3_270m", 0.95)]):
        run = {
            "probes": {"summary": {"n_contrasts": 2}},
            "probe_report": {
                "summary": {
                    "headline": {"name": "pressure best CV accuracy", "value": acc},
                    "best": {"pressure": acc, "sya_vs_ga": 0.425},
                }
            },
        }
        _job(tmp_path, n, [f"model={model}", "experiment=sycophancy_confound"], run, {"x": 1})
    _job(tmp_path, 2, ["model=tiny_random"], {"capture": {"summary": {}}})
    table = write_summary(tmp_path).set_index("job")
    assert table.loc[0, "model"] == "smollm2_135m" and table.loc[1, "model"] == "gemma3_270m"
    assert table["headline_value"].tolist()[:2] == [1.0, 0.95]
    assert table.loc[1, "best_sya_vs_ga"] == 0.425
    assert table.loc[2, "status"] == "no report"
    summary = (tmp_path / "summary.md").read_text()
    assert "pressure best CV accuracy" in summary and "gemma3_270m" in summary
