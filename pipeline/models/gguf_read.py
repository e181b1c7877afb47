"""Open a GGUF file with the ``gguf`` package and check it before any weight is decoded.

``read_gguf`` returns the metadata as plain Python values and each tensor's raw bytes
(memory-mapped, not yet decoded); ``check_gguf`` refuses an unsupported architecture,
tokenizer model or tensor type by name, so a file we cannot compute exactly never loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import quant_shape_from_byte_shape

from mlx_interp.models.gguf_decode import SUPPORTED_TYPES
from mlx_interp.models.gguf_tokenizer import GGUFError

# Tokenizer models (``tokenizer.ggml.model``) that mlx_interp.models.gguf_tokenizer builds.
SUPPORTED_TOKENIZERS = ("gpt2", "llama")


@dataclass
class GGUFTensor:
    """One tensor as stored: ``raw`` is ``[rows, bytes per row]`` uint8 for block types,
    ``[rows, cols]`` in the stored float dtype otherwise; ``shape`` is the decoded numpy
    shape (row-major, e.g. ``[out, in]`` for a linear weight)."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    raw: np.ndarray


@dataclass
class GGUFFile:
    """A parsed GGUF: metadata (plain Python values) and tensors by GGUF name."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def arch_value(self, key: str, default: Any = None) -> Any:
        """``<architecture>.<key>`` from the metadata (e.g. ``embedding_length``)."""
        return self.metadata.get(f"{self.architecture}.{key}", default)


def _field_value(field) -> Any:
    """A reader field as a Python value (strings decoded, arrays as lists)."""
    kinds = field.types
    if not kinds:
        return None
    if kinds[0] == GGUFValueType.ARRAY:
        if len(kinds) > 1 and kinds[1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if kinds[0] == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    return field.parts[field.data[0]].tolist()[0]


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse header, metadata and tensor table; tensor bytes stay memory-mapped."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"GGUF file not found: {path}; check the path")
    try:
        reader = GGUFReader(str(path), "r")
    except Exception as err:  # the reader raises ValueError/IndexError/struct.error on damage
        raise GGUFError(
            f"{path} is not a readable GGUF file (truncated or corrupt?): {err}; check the "
            "path, or download the file again"
        ) from err
    metadata = {name: _field_value(field) for name, field in reader.fields.items()}
    tensors = {}
    for tensor in reader.tensors:
        qtype = GGMLQuantizationType(int(tensor.tensor_type))
        raw = np.asarray(tensor.data)
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        tensors[tensor.name] = GGUFTensor(tensor.name, qtype, shape, raw)
    return GGUFFile(path, metadata, tensors)


def check_gguf(gguf: GGUFFile, architectures: list[str]) -> None:
    """Refuse what cannot be computed exactly, naming it, before any tensor is decoded."""
    path, arch = gguf.path, gguf.architecture
    if arch not in architectures:
        raise GGUFError(
            f"{path}: GGUF architecture {arch!r} is not supported (supported: "
            f"{', '.join(architectures)}); convert the original Hugging Face model with "
            "`python -m mlx_lm.convert` and use model.source=mlx_lm"
        )
    tokenizer = gguf.metadata.get("tokenizer.ggml.model")
    if tokenizer not in SUPPORTED_TOKENIZERS:
        raise GGUFError(
            f"{path}: GGUF tokenizer model {tokenizer!r} is not supported (supported: "
            f"{', '.join(SUPPORTED_TOKENIZERS)}); use model.source=mlx_lm with the original model"
        )
    bad: dict[str, list[str]] = {}
    for tensor in gguf.tensors.values():
        if tensor.qtype not in SUPPORTED_TYPES:
            bad.setdefault(tensor.qtype.name, []).append(tensor.name)
    if bad:
        listed = "; ".join(f"{kind} ({len(n)} tensors, e.g. {n[0]})" for kind, n in bad.items())
        supported = ", ".join(t.name for t in SUPPORTED_TYPES)
        raise GGUFError(
            f"{path}: GGUF tensor type(s) not supported: {listed}. Supported: {supported}; "
            "re-quantize the model with llama.cpp's llama-quantize into one of these"
        )
    for tensor in gguf.tensors.values():
        if tensor.qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            continue
        if tensor.raw.dtype == np.uint8:
            decoded = quant_shape_from_byte_shape(tensor.raw.shape, tensor.qtype)
            if tuple(decoded) != tensor.shape:
                raise GGUFError(f"{path}: tensor {tensor.name} has inconsistent shape/bytes")
