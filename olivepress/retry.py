"""Retry what a retry can fix: Prefect's retry policy applies unless the failure is the user's to fix."""

from __future__ import annotations

from olivepress.errors import UserError


def unless_user_error(task, task_run, state) -> bool:
    """A ``retry_condition_fn``: bad data, bad config or a failed gate fail the same way every time."""
    try:
        state.result(raise_on_failure=True)
    except UserError:
        return False
    except BaseException:
        return True
    return True
