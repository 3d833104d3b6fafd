"""prefect.yaml: `prefect deploy --all` against a real `prefect server` makes the deployments `olivepress
deploy` makes, on the pools the file names, and leaves an existing pool as it is."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from olivepress.config import SAMPLE_DATA
from olivepress.deployments import deploy as dp
from tests.conftest import REPO_ROOT
from tests.deployments.prefect_server import PREFECT, Stack, api, clean_env

PREFECT_YAML = REPO_ROOT / "prefect.yaml"
COMPARED = ("entrypoint", "description", "tags", "parameters", "enforce_parameter_schema", "work_pool_name")


def prefect_deploy(stack: Stack, *args: str) -> subprocess.CompletedProcess:
    """`prefect --no-prompt deploy ARGS` in the repository root, as a data team runs it."""
    return subprocess.run(
        [PREFECT, "--no-prompt", "deploy", *args],
        cwd=REPO_ROOT,
        env=clean_env(stack.root / "cli-home", PREFECT_API_URL=stack.api_url, COLUMNS="500"),
        capture_output=True,
        text=True,
        timeout=300,
    )


def pool_snapshot(client, name: str) -> dict:
    return client.read_work_pool(name).model_dump(mode="json", exclude={"updated"})


def deployment_fields(deployment) -> dict:
    fields = {name: getattr(deployment, name) for name in (*COMPARED, "job_variables", "pull_steps")}
    return {**fields, "schema": deployment.parameter_openapi_schema}


def test_prefect_yaml_holds_what_olivepress_deploy_applies():
    """One description of each deployment: the file's entries are deploy.py's, so the two ways agree."""
    entries = yaml.safe_load(PREFECT_YAML.read_text())
    assert entries["pull"] == [], "no code is pulled: the worker imports the installed flow"
    assert entries["deployments"] == [
        dp.deployment_spec(target, workdir=dp.IMAGE_WORKDIR) for target in dp.TARGETS
    ], "prefect.yaml and deployments/deploy.py's deployment_spec() disagree: change both"


def test_prefect_deploy_all_creates_the_deployments_on_the_named_pools(stack):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    missing = prefect_deploy(stack, "--all")
    output = missing.stdout + missing.stderr
    assert missing.returncode != 0 and "'olivepress-process' which does not exist" in output, output

    with api(stack), get_client(sync_client=True) as client:
        team_template = dp.pool_template("docker-gpu", image="team/image:7", gpu_device="3")
        assert client.read_deployments() == [], "Prefect creates no pool and no deployment without one"
        client.create_work_pool(
            WorkPoolCreate(
                name="olivepress-docker-gpu",
                type="docker",
                base_job_template=team_template,
                concurrency_limit=3,
            )
        )
        team_pool = pool_snapshot(client, "olivepress-docker-gpu")
        # the pools Prefect cannot create: olivepress deploy creates them, with the same deployments
        shortcut = {
            target: dp.deploy(target, workdir=dp.IMAGE_WORKDIR) for target in ("process", "kubernetes-gpu")
        }
        made = {
            target: deployment_fields(client.read_deployment(deployed.deployment_id))
            for target, deployed in shortcut.items()
        }

    result = prefect_deploy(stack, "--all")
    assert result.returncode == 0, result.stdout + result.stderr

    with api(stack), get_client(sync_client=True) as client:
        deployments = {d.name: d for d in client.read_deployments()}
        assert sorted(deployments) == sorted(dp.TARGETS)
        for target, deployed in shortcut.items():
            assert str(deployments[target].id) == deployed.deployment_id, "updated, not made twice"
            assert deployment_fields(deployments[target]) == made[target], f"{target}: the two ways differ"
        for target in dp.TARGETS:
            spec = dp.deployment_spec(target, workdir=dp.IMAGE_WORKDIR)
            deployment = deployments[target]
            assert deployment.work_pool_name == spec["work_pool"]["name"]
            assert deployment.job_variables == spec["work_pool"]["job_variables"]
            assert (deployment.parameters, deployment.tags) == (spec["parameters"], spec["tags"])
            assert deployment.entrypoint == dp.ENTRYPOINT and deployment.enforce_parameter_schema
            assert not deployment.pull_steps
            form = json.dumps(deployment.parameter_openapi_schema)
            assert str(SAMPLE_DATA) not in form and str(Path.home()) not in form, "no path of this machine"
            assert list(deployment.parameter_openapi_schema["properties"]) == ["config"]
        assert pool_snapshot(client, "olivepress-docker-gpu") == team_pool, "the team's pool is untouched"
