"""File helpers every module shares: content digests, sizes, writes that are whole or absent, and locks.

**Digests** are SHA-256 in hex. A folder's digest hashes one line per file, ``<relative path>\\0<file
SHA-256>\\n``, files in sorted path order; the store's manifests, the cache keys and the registry's content
hash are all built from these, and stored keys and manifests compare against them, so the bytes hashed
must never change.

**Writes** go to a temporary sibling (same file system, so the rename is atomic) that is renamed into
place: readers see the old content or the new, never a torn file or a half-filled folder, and a crash
leaves at most a ``.tmp-*`` sibling.

**Locks** are ``filelock`` locks (``fcntl.flock`` on Linux, ``LockFileEx`` on Windows): held by an open
file, so the operating system releases the lock of a process that dies, even by ``kill -9``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"


# --- digests and sizes ---------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    """SHA-256 of one file's bytes, read in chunks."""
    with Path(path).open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def folder_files(folder: Path) -> list[tuple[str, Path]]:
    """Every file under ``folder`` as (relative POSIX path, path), in sorted path order."""
    return [
        (path.relative_to(folder).as_posix(), path) for path in sorted(folder.rglob("*")) if path.is_file()
    ]


def folder_sha256(folder: Path | Mapping[str, Path]) -> str:
    """One SHA-256 over every file of a folder, by relative path: the same bytes elsewhere hash the same.

    A mapping hashes several folders as one, each file named ``<key>/<relative path>`` (keys in sorted
    order): the registry's content hash of an entry's sub-folders. Each file's hash is remembered in memory
    per (path, size, mtime), so a long-lived worker hashes a 500 MB base model once, and a changed file is
    read again.
    """
    sources = folder if isinstance(folder, Mapping) else {"": Path(folder)}
    digest = hashlib.sha256()
    for key in sorted(sources):
        prefix = f"{key}/" if key else ""
        for relative, path in folder_files(sources[key]):
            stat = path.stat()
            file_hash = _remembered_sha256(str(path), stat.st_size, stat.st_mtime_ns)
            digest.update(f"{prefix}{relative}\0{file_hash}\n".encode())
    return digest.hexdigest()


@cache
def _remembered_sha256(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(Path(path))


def folder_listing(folder: Path) -> dict[str, dict[str, Any]]:
    """Every file of a folder by relative path, with its size and SHA-256 (hashed afresh: a manifest)."""
    return {
        relative: {"size": path.stat().st_size, "sha256": file_sha256(path)}
        for relative, path in folder_files(folder)
    }


def folder_bytes(path: Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(file.stat().st_size for _, file in folder_files(path))


def link_into(folder: Path, source: Path) -> Path:
    """``folder/<source's name>`` standing for ``source`` without copying it: a symbolic link to it, except
    a shared library, which is hard-linked (copied across file systems). Why: ONNX Runtime GenAI resolves a
    model's ``custom_ops_library`` to its real path and loads it only from inside the model folder."""
    target = folder / source.name
    if source.suffix != ".so":
        target.symlink_to(source.resolve(), target_is_directory=source.is_dir())
        return target
    try:
        os.link(source.resolve(), target)
    except OSError:
        shutil.copy2(source, target)
    return target


# --- whole-or-absent writes ----------------------------------------------------------------------------


@contextmanager
def staging_dir(parent: Path, prefix: str = TMP_PREFIX) -> Iterator[Path]:
    """A fresh empty folder in ``parent``, removed when the block ends unless it was moved into place
    (:func:`move_into_place`)."""
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def move_into_place(staging: Path, final: Path, *, replace: bool) -> bool:
    """Rename the folder ``staging`` to ``final`` (a sibling) in one step; True if it moved.

    ``replace``: an existing ``final`` is removed first. Otherwise an existing non-empty ``final`` stays,
    and False says so (another writer got there first).
    """
    if replace and final.exists():
        shutil.rmtree(final) if final.is_dir() and not final.is_symlink() else final.unlink()
    try:
        os.rename(staging, final)  # onto a non-empty folder this fails, never merges
    except OSError:
        if not replace and final.exists():
            return False
        raise
    return True


@contextmanager
def atomic_dir(final: Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary sibling folder that becomes ``final`` only if the block finishes.

    A crash leaves at most a ``.tmp-*`` folder beside ``final``, never a partial ``final``. An existing
    ``final`` is replaced whole, or with ``replace=False`` kept (the staged folder is then discarded).
    """
    with staging_dir(final.parent, prefix=f"{TMP_PREFIX}{final.name}-") as staging:
        yield staging
        move_into_place(staging, final, replace=replace)


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield the path of an empty temporary sibling file that replaces ``path`` only if the block finishes.

    The file is created with the permissions the umask gives a new file (not ``tempfile``'s 0600).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:12]}")
    os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write bytes so that readers see the old file or the new one, never a torn one."""
    with atomic_file(path) as temporary:
        temporary.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    """Write UTF-8 text so that readers see the old file or the new one, never a torn one."""
    atomic_write_bytes(path, text.encode("utf-8"))


# --- locks ---------------------------------------------------------------------------------------------


@contextmanager
def file_lock(path: Path, waiting: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the block; wait as long as it takes.

    Every holder opens the file afresh, so threads of one process exclude each other too. ``waiting`` is
    logged once if another holder makes this one wait.
    """
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, thread_local=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if waiting:
            log.info("%s", waiting)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
