"""Content-addressed artifact store: one folder per (stage, key), complete only with a manifest.

A stage writes into ``<stage>/<key>.partial/``; the manifest is written last and the folder
is renamed into place, so a folder without a valid manifest is never read. The partial
folder survives a crash, so a stage that writes part files can resume from them. A lock
per key keeps two jobs of one sweep from computing the same artifact twice.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_interp.engine.distributed import Group, sharding

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"  # leading "_": Parquet readers skip it when they list a folder


class ArtifactError(RuntimeError):
    """An artifact could not be written or read; the message says what to do."""


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal inputs give equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def hash_key(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (hex, 64 chars)."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _listing(folder: Path) -> dict[str, int]:
    """Relative path -> size of every file in an artifact folder but the manifest."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out[p.relative_to(folder).as_posix()] = p.stat().st_size
    return out


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def writable_problem(path: str | os.PathLike) -> str | None:
    """Why files cannot be created under ``path`` (checked on its nearest existing folder)."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        return f"cannot be created: {p} is a file, not a folder"
    if not os.access(p, os.W_OK | os.X_OK):
        return f"is not writable ({p} is read-only for this user)"
    return None


@dataclass(frozen=True)
class Artifact:
    """A completed artifact: where it is and what its manifest says."""

    stage: str
    key: str
    path: Path
    manifest: dict
    cached: bool  # True when found complete, False when computed in this call


class ArtifactStore:
    """Artifacts under ``root/<stage>/<key>/``, each completed by a manifest."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def partial_path(self, stage: str, key: str) -> Path:
        return self.root / stage / f"{key}.partial"

    def read_manifest(self, stage: str, key: str) -> dict | None:
        """The manifest of a complete, untouched artifact, else None."""
        folder = self.path(stage, key)
        try:
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if manifest.get("key") != key or manifest.get("stage") != stage:
            return None
        if manifest.get("files") != _listing(folder):
            return None
        return manifest

    def get(self, stage: str, key: str) -> Artifact | None:
        manifest = self.read_manifest(stage, key)
        if manifest is None:
            return None
        return Artifact(stage, key, self.path(stage, key), manifest, cached=True)

    def check_writable(self) -> None:
        """Fail at start, not half-way, when the store cannot be written."""
        problem = writable_problem(self.root)
        if problem:
            raise ArtifactError(
                f"the artifact store {self.root} {problem}; make it writable or set "
                "paths.outputs=<a writable folder> (or paths.artifacts=...)"
            )

    @contextmanager
    def lock(self, stage: str, key: str) -> Iterator[None]:
        """Exclusive lock on one artifact key, across processes (flock); logs when it waits."""
        lock_dir = self.root / stage / ".locks"
        try:
            lock_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_dir / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise ArtifactError(
                f"cannot write to the artifact store {self.root} ({err.strerror}); "
                "make it writable or set paths.outputs=<a writable folder>"
            ) from err
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("artifact %s/%s is being computed by another job: waiting", stage, key)
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def build(
        self,
        stage: str,
        key: str,
        compute: Callable[[Path], dict | None],
        record: dict | None = None,
        resumable: bool = False,
    ) -> Artifact:
        """Return the artifact, computing it with ``compute(partial_dir)`` if needed.

        ``compute`` writes files into the partial folder it is given (which may hold
        parts from an interrupted attempt) and returns a small summary for the manifest.
        ``resumable``: the stage reuses complete files left in the partial folder, so a
        failed write keeps them (only temporary files are removed).
        """
        found = self.get(stage, key)
        if found is not None:
            return found
        with self.lock(stage, key):
            found = self.get(stage, key)  # another job may have finished it meanwhile
            if found is not None:
                return found
            partial = self._prepare(stage, key)
            started = time.time()
            with self._write_errors(stage, key, partial, resumable):
                summary = compute(partial) or {}
                return self._finalize(stage, key, partial, summary, started, record)

    def build_sharded(
        self,
        stage: str,
        key: str,
        compute: Callable[[Path], dict | None],
        group: Group,
        record: dict | None = None,
    ) -> Artifact:
        """Compute one artifact with every rank of ``group``; rank 0 writes the manifest.

        All ranks write their own files into the one partial folder. Only rank 0 takes the
        key's lock (against other jobs): a rank waiting on the lock while rank 0 waits for it
        at a barrier would deadlock. Each step ends with a vote, so every rank agrees on
        whether to compute, whether all succeeded and when the artifact is final.
        """
        if group.vote(self.get(stage, key) is not None) > 0:
            return self._await(stage, key)
        with ExitStack() as held:
            ready, failure = 0, None
            if group.rank == 0:
                try:
                    held.enter_context(self.lock(stage, key))
                    ready = int(self.get(stage, key) is not None)
                    if not ready:
                        self._prepare(stage, key)
                except Exception as err:  # the other ranks are waiting at the vote below
                    failure = err
            state = group.vote(2 * (failure is not None) + ready)
            if state >= 2:
                if failure is not None:
                    raise failure
                raise ArtifactError(f"rank 0 could not start stage {stage!r}; see its log")
            if state > 0:  # another job completed it while rank 0 waited for the lock
                return self._await(stage, key)
            partial = self.partial_path(stage, key)
            started = time.time()
            try:
                with self._write_errors(stage, key, partial, resumable=True), sharding(group.shard):
                    summary = compute(partial) or {}
            except Exception as err:  # every rank must reach the vote, even a failed one
                failure = err
            failed_ranks = group.vote(failure is not None)
            if failure is not None:
                raise failure
            if failed_ranks:
                raise ArtifactError(
                    f"stage {stage!r} failed on {failed_ranks} other rank(s); see their log "
                    "lines; the completed parts are kept, so re-running resumes"
                )
            if group.rank == 0:
                try:
                    with self._write_errors(stage, key, partial, resumable=True):
                        record = {**(record or {}), "ranks": group.size}
                        self._finalize(stage, key, partial, summary, started, record)
                except Exception as err:
                    failure = err
            if group.vote(failure is not None):  # rank 0 finalized (or failed to)
                if failure is not None:
                    raise failure
                raise ArtifactError(f"rank 0 could not finalize stage {stage!r}; see its log")
        return dataclasses.replace(self._await(stage, key), cached=False)  # computed just now

    def _await(self, stage: str, key: str) -> Artifact:
        """A complete artifact that another rank or job has just finalized."""
        found = self.get(stage, key)
        if found is None:
            raise ArtifactError(
                f"artifact {stage}/{key} was reported complete but fails its manifest "
                f"check under {self.root}; is paths.artifacts one shared folder for all ranks?"
            )
        return found

    def _prepare(self, stage: str, key: str) -> Path:
        """Set aside an invalid final folder; return the (possibly resumed) partial folder."""
        final = self.path(stage, key)
        if final.exists():  # edited by hand or corrupt: keep it aside, never trust it
            aside = final.with_name(f"{key}.invalid-{int(time.time())}")
            log.warning(
                "artifact %s/%s fails its manifest check; moved to %s", stage, key, aside.name
            )
            os.replace(final, aside)
        partial = self.partial_path(stage, key)
        partial.mkdir(parents=True, exist_ok=True)
        return partial

    def _finalize(
        self, stage: str, key: str, partial: Path, summary: dict, started: float, record
    ) -> Artifact:
        """Write the manifest last, then rename the partial folder into place."""
        manifest = {
            "stage": stage,
            "key": key,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.time() - started, 3),
            "summary": summary,
            "record": record or {},
            "files": _listing(partial),
        }
        write_json_atomic(partial / MANIFEST, manifest)
        final = self.path(stage, key)
        os.replace(partial, final)
        _fsync_dir(final.parent)
        return Artifact(stage, key, final, manifest, cached=False)

    @contextmanager
    def _write_errors(self, stage: str, key: str, partial: Path, resumable: bool):
        """Turn OSError while writing an artifact into a clear ArtifactError; disk full
        removes the partial folder (or only its temporary files when the stage resumes)."""
        try:
            yield
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise ArtifactError(
                    f"stage {stage!r} failed writing {partial} ({err.strerror}); artifacts "
                    "completed before are intact; free disk space or fix permissions, then "
                    "re-run"
                ) from err
            if resumable:
                for tmp in partial.rglob(".*"):
                    if tmp.is_file():
                        tmp.unlink(missing_ok=True)
                kept = "its completed part files are kept, so re-running resumes"
            else:
                shutil.rmtree(partial, ignore_errors=True)
                kept = "its partial folder was removed"
            raise ArtifactError(
                f"disk full while writing artifact {stage}/{key[:12]} in {partial.parent}: "
                f"free space there or set paths.outputs=<a folder on a disk with room>; "
                f"artifacts completed before are intact and {kept}"
            ) from err

    def remove(self, stage: str, key: str) -> None:
        """Delete one artifact (used by `clean` tooling and tests)."""
        shutil.rmtree(self.path(stage, key), ignore_errors=True)
