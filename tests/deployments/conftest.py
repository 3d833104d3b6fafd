"""The Prefect server of the tests in this folder that need one."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.deployments.prefect_server import Stack, prefect_server


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    with prefect_server(tmp_path_factory.mktemp("prefect-stack")) as server:
        yield server
