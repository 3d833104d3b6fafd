"""Deployments of the olivepress flow, one per target, and the work pools they run on.

    olivepress deploy process [--workdir DIR]
    olivepress deploy docker-gpu --image olivepress-gpu:0.1.0 [--gpu-device 0]
    olivepress deploy kubernetes-gpu --image REGISTRY/olivepress-gpu:0.1.0 [--concurrency N]

Each call creates the target's work pool when it is missing, with its concurrency limit and its base job
template, then creates or updates the deployment ``olivepress/<target>`` in it. A pool that exists is used as
it is and never overwritten: a team's pool serves its other deployments, whose runs need its template and
limit as they are. One of another type than the target needs is refused. It talks to the Prefect API that
``PREFECT_API_URL`` (or the active Prefect profile) names.

The repository's prefect.yaml holds the same three deployments for ``prefect deploy --all`` (each entry
is :func:`deployment_spec`'s; the tests check they agree). ``prefect deploy`` refuses a pool that does not
exist; this module creates it.

The deployment's entrypoint is the module path ``olivepress.flows.pipeline.olivepress_flow``: a worker
imports the flow from the installed package (the process worker's venv, the image's venv), so no source
is copied, pulled or baked into the deployment.

Concurrency: each pool's concurrency limit is the number of runs it executes at once, so one training at a
time per GPU: a Docker GPU pool drives one GPU (``gpu_device``) and has limit 1 (a host with several GPUs
gets one pool per GPU); a Kubernetes pool's limit is the number of GPUs the cluster gives it, each run's pod
requesting one ``nvidia.com/gpu``; the process pool runs one at a time on its machine (a run with several
datasets trains one adapter per GPU it sees at once). ``finetune_limit`` adds a global cap on the
``finetune`` task tag across every pool (a Prefect tag concurrency limit), each of a run's trainings counted.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from olivepress.config import RunConfig
from olivepress.errors import InvalidArgument

TARGETS = ("process", "docker-gpu", "kubernetes-gpu")
ENTRYPOINT = "olivepress.flows.pipeline.olivepress_flow"
POOL_TYPES = {"process": "process", "docker-gpu": "docker", "kubernetes-gpu": "kubernetes"}
FLOW_NAME = "olivepress"
FINETUNE_TAG = "finetune"

# What docker/Dockerfile.gpu builds; these paths are fixed there (tests/deployments checks they agree).
DEFAULT_IMAGE = "olivepress-gpu:0.1.0"
IMAGE_CACHE = "/home/olivepress/.cache"
IMAGE_WORKDIR = "/srv/olivepress"  # runs/ and registry/ land here: the image's WORKDIR, a volume
IMAGE_UID = 10001
CACHE_VOLUME = "olivepress-cache"
WORK_VOLUME = "olivepress-work"


@dataclass(frozen=True)
class Deployed:
    deployment_id: str
    name: str  # "olivepress/<deployment>", what `prefect deployment run` takes
    pool: str
    pool_type: str
    pool_concurrency: int | None  # the pool's limit: the one created, or the existing pool's own
    pool_created: bool  # False: an existing pool, used as it was
    worker_command: str


def default_pool_name(target: str) -> str:
    return f"olivepress-{target}"


def base_job_template(pool_type: str) -> dict[str, Any]:
    """Prefect's default template for a worker type: from the worker class when its package is installed
    (prefect-docker, prefect-kubernetes), else from the API's collection registry (bundled with the server)."""
    from prefect.utilities.asyncutils import run_coro_as_sync
    from prefect.workers.utilities import get_default_base_job_template_for_infrastructure_type

    template = run_coro_as_sync(get_default_base_job_template_for_infrastructure_type(pool_type))
    if not template:
        raise RuntimeError(f"Prefect knows no default job template for work pool type {pool_type!r}")
    return template


def _variable(template: dict, key: str, default: Any, schema: dict | None = None) -> None:
    """Set a template variable's default, declaring the variable first when the base template lacks it."""
    properties = template["variables"].setdefault("properties", {})
    entry = properties.setdefault(key, dict(schema or {}))
    entry["default"] = default


def docker_gpu_template(base: dict, *, image: str = DEFAULT_IMAGE, gpu_device: str = "0") -> dict:
    """The Docker worker's template with the GPU image, one GPU per container and the two volumes.

    ``container_create_kwargs`` goes to docker-py's ``containers.create``: ``device_requests`` is
    ``docker run --gpus device=N`` (the NVIDIA Container Toolkit must be on the host)."""
    template = copy.deepcopy(base)
    template["job_configuration"].setdefault("container_create_kwargs", "{{ container_create_kwargs }}")
    _variable(template, "image", image)
    _variable(template, "image_pull_policy", "IfNotPresent")
    _variable(template, "auto_remove", True)
    _variable(template, "volumes", [f"{CACHE_VOLUME}:{IMAGE_CACHE}", f"{WORK_VOLUME}:{IMAGE_WORKDIR}"])
    _variable(
        template,
        "container_create_kwargs",
        {
            "device_requests": [
                {"driver": "nvidia", "device_ids": [str(gpu_device)], "capabilities": [["gpu"]]}
            ],
            # torch's data loader workers share tensors through /dev/shm, 64 MB by default in Docker
            "shm_size": "2g",
        },
        {
            "title": "Container Configuration",
            "description": "Extra keyword arguments for docker-py's containers.create (GPU device requests).",
            "type": "object",
        },
    )
    return template


def kubernetes_gpu_template(base: dict, *, image: str = DEFAULT_IMAGE) -> dict:
    """The Kubernetes worker's Job template: one ``nvidia.com/gpu`` per run's pod (the device plugin assigns
    a free GPU), GPU-node tolerations, the two PersistentVolumeClaims mounted, non-root."""
    template = copy.deepcopy(base)
    _variable(template, "image", image)
    _variable(
        template,
        "gpus_per_run",
        1,
        {
            "title": "GPUs per run",
            "description": "nvidia.com/gpu requested by each run's pod.",
            "type": "integer",
            "minimum": 1,
        },
    )
    _variable(
        template,
        "cache_claim",
        CACHE_VOLUME,
        {
            "title": "Cache claim",
            "description": f"PersistentVolumeClaim mounted at {IMAGE_CACHE}.",
            "type": "string",
        },
    )
    _variable(
        template,
        "work_claim",
        WORK_VOLUME,
        {
            "title": "Work claim",
            "description": f"PersistentVolumeClaim mounted at {IMAGE_WORKDIR} (runs, registry).",
            "type": "string",
        },
    )
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    container.setdefault("resources", {}).setdefault("limits", {})["nvidia.com/gpu"] = "{{ gpus_per_run }}"
    container["volumeMounts"] = [
        {"name": "cache", "mountPath": IMAGE_CACHE},
        {"name": "work", "mountPath": IMAGE_WORKDIR},
    ]
    pod["volumes"] = [
        {"name": "cache", "persistentVolumeClaim": {"claimName": "{{ cache_claim }}"}},
        {"name": "work", "persistentVolumeClaim": {"claimName": "{{ work_claim }}"}},
    ]
    pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    pod["securityContext"] = {"runAsNonRoot": True, "runAsUser": IMAGE_UID, "fsGroup": IMAGE_UID}
    return template


def pool_template(target: str, *, image: str = DEFAULT_IMAGE, gpu_device: str = "0") -> dict:
    base = base_job_template(POOL_TYPES[target])
    if target == "docker-gpu":
        return docker_gpu_template(base, image=image, gpu_device=gpu_device)
    if target == "kubernetes-gpu":
        return kubernetes_gpu_template(base, image=image)
    return base


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = (
            _merge(merged[key], value)
            if isinstance(value, dict) and isinstance(merged.get(key), dict)
            else value
        )
    return merged


def default_parameters(target: str, device: Literal["auto", "cpu", "gpu"] | None = None) -> dict[str, Any]:
    """The run form's pre-filled values. The rest of the form (every RunConfig field, its default, its
    description and its bounds) comes from the flow's parameter schema. A GPU pool computes on its GPU and
    builds for the CPU, as the Olive lab does: the model a data team's first run registers is the on-device
    one (a CUDA build is one more target in the form)."""
    if target == "process":
        return {"config": {"device": device or "auto"}}
    return {"config": {"device": device or "gpu", "targets": ["cpu"]}}


def deployment_spec(
    target: str,
    *,
    pool: str | None = None,
    name: str | None = None,
    image: str = DEFAULT_IMAGE,
    workdir: Path | str | None = None,
    device: Literal["auto", "cpu", "gpu"] | None = None,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The deployment ``olivepress/<name>`` as an entry of prefect.yaml's ``deployments:`` list: what
    :func:`deploy` applies, and what the repository's prefect.yaml holds for each target with these
    defaults (and ``workdir`` /srv/olivepress; tests/deployments checks they agree)."""
    job_variables = (
        {"working_dir": str(Path(workdir or Path.cwd()).resolve())}
        if target == "process"
        else {"image": image}
    )
    return {
        "name": name or target,
        "entrypoint": ENTRYPOINT,
        "description": (
            f"olivepress on the {target} pool: validate, AWQ-quantize, LoRA-fine-tune, export to ONNX Runtime "
            "GenAI, gate, report, register. Set the run's config below; the report, metrics and gate are "
            "the run's artifacts."
        ),
        "tags": ["olivepress", target],
        "parameters": _merge(default_parameters(target, device), {"config": config or {}}),
        "enforce_parameter_schema": True,
        "work_pool": {"name": pool or default_pool_name(target), "job_variables": job_variables},
    }


def deploy(
    target: str,
    *,
    pool: str | None = None,
    name: str | None = None,
    image: str = DEFAULT_IMAGE,
    workdir: Path | str | None = None,
    concurrency: int = 1,
    gpu_device: str = "0",
    device: Literal["auto", "cpu", "gpu"] | None = None,
    config: dict[str, Any] | None = None,
    finetune_limit: int | None = None,
) -> Deployed:
    """Create the work pool of ``target`` if it is missing (an existing one is used as it is, never
    overwritten; one of another type is refused), then create or update the deployment ``olivepress/<name>``
    in it.

    target: ``process`` (this machine), ``docker-gpu`` or ``kubernetes-gpu``.
    pool: work pool name (default ``olivepress-<target>``); name: deployment name (default ``target``).
    image: the GPU image (docker/kubernetes targets). workdir: the process pool's working folder, where
    relative ``runs/`` and ``registry/`` land (default: the current folder).
    concurrency: a created pool's concurrency limit, runs at once: 1 per GPU (a Docker GPU pool drives one
    GPU, ``gpu_device``; Kubernetes: the GPUs the cluster gives the pool); 1 for a single machine. Image,
    GPU device and limit shape a pool olivepress creates; an existing pool keeps its own.
    device: the run form's default device (process: auto, GPU pools: gpu, building for the cpu target).
    config: RunConfig values (nested dicts) merged over the target's defaults as the deployment's default
    parameters; the API validates them against the flow's schema.
    finetune_limit: if set, a Prefect tag concurrency limit on ``finetune`` tasks across all pools.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.deployments.runner import EntrypointType, RunnerDeployment
    from prefect.exceptions import ObjectNotFound

    from olivepress.flows.pipeline import olivepress_flow

    if target not in TARGETS:
        raise InvalidArgument(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if concurrency < 1:
        raise InvalidArgument("concurrency must be at least 1")
    if target == "docker-gpu" and concurrency != 1:
        raise InvalidArgument(
            "a Docker GPU pool drives one GPU (gpu_device): create one pool per GPU, "
            "e.g. --pool olivepress-docker-gpu-1 --name docker-gpu-1 --gpu-device 1"
        )
    spec = deployment_spec(
        target, pool=pool, name=name, image=image, workdir=workdir, device=device, config=config
    )
    pool = spec["work_pool"]["name"]
    pool_type = POOL_TYPES[target]

    template = pool_template(target, image=image, gpu_device=gpu_device)
    with get_client(sync_client=True) as client:
        try:
            existing = client.read_work_pool(pool)
        except ObjectNotFound:
            existing = None
            client.create_work_pool(
                WorkPoolCreate(
                    name=pool,
                    type=pool_type,
                    base_job_template=template,
                    concurrency_limit=concurrency,
                    description=f"olivepress {target} pool: {concurrency} run(s) at once",
                )
            )
        if existing is not None and existing.type != pool_type:
            raise InvalidArgument(
                f"work pool {pool!r} exists with type {existing.type!r}, and the {target} deployment runs on "
                f"a {pool_type!r} pool; name another pool with --pool (a missing one is created)"
            )
        if finetune_limit is not None:
            client.create_concurrency_limit(tag=FINETUNE_TAG, concurrency_limit=finetune_limit)

    deployment = RunnerDeployment.from_flow(
        olivepress_flow,
        name=spec["name"],
        parameters=spec["parameters"],
        job_variables=spec["work_pool"]["job_variables"],
        work_pool_name=pool,
        entrypoint_type=EntrypointType.MODULE_PATH,
        tags=spec["tags"],
        description=spec["description"],
        enforce_parameter_schema=spec["enforce_parameter_schema"],
    )
    deployment_id = deployment.apply(work_pool_name=pool)
    return Deployed(
        deployment_id=str(deployment_id),
        name=f"{FLOW_NAME}/{spec['name']}",
        pool=pool,
        pool_type=pool_type,
        pool_concurrency=concurrency if existing is None else existing.concurrency_limit,
        pool_created=existing is None,
        worker_command=f"prefect worker start --pool {pool}",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="olivepress deploy", description=__doc__.splitlines()[0])
    parser.add_argument("target", choices=TARGETS)
    parser.add_argument("--pool")
    parser.add_argument("--name")
    parser.add_argument("--image", default=DEFAULT_IMAGE)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--gpu-device", default="0")
    parser.add_argument("--device", choices=get_args(RunConfig.model_fields["device"].annotation))
    parser.add_argument(
        "--config", type=json.loads, help="JSON object of RunConfig defaults for the run form"
    )
    parser.add_argument("--finetune-limit", type=int)
    args = parser.parse_args(argv)
    deployed = deploy(
        args.target,
        pool=args.pool,
        name=args.name,
        image=args.image,
        workdir=args.workdir,
        concurrency=args.concurrency,
        gpu_device=args.gpu_device,
        device=args.device,
        config=args.config,
        finetune_limit=args.finetune_limit,
    )
    print(json.dumps(asdict(deployed), indent=1))
    print(f"start a worker:  {deployed.worker_command}", file=sys.stderr)
    print(
        f'run it:          prefect deployment run {deployed.name} -p config=\'{{"data": "..."}}\'',
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    raise SystemExit(main())
