"""The olivepress flow: validate → quantize (AWQ) → finetune (LoRA) → for each target: optimize (ONNX Runtime
GenAI) → evaluate (the gate) → report → register.

A run is a list of datasets (``data`` is a list of one) and a list of targets (``targets``, default cpu),
and every run takes this one path. Each step is a Prefect task wrapping a plain function from
``olivepress.tasks``; the steps that compute declare in their own module what their output depends on
(:class:`olivepress.steps.Step`) and publish it to the artifact store under a key made from that
(:mod:`olivepress.store`): a re-run with the same inputs reuses them, a crashed run resumes from the last
published step, and a target added later builds only its own export and evaluation. The run folder and the
store are :class:`olivepress.flows.runs.Run`'s; what each dataset went through, and the steps on it, are
:mod:`olivepress.flows.datasets`'. Where the heavy steps compute is ``device`` (auto: the GPU when one is
visible). On a GPU the base models evaluate compares against are built from the start in child processes
(:mod:`olivepress.base_ahead`), beside quantize and finetune. Only what passed its gate is registered; the
report, written before (the registry entry keeps it), is then written again naming the version. A run in
which anything failed then fails, naming what and why.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any

from prefect import flow

from olivepress.base_ahead import built_early
from olivepress.config import RunConfig
from olivepress.flows.datasets import (
    calibration_examples,
    evaluate_target,
    export_target,
    outcome,
    register_and_report,
    report,
    train_adapters,
    validated_branches,
)
from olivepress.flows.runs import (
    Run,
    StepRecord,
    format_summary,
    fuller_run_estimate,
    new_run_dir,
    open_store,
    resolve_model,
)
from olivepress.tasks.quantize import quantize_task

# the run's helpers that callers (the CLI, tests, benchmarks) import from here
__all__ = [
    "StepRecord",
    "format_summary",
    "fuller_run_estimate",
    "new_run_dir",
    "olivepress_flow",
    "open_store",
    "run_folder",
]

_run_folder: ContextVar[Path | None] = ContextVar("olivepress_run_folder", default=None)


@contextmanager
def run_folder(path: Path) -> Iterator[Path]:
    """Flow runs called inside the block write into ``path``: the command line opens the folder first to
    log into it. Not a flow parameter: a deployment's run makes its own under ``config.output``, and the
    run form shows nothing of the machine that deployed it."""
    token = _run_folder.set(path)
    try:
        yield path
    finally:
        _run_folder.reset(token)


def run_labels(config: RunConfig | dict[str, Any]) -> tuple[str, list[str], list[str]]:
    """A run's model name, dataset names and targets, from its config as validated or as the API holds the
    parameters (a dict, the name being chosen before the flow validates it)."""
    from olivepress.default_model import MODEL_NAME

    read = (
        config.get if isinstance(config, dict) else lambda name, default=None: getattr(config, name, default)
    )
    model = Path(str(read("model"))).name if read("model") else MODEL_NAME
    datasets = list(read("datasets") or {Path(str(read("data") or "travel_sample.jsonl")).stem: None})
    return model, datasets, list(read("targets") or ["cpu"])


def run_name() -> str:
    """A flow run's name in the Prefect UI: its model, datasets and targets (``SmolLM2-135M-Instruct on
    travel_sample for cpu``), where Prefect's own random names tell runs apart by nothing."""
    from prefect.runtime import flow_run

    model, datasets, targets = run_labels(flow_run.parameters["config"])
    return f"{model} on {'+'.join(datasets)} for {'+'.join(targets)}"


def run_tags(config: RunConfig) -> list[str]:
    """``model:<name>``, ``data:<dataset>`` and ``target:<target>``: what the UI's tag filter and an
    automation's match find a model's, a dataset's or a target's runs by."""
    model, datasets, targets = run_labels(config)
    return [f"model:{model}", *(f"data:{name}" for name in datasets), *(f"target:{t}" for t in targets)]


def tag_flow_run(config: RunConfig) -> None:
    """Add :func:`run_tags` to the running flow run's own (a deployment's tags stay): a deployment creates
    the run before its parameters are read, so the flow tags itself."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    flow_run = FlowRunContext.get().flow_run
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, tags=list(dict.fromkeys([*flow_run.tags, *run_tags(config)])))


class WorkerDefaults:
    """Leaves a default that is an absolute path out of the run form's schema (``data``: the sample file
    inside this install; ``store.cache_dir``: under this user's home): a deployment made here would show,
    and pre-fill, paths of the deploying machine. Left empty, the field takes its default where the flow
    runs."""

    NOTE = " Left empty: its default on the machine that runs the flow."

    def __get_pydantic_json_schema__(self, core_schema, handler):
        schema = handler(core_schema)
        seen: set[int] = set()

        def strip(reference: dict) -> None:
            definition = handler.resolve_ref_schema(reference)
            if id(definition) in seen:
                return
            seen.add(id(definition))
            for field in definition.get("properties", {}).values():
                default = field.get("default")
                if isinstance(default, str) and os.path.isabs(default):
                    del field["default"]
                    field["description"] = field.get("description", "") + self.NOTE
                for part in (field, *field.get("anyOf", ()), *field.get("allOf", ())):
                    if "$ref" in part:
                        strip(part)

        strip(schema)
        return schema


@flow(name="olivepress", persist_result=False, flow_run_name=run_name)
def olivepress_flow(config: Annotated[RunConfig, WorkerDefaults()]) -> dict:
    """One run: every step's output lands in a new folder under ``config.output`` (or the one
    :func:`run_folder` names); the summary is printed at the end. ``config`` is the deployment's parameter:
    the Prefect UI's run form is built from its schema, and Prefect validates it before the run starts."""
    tag_flow_run(config)
    with Run(config, _run_folder.get()) as run:
        branches = validated_branches(run)
        calibration = calibration_examples(run, branches)
        model = resolve_model(run.config)
        with built_early(run.config, model.path, run.store.scratch_root()) as bases_ahead:
            quantized = run.step(quantize_task, model_dir=model.path, examples=calibration)
            train_adapters(run, [b for b in branches if not b.failure], quantized)
            trained = [b for b in branches if not b.failure]
            for target in run.config.targets if trained else ():
                onnx = export_target(run, target, trained, quantized)
                if onnx is not None:
                    evaluate_target(run, target, trained, model, onnx, bases_ahead.get(target))
        report_dir = report(run, model, branches)
        registration = register_and_report(run, model, branches, report_dir)
    return outcome(run, branches, report_dir, registration)
