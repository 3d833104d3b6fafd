"""Credentials from Prefect Secret blocks, on a real (ephemeral) Prefect API."""

import os

import pytest

from olivepress.errors import UserError
from olivepress.secrets import apply_secrets


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def saved_secrets(monkeypatch):
    from prefect.blocks.system import Secret

    Secret(value="hf_abc").save("hf-token", overwrite=True)
    Secret(value={"key": "id", "secret": "s"}).save("json-secret", overwrite=True)
    for variable in ("HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "OTHER"):
        monkeypatch.delenv(variable, raising=False)


def test_each_variable_gets_its_blocks_value(saved_secrets, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "the-workers-own")
    assert apply_secrets({"HF_TOKEN": "hf-token", "AWS_SECRET_ACCESS_KEY": "hf-token"}) == [
        "HF_TOKEN",
        "AWS_SECRET_ACCESS_KEY",
    ]
    assert os.environ["HF_TOKEN"] == os.environ["AWS_SECRET_ACCESS_KEY"] == "hf_abc", "the block wins"


def test_a_missing_block_names_the_setting_and_sets_nothing(saved_secrets):
    with pytest.raises(
        UserError, match=r"secrets\.OTHER: the Prefect server has no Secret block named 'nope'"
    ):
        apply_secrets({"HF_TOKEN": "hf-token", "OTHER": "nope"})
    assert "HF_TOKEN" not in os.environ, "every block is read before any variable is set"


def test_a_json_secret_is_refused(saved_secrets):
    with pytest.raises(UserError, match=r"secrets\.OTHER: Secret block 'json-secret' holds JSON"):
        apply_secrets({"OTHER": "json-secret"})


def test_no_secrets_reads_nothing():
    assert apply_secrets({}) == []
