"""How each step becomes a Prefect task: cached by its content key, retried only when a retry can help.

The store is the truth about what is done (see :mod:`olivepress.store`); Prefect's cache is the fast path
that lets the UI show a reused step as Cached. The flow asks Prefect to refresh a step's cache whenever
the store does not hold a verified output for its key, so a cache record never stands in for a missing
or corrupted artifact.
"""

from __future__ import annotations

from prefect import task

from olivepress.retry import retry_if_transient


def by_cache_key(context, parameters: dict) -> str:
    """A ``cache_key_fn``: the content key the flow computed for this step (see cache_keys.step_key)."""
    return parameters["key"]


def step_task(name: str, *tags: str):
    """The decorator every cached step shares; retries and their delays are set per run by the flow."""
    return task(
        name=name,
        cache_key_fn=by_cache_key,
        persist_result=True,
        retry_condition_fn=retry_if_transient,
        tags=["olivepress", *tags],
    )
