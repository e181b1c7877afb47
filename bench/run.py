"""`make bench`: speed ratios measured in one run on the embedded model (SmolLM2-135M).

Each measurement runs in a fresh subprocess (the BLAS is chosen at process start), and
every figure is printed as a ratio of two timings taken on this machine in this run.
Writes outputs/bench/bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _best(fn, repeat: int = 5) -> float:
    fn()  # warm-up (graph build, allocations)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def worker(dequantize: str, batch: int, seq: int) -> dict:
    """Timings inside one process: matmul, bare forward, capture of all layers."""
    sys.path.insert(0, str(ROOT))
    from pipeline.blas import ensure_fast_blas

    blas = ensure_fast_blas()  # before mlx is imported
    import mlx.core as mx

    from pipeline.capture import capture_batch
    from pipeline.models import load_model

    a = mx.random.normal((2048, 2048))
    mx.eval(a)
    t_mm = _best(lambda: mx.eval(a @ a), repeat=3)
    lm = load_model({"name": "smollm2_135m", "source": "embedded", "dequantize": dequantize})
    mx.random.seed(0)
    tokens = mx.random.randint(100, 40000, (batch, seq))
    seqs = tokens.tolist()
    n_layers = lm.n_layers

    def bare():
        mx.eval(lm.model.model(tokens) if hasattr(lm.model, "model") else lm.model(tokens))

    def capture():
        capture_batch(lm.model, seqs, list(range(n_layers)), "last")

    t_bare = _best(bare)
    t_cap = _best(capture)
    return {
        "blas": blas.name,
        "dequantized": lm.dequantized,
        "matmul_gflops": 2 * 2048**3 / t_mm / 1e9,
        "forward_tokens_per_s": batch * seq / t_bare,
        "capture_tokens_per_s": batch * seq / t_cap,
    }


def run_worker(env_extra: dict, *args: str) -> dict:
    env = {**os.environ, **env_extra}
    out = subprocess.run(
        [sys.executable, __file__, "--worker", *args],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dequantize", default="auto")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.dequantize, args.batch, args.seq)))
        return
    shape = ["--batch", str(args.batch), "--seq", str(args.seq)]
    fast = run_worker({}, "--dequantize", "auto", *shape)
    quant = run_worker({}, "--dequantize", "false", *shape)
    ref = run_worker({"MLX_INTERP_BLAS": "none"}, "--dequantize", "auto", *shape)
    ref_quant = run_worker({"MLX_INTERP_BLAS": "none"}, "--dequantize", "false", *shape)
    ratios = {
        "matmul GFLOP/s, optimized BLAS / reference BLAS": fast["matmul_gflops"]
        / ref["matmul_gflops"],
        "prefill tokens/s, optimized BLAS / reference BLAS (float32 weights)": fast[
            "forward_tokens_per_s"
        ]
        / ref["forward_tokens_per_s"],
        "prefill tokens/s, float32 weights / 4-bit weights (optimized BLAS)": fast[
            "forward_tokens_per_s"
        ]
        / quant["forward_tokens_per_s"],
        "prefill tokens/s, spine defaults / reference BLAS + 4-bit weights": fast[
            "forward_tokens_per_s"
        ]
        / ref_quant["forward_tokens_per_s"],
        "capture all layers (last token) time / bare forward time": fast["forward_tokens_per_s"]
        / fast["capture_tokens_per_s"],
    }
    result = {
        "shape": {"batch": args.batch, "seq": args.seq},
        "runs": {
            "fast": fast,
            "quantized": quant,
            "reference": ref,
            "reference_quantized": ref_quant,
        },
        "ratios": ratios,
    }
    print(f"SmolLM2-135M, batch {args.batch} x {args.seq} tokens, BLAS: {fast['blas']}")
    for name, run in result["runs"].items():
        print(
            f"  {name:20s} matmul {run['matmul_gflops']:7.1f} GFLOP/s  "
            f"forward {run['forward_tokens_per_s']:8.1f} tok/s  "
            f"capture {run['capture_tokens_per_s']:8.1f} tok/s"
        )
    for name, value in ratios.items():
        print(f"  {value:8.2f}x  {name}")
    out = ROOT / "outputs" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    print(f"written: {out / 'bench.json'}")


if __name__ == "__main__":
    main()
