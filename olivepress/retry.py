"""Retry what a retry can fix, with exponential backoff and jitter; never what the user must fix.

Transient: connection errors and timeouts (httpx's too: the Hugging Face hub's client), and 429, 5xx and
throttling answers (S3's, Azure's, the hub's). Everything else, and above all a ``UserError`` (bad data,
bad config, a failed gate, a gated or missing model), fails at once: it would fail the same way.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from olivepress.errors import UserError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    base_delay_s: float = 1.0
    max_delay_s: float = 30.0
    jitter: float = 0.5  # each delay is scaled by a random factor in [1 - jitter, 1 + jitter]

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        base = min(self.base_delay_s * 2 ** (attempt - 1), self.max_delay_s)
        return base * random.uniform(1 - self.jitter, 1 + self.jitter)


def is_transient(error: BaseException) -> bool:
    """Failures a retry can fix: the network, S3's 5xx/throttling and Azure's 429/5xx answers, also when
    wrapped (s3fs and Prefect wrap some); never a ``UserError``, whatever it was raised from."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserError):
            return False
        if _transient_itself(error):
            return True
        seen.add(id(error))
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return False


def _transient_itself(error: BaseException) -> bool:
    if (
        isinstance(error, (ConnectionError, TimeoutError))
        or _azure_transient(error)
        or _httpx_transient(error)
    ):
        return True
    try:
        from botocore.exceptions import ClientError, HTTPClientError
        from botocore.exceptions import ConnectionError as BotoConnectionError
    except ImportError:  # no S3 support installed: only the errors above are known
        return False
    if isinstance(error, (BotoConnectionError, HTTPClientError)):
        return True
    if isinstance(error, ClientError):
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        code = error.response.get("Error", {}).get("Code", "")
        return status >= 500 or status == 429 or code in {"Throttling", "ThrottlingException", "SlowDown"}
    return False


def with_retries(action: Callable[[], T], what: str, policy: RetryPolicy) -> T:
    for attempt in range(1, policy.attempts + 1):
        try:
            return action()
        except Exception as error:
            if attempt == policy.attempts or not is_transient(error):
                raise
            delay = policy.delay(attempt)
            log.warning(
                "%s failed (%s: %s); retry %d/%d in %.1f s",
                what,
                type(error).__name__,
                error,
                attempt,
                policy.attempts - 1,
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def _azure_transient(error: BaseException) -> bool:
    try:
        from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError
    except ImportError:
        return False
    if isinstance(error, (ServiceRequestError, ServiceResponseError)):
        return True
    status = getattr(error, "status_code", None) or 0
    return isinstance(error, HttpResponseError) and (status == 429 or status >= 500)


def _httpx_transient(error: BaseException) -> bool:
    """httpx's failures (huggingface_hub's client, whose HfHubHTTPError is an httpx error that carries the
    response): a connection that failed, dropped or timed out, or a 429 or 5xx answer. Its own errors are
    not builtin ConnectionErrors, and huggingface_hub lets some through (a tree listing, a 5xx download)."""
    try:
        import httpx
    except ImportError:
        return False
    if isinstance(error, (httpx.NetworkError, httpx.TimeoutException, httpx.RemoteProtocolError)):
        return True
    status = getattr(getattr(error, "response", None), "status_code", 0) or 0
    return isinstance(error, httpx.HTTPError) and (status == 429 or status >= 500)


def retry_if_transient(task, task_run, state) -> bool:
    """A Prefect ``retry_condition_fn``: retry a failed step only when its failure was transient."""
    try:
        state.result(raise_on_failure=True)
    except BaseException as error:
        return is_transient(error)
    return False
