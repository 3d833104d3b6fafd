"""A real ``prefect server`` for the tests that need one: started on loopback in its own process group with
its own PREFECT_HOME, torn down (group killed) even when a check fails, its log kept in
``$OLIVEPRESS_TEST_ARTIFACTS`` (default ``tests/artifacts/``). The ``stack`` fixture (conftest.py) is one
per test module."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO_ROOT

PREFECT = str(Path(sys.executable).parent / "prefect")
SERVER_START_S = 120


def artifacts_dir() -> Path:
    target = Path(os.environ.get("OLIVEPRESS_TEST_ARTIFACTS", REPO_ROOT / "tests" / "artifacts"))
    target.mkdir(parents=True, exist_ok=True)
    return target


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """This process's environment without any Prefect setting, plus an isolated PREFECT_HOME."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_LEVEL="INFO",
        **extra,
    )
    return env


@contextmanager
def process_group(
    command: list[str], env: dict[str, str], log: Path, cwd: Path
) -> Iterator[subprocess.Popen]:
    """A subprocess in its own session, killed with its children (SIGTERM, then SIGKILL) on the way out."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            yield proc
        finally:
            for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue


def tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else ""


@dataclass
class Stack:
    url: str  # the UI, served by the server itself
    api_url: str
    root: Path
    logs: list[Path]


@contextmanager
def prefect_server(root: Path) -> Iterator[Stack]:
    """``prefect server start`` (API and UI) on a free loopback port, its files under ``root``."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = root / "server.log"
    env = clean_env(
        root / "server-home",
        PREFECT_UI_ENABLED="true",
        # the UI's pages call this URL; by default it is built from the default port, not --port
        PREFECT_UI_API_URL=f"{url}/api",
        PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT="false",
    )
    command = [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with process_group(command, env, log, root) as server:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if server.poll() is not None:
                pytest.fail(f"prefect server exited with {server.returncode}:\n{tail(log)}")
            try:
                if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prefect server did not answer /api/health in {SERVER_START_S} s:\n{tail(log)}")
            time.sleep(0.5)
        stack = Stack(url=url, api_url=f"{url}/api", root=root, logs=[log])
        try:
            yield stack
        finally:
            # the server's and workers' logs stay beside the screenshots, for a failure in CI
            for path in stack.logs:
                if path.is_file():
                    shutil.copyfile(path, artifacts_dir() / f"prefect-{path.name}")


@contextmanager
def api(stack: Stack):
    """This process's Prefect client pointed at the test server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: stack.api_url}):
        yield
