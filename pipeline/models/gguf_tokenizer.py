"""Build a Hugging Face fast tokenizer from the tokenizer stored in GGUF metadata.

GGUF files carry the whole tokenizer (``tokenizer.ggml.*`` keys), so a GGUF model
needs no ``tokenizer.json``. Only the byte-level BPE flavour (``tokenizer.ggml.model
== "gpt2"``) is supported, which covers SmolLM2, Llama 3, Qwen and most GPT-style models.
"""

from __future__ import annotations

import logging
from typing import Any

import mlx.core as mx
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

logger = logging.getLogger(__name__)


class GGUFError(ValueError):
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
            f"GGUF tokenizer model {kind!r} is not supported (only 'gpt2' byte-level BPE); "
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

    bos = _token(tokens, metadata, "bos_token_id")
    if _value(metadata, "tokenizer.ggml.add_bos_token", False) and bos is not None:
        bos_id = vocab[bos]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    return tokenizer


def tokenizer_from_gguf(metadata: dict) -> TokenizerWrapper:
    """mlx-lm ``TokenizerWrapper`` (BPE streaming detokenizer) built from GGUF metadata.

    Special tokens (token_type 3/4) are single ids, ``chat_template`` comes from
    ``tokenizer.chat_template`` and a BOS is prepended only if ``add_bos_token`` is set.
    """
    from transformers import PreTrainedTokenizerFast

    raw = build_tokenizer(metadata)
    tokens = _value(metadata, "tokenizer.ggml.tokens")
    hf = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=_token(tokens, metadata, "bos_token_id"),
        eos_token=_token(tokens, metadata, "eos_token_id"),
        pad_token=_token(tokens, metadata, "padding_token_id"),
        unk_token=_token(tokens, metadata, "unknown_token_id"),
        chat_template=_value(metadata, "tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
    )
    # End-of-turn / end-of-message ids (Llama 3 style) also stop generation.
    eos_keys = ("eos_token_id", "eot_token_id", "eom_token_id")
    eos_ids = [_value(metadata, f"tokenizer.ggml.{key}") for key in eos_keys]
    eos_ids = [int(i) for i in eos_ids if i is not None]
    return TokenizerWrapper(hf, BPEStreamingDetokenizer, eos_token_ids=eos_ids or None)
