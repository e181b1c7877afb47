"""Bench section `patching`: a 30-layer x every-position residual patching heatmap on SmolLM2
(the IOI prompt "When John and Mary went to the store, Mary gave the bag to", corrupted by
"..., John gave ...", metric logit(" John") - logit(" Mary") at the last token), computed by
mlx-interp, by TransformerLens and by nnsight on the same CPU and the same weights, each in its
own process; plus the by-hand MLX way (one full forward per patch) and attribution patching's
correlation with real patching on two IOI pairs (every kind: the per-head heatmap is most of
this section's time).

Weights: MLX reads the embedded GGUF itself (dequantized to float32); transformers reads the
same GGUF with ``gguf_file=`` (dequantized to float32 by gguf-py); TransformerLens wraps that
transformers model (``TransformerBridge.boot_transformers(name, hf_model=..., tokenizer=...)``,
no hub access) and runs ``transformer_lens.patching.get_act_patch_resid_pre``; nnsight wraps
it too (``nnsight.TransformersModel(hf_model, tokenizer=...)``) and patches
``model.layers[l].input`` at one position per invoke, one trace (a batch of every position)
per layer. All three get the
same token ids; their heatmaps are compared (max abs difference of the normalised values).
Threads: mlx-interp's patching forwards use one BLAS thread (``patch_batches.BLAS_THREADS``:
MKL's two threads spin against each other on a shared 2-core machine); TransformerLens
and nnsight each run twice, with torch's default thread count and with one thread.

    python bench/patching.py              # this section alone (27 min on 2 busy cores, 2026-12-05)
    python bench/run.py --only patching   # the same, inside `make bench`

Skipped with a message when the `bench` extra (torch, transformers, transformer-lens, nnsight)
is not installed. Workers run from a temporary directory: the repository's own ``datasets``
package would otherwise shadow Hugging Face's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TEMPLATE = "When {io} and {s} went to the store, {s} gave the bag to"
PAIRS = [("John", "Mary"), ("Tom", "Anna")]  # the heatmap: the first; attribution: both
HF_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the GGUF's model (config from the GGUF)


def _ioi(io: str, s: str) -> tuple[str, str]:
    """(clean, corrupted) prompts: the corrupted one names the subject where IO was."""
    clean = TEMPLATE.format(io=io, s=s)
    return clean, clean.replace(f", {s} gave", f", {io} gave")


def _timed(fn, repeat: int) -> tuple[float, object]:
    """Best wall time of ``repeat`` calls (after the first, a warm-up) and the last result;
    the CPU time (user + system, every thread) of the best call goes to ``CPU_SECONDS``."""
    out = fn()
    best, cpu = float("inf"), float("inf")
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = fn()
        wall = time.perf_counter() - start
        if wall < best:
            best, cpu = wall, time.process_time() - start_cpu
    CPU_SECONDS.append(cpu)
    return best, out


CPU_SECONDS: list[float] = []  # of each _timed call in this process, in order


def worker_mlx(repeat: int = 2, extras: bool = True) -> dict:
    """mlx-interp: the heatmap's time; with ``extras`` also the heatmap without skipping
    unchanged positions, the by-hand way (one full forward per patch) and attribution vs
    real patching (per-head patching on layers 15-29 only: all layers is 5x the time)."""
    import mlx_interp as mi  # noqa: I001  (first: the fast BLAS before mlx)
    import mlx.core as mx
    import numpy as np

    from mlx_interp.analysis.attribution import attribution_patching
    from mlx_interp.blas import blas_threads
    from mlx_interp.interventions.patch_batches import BLAS_THREADS
    from mlx_interp.interventions.patching import patching_heatmap, patching_heatmaps
    from mlx_interp.interventions.resume import last_position_logits, record_base, wrapped_calls
    from mlx_interp.models.gguf import embedded_gguf_path

    model = mi.load("smollm2_135m")
    clean, corrupt = _ioi(*PAIRS[0])
    ids = {"clean": model.tokens(clean), "corrupt": model.tokens(corrupt)}
    answers = [model.tokenizer.encode(" " + n, add_special_tokens=False)[0] for n in PAIRS[0]]
    kw = {"answers": tuple(answers)}
    fast_s, heat = _timed(lambda: patching_heatmap(model, clean, corrupt, **kw), repeat)
    out = {
        "gguf": str(embedded_gguf_path()),
        "ids": ids,
        "answers": answers,
        "heatmap": heat.recovery.tolist(),
        "clean_metric": heat.clean_metric,
        "corrupted_metric": heat.corrupted_metric,
        "fast_s": fast_s,
        "fast_cpu_s": CPU_SECONDS[-1],
    }
    if not extras:
        return out
    every_s, every = _timed(
        lambda: patching_heatmap(model, clean, corrupt, skip_unchanged=False, **kw), 1
    )
    width = len(ids["clean"])
    clean_run = record_base(
        model.model, mx.array([ids["clean"]]), [width - 1], ["resid_pre"], False
    )

    def by_hand() -> np.ndarray:  # what a user writes without the library's batching
        tokens = mx.array([ids["corrupt"]])
        values = np.zeros((model.n_layers, width))
        for layer in range(model.n_layers):
            for p in range(width):
                source = clean_run.resid[layer]

                def patch(original, self, x, *args, _p=p, _s=source, **kwargs):
                    x = mx.concatenate([x[:, :_p], _s[:, _p : _p + 1], x[:, _p + 1 :]], axis=1)
                    return original(self, x, *args, **kwargs)

                with wrapped_calls(model.model, {("resid_pre", layer): patch}):
                    logits = last_position_logits(model.model, tokens, [tokens.shape[1] - 1])
                values[layer, p] = (logits[0, answers[0]] - logits[0, answers[1]]).item()
        return values

    start = time.perf_counter()
    with blas_threads(BLAS_THREADS):  # as the library's forwards: the ratio is the batching's
        hand = by_hand()
    hand_s = time.perf_counter() - start
    hand_rec = (hand - heat.corrupted_metric) / (heat.clean_metric - heat.corrupted_metric)
    # attribution patching vs real patching on the IOI pairs (a batch)
    prompts = [_ioi(io, s) for io, s in PAIRS]
    encode = model.tokenizer.encode
    names = [[encode(" " + n, add_special_tokens=False)[0] for n in p] for p in PAIRS]
    batch = {
        "clean": [c for c, _ in prompts],
        "corrupted": [x for _, x in prompts],
        "answers": ([n[0] for n in names], [n[1] for n in names]),
    }
    kinds = ("resid_pre", "resid_post", "attn_out", "mlp_out")
    late = list(range(15, model.n_layers))
    start = time.perf_counter()
    real = patching_heatmaps(model, kinds=kinds, **batch)
    real["z"] = patching_heatmap(model, kind="z", layers=late, **batch)
    real_s = time.perf_counter() - start
    start = time.perf_counter()
    est = attribution_patching(model, kinds=(*kinds, "z"), **batch)
    attribution_s = time.perf_counter() - start
    correlation = {}
    for kind, got in real.items():
        a, b = got.recovery.ravel(), est[kind].recovery[got.layers].ravel()
        keep = (a != 0) | (b != 0)  # positions before the names differ are 0 in both
        correlation[kind] = float(np.corrcoef(a[keep], b[keep])[0, 1])
    return {
        **out,
        "every_position_s": every_s,
        "every_position_max_diff": float(np.abs(every.recovery - heat.recovery).max()),
        "by_hand_s": hand_s,
        "by_hand_max_diff": float(np.abs(hand_rec - heat.recovery).max()),
        "ioi_real_s": real_s,
        "attribution_s": attribution_s,
        "attribution_correlation": correlation,
        "n_pairs_attribution": len(PAIRS),
    }


def _hf(gguf: str):
    """transformers' SmolLM2 from the embedded GGUF (float32) and its tokenizer (mlx_interp
    is not imported here: MLX and torch stay in separate processes)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    path = Path(gguf)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval(), tokenizer


def worker_transformer_lens(
    gguf: str, ids: dict, answers: list, repeat: int = 1, threads: int = 0
) -> dict:
    """TransformerLens: get_act_patch_resid_pre on a TransformerBridge of the same weights;
    ``threads``: torch's thread count (0: torch's default)."""
    import importlib.metadata as md

    import torch

    if threads:
        torch.set_num_threads(threads)
    from transformer_lens import patching
    from transformer_lens.model_bridge import TransformerBridge

    hf, tokenizer = _hf(gguf)
    bridge = TransformerBridge.boot_transformers(HF_NAME, hf_model=hf, tokenizer=tokenizer)
    clean, corrupt = torch.tensor([ids["clean"]]), torch.tensor([ids["corrupt"]])
    io, s = answers
    with torch.inference_mode():
        clean_logits, clean_cache = bridge.run_with_cache(clean)
        corrupt_logits = bridge(corrupt)
    m_clean = float(clean_logits[0, -1, io] - clean_logits[0, -1, s])
    m_corrupt = float(corrupt_logits[0, -1, io] - corrupt_logits[0, -1, s])

    def metric(logits):
        return (logits[0, -1, io] - logits[0, -1, s] - m_corrupt) / (m_clean - m_corrupt)

    def heatmap():
        with torch.inference_mode():
            return patching.get_act_patch_resid_pre(bridge, corrupt, clean_cache, metric)

    seconds, heat = _timed(heatmap, repeat)
    return {
        "version": md.version("transformer-lens"),
        "torch_threads": torch.get_num_threads(),
        "seconds": seconds,
        "cpu_seconds": CPU_SECONDS[-1],
        "heatmap": heat.tolist(),
        "loaded": "TransformerBridge.boot_transformers(hf_model=transformers GGUF model)",
    }


def worker_nnsight(gguf: str, ids: dict, answers: list, repeat: int = 1, threads: int = 0) -> dict:
    """nnsight: model.layers[l].input patched at one position per invoke; a trace per layer
    holds every position (one batched forward), as in nnsight's patching tutorial.
    ``threads``: torch's thread count (0: torch's default)."""
    import importlib.metadata as md

    import nnsight
    import torch

    if threads:
        torch.set_num_threads(threads)

    hf, tokenizer = _hf(gguf)
    lm = nnsight.TransformersModel(hf, tokenizer=tokenizer)
    clean, corrupt = torch.tensor([ids["clean"]]), torch.tensor([ids["corrupt"]])
    n_layers, width = hf.config.num_hidden_layers, clean.shape[1]
    io, s = answers
    with torch.inference_mode():
        m_clean = hf(clean).logits[0, -1]
        m_corrupt = hf(corrupt).logits[0, -1]
    m_clean, m_corrupt = float(m_clean[io] - m_clean[s]), float(m_corrupt[io] - m_corrupt[s])

    def heatmap():
        with torch.inference_mode():
            with lm.trace(clean):
                states = nnsight.save([lm.model.layers[i].input for i in range(n_layers)])
            rows = []
            for layer in range(n_layers):
                outs = []
                with lm.trace() as tracer:
                    for p in range(width):
                        with tracer.invoke(corrupt):
                            lm.model.layers[layer].input[:, p] = states[layer][:, p]
                            outs.append(lm.lm_head.output[:, -1].save())
                rows.append([float(o[0, io] - o[0, s]) for o in outs])
        return torch.tensor(rows)

    seconds, heat = _timed(heatmap, repeat)
    heat = (heat - m_corrupt) / (m_clean - m_corrupt)
    return {
        "version": md.version("nnsight"),
        "torch_threads": torch.get_num_threads(),
        "seconds": seconds,
        "cpu_seconds": CPU_SECONDS[-1],
        "heatmap": heat.tolist(),
        "loaded": "nnsight.TransformersModel(transformers GGUF model)",
    }


PEERS = {  # result key -> (label, after the version)
    "transformer_lens": ("TransformerLens", ""),
    "nnsight": ("nnsight", ""),
    "transformer_lens_1_thread": ("TransformerLens", " (torch on 1 thread)"),
    "nnsight_1_thread": ("nnsight", " (torch on 1 thread)"),
}
WORKERS = {
    "mlx": worker_mlx,
    "transformer_lens": worker_transformer_lens,
    "nnsight": worker_nnsight,
}


def _run(name: str, cwd: str, **kwargs) -> dict:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", name, json.dumps(kwargs)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no message)"]
        return {"error": f"{name} failed: {tail[0]}", "stderr": proc.stderr[-3000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def missing_extra() -> str | None:
    """The first bench-extra package that is not installed (None: all are)."""
    import importlib.util

    for module in ("torch", "transformers", "transformer_lens", "nnsight"):
        if importlib.util.find_spec(module) is None:
            return module
    return None


def section(repeat: int = 2) -> dict:
    """Run every worker in its own process: mlx-interp, TransformerLens, nnsight, then
    mlx-interp's heatmap again (the machine's load drifts: its best of both runs counts);
    heatmaps compared, times as ratios."""
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="mlx-interp-patching-") as cwd:
        res: dict = {"mlx": _run("mlx", cwd, repeat=repeat)}
        if "error" in res["mlx"]:
            return res
        missing = missing_extra()
        if missing is not None:
            res["skipped"] = f"{missing} is not installed: pip install -e '.[bench]'"
            return res
        shared = {k: res["mlx"][k] for k in ("gguf", "ids", "answers")}
        for peer in ("transformer_lens", "nnsight"):
            res[peer] = _run(peer, cwd, **shared)
        # torch on one thread, as mlx-interp's patching forwards (BLAS_THREADS)
        res["transformer_lens_1_thread"] = _run("transformer_lens", cwd, threads=1, **shared)
        res["nnsight_1_thread"] = _run("nnsight", cwd, threads=1, **shared)
        again = _run("mlx", cwd, repeat=repeat, extras=False)
        m = res["mlx"]
        m["fast_s_runs"] = [m["fast_s"], again.get("fast_s")]
        m["fast_cpu_s_runs"] = [m["fast_cpu_s"], again.get("fast_cpu_s")]
        m["fast_s"] = min(t for t in m["fast_s_runs"] if t is not None)
        m["fast_cpu_s"] = min(t for t in m["fast_cpu_s_runs"] if t is not None)
    ours = np.array(res["mlx"]["heatmap"])
    for peer in PEERS:
        if "heatmap" in res.get(peer, {}):
            diff = np.abs(np.array(res[peer]["heatmap"]) - ours).max()
            res[peer]["max_abs_diff_vs_mlx"] = float(diff)
            res[peer]["time_ratio_vs_mlx"] = res[peer]["seconds"] / res["mlx"]["fast_s"]
            res[peer]["cpu_ratio_vs_mlx"] = res[peer]["cpu_seconds"] / res["mlx"]["fast_cpu_s"]
    return res


def figures(res: dict) -> list[tuple[str, float | None, str, str]]:
    """(figure, value, goal, note) rows for bench/run.py's table."""
    m = res.get("mlx", {})
    if "fast_s" not in m:
        return [("patching heatmap", None, "", res.get("mlx", {}).get("error", "not run"))]
    shape = f"{len(m['heatmap'])}x{len(m['heatmap'][0])}"
    runs = ", ".join(f"{t:.1f}" for t in m.get("fast_s_runs", []) if t is not None)
    rows = [
        (f"patching heatmap resid_pre {shape}, seconds (mlx-interp)", m["fast_s"], "", runs),
        (
            "by hand (one full forward per patch) / mlx-interp heatmap time",
            m["by_hand_s"] / m["fast_s"],
            "",
            f"{m['by_hand_s']:.1f} s; max |diff| {m['by_hand_max_diff']:.1e}",
        ),
        (
            "heatmap without skipping unchanged positions / with",
            m["every_position_s"] / m["fast_s"],
            "",
            f"same values (max |diff| {m['every_position_max_diff']:.1e})",
        ),
    ]
    for peer, (label, suffix) in PEERS.items():
        got = res.get(peer, {})
        if "seconds" in got:
            rows.append(
                (
                    f"{label} {got['version']}{suffix} heatmap wall time / mlx-interp",
                    got["time_ratio_vs_mlx"],
                    "> 1",
                    f"{got['seconds']:.1f} s, torch threads {got['torch_threads']}; max |diff| "
                    f"{got['max_abs_diff_vs_mlx']:.1e}",
                )
            )
            rows.append(
                (
                    f"{label} {got['version']}{suffix} heatmap CPU time / mlx-interp",
                    got["cpu_ratio_vs_mlx"],
                    "> 1",
                    f"{got['cpu_seconds']:.1f} vs {m['fast_cpu_s']:.1f} CPU s (all threads)",
                )
            )
        else:
            note = res.get("skipped") or got.get("error", "not run")
            rows.append((f"{label}{suffix} heatmap time / mlx-interp", None, "> 1", note))
    for kind, r in m["attribution_correlation"].items():
        rows.append(
            (
                f"attribution vs real patching, Pearson r, {kind} ({m['n_pairs_attribution']} "
                f"IOI pairs{', layers 15-29' if kind == 'z' else ''})",
                r,
                "",
                f"{m['attribution_s']:.1f} s vs real {m['ioi_real_s']:.1f} s (every kind)"
                if kind == "resid_pre"
                else "",
            )
        )
    return rows


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        print(json.dumps(WORKERS[sys.argv[2]](**json.loads(sys.argv[3]))))
        return
    res = section()
    for name, value, goal, note in figures(res):
        shown = "skipped" if value is None else f"{value:9.3g}"
        print(f"{name:75s} {shown:>9s}  {goal:7s} {note}")
    if res.get("skipped"):
        print(f"peers skipped: {res['skipped']}")
    out = Path(__file__).resolve().parent.parent / "outputs" / "bench" / "patching.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
