"""Build a Hugging Face fast tokenizer from the tokenizer stored in GGUF metadata.

GGUF files carry the whole tokenizer (``tokenizer.ggml.*`` keys), so a GGUF model
needs no ``tokenizer.json``. Two flavours: byte-level BPE (``tokenizer.ggml.model == "gpt2"``:
SmolLM2, Llama 3, Qwen, built here) and SentencePiece (``"llama"``: Llama 2, Mistral, Gemma,
Phi-3, built by transformers' GGUF tokenizer converter from the vocabulary and scores).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.tokenizer_utils import (
    BPEStreamingDetokenizer,
    NaiveStreamingDetokenizer,
    TokenizerWrapper,
)
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from mlx_interp.errors import DataError

logger = logging.getLogger(__name__)


class GGUFError(DataError):
    """A GGUF file is missing, unreadable or describes a model we cannot build."""


# llama.cpp token types that are not ordinary text pieces: 3 = control, 4 = user-defined.
SPECIAL_TOKEN_TYPES = (3, 4)


def _value(metadata: dict, key: str, default: Any = None) -> Any:
    """Metadata value as a Python object (GGUF scalars come back as 0-d mx arrays)."""
    value = metadata.get(key, default)
    if isinstance(value, mx.array):
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def _pre_tokenizer(pre: str | None, add_prefix_space: bool) -> pre_tokenizers.PreTokenizer:
    """Pre-tokenizer matching llama.cpp's ``tokenizer.ggml.pre`` for the gpt2 model."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)
    if pre == "smollm":
        # llama.cpp LLAMA_VOCAB_PRE_TYPE_SMOLLM: single digits, then the GPT-2 regex.
        digits = pre_tokenizers.Digits(individual_digits=True)
        return pre_tokenizers.Sequence([digits, byte_level])
    if pre not in (None, "default", "gpt-2", "gpt2"):
        logger.warning(
            "GGUF pre-tokenizer %r is not implemented; using plain GPT-2 byte-level "
            "splitting, so token ids may differ from llama.cpp on some inputs",
            pre,
        )
    return byte_level


def _special_tokens(tokens: list[str], token_types: list[int] | None) -> list[AddedToken]:
    """Control and user-defined tokens, which must never be split by BPE."""
    if token_types is None:
        return []
    return [
        AddedToken(tokens[i], special=True, normalized=False)
        for i, kind in enumerate(token_types)
        if kind in SPECIAL_TOKEN_TYPES
    ]


def _token(tokens: list[str], metadata: dict, key: str) -> str | None:
    """Token string for the id stored under ``tokenizer.ggml.<key>``, if any."""
    token_id = _value(metadata, f"tokenizer.ggml.{key}")
    if token_id is None or not 0 <= int(token_id) < len(tokens):
        return None
    return tokens[int(token_id)]


def build_tokenizer(metadata: dict) -> Tokenizer:
    """Raw ``tokenizers.Tokenizer`` (byte-level BPE) from GGUF tokenizer metadata."""
    kind = _value(metadata, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(
            f"GGUF tokenizer model {kind!r} is not supported here (only 'gpt2' byte-level BPE); "
            "convert the original Hugging Face model with `python -m mlx_lm.convert` instead"
        )
    tokens = _value(metadata, "tokenizer.ggml.tokens")
    merges = _value(metadata, "tokenizer.ggml.merges", [])
    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))

    add_prefix_space = bool(_value(metadata, "tokenizer.ggml.add_space_prefix", False))
    pre = _value(metadata, "tokenizer.ggml.pre")
    tokenizer.pre_tokenizer = _pre_tokenizer(pre, add_prefix_space)
    tokenizer.decoder = decoders.ByteLevel()
    token_types = _value(metadata, "tokenizer.ggml.token_type")
    tokenizer.add_special_tokens(_special_tokens(tokens, token_types))

    _add_bos(tokenizer, metadata, tokens, default=False)
    return tokenizer


# transformers' names for the tokenizer.ggml.* keys its GGUF converter reads.
_CONVERTER_KEYS = {
    "model": "tokenizer_type",
    "pre": "pre_tokenizer_type",
    "tokens": "tokens",
    "scores": "scores",
    "token_type": "token_type",
    "merges": "merges",
    "add_space_prefix": "add_prefix_space",
}


def build_sentencepiece(metadata: dict, architecture: str) -> Tokenizer:
    """Raw ``tokenizers.Tokenizer`` for a SentencePiece (``llama``) vocabulary, through
    transformers' GGUF converter (merges recovered from the scores; Gemma's from the order)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    tokens = _value(metadata, "tokenizer.ggml.tokens")
    info = {
        name: _value(metadata, f"tokenizer.ggml.{key}")
        for key, name in _CONVERTER_KEYS.items()
        if metadata.get(f"tokenizer.ggml.{key}") is not None
    }
    for key in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"):
        if metadata.get(f"tokenizer.ggml.{key}") is not None:
            info[key.replace("unknown", "unk").replace("padding", "pad")] = int(
                _value(metadata, f"tokenizer.ggml.{key}")
            )
    info["tokens"] = tokens
    raw, _ = convert_gguf_tokenizer(architecture, info)
    raw.post_processor = None  # BOS is added below from add_bos_token, as llama.cpp does
    return raw


def _add_bos(tokenizer: Tokenizer, metadata: dict, tokens: list[str], default: bool) -> None:
    """Prepend BOS when ``add_bos_token`` says so (``default`` when the key is absent)."""
    bos = _token(tokens, metadata, "bos_token_id")
    if bool(_value(metadata, "tokenizer.ggml.add_bos_token", default)) and bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))]
        )


@dataclass
class TokenizerParts:
    """What a GGUF's ``TokenizerWrapper`` is built from, in a form the model load cache
    (:mod:`mlx_interp.models.gguf_cache`) can store: the raw tokenizer, special tokens, chat
    template, the ids that stop generation and the streaming detokenizer's kind."""

    raw: Tokenizer | Path  # a Tokenizer, or its tokenizer.json file (read without a copy)
    bos: str | None
    eos: str | None
    pad: str | None
    unk: str | None
    chat_template: str | None
    eos_ids: list[int]
    detokenizer: str  # "bpe" (byte-level BPE) | "naive" (SentencePiece)

    def settings(self) -> dict[str, Any]:
        """Everything but the raw tokenizer, as JSON values."""
        return {k: v for k, v in self.__dict__.items() if k != "raw"}


def tokenizer_parts(metadata: dict, architecture: str | None = None) -> TokenizerParts:
    """The parts of the tokenizer GGUF metadata describes (see :func:`tokenizer_from_gguf`)."""
    if _value(metadata, "tokenizer.ggml.model") == "llama":
        arch = architecture or _value(metadata, "general.architecture")
        raw = build_sentencepiece(metadata, arch)
        _add_bos(raw, metadata, _value(metadata, "tokenizer.ggml.tokens"), default=True)
        detokenizer = "naive"
    else:
        raw = build_tokenizer(metadata)
        detokenizer = "bpe"
    tokens = _value(metadata, "tokenizer.ggml.tokens")
    # End-of-turn / end-of-message ids (Llama 3 style) also stop generation.
    eos_keys = ("eos_token_id", "eot_token_id", "eom_token_id")
    eos_ids = [_value(metadata, f"tokenizer.ggml.{key}") for key in eos_keys]
    return TokenizerParts(
        raw=raw,
        bos=_token(tokens, metadata, "bos_token_id"),
        eos=_token(tokens, metadata, "eos_token_id"),
        pad=_token(tokens, metadata, "padding_token_id"),
        unk=_token(tokens, metadata, "unknown_token_id"),
        chat_template=_value(metadata, "tokenizer.chat_template"),
        eos_ids=[int(i) for i in eos_ids if i is not None],
        detokenizer=detokenizer,
    )


def wrap_tokenizer(parts: TokenizerParts) -> TokenizerWrapper:
    """mlx-lm ``TokenizerWrapper`` around a Hugging Face fast tokenizer built from ``parts``."""
    from transformers import PreTrainedTokenizerFast

    source: dict[str, Any]
    if isinstance(parts.raw, Path):
        source = {"tokenizer_file": str(parts.raw)}
    else:
        source = {"tokenizer_object": parts.raw}
    hf = PreTrainedTokenizerFast(
        **source,
        bos_token=parts.bos,
        eos_token=parts.eos,
        pad_token=parts.pad,
        unk_token=parts.unk,
        chat_template=parts.chat_template,
        clean_up_tokenization_spaces=False,
    )
    detokenizer = (
        BPEStreamingDetokenizer if parts.detokenizer == "bpe" else NaiveStreamingDetokenizer
    )
    return TokenizerWrapper(hf, detokenizer, eos_token_ids=parts.eos_ids or None)


def tokenizer_from_gguf(metadata: dict, architecture: str | None = None) -> TokenizerWrapper:
    """mlx-lm ``TokenizerWrapper`` built from GGUF metadata.

    Special tokens (token_type 3/4) are single ids, ``chat_template`` comes from
    ``tokenizer.chat_template`` and a BOS is prepended only if ``add_bos_token`` is set
    (SentencePiece files without the key get one, as in llama.cpp).
    """
    return wrap_tokenizer(tokenizer_parts(metadata, architecture))
