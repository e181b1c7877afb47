"""Load the model a config names: the embedded GGUF, any llama GGUF, or any mlx-lm model.

``dequantize: auto`` turns quantized weights into float32 on the CPU device (MLX's CPU
quantized matmul is ~20x slower than a float32 matmul on an optimized BLAS) and keeps them
quantized on Metal/CUDA, where quantized kernels are fast.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from mlx_interp.blas import usable_blas
from mlx_interp.engine.cache import hash_key
from mlx_interp.engine.schema import SOURCES, ModelConfig
from mlx_interp.errors import MlxInterpError
from mlx_interp.models.anatomy import anatomy_of

log = logging.getLogger(__name__)


class ModelLoadError(MlxInterpError, ValueError):
    """The model a config names cannot be loaded; the message says how to fix it."""


@dataclass
class LoadedModel:
    """A model ready for capture and steering."""

    model: nn.Module
    tokenizer: Any  # mlx_lm TokenizerWrapper
    name: str
    n_layers: int
    d_model: int
    dequantized: bool
    prompt_format: str = "chat"  # plain for base models (model.prompt_format)

    @property
    def pad_id(self) -> int:
        """Token used to right-pad batches (never seen by real positions: causal attention)."""
        for attr in ("pad_token_id", "eos_token_id"):
            value = getattr(self.tokenizer, attr, None)
            if isinstance(value, int):
                return value
        return 0


def _gpu_available() -> bool:
    try:
        return mx.metal.is_available() or mx.cuda.is_available()
    except AttributeError:
        return mx.metal.is_available()


def should_dequantize(option: str | bool) -> bool:
    """Resolve the ``dequantize`` option: auto = only when running on the CPU."""
    if isinstance(option, bool):
        return option
    option = str(option).lower()  # `model.dequantize=false` arrives as "False" (a str field)
    if option == "auto":
        return mx.default_device() == mx.cpu or not _gpu_available()
    if option in ("true", "false"):
        return option == "true"
    raise ModelLoadError(f"model.dequantize must be auto, true or false, not {option!r}")


def to_float32(model: nn.Module) -> None:
    """Cast every floating parameter to float32 (MLX's CPU matmul is fastest in float32)."""
    params = tree_map(
        lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p,
        model.parameters(),
    )
    model.update(params)


def source_for_path(path: str | Path) -> str:
    """The model source a path means: ``gguf`` for a .gguf file, ``mlx_lm`` for a folder or a
    Hugging Face id (``owner/name``). Raises :class:`ModelLoadError` for anything else."""
    text = str(path)
    local = Path(text).expanduser()
    if text.endswith(".gguf"):
        return "gguf"
    if local.is_dir():
        return "mlx_lm"
    if local.exists():
        raise ModelLoadError(f"{local} is a file but not a .gguf model; give a .gguf file")
    parts = text.split("/")
    if len(parts) == 2 and all(parts) and not text.startswith((".", "~")):
        return "mlx_lm"
    raise ModelLoadError(
        f"{text!r} is not a model: give a conf/model name (e.g. smollm2_135m), a .gguf file, "
        "a folder saved by mlx-lm, or a Hugging Face id like owner/name"
    )


def model_config(spec: str | Path) -> dict:
    """A ``model`` config slice for ``spec``: a name under conf/model, or a path / hub id
    (its source inferred by :func:`source_for_path`)."""
    from omegaconf import OmegaConf

    from mlx_interp.engine.schema import ModelConfig
    from mlx_interp.resources import CONF_DIR

    text = str(spec)
    named = Path(CONF_DIR) / "model" / f"{text}.yaml"
    schema = OmegaConf.structured(ModelConfig)
    if "/" not in text and named.is_file():
        cfg = OmegaConf.merge(schema, OmegaConf.load(named))
    else:
        source = source_for_path(text)
        name = Path(text).stem if source == "gguf" else text.rstrip("/").split("/")[-1]
        cfg = OmegaConf.merge(schema, {"name": name, "source": source, "path": text})
    return cast(dict, OmegaConf.to_container(cfg, resolve=True))


def _resolve_gguf_path(cfg: dict) -> Path:
    from mlx_interp.models.gguf import EMBEDDED

    if cfg["source"] == "embedded":
        which = cfg.get("embedded") or "smollm2_135m"
        if which not in EMBEDDED:
            raise ModelLoadError(f"model.embedded must be one of {sorted(EMBEDDED)}, not {which!r}")
        return EMBEDDED[which]()
    if not cfg.get("path"):
        raise ModelLoadError("model.source=gguf needs model.path=/path/to/model.gguf")
    path = Path(cfg["path"]).expanduser()
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.gguf"))[:5]
        raise ModelLoadError(
            f"model.path={cfg['path']} is a folder, not a GGUF file; give the .gguf file "
            f"itself ({', '.join(inside) or 'this folder has none'}), or model.source=mlx_lm "
            "for a folder saved by mlx-lm"
        )
    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}; check model.path")
    return path


def _load_mlx_lm(cfg: dict):
    from mlx_lm import load as mlx_lm_load

    ref = cfg.get("path")
    if not ref:
        raise ModelLoadError("model.source=mlx_lm needs model.path (a Hugging Face id or folder)")
    local = Path(ref).expanduser()
    looks_local = local.exists() or ref.startswith((".", "/", "~"))
    if looks_local and not (local / "config.json").is_file():
        raise ModelLoadError(
            f"{local} is not an mlx-lm model folder (no config.json); save one with "
            "mlx_lm.convert or mlx_lm.utils.save, or give a Hugging Face id"
        )
    try:
        kwargs = {"revision": cfg["revision"]} if cfg.get("revision") else {}
        return mlx_lm_load(str(local) if looks_local else ref, **kwargs)
    except Exception as err:  # hub and file errors come in many types
        raise ModelLoadError(
            f"could not load model {ref!r} with mlx_lm.load: {err}. Without network access "
            "use a local folder saved by mlx-lm, or model=smollm2_135m (embedded)"
        ) from err


def _tiny(cfg: dict):
    """A random-weight llama with the embedded tokenizer: for fast smoke tests of the DAG."""
    from mlx_lm.models import llama

    from mlx_interp.models.gguf import embedded_gguf_path
    from mlx_interp.models.gguf_tokenizer import tokenizer_from_gguf

    loaded = mx.load(str(embedded_gguf_path()), return_metadata=True)
    _, meta = cast(tuple[dict[str, mx.array], dict[str, Any]], loaded)
    tokenizer = tokenizer_from_gguf(meta)
    tiny = cfg.get("tiny") or {}
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=int(tiny.get("hidden_size", 32)),
        num_hidden_layers=int(tiny.get("num_layers", 4)),
        intermediate_size=int(tiny.get("intermediate_size", 64)),
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=len(meta["tokenizer.ggml.tokens"]),
        tie_word_embeddings=True,
        max_position_embeddings=int(meta.get("llama.context_length", 8192)),  # a known limit
    )
    mx.random.seed(int(tiny.get("seed", 0)))
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model, tokenizer


_CACHE: dict[str, LoadedModel] = {}


def model_dict(cfg: ModelConfig | Mapping) -> dict:
    """A ``model`` config as a plain dict: a stage's typed ModelConfig, or a mapping."""
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)


def load_model(cfg: ModelConfig | Mapping) -> LoadedModel:
    """Load (once per process) the model described by a ``model`` config (the schema's
    ModelConfig or the same keys in a plain mapping)."""
    usable_blas()  # MLX_INTERP_BLAS naming a library that does not load: an error, not slow
    cfg = model_dict(cfg)
    cache_key = hash_key(cfg)
    if cache_key in _CACHE:
        return _CACHE[cache_key]
    source = cfg.get("source")
    if source not in SOURCES:
        raise ModelLoadError(f"unknown model.source {source!r}; use one of {SOURCES}")
    if cfg.get("prompt_format") not in (None, "chat", "plain"):
        raise ModelLoadError(
            f"model.prompt_format must be chat, plain or null, not {cfg['prompt_format']!r}"
        )
    dequantize = should_dequantize(cfg.get("dequantize", "auto"))
    dequantized = False
    if source in ("embedded", "gguf"):
        from mlx_interp.models.gguf import load_gguf

        # Decoded exactly by models.gguf: float32, or kept quantized where MLX's format is exact.
        model, tokenizer = load_gguf(_resolve_gguf_path(cfg), keep_quantized=not dequantize)
        dequantized, dequantize = dequantize, False
    elif source == "mlx_lm":
        model, tokenizer = _load_mlx_lm(cfg)
    else:
        model, tokenizer = _tiny(cfg)
    if dequantize:
        from mlx_lm.utils import dequantize_model

        before = sum(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
        model = dequantize_model(model)
        to_float32(model)
        mx.eval(model.parameters())
        dequantized = before > 0
        log.info("model %s: dequantized %d quantized layers to float32 (CPU)", cfg["name"], before)
    model.eval()
    layers = anatomy_of(model, cfg.get("anatomy")).layers  # model.anatomy: an unusual layout
    d_model = _d_model(model)
    fmt = cfg.get("prompt_format") or "chat"
    loaded = LoadedModel(model, tokenizer, cfg["name"], len(layers), d_model, dequantized, fmt)
    _CACHE[cache_key] = loaded
    return loaded


def _d_model(model: nn.Module) -> int:
    width = anatomy_of(model).d_model
    if width is None:
        raise ModelLoadError("cannot tell the model's hidden size (no args.hidden_size)")
    return width


def model_fingerprint(cfg: ModelConfig | Mapping) -> dict:
    """Content identity of the weights a model config names, for cache keys."""
    cfg = model_dict(cfg)
    source = cfg.get("source")
    if source in ("embedded", "gguf"):
        from mlx_interp.models.gguf import gguf_sha256  # memoized: the load cache's key too

        return {"weights_sha256": gguf_sha256(_resolve_gguf_path(cfg))}
    if source == "mlx_lm":
        local = Path(str(cfg.get("path", ""))).expanduser()
        if local.is_dir():
            files = sorted(p for p in local.iterdir() if p.is_file())
            return {"files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}}
        return {"hub_id": cfg.get("path"), "revision": cfg.get("revision")}
    return {}
