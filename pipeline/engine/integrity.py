"""Content checksums of artifact files: what a manifest promises, and which leftovers to trust.

A manifest lists every file of an artifact with its size and sha256; :func:`listing_problem`
compares a folder with that list (a changed byte, a missing or an extra file). A resumable
stage seals each part file it completes (:func:`seal`: a hidden ``.<name>.sha256`` beside it),
so a later attempt keeps only parts whose seal matches (:func:`sealed_intact`); anything else
left in a partial folder (a truncated part, a stray file) is moved aside by
:func:`clear_unsealed`, never sealed into an artifact.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

MANIFEST = "_manifest.json"  # leading "_": Parquet readers skip it when they list a folder
SEAL_SUFFIX = ".sha256"


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def seal_path(path: Path) -> Path:
    """Where the seal of ``path`` lives: ``.<name>.sha256`` in the same folder."""
    return path.with_name(f".{path.name}{SEAL_SUFFIX}")


def is_seal(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(SEAL_SUFFIX)


def seal(path: Path, digest: str | None = None) -> str:
    """Record ``path``'s sha256 beside it (atomically); returns the digest."""
    digest = digest or file_sha256(path)
    target = seal_path(path)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    tmp.write_text(digest, encoding="ascii")
    os.replace(tmp, target)
    return digest


def sealed_intact(path: Path) -> bool:
    """True when ``path`` exists and its bytes match the seal written when it was completed."""
    try:
        expected = seal_path(path).read_text(encoding="ascii").strip()
    except OSError:
        return False
    return path.is_file() and file_sha256(path) == expected


def listing(folder: Path, use_seals: bool = False) -> dict[str, dict]:
    """Relative path -> {size, sha256} of every file in an artifact folder but the manifest
    and the seals. ``use_seals``: take a sealed file's digest from its seal instead of reading
    it again (for parts sealed or verified moments ago by this process)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST and not is_seal(p):
            digest = None
            if use_seals and seal_path(p).is_file():
                digest = seal_path(p).read_text(encoding="ascii").strip()
            out[p.relative_to(folder).as_posix()] = {
                "size": p.stat().st_size,
                "sha256": digest or file_sha256(p),
            }
    return out


def listing_problem(folder: Path, files: object) -> str | None:
    """What differs between ``folder`` and a manifest's file list; None when every file is
    there with the recorded size and sha256 and no other file is."""
    if not isinstance(files, dict) or not all(
        isinstance(v, dict) and "sha256" in v for v in files.values()
    ):
        return "its manifest has no content checksums (written by an older version)"
    present = {
        p.relative_to(folder).as_posix(): p
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST and not is_seal(p)
    }
    missing = sorted(set(files) - set(present))
    extra = sorted(set(present) - set(files))
    if missing or extra:
        return f"files missing {missing[:3]}, not in the manifest {extra[:3]}"
    for rel, want in sorted(files.items()):
        path = present[rel]
        if path.stat().st_size != want.get("size") or file_sha256(path) != want["sha256"]:
            return f"{rel} does not match its checksum"
    return None


def clear_unsealed(partial: Path, keep_sealed: bool) -> list[str]:
    """Move every file of a partial folder that this code cannot vouch for into a sibling
    ``<name>.junk-<time>`` folder: all of them, or (``keep_sealed``) those without an intact
    seal. Returns the moved files' relative paths."""
    moved = []
    junk = partial.with_name(f"{partial.name.removesuffix('.partial')}.junk-{time.time_ns()}")
    for p in sorted(partial.rglob("*")):
        if not p.is_file() or is_seal(p):
            continue
        if keep_sealed and sealed_intact(p):
            continue
        rel = p.relative_to(partial)
        (junk / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(p, junk / rel)
        seal_path(p).unlink(missing_ok=True)
        moved.append(rel.as_posix())
    for p in sorted(partial.rglob("*"), reverse=True):  # seals of files that are gone
        if p.is_file() and is_seal(p) and not (p.parent / p.name[1 : -len(SEAL_SUFFIX)]).exists():
            p.unlink()
    return moved


def remove_seals(folder: Path) -> None:
    """Drop the seals before a partial folder becomes an artifact (the manifest holds the
    checksums from then on)."""
    for p in folder.rglob(f".*{SEAL_SUFFIX}"):
        if p.is_file():
            p.unlink()
