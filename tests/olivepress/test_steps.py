"""Step declarations: a task takes exactly what its step declares, sees only its declared settings, and a
publish that fails past the store's retries is retried by Prefect from the kept output."""

from __future__ import annotations

from pathlib import Path

import pytest

from olivepress.config import RunConfig, load_config
from olivepress.retry import RetryPolicy
from olivepress.steps import Step, StepSettings, prefect_retries
from olivepress.store import ArtifactStore
from olivepress.tasks import evaluate, finetune, optimize, quantize, validate
from tests.olivepress.test_store import failing_uploads, make_output

STEPS = [validate.STEP, quantize.STEP, finetune.STEP, optimize.STEP, evaluate.STEP]


def test_every_declared_setting_is_a_setting_of_the_config():
    for step in STEPS:
        assert set(step.settings) <= set(RunConfig.model_fields), step.name
        assert step.module == f"olivepress.tasks.{step.name}"


def test_a_step_sees_only_the_settings_it_declared():
    settings = quantize.STEP.settings_of(load_config(overrides={"quantize.group_size": 64}))
    assert settings.quantize.group_size == 64 and settings.seed == 0
    with pytest.raises(AttributeError, match="'finetune' is not among the settings this step declared"):
        _ = settings.finetune
    assert sorted(settings.for_key()) == ["quantize", "seed", "text_template", "trust_remote_code"]


def test_a_task_must_take_what_its_step_declares():
    step = Step("demo", __name__, inputs=("model_dir",), settings=("seed",))
    with pytest.raises(TypeError, match="declares"):

        @step.task
        def wrong(store, key, settings, checkpoint_dir):
            raise AssertionError("never called")


def test_prefect_retries_follow_the_config():
    options = prefect_retries(load_config(overrides={"retries.step_attempts": 3}).retries)
    assert options["retries"] == 2 and len(options["retry_delay_seconds"]) == 2
    assert prefect_retries(load_config(overrides={"retries.step_attempts": 1}).retries)["retries"] == 0


DEMO = Step("demo", __name__, inputs=("source",), settings=("seed",))
COMPUTED: list[Path] = []
ATTEMPTS: list[int] = []


@DEMO.task
def demo_task(store: ArtifactStore, key: str, settings: StepSettings, source: Path):
    ATTEMPTS.append(settings.seed)
    return store.produce("demo", key, lambda out: (COMPUTED.append(out), make_output(out)))


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_a_publish_that_fails_past_the_stores_retries_is_retried_by_prefect_without_recomputing(
    prefect_api, tmp_path, monkeypatch
):
    from prefect import flow

    store = ArtifactStore(
        str(tmp_path / "store"), tmp_path / "cache", retry=RetryPolicy(attempts=2, base_delay_s=0.01)
    )
    failing_uploads(store, monkeypatch, failures=2)  # the store's two tries of the first upload
    retries = load_config(overrides={"retries.step_attempts": 2, "retries.backoff_seconds": 0}).retries
    task = demo_task.with_options(refresh_cache=True, **prefect_retries(retries))
    COMPUTED.clear()
    ATTEMPTS.clear()

    @flow
    def one_step():
        return task(store, "k1", DEMO.settings_of(load_config()), source=tmp_path)

    manifest = one_step()
    assert len(ATTEMPTS) == 2, "Prefect retried the step"
    assert len(COMPUTED) == 1, "the retry published the kept output; it did not compute it again"
    assert store.complete("demo", "k1") == manifest
    assert (store.local_copy(manifest) / "model.bin").read_bytes() == b"weights" * 1000


def test_prefects_cache_record_of_a_key_belongs_to_one_store(tmp_path):
    from olivepress.steps import by_cache_key

    one = ArtifactStore(str(tmp_path / "one"), tmp_path / "cache")
    other = ArtifactStore(str(tmp_path / "other"), tmp_path / "cache")
    assert by_cache_key(None, {"key": "k", "store": one}) == by_cache_key(None, {"key": "k", "store": one})
    assert by_cache_key(None, {"key": "k", "store": one}) != by_cache_key(None, {"key": "k", "store": other})
