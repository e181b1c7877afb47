"""`make bench`: speed and memory ratios measured in one run on the embedded model (SmolLM2-135M).

Each measurement runs in a fresh subprocess (the BLAS is chosen at process start; peak RSS is
per process), and every figure is a ratio of two timings taken on this machine in this run,
interleaved where both sides run in one process. Prints a table and writes
outputs/bench/bench.json. ``--full`` adds the default experiment's wall time without the fixes
(reference BLAS and 4-bit weights; about 10 minutes on a 2-core machine).

    python bench/run.py            # the table (about 5 minutes on a 2-core machine)
    python bench/run.py --full     # + the experiment with and without the fixes
    python bench/run.py --only parquet,generate   # some sections
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import patching as patching_bench  # noqa: E402
from bench import stages  # noqa: E402
from bench.stats import best_of, interleaved, paired_median, ratio  # noqa: E402

SECTIONS = (
    "forward",
    "import_order",
    "generate",
    "parquet",
    "batch",
    "torch",
    "experiment",
    "memory",
    "patching",  # bench/patching.py: heatmaps beside TransformerLens and nnsight
    "stages",  # bench/stages.py: stages / capture, sweeps after a cached run (issue 18)
    "load",  # bench/stages.py: second model load (model load cache)
)
# the reduced default experiment behind the cached re-run and the with/without-fixes figure
REDUCED = ["steer.n_random=2", "steer.confirm_n=0"]
MODEL = {"name": "smollm2_135m", "source": "embedded"}


# --- workers: each runs in its own process -------------------------------------------------


def _load(dequantize: str = "auto"):
    from mlx_interp.blas import ensure_fast_blas

    blas = ensure_fast_blas()  # before mlx is imported
    from mlx_interp.models.loading import load_model

    return blas, load_model({**MODEL, "dequantize": dequantize})


def _tokens(batch: int, seq: int):
    import mlx.core as mx

    mx.random.seed(0)
    return mx.random.randint(100, 40000, (batch, seq))


def worker_forward(dequantize: str, batch: int, seq: int, capture: bool) -> dict:
    """matmul GFLOP/s, bare forward tokens/s and (if asked) all-layer capture tokens/s."""
    blas, lm = _load(dequantize)
    import mlx.core as mx

    from mlx_interp.interventions.capture import capture_batch

    a = mx.random.normal((2048, 2048))
    mx.eval(a)
    t_mm = best_of(lambda: mx.eval(a @ a), repeat=3)
    tokens = _tokens(batch, seq)
    seqs = tokens.tolist()
    layers = list(range(lm.n_layers))

    def bare():
        mx.eval(lm.model.model(tokens))  # the transformer body, as capture runs it

    def cap():
        capture_batch(lm.model, seqs, layers, "last")

    out = {"blas": blas.name, "dequantized": lm.dequantized}
    out["matmul_gflops"] = 2 * 2048**3 / t_mm / 1e9
    if capture:
        times = interleaved({"bare": bare, "capture": cap}, repeat=4)
        out["forward_tokens_per_s"] = batch * seq / times["bare"]
        out["capture_tokens_per_s"] = batch * seq / times["capture"]
    else:
        out["forward_tokens_per_s"] = batch * seq / best_of(bare, repeat=2, budget_s=20)
    return out


def worker_generate(max_tokens: int) -> dict:
    """Greedy tokens/s: pipeline's steered generation vs mlx-lm's own stream_generate."""
    _, lm = _load()
    import mlx.core as mx
    import numpy as np
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    from mlx_interp.interventions.steering import LayerEdit, ReflectMode, generate_steered, steer

    model, tok = lm.model, lm.tokenizer
    chat = [{"role": "user", "content": "Write a long story about a red fox in a green forest."}]
    prompt = tok.apply_chat_template(chat, add_generation_prompt=True)
    rng = np.random.default_rng(0)
    edit = LayerEdit(
        lm.n_layers // 2,
        rng.standard_normal(lm.d_model).astype(np.float32) * 0.1,
        np.zeros(lm.d_model, np.float32),
    )
    greedy = make_sampler(temp=0.0)
    counts = {}

    def bare():
        n = 0
        for _ in stream_generate(
            model, tok, mx.array(prompt), max_tokens=max_tokens, sampler=greedy
        ):
            n += 1
        counts["bare"] = n

    def steered():
        counts["steered"] = len(
            generate_steered(model, tok, prompt, [edit], ReflectMode(), 1.0, max_tokens)[1]
        )

    def steered_stream():
        n = 0
        with steer(model, [edit], ReflectMode(), 1.0):
            for _ in stream_generate(
                model, tok, mx.array(prompt), max_tokens=max_tokens, sampler=greedy
            ):
                n += 1
        counts["steer_stream"] = n

    fns = {"bare": bare, "steered": steered, "steer_stream": steered_stream}
    rounds: dict = {}
    times = interleaved(fns, repeat=5, rounds=rounds)
    return {
        "prompt_tokens": len(prompt),
        "tokens": counts,
        "tokens_per_s": {k: counts[k] / times[k] for k in fns},
        "paired_median": {k: paired_median(rounds, k, "bare") for k in ("steered", "steer_stream")},
    }


def _hf_model():
    """transformers' model from the same GGUF (float32, CPU), or the reason it is skipped."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
    except ImportError as err:
        return None, f"torch/transformers not installed ({err.name})"
    from mlx_interp.models.gguf import embedded_gguf_path

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    path = embedded_gguf_path()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    except Exception as err:  # missing gguf/accelerate, or an unsupported GGUF
        return None, f"transformers cannot load the GGUF: {type(err).__name__}: {err}"
    return model.eval(), None


def worker_batch(batch: int, seq: int, torch: bool = True) -> dict:
    """Capture throughput at a larger batch: MLX capture, bare body, mx.compile(body), and
    transformers' output_hidden_states on the same GGUF in the same process (interleaved);
    plus the exp-based elementwise ops that explain the gap (MLX vs numpy, same shapes)."""
    _, lm = _load()
    import mlx.core as mx
    import numpy as np
    from mlx_lm.models.activations import swiglu

    from mlx_interp.interventions.capture import capture_batch

    tokens = _tokens(batch, seq)
    seqs = tokens.tolist()
    layers = list(range(lm.n_layers))
    body = lm.model.model
    compiled = mx.compile(body)
    fns = {
        "capture": lambda: capture_batch(lm.model, seqs, layers, "last"),
        "bare": lambda: mx.eval(body(tokens)),
        "compiled_body": lambda: mx.eval(compiled(tokens)),
    }
    out: dict = {}
    hf, skipped = _hf_model() if torch else (None, "not asked (--only without torch)")
    if hf is not None:
        import torch as pt

        ids = pt.tensor(seqs)

        def hidden():
            with pt.inference_mode():
                hf.model(ids, output_hidden_states=True)

        fns["transformers_hidden_states"] = hidden
        out["torch_threads"] = pt.get_num_threads()
    else:
        out["transformers_skipped"] = skipped
    rounds: dict = {}
    times = interleaved(fns, repeat=5, rounds=rounds)
    out["tokens_per_s"] = {k: batch * seq / t for k, t in times.items()}
    out["paired_median"] = {k: paired_median(rounds, k, "bare") for k in fns if k != "bare"}
    # per-layer elementwise ops at this shape: SiLU gate of the MLP, softmax of attention
    args = lm.model.args
    gate = mx.random.normal((batch * seq, args.intermediate_size))
    scores = mx.random.normal((batch, args.num_attention_heads, seq, seq))
    mx.eval(gate, scores)
    g, s = np.array(gate), np.array(scores)

    def np_softmax():
        e = np.exp(s - s.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    ops = interleaved(
        {
            "mlx_silu_gate": lambda: mx.eval(swiglu(gate, gate)),
            "numpy_silu_gate": lambda: g / (1 + np.exp(-g)) * g,
            "mlx_softmax": lambda: mx.eval(mx.softmax(scores, axis=-1, precise=True)),
            "numpy_softmax": np_softmax,
        },
        repeat=5,
    )
    out["op_ms"] = {k: t * 1e3 for k, t in ops.items()}
    return out


WORKERS = {
    "forward": worker_forward,
    "generate": worker_generate,
    "batch": worker_batch,
    "load": stages.worker_load,
}


def run_worker(name: str, env: dict | None = None, **kwargs) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", name, json.dumps(kwargs)],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- sections run from the parent process ---------------------------------------------------


MATMUL = (
    "import time; a = mx.random.normal((1024, 1024)); mx.eval(a @ a); t = time.perf_counter()\n"
    "for _ in range(10): mx.eval(a @ a)\n"
    "print(2 * 1024**3 * 10 / (time.perf_counter() - t) / 1e9)"
)


def section_import_order() -> dict:
    """Both import orders: mlx_interp first (fast BLAS), mlx first (refused with the fix),
    and mlx first accepted with MLX_INTERP_BLAS=none (what the slow order would compute at)."""

    def run(first: str, env: dict | None = None) -> subprocess.CompletedProcess:
        code = f"{first}\nimport mlx.core as mx\n{MATMUL}"
        return subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
        )

    fast = run("import mlx_interp")
    late = run("import mlx.core\nimport mlx_interp")
    accepted = run("import mlx.core\nimport mlx_interp", {"MLX_INTERP_BLAS": "none"})
    for name, proc in (("mlx_interp first", fast), ("MLX_INTERP_BLAS=none", accepted)):
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{proc.stderr[-2000:]}")
    return {
        "mlx_interp_first_gflops": float(fast.stdout.split()[-1]),
        "mlx_first_refused": late.returncode != 0 and "BlasOrderError" in late.stderr,
        "mlx_first_message": (late.stderr.strip().splitlines() or [""])[-1],
        "mlx_first_accepted_gflops": float(accepted.stdout.split()[-1]),
    }


def section_parquet() -> dict:
    from bench.parquet import parquet_vs_npsave

    return parquet_vs_npsave()


def run_cli(args: list[str], env: dict | None = None) -> tuple[float, str]:
    """Run `mlx-interp` with ``args`` in a subprocess; (wall seconds, stdout)."""
    exe = Path(sys.executable).with_name("mlx-interp")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mlx_interp.apps.cli"]
    start = time.perf_counter()
    proc = subprocess.run(
        cmd + args, env={**os.environ, **(env or {})}, capture_output=True, text=True, cwd=ROOT
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"mlx-interp {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


def _capture_share(outputs: Path) -> dict:
    """Parquet write seconds / capture stage seconds, from the capture artifact's manifest."""
    for manifest in (outputs / "artifacts" / "capture").glob("*/_manifest.json"):
        timing = json.loads(manifest.read_text()).get("summary", {}).get("timing")
        if timing:
            return {**timing, "write_share": timing["write_seconds"] / timing["seconds"]}
    return {}


def _verify_cost(store: Path) -> dict:
    """Seconds to sha256 every file of every artifact (what a cached re-run checks), best of 3."""
    import hashlib

    files = [p for p in store.rglob("*") if p.is_file() and ".locks" not in p.parts]

    def digest_all() -> None:
        for path in files:
            with open(path, "rb", buffering=0) as f:
                h = hashlib.sha256()
                while block := f.read(1 << 20):
                    h.update(block)

    return {
        "seconds": best_of(digest_all, 3),
        "files": len(files),
        "mb": sum(p.stat().st_size for p in files) / 1e6,
    }


def section_experiment(tmp: Path, full: bool) -> dict:
    """The reduced default experiment computed, then re-run fully cached; --full: without the
    fixes (reference BLAS, 4-bit weights) on the same reduced job."""
    out = tmp / "fixed"
    args = [f"paths.outputs={out}", *REDUCED]
    first, _ = run_cli(args)
    second, stdout = run_cli(args)
    result = {
        "reduced": " ".join(REDUCED),
        "first_run_s": first,
        "cached_rerun_s": second,
        "all_cached": "nothing recomputed" in stdout,
        "capture_stage": _capture_share(out),
        "verify": _verify_cost(out / "artifacts"),
    }
    if full:
        # quoted: a bare false would reach the config as a bool
        unfixed = [f"paths.outputs={tmp / 'unfixed'}", *REDUCED, "model.dequantize='false'"]
        try:
            result["unfixed_run_s"], _ = run_cli(unfixed, {"MLX_INTERP_BLAS": "none"})
        except RuntimeError as err:
            result["unfixed_error"] = str(err)
    return result


def section_memory(tmp: Path, factor: int = 10, every: int = 4) -> dict:
    """Peak RSS of the capture-only experiment on every ``every``-th colour-swap prompt and on
    ``factor`` times as many (those rows repeated under new ids), each in a fresh process."""
    from bench.stats import repeated_dataset

    source = ROOT / "datasets" / "color_swap.jsonl"
    out = {}
    for k in (1, factor):
        data = repeated_dataset(source, k, tmp / f"prompts_x{k}.jsonl", every)
        args = [
            "experiment=capture_only",
            f"concept.dataset={data}",
            f"paths.outputs={tmp / f'mem{k}'}",
        ]
        code = (
            "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
            "stdout=subprocess.DEVNULL); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
        )
        exe = Path(sys.executable).with_name("mlx-interp")
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", code, str(exe), *args], capture_output=True, text=True, cwd=ROOT
        )
        if proc.returncode != 0:
            raise RuntimeError(f"capture x{k} failed:\n{proc.stderr[-3000:]}")
        n_rows = sum(1 for _ in data.open())
        out[f"x{k}"] = {
            "prompts": n_rows,
            "peak_rss_mb": int(proc.stdout.split()[-1]) / 1024,
            "wall_s": time.perf_counter() - start,
            "capture_stage": _capture_share(tmp / f"mem{k}"),
        }
    return out


# --- the table --------------------------------------------------------------------------------


def figures(res: dict) -> list[tuple[str, float | None, str, str]]:
    """(figure, value, goal, note) rows from the raw results."""
    rows = []
    fwd = res.get("forward")
    if fwd:
        fast, ref, quant, rq = (fwd[k] for k in ("fast", "reference", "quantized", "ref_quant"))
        rows += [
            (
                "capture all layers (last token) time / bare forward time",
                ratio(fast["forward_tokens_per_s"], fast["capture_tokens_per_s"]),
                "<= 1.05",
                "",
            ),
            (
                "prefill tokens/s, optimized BLAS / reference BLAS (float32)",
                ratio(fast["forward_tokens_per_s"], ref["forward_tokens_per_s"]),
                "",
                "",
            ),
            (
                "prefill tokens/s, float32 / 4-bit weights (optimized BLAS)",
                ratio(fast["forward_tokens_per_s"], quant["forward_tokens_per_s"]),
                "",
                "",
            ),
            (
                "prefill tokens/s, both fixes / neither",
                ratio(fast["forward_tokens_per_s"], rq["forward_tokens_per_s"]),
                "",
                f"{fast['forward_tokens_per_s']:.0f} vs {rq['forward_tokens_per_s']:.1f} tok/s",
            ),
            (
                "matmul GFLOP/s, optimized / reference BLAS",
                ratio(fast["matmul_gflops"], ref["matmul_gflops"]),
                "",
                f"{fast['matmul_gflops']:.0f} vs {ref['matmul_gflops']:.1f} GFLOP/s",
            ),
        ]
    order = res.get("import_order")
    if order:
        fast, slow = order["mlx_interp_first_gflops"], order["mlx_first_accepted_gflops"]
        rows += [
            (
                "matmul GFLOP/s, mlx_interp imported first / mlx first (MLX_INTERP_BLAS=none)",
                ratio(fast, slow),
                "",
                f"{fast:.0f} vs {slow:.1f} GFLOP/s",
            ),
            (
                "mlx imported first without MLX_INTERP_BLAS=none: refused with the fix (1 = yes)",
                float(order["mlx_first_refused"]),
                "1",
                "BlasOrderError names the fix",
            ),
        ]
    gen = res.get("generate")
    if gen:
        tps = gen["tokens_per_s"]
        rows += [
            (
                "steered generation tok/s (generate_steered) / mlx-lm stream_generate",
                ratio(tps["steered"], tps["bare"]),
                ">= 0.97",
                f"{tps['steered']:.1f} vs {tps['bare']:.1f} tok/s, {gen['tokens']['bare']} tokens"
                + _paired(gen, "steered"),
            ),
            (
                "steer() around stream_generate / stream_generate",
                ratio(tps["steer_stream"], tps["bare"]),
                ">= 0.97",
                _paired(gen, "steer_stream").lstrip("; "),
            ),
        ]
    pq = res.get("parquet")
    if pq:
        for dt in ("float32", "float16"):
            r = pq[dt]
            rows.append(
                (
                    f"Parquet write MB/s / np.save MB/s, {dt} 1000x30x576",
                    r["ratio"],
                    ">= 0.3",
                    f"{r['parquet_mb_s']:.0f} vs {r['npsave_mb_s']:.0f} MB/s (fsync both); "
                    f"list column: {r['list_ratio']:.2f}x",
                )
            )
    exp = res.get("experiment")
    mem = res.get("memory")
    share = (mem or {}).get(f"x{10}", {}).get("capture_stage") or (exp or {}).get("capture_stage")
    if share:
        rows.append(
            (
                "Parquet writing share of the capture stage's wall time",
                share["write_share"],
                "< 0.05",
                f"{share['write_seconds']:.2f} of {share['seconds']:.1f} s",
            )
        )
    if exp:
        rows.append(
            (
                "fully cached re-run of the default experiment, seconds",
                exp["cached_rerun_s"],
                "< 3",
                f"first run reduced ({exp['reduced']}): {exp['first_run_s']:.0f} s",
            )
        )
        ver, cap = exp.get("verify"), exp.get("capture_stage") or {}
        if ver:
            rows.append(
                (
                    "sha256 check of every artifact file / fully cached re-run",
                    ratio(ver["seconds"], exp["cached_rerun_s"]),
                    "",
                    f"{ver['seconds']:.3f} s for {ver['files']} files, {ver['mb']:.1f} MB",
                )
            )
        if "hash_seconds" in cap:
            rows.append(
                (
                    "sealing capture parts (sha256) / capture stage wall time",
                    ratio(cap["hash_seconds"], cap["seconds"]),
                    "<= 0.05",
                    f"{cap['hash_seconds']:.3f} of {cap['seconds']:.1f} s",
                )
            )
        if "unfixed_run_s" in exp:
            rows.append(
                (
                    "experiment wall time without the fixes / with them",
                    ratio(exp["unfixed_run_s"], exp["first_run_s"]),
                    ">= 5",
                    f"{exp['unfixed_run_s']:.0f} vs {exp['first_run_s']:.0f} s, "
                    f"same reduced job ({exp['reduced']})",
                )
            )
    if mem:
        one, ten = mem["x1"], mem["x10"]
        rows.append(
            (
                "peak RSS, capture of 10x the prompts / 1x",
                ratio(ten["peak_rss_mb"], one["peak_rss_mb"]),
                "~1 (flat)",
                f"{one['peak_rss_mb']:.0f} MB ({one['prompts']} prompts) vs "
                f"{ten['peak_rss_mb']:.0f} MB ({ten['prompts']})",
            )
        )
    bat = res.get("batch")
    if bat:
        shape, tps, ops = res["batch_shape"], bat["tokens_per_s"], bat["op_ms"]
        rows += [
            (
                f"capture / bare forward tok/s, batch {shape}",
                ratio(tps["capture"], tps["bare"]),
                ">= 0.95",
                f"{tps['capture']:.0f} vs {tps['bare']:.0f} tok/s" + _paired(bat, "capture"),
            ),
            (
                f"mx.compile(body) / plain body tok/s, batch {shape}",
                ratio(tps["compiled_body"], tps["bare"]),
                "",
                "not adopted (docs/speed.md)" + _paired(bat, "compiled_body"),
            ),
        ]
        if "transformers_hidden_states" in tps:
            hs = tps["transformers_hidden_states"]
            rows.append(
                (
                    f"MLX capture / transformers output_hidden_states tok/s, batch {shape}",
                    ratio(tps["capture"], hs),
                    ">= 1",
                    f"{tps['capture']:.0f} vs {hs:.0f} tok/s, torch threads {bat['torch_threads']}",
                )
            )
        else:
            rows.append(
                (
                    "MLX capture / transformers output_hidden_states",
                    None,
                    ">= 1",
                    f"skipped: {bat['transformers_skipped']}; pip install -e '.[bench]'",
                )
            )
        rows += [
            (
                "MLX SiLU gate time / numpy (exp-based, per layer)",
                ratio(ops["mlx_silu_gate"], ops["numpy_silu_gate"]),
                "",
                f"{ops['mlx_silu_gate']:.1f} vs {ops['numpy_silu_gate']:.1f} ms",
            ),
            (
                "MLX softmax time / numpy (attention scores, per layer)",
                ratio(ops["mlx_softmax"], ops["numpy_softmax"]),
                "",
                f"{ops['mlx_softmax']:.1f} vs {ops['numpy_softmax']:.1f} ms",
            ),
        ]
    rows += patching_bench.figures(res["patching"]) if "patching" in res else []
    return rows + stages.figures(res, ratio)


def _paired(res: dict, name: str) -> str:
    """The paired-median ratio of ``name`` (bench.stats.paired_median), as a note."""
    value = res.get("paired_median", {}).get(name)
    return "" if value is None else f"; paired median {value:.3f}"


def print_table(rows) -> None:
    width = max(len(r[0]) for r in rows)
    print(f"\n{'figure':{width}s}  {'measured':>9s}  {'goal':9s}  note")
    for name, value, goal, note in rows:
        shown = "skipped" if value is None else f"{value:9.3g}"
        print(f"{name:{width}s}  {shown:>9s}  {goal:9s}  {note}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("kwargs", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help="forward section shape")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--big", default="8x128", help="batch section shape (vs transformers)")
    parser.add_argument("--max-tokens", type=int, default=64, help="generation section length")
    parser.add_argument("--full", action="store_true", help="+ the experiment without the fixes")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "bench" / "bench.json"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](**json.loads(args.kwargs or "{}"))))
        return
    only = set(args.only.split(","))
    unknown = only - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; valid: {', '.join(SECTIONS)}")
    big_b, big_s = (int(x) for x in args.big.split("x"))
    res: dict = {"shape": {"batch": args.batch, "seq": args.seq}, "batch_shape": args.big}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mlx-interp-bench-") as tmp:
        tmp = Path(tmp)
        steps = [
            (
                "forward",
                lambda: {
                    "fast": run_worker(
                        "forward",
                        None,
                        dequantize="auto",
                        batch=args.batch,
                        seq=args.seq,
                        capture=True,
                    ),
                    "quantized": run_worker(
                        "forward",
                        None,
                        dequantize="false",
                        batch=args.batch,
                        seq=args.seq,
                        capture=False,
                    ),
                    "reference": run_worker(
                        "forward",
                        {"MLX_INTERP_BLAS": "none"},
                        dequantize="auto",
                        batch=args.batch,
                        seq=args.seq,
                        capture=False,
                    ),
                    "ref_quant": run_worker(
                        "forward",
                        {"MLX_INTERP_BLAS": "none"},
                        dequantize="false",
                        batch=args.batch,
                        seq=args.seq,
                        capture=False,
                    ),
                },
            ),
            ("import_order", section_import_order),
            ("generate", lambda: run_worker("generate", max_tokens=args.max_tokens)),
            ("parquet", section_parquet),
            ("batch", lambda: run_worker("batch", batch=big_b, seq=big_s, torch="torch" in only)),
            ("experiment", lambda: section_experiment(tmp, args.full)),
            ("memory", lambda: section_memory(tmp)),
            ("patching", patching_bench.section),
            ("stages", lambda: stages.section_stages(tmp, run_cli)),
            ("load", lambda: stages.section_load(tmp, run_worker)),
        ]
        for name, step in steps:
            if name not in only:
                continue
            t = time.perf_counter()
            print(f"bench: {name} ...", flush=True)
            try:
                res[name] = step()
            except Exception as err:  # one failed section must not hide the others
                print(f"bench: {name} failed: {err}", file=sys.stderr, flush=True)
                res.setdefault("errors", {})[name] = str(err)
            res.setdefault("seconds", {})[name] = round(time.perf_counter() - t, 1)
    res["total_seconds"] = round(time.perf_counter() - started, 1)
    rows = figures(res)
    res["table"] = [{"figure": n, "value": v, "goal": g, "note": note} for n, v, g, note in rows]
    fast = res.get("forward", {}).get("fast", {})
    print(
        f"\nSmolLM2-135M on {os.cpu_count()} CPU cores, BLAS: {fast.get('blas', '?')}; "
        f"forward shape {args.batch}x{args.seq}; {res['total_seconds']:.0f} s"
    )
    print_table(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
