"""Prepared-model cache: a second load of the same GGUF reads what the first one built.

Decoding a GGUF means parsing its vocabulary (most of SmolLM2's load time) and decoding
every tensor. The first load writes what it built into ``<cache>/<key>/``: the model's
parameters (``weights.safetensors``, exactly the decoded arrays), ``model.json`` (mlx-lm
module, ``ModelArgs``, which modules stay affine-quantized, llama's rope factors) and
``tokenizer.json`` (the raw tokenizer) with ``tokenizer_settings.json`` (special tokens, chat
template, stop ids). A later
load rebuilds the same model and tokenizer from them.

- key = sha256 of the GGUF file's bytes, of the conversion code (every ``gguf*.py`` module's
  source), of the versions of the packages it calls (gguf, mlx-lm, transformers, tokenizers)
  and of ``keep_quantized``: a changed file or converter never meets an old entry;
- an entry is written into a temporary folder and renamed into place whole, with its
  manifest (a CRC-32 and the size of every file) written last: concurrent writers are safe
  (the first rename wins, the others drop theirs) and a folder is either complete or absent;
- every load checks every file against the manifest (in a thread, beside the loading); an
  entry that does not match is moved aside, rebuilt from the GGUF and never served.

``MLX_INTERP_MODEL_CACHE`` names the folder (default ``~/.cache/mlx-interp/models``, under
``MLX_INTERP_CACHE``/``XDG_CACHE_HOME`` when set); ``off`` disables the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_interp.models.gguf_embedded import _cache_dir
from mlx_interp.models.gguf_tokenizer import TokenizerParts

log = logging.getLogger(__name__)

CACHE_ENV = "MLX_INTERP_MODEL_CACHE"
FORMAT = 1  # layout of an entry (files and their fields)
CONVERTER_MODULES = (
    "gguf",
    "gguf_arch",
    "gguf_cache",
    "gguf_decode",
    "gguf_read",
    "gguf_tokenizer",
)
PACKAGES = ("gguf", "mlx", "mlx-lm", "transformers", "tokenizers")
FILES = ("weights.safetensors", "model.json", "tokenizer.json", "tokenizer_settings.json")
MANIFEST = "manifest.json"


def cache_root() -> Path | None:
    """The cache folder, or None when ``MLX_INTERP_MODEL_CACHE=off``."""
    value = os.environ.get(CACHE_ENV, "").strip()
    if value.lower() in ("off", "none", "0", "false"):
        return None
    return Path(value).expanduser() if value else _cache_dir() / "models"


_CONVERTER: str | None = None


def converter_version() -> str:
    """sha256 of the conversion code's source and of the versions of the packages it uses."""
    global _CONVERTER
    if _CONVERTER is None:
        digest = hashlib.sha256(f"format {FORMAT}\n".encode())
        here = Path(__file__).parent
        for name in CONVERTER_MODULES:
            digest.update(name.encode() + b"\n" + (here / f"{name}.py").read_bytes())
        for package in PACKAGES:
            try:
                version = package_metadata.version(package)
            except package_metadata.PackageNotFoundError:
                version = "absent"
            digest.update(f"{package}=={version}\n".encode())
        _CONVERTER = digest.hexdigest()
    return _CONVERTER


def entry_key(gguf_sha256: str, keep_quantized: bool) -> str:
    """Folder name of the entry for a GGUF (by content) loaded with ``keep_quantized``."""
    text = json.dumps(
        {"gguf": gguf_sha256, "converter": converter_version(), "keep_quantized": keep_quantized},
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _crc32(path: Path) -> int:
    crc = 0
    with path.open("rb", buffering=0) as stream:
        while block := stream.read(1 << 24):
            crc = zlib.crc32(block, crc)  # releases the GIL: runs beside the loading
    return crc


def _checked(folder: Path) -> dict[str, Any] | None:
    """The manifest if every file has its recorded size (CRCs are checked by the loader)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        if sorted(files) != sorted(FILES):
            return None
        for name, info in files.items():
            if (folder / name).stat().st_size != info["size"]:
                return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _move_aside(folder: Path, why: str) -> None:
    log.warning("model cache entry %s is damaged (%s): rebuilding it from the GGUF", folder, why)
    aside = folder.with_name(f"{folder.name}.damaged-{uuid.uuid4().hex[:8]}")
    try:
        folder.rename(aside)
        shutil.rmtree(aside, ignore_errors=True)
    except OSError:
        pass  # another process moved it first


def read_entry(root: Path, key: str, build: Callable[[Path], Any]) -> Any | None:
    """``build(folder)`` from the entry ``key`` (reading ``FILES``), or None when it
    is absent or damaged (then it is moved aside). The files' CRCs are checked in a thread
    while ``build`` runs; a mismatch discards what was built."""
    folder = root / key
    if not folder.is_dir():
        return None
    manifest = _checked(folder)
    if manifest is None:
        _move_aside(folder, "missing file, wrong size or unreadable manifest")
        return None
    crcs: dict[str, int] = {}

    def check() -> None:
        for name in FILES:
            crcs[name] = _crc32(folder / name)

    checker = threading.Thread(target=check, daemon=True)
    checker.start()
    try:
        built = build(folder)
        error = None
    except Exception as err:  # a damaged file can fail in many ways; the CRCs decide
        built, error = None, err
    checker.join()
    bad = [n for n in FILES if crcs.get(n) != manifest["files"][n]["crc32"]]
    if bad or error is not None:
        _move_aside(folder, f"checksum mismatch in {bad}" if bad else f"{error}")
        return None
    return built


def write_entry(
    root: Path, key: str, model: nn.Module, model_json: dict, tokenizer: TokenizerParts
) -> Path | None:
    """Store an entry (temporary folder, manifest last, atomic rename); None if another
    writer stored it first or the folder is not writable (the load goes on uncached)."""
    target = root / key
    tmp = root / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        weights = dict(tree_flatten(model.parameters()))
        mx.save_safetensors(str(tmp / "weights.safetensors"), weights)
        (tmp / "model.json").write_text(json.dumps(model_json, sort_keys=True))
        if isinstance(tokenizer.raw, Path):  # a tokenizer.json already (read from an entry)
            shutil.copyfile(tokenizer.raw, tmp / "tokenizer.json")
        else:
            tokenizer.raw.save(str(tmp / "tokenizer.json"))
        settings = json.dumps(tokenizer.settings(), sort_keys=True)
        (tmp / "tokenizer_settings.json").write_text(settings)
        files = {
            name: {"size": (tmp / name).stat().st_size, "crc32": _crc32(tmp / name)}
            for name in FILES
        }
        manifest = {"key": key, "format": FORMAT, "files": files, "written": time.time()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        tmp.rename(target)
        return target
    except OSError as err:
        if not target.is_dir():
            log.warning("model cache: cannot write %s (%s); loading without it", target, err)
        return None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
