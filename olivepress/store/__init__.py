"""Content-keyed artifact store: a local folder or ``s3://bucket/prefix``, through fsspec.

Each step output lives at ``<root>/<step>/<key>/`` where ``key`` is the step's cache key (a hash of its
inputs' content, its settings, its code and its libraries). Publishing uploads the files into a fresh
``<publish-id>/`` sub-folder, then writes ``manifest.json`` (every file's size and SHA-256, and which
publish-id holds them) last, in one atomic write. So:

* an output counts as done only when its manifest exists and its files match it; a crash mid-upload leaves
  files no manifest points to, never a manifest with missing or torn files;
* two runs publishing the same key at once each upload a complete set and the last manifest wins: both
  sets are whole, so either is a correct answer;
* a corrupted file (one byte changed) fails verification, and the step is recomputed rather than used.

Two runs that need the same missing output at once compute it once: :meth:`ArtifactStore.produce` holds a
lock per step key while it computes and publishes (a ``filelock`` on ``<root>/<step>/<key>.lock`` for a
local store; on S3 a lease object ``<root>/<step>/<key>.lease`` taken with a conditional put, see
:mod:`olivepress.store.s3_lease`). The other run waits, then finds the manifest and reuses the output. A
step's scratch that must survive a crash (training checkpoints) lives in :meth:`ArtifactStore.work_dir`, named by
store and key and used only under that lock.

The computed output is kept there too until it is published: when the publish fails (S3 down longer than
the store's retries), the step's next attempt, or the next run of the same key, publishes the kept output
if it is complete instead of computing it again. A computation that fails leaves no output behind.

Files stream in chunks (upload, download, hashing); nothing is held in memory whole. Store operations
retry transient failures (connection errors, S3 5xx and throttling) with exponential backoff and jitter.

Beside it in this package: the S3 lease (:mod:`olivepress.store.s3_lease`) and the keys outputs are stored
under (:mod:`olivepress.store.cache_keys`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from olivepress.files import (
    atomic_file,
    atomic_write_bytes,
    atomic_write_text,
    file_lock,
    file_sha256,
    folder_listing,
    move_into_place,
    staging_dir,
)
from olivepress.retry import RetryPolicy, with_retries

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# in a key's work folder: the computed output until it is published, and its listing once it is complete
KEPT_OUTPUT = "output"
KEPT_LISTING = "output.json"
STALE_PUBLISH_SECONDS = 6 * 3600  # longer than any upload; younger leftovers may be a live publisher's
STALE_SCRATCH_SECONDS = 24 * 3600  # longer than any step's computation


@dataclass(frozen=True)
class Manifest:
    step: str
    key: str
    publish_id: str
    files: dict[str, dict[str, Any]]  # relative path → {"size", "sha256"}

    @property
    def digest(self) -> str:
        """The output's content identity: what the next step's cache key is built from."""
        listing = json.dumps(sorted((name, meta["sha256"]) for name, meta in self.files.items()))
        return hashlib.sha256(listing.encode()).hexdigest()

    def to_json(self) -> str:
        return json.dumps(
            {"step": self.step, "key": self.key, "publish_id": self.publish_id, "files": self.files}, indent=1
        )

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        return cls(data["step"], data["key"], data["publish_id"], data["files"])


class ArtifactStore:
    """See the module docstring. ``cache_dir`` holds local copies of remote outputs for the steps to read."""

    def __init__(
        self,
        uri: str,
        cache_dir: Path,
        *,
        retry: RetryPolicy | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        import fsspec

        self.uri = uri
        self.is_local = "://" not in uri or uri.startswith("file://")
        self.fs, self.root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        self.root = self.root.rstrip("/")
        self.cache_dir = cache_dir
        self.retry = retry or RetryPolicy()
        # folders this store object already hashed against a manifest: the flow and the step's task both
        # ask for the same output, and hashing a 500 MB model once per run is enough
        self._verified: dict[tuple[str, str, str], Path] = {}
        # (step, key) of the outputs this store object computed, not reused (the run's summary tells them)
        self.computed: set[tuple[str, str]] = set()

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def manifest(self, step: str, key: str) -> Manifest | None:
        """The published manifest of ``step``/``key``, or None if there is none (not done)."""
        path = self._path(step, key, MANIFEST)

        def read() -> Manifest | None:
            try:
                with self.fs.open(path, "rb") as handle:
                    return Manifest.from_json(handle.read().decode("utf-8"))
            except FileNotFoundError:
                return None

        try:
            return with_retries(read, f"reading {path}", self.retry)
        except (ValueError, KeyError):
            log.warning("%s is not a valid manifest; the step will be recomputed", path)
            return None

    def complete(self, step: str, key: str) -> Manifest | None:
        """The manifest if the output is done: every file present with its size and SHA-256.

        Local files are hashed in place; remote ones are fetched into the cache and hashed there (the copy
        is what the next step reads anyway).
        """
        manifest = self.manifest(step, key)
        if manifest is None:
            return None
        try:
            self.local_copy(manifest)
        except CorruptArtifact as error:
            log.warning("%s; the step will be recomputed", error)
            return None
        return manifest

    def local_copy(self, manifest: Manifest) -> Path:
        """A local folder holding the manifest's files, verified; remote files are downloaded once."""
        identity = (manifest.step, manifest.key, manifest.publish_id)
        if identity not in self._verified:
            self._verified[identity] = self._verified_copy(manifest)
        return self._verified[identity]

    def _verified_copy(self, manifest: Manifest) -> Path:
        if self.is_local:
            folder = Path(self._path(manifest.step, manifest.key, manifest.publish_id))
            verify(folder, manifest)
            return folder
        folder = self.cache_dir / manifest.step / manifest.key / manifest.publish_id
        if folder.is_dir():
            try:
                verify(folder, manifest)
                return folder
            except CorruptArtifact:
                shutil.rmtree(folder)
        with staging_dir(folder.parent) as staging:
            for name in manifest.files:
                remote = self._path(manifest.step, manifest.key, manifest.publish_id, name)
                target = staging / name
                target.parent.mkdir(parents=True, exist_ok=True)
                with_retries(
                    lambda r=remote, t=target: self.fs.get_file(r, str(t)),
                    f"downloading {remote}",
                    self.retry,
                )
            verify(staging, manifest)
            # False: another run placed the same verified copy first
            move_into_place(staging, folder, replace=False)
        return folder

    def publish(self, step: str, key: str, folder: Path, files: dict[str, Any] | None = None) -> Manifest:
        """Upload ``folder``'s files under a new publish-id, then the manifest; return the manifest.
        ``files``: the folder's listing (:func:`folder_listing`), if it was just made."""
        manifest = Manifest(step, key, uuid.uuid4().hex, files or folder_listing(folder))
        for name in manifest.files:
            remote = self._path(step, key, manifest.publish_id, name)
            local = folder / name
            with_retries(lambda r=remote, p=local: self._upload(p, r), f"uploading {remote}", self.retry)
        self._write_manifest(manifest)
        self._drop_stale_publishes(manifest)
        return manifest

    def _drop_stale_publishes(self, manifest: Manifest) -> None:
        """Remove this key's other publish folders once they are old: what a crashed or out-raced upload
        left. A young one may be a concurrent publisher still uploading, so it stays."""
        now = time.time()
        for entry in self.fs.ls(self._path(manifest.step, manifest.key), detail=True):
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if entry["type"] != "directory" or name == manifest.publish_id:
                continue
            with contextlib.suppress(FileNotFoundError):  # another publisher removed it first
                files = self.fs.find(entry["name"], detail=True).values()
                # a folder just made, still empty, is as young as the folder itself
                newest = max([_modified(entry), *(_modified(info) for info in files)])
                if now - newest > STALE_PUBLISH_SECONDS:
                    self.fs.rm(entry["name"], recursive=True)

    def scratch_root(self) -> Path:
        """Where steps compute: ``cache_dir/staging``. Folders there older than a day are what a killed run
        left (a live step's folder is younger), so they are removed here."""
        root = self.cache_dir / "staging"
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if time.time() - leftover.stat().st_mtime > STALE_SCRATCH_SECONDS:
                    shutil.rmtree(leftover, ignore_errors=True)
        return root

    def _upload(self, local: Path, remote: str) -> None:
        self.fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
        self.fs.put_file(str(local), remote)

    def work_dir(self, step: str, key: str) -> Path:
        """A step's scratch folder that outlives a crash, so that a re-run resumes from it (training
        checkpoints, and the computed output until it is published): named by this store and ``key``, used
        only by the holder of the key's lock (:meth:`produce`), and removed once the output is published."""
        return self.cache_dir / "work" / f"{step}-{key[:16]}-{self.id}"

    @property
    def id(self) -> str:
        """A short name of this store (its full URI hashed): a key's work folder, and Prefect's cache record
        of a step, belong to one store."""
        return hashlib.sha256(self.fs.unstrip_protocol(self.root).encode()).hexdigest()[:8]

    @contextlib.contextmanager
    def key_lock(self, step: str, key: str) -> Iterator[None]:
        """Hold the lock of ``step``/``key`` in this store, waiting while another run holds it."""
        waiting = f"{step}: another run is computing this output (key {key[:12]}); waiting for it"
        if self.is_local:
            with file_lock(Path(self._path(step, f"{key}.lock")), waiting):
                yield
            return
        from olivepress.store.s3_lease import S3Lease

        lease = S3Lease(self.fs, self._path(step, f"{key}.lease"), retry=self.retry)
        lease.acquire(waiting)
        try:
            yield
        finally:
            lease.release()

    def produce(self, step: str, key: str, compute: Callable[[Path], object]) -> Manifest:
        """The step's output for ``key``: reused if published and intact, else computed and published.

        ``compute`` fills an empty local folder; a crash inside it leaves nothing in the store. It runs
        under the key's lock: a concurrent run of the same key waits, then reuses what this one published.
        A computed output whose publish failed is kept (:meth:`kept_output`) and published by the next call
        for the key without computing it again.
        """
        if manifest := self.complete(step, key):
            log.info("%s: reusing the output published for this input (key %s)", step, key[:12])
            return manifest
        with self.key_lock(step, key):
            self.fs.invalidate_cache(self._path(step, key))  # s3fs may remember the listing from before
            if manifest := self.complete(step, key):
                log.info("%s: reusing the output another run published meanwhile (key %s)", step, key[:12])
            else:
                output, files = self.kept_output(step, key) or self._compute(step, key, compute)
                manifest = self.publish(step, key, output, files)  # fails: the output stays kept
                self.computed.add((step, key))
            shutil.rmtree(self.work_dir(step, key), ignore_errors=True)
        return manifest

    def kept_output(self, step: str, key: str) -> tuple[Path, dict[str, Any]] | None:
        """The output an earlier attempt computed for ``key`` and failed to publish, with its listing, if it
        is complete and unchanged; None otherwise (a partial or altered one is removed)."""
        work = self.work_dir(step, key)
        output, listing = work / KEPT_OUTPUT, work / KEPT_LISTING
        if not listing.is_file():
            shutil.rmtree(output, ignore_errors=True)  # what a computation killed mid-way wrote
            return None
        try:
            files = json.loads(listing.read_text(encoding="utf-8"))
            if output.is_dir() and folder_listing(output) == files:
                log.info(
                    "%s: publishing the output computed before its publish failed (key %s)", step, key[:12]
                )
                return output, files
        except (OSError, ValueError):
            pass
        log.warning("%s: the output kept for key %s is incomplete; computing it again", step, key[:12])
        listing.unlink(missing_ok=True)
        shutil.rmtree(output, ignore_errors=True)
        return None

    def _compute(self, step: str, key: str, compute: Callable[[Path], object]) -> tuple[Path, dict[str, Any]]:
        """Run ``compute`` into the key's kept-output folder; its listing, written last, marks it complete."""
        work = self.work_dir(step, key)
        output = work / KEPT_OUTPUT
        output.mkdir(parents=True)
        try:
            compute(output)
        except BaseException:
            shutil.rmtree(output, ignore_errors=True)
            raise
        files = folder_listing(output)
        atomic_write_text(work / KEPT_LISTING, json.dumps(files))
        return output, files

    def _write_manifest(self, manifest: Manifest) -> None:
        target = self._path(manifest.step, manifest.key, MANIFEST)
        data = manifest.to_json().encode("utf-8")
        if self.is_local:  # a local rename is atomic; the temporary name never looks like a manifest
            atomic_write_bytes(Path(target), data)
            return
        # one S3 PUT is atomic: readers see the old object or the new one
        with_retries(lambda: self.fs.pipe_file(target, data), f"writing {target}", self.retry)


def _modified(info: dict[str, Any]) -> float:
    """A file's modification time in seconds from fsspec's listing (local: ``mtime``; S3: ``LastModified``)."""
    value = info.get("mtime") or info.get("LastModified") or 0.0
    return value.timestamp() if hasattr(value, "timestamp") else float(value)


def fetch_file(uri: str, target_dir: Path, storage_options: dict[str, Any], retry: RetryPolicy) -> Path:
    """Download ``uri`` (e.g. the run's s3:// data) afresh into ``target_dir``; the source may have changed,
    and the steps key on the bytes, not the name."""
    import fsspec

    fs, remote = fsspec.core.url_to_fs(uri, **storage_options)
    target = target_dir / hashlib.sha256(uri.encode()).hexdigest()[:16] / remote.rsplit("/", 1)[-1]
    with atomic_file(target) as partial:
        with_retries(lambda: fs.get_file(remote, str(partial)), f"downloading {uri}", retry)
    return target


class CorruptArtifact(Exception):
    """A stored file is missing or does not match its manifest."""


def verify(folder: Path, manifest: Manifest) -> None:
    for name, meta in manifest.files.items():
        path = folder / name
        if not path.is_file():
            raise CorruptArtifact(f"{manifest.step}/{manifest.key}: {name} is missing")
        if path.stat().st_size != meta["size"] or file_sha256(path) != meta["sha256"]:
            raise CorruptArtifact(f"{manifest.step}/{manifest.key}: {name} does not match its manifest")
