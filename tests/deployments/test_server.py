"""The deployments on a real Prefect server: `prefect server start` on loopback, a process work pool, a real
`prefect worker`, runs triggered through the API, their history read back, and the run's page opened in the
Prefect UI with headless Chromium.

Everything runs in subprocesses with their own PREFECT_HOME and is torn down (process groups killed) even
when a check fails. The screenshots, the run page's text and the server's and worker's logs are kept in
``$OLIVEPRESS_TEST_ARTIFACTS`` (default ``tests/artifacts/``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from olivepress.deployments import deploy as dp
from olivepress.registry import LocalRegistry
from tests.deployments.chromium import Browser, chromium_binary
from tests.deployments.prefect_server import (
    PREFECT,
    Stack,
    api,
    artifacts_dir,
    clean_env,
    process_group,
    tail,
)
from tests.flows import test_pipeline as pipeline_tests

pytestmark = pytest.mark.slow

STEPS = ("validate", "quantize", "finetune", "optimize", "evaluate_base", "evaluate", "report", "register")
REPORT_KEYS = {"olivepress-report", "olivepress-metrics", "olivepress-gate"}
RUNS_S = 300


@contextmanager
def worker(stack: Stack, pool: str) -> Iterator[subprocess.Popen]:
    log = stack.root / f"worker-{pool}.log"
    stack.logs.append(log)
    env = clean_env(
        stack.root / "worker-home",
        PREFECT_API_URL=stack.api_url,
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_WORKER_PREFETCH_SECONDS="5",
    )
    # the flow runs import olivepress from this venv (the worker runs them with its own interpreter)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    with process_group([PREFECT, "worker", "start", "--pool", pool], env, log, stack.root) as proc:
        yield proc


def wait_final(flow_run_ids: list[str], timeout: float, worker_proc, worker_log: Path) -> dict:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = {run_id: client.read_flow_run(run_id) for run_id in flow_run_ids}
            if all(run.state and run.state.is_final() for run in runs.values()):
                return runs
            if worker_proc.poll() is not None:
                pytest.fail(f"the worker exited with {worker_proc.returncode}:\n{tail(worker_log)}")
            if time.monotonic() > deadline:
                states = {run.name: run.state.type.value for run in runs.values()}
                pytest.fail(f"runs not finished after {timeout} s: {states}\n{tail(worker_log)}")
            time.sleep(1)


def task_runs(flow_run_id: str) -> dict[str, str]:
    """Step name → state type of each task run of a flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    # a task run is named "<task>-<suffix>"
    return {run.name.rsplit("-", 1)[0]: run.state_type.value for run in runs}


def trigger_from_cli(stack: Stack, deployment: str, config: dict) -> str:
    """`prefect deployment run NAME -p config=JSON`; returns the flow run's id."""
    result = subprocess.run(
        [PREFECT, "deployment", "run", deployment, "-p", f"config={json.dumps(config)}"],
        env=clean_env(stack.root / "cli-home", PREFECT_API_URL=stack.api_url),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"UUID: ([0-9a-f-]{36})", result.stdout)
    assert match, result.stdout
    return match.group(1)


@dataclass
class Outcome:
    """What the module's one deployment and its two runs left on the server."""

    work: Path
    pool: str
    deployed: dict[str, dp.Deployed]
    good: object  # FlowRun
    bad: object
    steps: dict[str, dict[str, str]]  # flow run id -> step -> task run state
    artifacts: dict[str, dict[str, object]]  # flow run id -> key -> Artifact
    registry: LocalRegistry


@pytest.fixture(scope="module")
def outcome(stack, tiny_model_dir, tmp_path_factory) -> Outcome:
    """Deploy the three targets, trigger a good and a bad-data run on the process pool, let a real worker
    run them, and read everything back through the API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    work = tmp_path_factory.mktemp("deployed")
    pool = "olivepress-test-process"
    good_config = pipeline_tests.tiny_config(work, tiny_model_dir)
    bad_data = work / "bad.jsonl"
    bad_data.write_text('{"prompt": "a", "response": "b"}\n["not", "an", "object"]\n', encoding="utf-8")
    bad_config = pipeline_tests.tiny_config(work, tiny_model_dir, data=bad_data)

    with api(stack):
        deployed = {
            "process": dp.deploy("process", pool=pool, name="process-test", workdir=work, finetune_limit=1),
            # the GPU targets go to the same server: the API accepts their pools, templates and deployments
            # (no Docker engine, cluster or GPU here runs them)
            "docker-gpu": dp.deploy("docker-gpu", image="olivepress-gpu:test"),
            "kubernetes-gpu": dp.deploy(
                "kubernetes-gpu", image="registry.example/olivepress-gpu:test", concurrency=4
            ),
        }
        deployment_id = deployed["process"].deployment_id
        # the good run goes through the command the README gives the data team, the bad one through the API
        good_id = trigger_from_cli(stack, deployed["process"].name, good_config.model_dump(mode="json"))
        with get_client(sync_client=True) as client:
            bad = client.create_flow_run_from_deployment(
                deployment_id, parameters={"config": bad_config.model_dump(mode="json")}
            )
        ids = [good_id, str(bad.id)]
        with worker(stack, pool) as worker_proc:
            runs = wait_final(ids, RUNS_S, worker_proc, stack.logs[-1])
        with get_client(sync_client=True) as client:
            artifacts = {
                run_id: {
                    artifact.key: artifact
                    for artifact in client.read_artifacts(
                        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
                    )
                }
                for run_id in ids
            }
        steps = {run_id: task_runs(run_id) for run_id in ids}
    return Outcome(
        work=work,
        pool=pool,
        deployed=deployed,
        good=runs[ids[0]],
        bad=runs[ids[1]],
        steps=steps,
        artifacts=artifacts,
        registry=LocalRegistry(good_config.registry.path),
    )


def test_pools_deployments_and_the_run_forms_schema(stack, outcome):
    from prefect.client.orchestration import get_client

    deployed = outcome.deployed
    with api(stack), get_client(sync_client=True) as client:
        process_pool = client.read_work_pool(outcome.pool)
        assert (process_pool.type, process_pool.concurrency_limit) == ("process", 1)
        docker_pool = client.read_work_pool(deployed["docker-gpu"].pool)
        assert (docker_pool.type, docker_pool.concurrency_limit) == ("docker", 1)
        kwargs = docker_pool.base_job_template["variables"]["properties"]["container_create_kwargs"]
        assert kwargs["default"]["device_requests"][0]["capabilities"] == [["gpu"]]
        kube_pool = client.read_work_pool(deployed["kubernetes-gpu"].pool)
        assert (kube_pool.type, kube_pool.concurrency_limit) == ("kubernetes", 4)
        pod = kube_pool.base_job_template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus_per_run }}"
        assert client.read_concurrency_limit_by_tag("finetune").concurrency_limit == 1

        deployment = client.read_deployment(deployed["process"].deployment_id)
        assert deployment.entrypoint == "olivepress.flows.pipeline.olivepress_flow"
        assert deployment.job_variables == {"working_dir": str(outcome.work.resolve())}
        assert deployment.enforce_parameter_schema
        run_config = deployment.parameter_openapi_schema["definitions"]["RunConfig"]["properties"]
        assert run_config["data"]["description"] and run_config["device"]["enum"] == ["auto", "cpu", "gpu"]
        gpu_deployment = client.read_deployment(deployed["docker-gpu"].deployment_id)
        assert gpu_deployment.parameters["config"] == {"device": "gpu", "targets": ["cpu"]}
        assert gpu_deployment.job_variables["image"] == "olivepress-gpu:test"

        # the API refuses what the run form refuses, before any run exists
        with pytest.raises(Exception, match=r"(?i)validation|max_steps"):
            client.create_flow_run_from_deployment(
                deployment.id, parameters={"config": {"finetune": {"max_steps": 0}}}
            )


def test_the_good_run_completed_every_step_published_its_report_and_registered(stack, outcome):
    good = outcome.good
    assert good.state.is_completed(), f"{good.state}\n{tail(stack.logs[-1])}"
    steps = outcome.steps[str(good.id)]
    assert set(STEPS) <= set(steps) and all(steps[step] == "COMPLETED" for step in STEPS), steps
    artifacts = outcome.artifacts[str(good.id)]
    assert set(artifacts) >= REPORT_KEYS, set(artifacts)
    assert "data:image/png;base64," in artifacts["olivepress-report"].data
    assert "gate passed" in artifacts["olivepress-gate"].description
    entries = outcome.registry.entries()
    assert [entry.lineage["flow_run_id"] for entry in entries] == [str(good.id)], (
        "only the good run registers"
    )


def test_the_bad_data_run_failed_with_its_validation_report_and_registered_nothing(outcome):
    bad = outcome.bad
    assert bad.state.is_failed(), bad.state
    steps = outcome.steps[str(bad.id)]
    assert steps.get("validate") == "FAILED" and "quantize" not in steps, steps
    artifacts = outcome.artifacts[str(bad.id)]
    assert "olivepress-validation" in artifacts and not REPORT_KEYS & set(artifacts), set(artifacts)
    assert "line 2: " in artifacts["olivepress-validation"].data
    assert all(entry.lineage["flow_run_id"] != str(bad.id) for entry in outcome.registry.entries())


def test_the_pool_ran_one_at_a_time(outcome):
    first, second = sorted([outcome.good, outcome.bad], key=lambda run: run.start_time)
    assert first.end_time <= second.start_time, "the pool's concurrency limit of 1 let two runs overlap"


def test_the_run_pages_in_the_prefect_ui(stack, outcome, tmp_path):
    """The UI that `prefect server` serves, rendered by headless Chromium: the run's Artifacts tab, the
    report artifact with its plots, the failed run's validation report. Screenshots: tests/artifacts/."""
    if chromium_binary() is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium): the UI pages were not checked")
    good, bad = outcome.good, outcome.bad
    out = artifacts_dir()
    with Browser(tmp_path / "chromium") as browser:
        browser.goto(f"{stack.url}/runs/flow-run/{good.id}")
        browser.wait_for(
            f"document.body.innerText.includes({good.name!r}) && document.getElementById('artifacts')"
        )
        browser.evaluate("document.getElementById('artifacts').click()")  # the run page's Artifacts tab
        browser.wait_for(
            " && ".join(f"document.body.innerText.includes({key!r})" for key in sorted(REPORT_KEYS))
        )
        text = browser.text()
        browser.screenshot(out / "flow-run-artifacts.png")
        (out / "flow-run-artifacts.txt").write_text(text, encoding="utf-8")
        n_steps = len(outcome.steps[str(good.id)])
        for expected in ("Completed", f"{n_steps} Task runs", "process-test", outcome.pool, "gate passed"):
            assert expected in text, f"{expected!r} not on the run's page:\n{text[:3000]}"

        # the report artifact's own page renders the markdown and its plots (PNG data URIs)
        report_id = outcome.artifacts[str(good.id)]["olivepress-report"].id
        browser.goto(f"{stack.url}/artifacts/artifact/{report_id}")
        plots = "[...document.images].filter(image => image.src.startsWith('data:image/png'))"
        browser.wait_for(f"{plots}.length >= 2 && {plots}.every(image => image.complete)")
        sizes = browser.evaluate(f"{plots}.map(image => [image.naturalWidth, image.naturalHeight])")
        assert all(width > 0 and height > 0 for width, height in sizes), sizes
        assert "olivepress run: gate passed" in browser.text()
        browser.screenshot(out / "report-artifact.png")

        browser.goto(f"{stack.url}/runs/flow-run/{bad.id}")
        browser.wait_for(
            f"document.body.innerText.includes({bad.name!r}) && document.getElementById('artifacts')"
        )
        browser.evaluate("document.getElementById('artifacts').click()")
        browser.wait_for("document.body.innerText.includes('olivepress-validation')")
        assert "Failed" in browser.text()
        browser.screenshot(out / "failed-run-artifacts.png")
    for name in ("flow-run-artifacts.png", "report-artifact.png", "failed-run-artifacts.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
