"""What a cached step is: its declaration (inputs, settings, code), its key, and its Prefect task.

Each step module (``tasks/<step>.py``) declares its :class:`Step`: the inputs its output is computed from
(hashed by content), the config settings it reads, and, found from its imports, the olivepress code it runs
(:func:`olivepress.store.cache_keys.code_modules`). Its task receives exactly the declared inputs and a
:class:`StepSettings` holding only the declared settings, and the key is made from that same object, so
the key covers what the step reads: a setting the step did not declare is an ``AttributeError`` in it.

Caching: the store is the truth about what is done (see :mod:`olivepress.store`); Prefect's cache is the
fast path that shows a reused step as Cached in the UI. The flow asks Prefect to refresh a step's cache
whenever the store does not hold a verified output for its key, so a cache record never stands in for a
missing or corrupted artifact. Retries: see :func:`prefect_retries` and docs/caching.md, "Retries".
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from olivepress.retry import retry_if_transient
from olivepress.store.cache_keys import code_modules, records_sha256, step_key

if TYPE_CHECKING:
    from olivepress.config import RetrySettings, RunConfig
    from olivepress.store import Manifest

# the first parameters of every step task; the declared inputs and context follow
TASK_PARAMETERS = ("store", "key", "settings")


class StepSettings(SimpleNamespace):
    """The settings a step declared, by their config names (``settings.quantize.group_size``,
    ``settings.seed``), and nothing else."""

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"{name!r} is not among the settings this step declared (its module's STEP)")

    def for_key(self) -> dict[str, Any]:
        return {
            name: value.model_dump(mode="json") if isinstance(value, BaseModel) else value
            for name, value in sorted(vars(self).items())
        }


@dataclass(frozen=True)
class StepOutput:
    """A published output as the next step sees it: its manifest (whose digest keys the next step) and a
    local folder with its verified files."""

    manifest: Manifest
    folder: Path


@dataclass(frozen=True)
class Step:
    """One cached step, declared in its own module.

    ``inputs``: the task's arguments its output is computed from; each is part of the key by content
    (:func:`input_digest`). ``settings``: the config fields it reads (sections such as ``quantize``, or
    top-level settings such as ``seed``). ``context``: arguments that say where to report or how to name
    things, never what to compute: not part of the key. ``module``: the step's module (``__name__``); its
    code version covers the olivepress modules it imports.
    """

    name: str
    module: str
    inputs: tuple[str, ...]
    settings: tuple[str, ...]
    context: tuple[str, ...] = ()
    tags: tuple[str, ...] = field(default=())

    def settings_of(self, config: RunConfig) -> StepSettings:
        return StepSettings(**{name: getattr(config, name) for name in self.settings})

    def key(self, inputs: dict[str, str], settings: StepSettings) -> str:
        """The cache key from the inputs' digests (the declared ones, and the run's data hash) and the
        settings the task receives."""
        if missing := set(self.inputs) - set(inputs):
            raise ValueError(f"{self.name}: no digest for its input(s) {sorted(missing)}")
        if set(vars(settings)) != set(self.settings):
            raise ValueError(
                f"{self.name}: settings {sorted(vars(settings))}, declared {list(self.settings)}"
            )
        return step_key(self.name, self.module, inputs=inputs, settings=settings.for_key())

    def code_modules(self) -> tuple[str, ...]:
        return code_modules(self.module)

    def task(self, function):
        """Decorate the step's task function: ``(store, key, settings, *inputs, *context)``, checked here.

        Prefect caches it by the key the flow computed; retries and their delays are set per run
        (:func:`prefect_retries`), and only a transient failure is retried."""
        from prefect import task

        parameters = tuple(inspect.signature(function).parameters)
        expected = TASK_PARAMETERS + self.inputs + self.context
        if parameters != expected:
            raise TypeError(f"{function.__name__} takes {parameters}; step {self.name} declares {expected}")
        prefect_task = task(
            name=self.name,
            cache_key_fn=by_cache_key,
            persist_result=True,
            retry_condition_fn=retry_if_transient,
            # its name too: a tag concurrency limit on "finetune" (deploy --finetune-limit) caps trainings
            tags=sorted({"olivepress", self.name, *self.tags}),
        )(function)
        prefect_task.step = self
        return prefect_task


def by_cache_key(context, parameters: dict) -> str:
    """A ``cache_key_fn``: the content key the flow computed for this step (see :meth:`Step.key`), in this
    store. Prefect keeps its cache records in its own result storage, shared by every store on the machine:
    a record of the same key in another store names a publish this store does not have."""
    return f"{parameters['key']}-{parameters['store'].id}"


def prefect_retries(retries: RetrySettings) -> dict[str, Any]:
    """Prefect task options for ``retries.step_attempts`` tries with exponential backoff and jitter."""
    from prefect.tasks import exponential_backoff

    count = retries.step_attempts - 1
    delays = exponential_backoff(backoff_factor=retries.backoff_seconds)(count) if count else 0
    return {
        "retries": count,
        "retry_delay_seconds": delays,
        "retry_jitter_factor": retries.jitter,
    }


def input_digest(value: Any) -> str:
    """A step input's content hash: a stored output's manifest digest, a folder's or file's SHA-256, the
    hash of a list of examples, or of a name (the target an export is built for)."""
    import hashlib

    from olivepress.files import file_sha256, folder_sha256

    if isinstance(value, StepOutput):
        return value.manifest.digest
    if isinstance(value, Path):
        return folder_sha256(value) if value.is_dir() else file_sha256(value)
    if isinstance(value, list):
        return records_sha256(value)
    if isinstance(value, str):
        return hashlib.sha256(value.encode()).hexdigest()
    raise TypeError(f"no content hash for a step input of type {type(value).__name__}")
