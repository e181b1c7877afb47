"""``mlx-interp-cv``: export, import and show llama.cpp control vectors (GGUF)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mlx_interp.analysis.directions import DirectionError
from mlx_interp.io.control_vectors import (
    export_control_vector,
    import_control_vector,
    load_directions,
    resolve_directions_path,
)


def _parse_layers(text: str | None) -> list[int] | None:
    if text in (None, "", "all"):
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise DirectionError(f"--layers must be 'all' or comma-separated ints, got {text!r}") from e


def main(argv: Sequence[str] | None = None) -> int:
    """``mlx-interp-cv``: export / import / show llama.cpp control vectors."""
    parser = argparse.ArgumentParser(
        prog="mlx-interp-cv", description="llama.cpp control vectors from/to direction sets"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="direction set -> control-vector GGUF")
    exp.add_argument("source", help="directions .safetensors, artifact folder or run folder")
    exp.add_argument("out", help="output .gguf")
    exp.add_argument("--alpha", type=float, default=1.0, help="scale written into the file")
    exp.add_argument("--unit", action="store_true", help="write alpha * unit vector")
    exp.add_argument("--layers", default="all", help="'all' (but 0) or e.g. 8 or 6,8,10")
    exp.add_argument("--model-hint", default="llama", help="the model's GGUF architecture")
    imp = sub.add_parser("import", help="control-vector GGUF -> directions .safetensors")
    imp.add_argument("source", help="control-vector .gguf")
    imp.add_argument("out", help="output .safetensors")
    show = sub.add_parser("show", help="print what a direction or control-vector file holds")
    show.add_argument("source")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            dirset = load_directions(args.source)
            layers = _parse_layers(args.layers)
            written = export_control_vector(
                dirset, args.out, args.alpha, args.unit, layers, args.model_hint
            )
            scale = "alpha * unit vector" if args.unit else "alpha * vector"
            print(
                f"wrote {args.out}: direction.{{{','.join(map(str, written))}}} = {scale}, "
                f"alpha {args.alpha}"
            )
            print(
                f"llama.cpp: llama-cli -m MODEL.gguf --control-vector {args.out} "
                f"[--control-vector-layer-range {written[0]} {written[-1]}]"
            )
        elif args.command == "import":
            dirset = import_control_vector(resolve_directions_path(args.source))
            dirset.save(args.out)
            print(f"wrote {args.out}: layers {dirset.layers}, method {dirset.method}")
        else:
            dirset = load_directions(args.source)
            norms = dirset.norms()
            print(
                f"{args.source}: method {dirset.method}, contrast {dirset.contrast[0]} - "
                f"{dirset.contrast[1]}, d_model {dirset.vectors[dirset.layers[0]].shape[0]}"
            )
            for key in ("model", "artifact_key", "config_key", "model_hint"):
                if dirset.meta.get(key):
                    print(f"  {key}: {dirset.meta[key]}")
            print("  layer norms: " + ", ".join(f"{k}:{norms[k]:.3g}" for k in dirset.layers))
    except (DirectionError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
