"""An exclusive lease on one S3 object: the lock the artifact store takes per step key on ``s3://``.

S3 has no locks, but it has conditional writes:

* **taking** the lease is ``PutObject`` with ``If-None-Match: *``: of two runs writing the lease object at
  once, exactly one succeeds, the other gets 412 Precondition Failed and waits, polling;
* the lease object holds its **owner** and an **expiry** (``LEASE_SECONDS`` ahead); the holder renews it
  every quarter of that with ``If-Match`` on its own ETag, so a waiter can tell a live holder from a dead
  one. A lease past its expiry is **taken over** with ``If-Match`` on the ETag the waiter read: of several
  waiters only one wins;
* a write whose answer was lost and whose retry gets 412 is **read back**: if the owner is this lease, it
  holds;
* **releasing** deletes the object if the owner read back is this lease.

A holder that loses its lease (it could not renew for ``LEASE_SECONDS``: the network went away) logs a
warning and carries on: another run may then compute the same step, and the store keeps whichever output
publishes last, both whole. A server without conditional writes (HTTP 501) gets a warning and no lease,
which is the same outcome. Expiry compares the holder's clock with the waiter's: clocks that disagree by
more than ``LEASE_SECONDS`` could let a waiter take over a live lease (the same outcome again).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from olivepress.retry import RetryPolicy, with_retries

log = logging.getLogger(__name__)

LEASE_SECONDS = 120.0
POLL_SECONDS = 2.0


class S3Lease:
    def __init__(
        self,
        fs,
        path: str,
        *,
        retry: RetryPolicy,
        seconds: float | None = None,
        poll_seconds: float | None = None,
    ) -> None:
        self.fs = fs  # an s3fs.S3FileSystem
        self.path = path
        self.bucket, self.key, _ = fs.split_path(path)
        self.retry = retry
        self.seconds = seconds or LEASE_SECONDS
        self.poll_seconds = poll_seconds or POLL_SECONDS
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self.etag: str | None = None
        self.held = False
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def acquire(self, waiting: str | None = None) -> bool:
        """Wait until this lease holds the object; False if the server cannot do conditional writes."""
        announced = False
        while True:
            try:
                self.etag = with_retries(self._create, f"taking the lease {self.path}", self.retry)
                break
            except Exception as error:
                if isinstance(error, ConditionalWritesUnsupported):
                    log.warning(
                        "%s: this S3 server does not support conditional writes (%s); concurrent runs of "
                        "this step may both compute it (the store keeps one whole output)",
                        self.path,
                        error,
                    )
                    return False
                if not _precondition_failed(error):
                    raise
            current = with_retries(self._read, f"reading the lease {self.path}", self.retry)
            if current is None:  # released between our write and our read: try again at once
                continue
            body, etag = current
            if body.get("owner") == self.owner:  # our own write, whose answer was lost
                self.etag = etag
                break
            if float(body.get("expires", 0)) < time.time():
                log.warning("%s: lease of %s expired; taking it over", self.path, body.get("owner"))
                try:  # a lost answer's retry gets 412 and is read back as ours above
                    self.etag = with_retries(
                        lambda etag=etag: self._put(IfMatch=etag), f"taking over {self.path}", self.retry
                    )
                    break
                except Exception as error:
                    if not (_precondition_failed(error) or isinstance(error, FileNotFoundError)):
                        raise
                    continue  # another waiter took it, or its holder renewed or released it
            if waiting and not announced:
                log.info("%s (lease held by %s)", waiting, body.get("owner"))
                announced = True
            time.sleep(self.poll_seconds)
        self.held = True
        self._stop.clear()
        self._renewer = threading.Thread(target=self._renew_until_released, name="s3-lease", daemon=True)
        self._renewer.start()
        return True

    def release(self) -> None:
        """Stop renewing and delete the lease object if it is still this lease's."""
        if not self.held:
            return
        self.held = False
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        try:
            current = with_retries(self._read, f"reading the lease {self.path}", self.retry)
            if current is not None and current[0].get("owner") == self.owner:
                with_retries(
                    lambda: self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key),
                    f"releasing the lease {self.path}",
                    self.retry,
                )
        except Exception as error:  # it expires on its own
            log.warning("%s: could not release the lease (%s); it expires by itself", self.path, error)

    def __enter__(self) -> S3Lease:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def _renew_until_released(self) -> None:
        while not self._stop.wait(self.seconds / 4):
            try:
                self.etag = self._put(IfMatch=self.etag)
            except Exception as error:
                if _precondition_failed(error) or isinstance(error, FileNotFoundError):
                    current = self._read_quietly()
                    if current is not None and current[0].get("owner") == self.owner:
                        self.etag = current[1]  # our last renewal went through; its answer was lost
                        continue
                    log.warning(
                        "%s: lost the lease (another run took it over); both runs may compute this step",
                        self.path,
                    )
                    return
                log.warning("%s: renewing the lease failed (%s); trying again", self.path, error)

    def _body(self) -> bytes:
        expires = time.time() + self.seconds
        return json.dumps({"owner": self.owner, "expires": expires, "seconds": self.seconds}).encode()

    def _create(self) -> str:
        try:
            return self._put(IfNoneMatch="*")
        except Exception as error:
            if _unsupported(error):  # a 501, not a transient 5xx: no retry
                raise ConditionalWritesUnsupported(str(error)) from None
            raise

    def _put(self, **condition: str) -> str:
        answer = self.fs.call_s3(
            "put_object", Bucket=self.bucket, Key=self.key, Body=self._body(), **condition
        )
        return answer["ETag"]

    def _read(self) -> tuple[dict[str, Any], str] | None:
        """The lease object's body and ETag from one GET, or None if there is none."""
        from fsspec.asyn import sync

        async def get() -> tuple[bytes, str]:
            answer = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            try:
                return await answer["Body"].read(), answer["ETag"]
            finally:
                answer["Body"].close()

        try:
            data, etag = sync(self.fs.loop, get)
        except FileNotFoundError:
            return None
        try:
            return json.loads(data), etag
        except ValueError:  # not ours to judge: treat as expired so that it is replaced conditionally
            return {"owner": None, "expires": 0}, etag

    def _read_quietly(self) -> tuple[dict[str, Any], str] | None:
        try:
            return self._read()
        except Exception:
            return None


def _client_errors(error: BaseException):
    """The botocore ClientErrors in ``error``'s chain (s3fs translates them into OSErrors)."""
    from botocore.exceptions import ClientError

    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ClientError):
            yield error
        error = error.__cause__ or error.__context__


def _status_and_code(error: BaseException) -> tuple[int, str] | None:
    for client_error in _client_errors(error):
        status = client_error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status, client_error.response.get("Error", {}).get("Code", "")
    return None


def _precondition_failed(error: BaseException) -> bool:
    """412 (a conditional write lost), or 409 ConditionalRequestConflict (S3's answer to a race)."""
    if isinstance(error, FileExistsError):  # s3fs's translation of If-None-Match's 412
        return True
    found = _status_and_code(error)
    return found is not None and (found[0] in (409, 412) or found[1] == "PreconditionFailed")


def _unsupported(error: BaseException) -> bool:
    found = _status_and_code(error)
    return found is not None and (found[0] == 501 or found[1] == "NotImplemented")


class ConditionalWritesUnsupported(Exception):
    """The S3 server answered a conditional write with 501 Not Implemented."""
