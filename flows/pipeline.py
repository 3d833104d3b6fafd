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
(:mod:`olivepress.base_ahead`), beside quantize and finetune. Only what passed its gate is registered; a
run in which anything failed then fails, naming what and why.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from olivepress.base_ahead import built_early
from olivepress.config import RunConfig
from olivepress.flows.datasets import (
    anything_passed,
    calibration_examples,
    evaluate_target,
    export_target,
    outcome,
    register,
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
]


def run_name() -> str:
    """A flow run's name in the Prefect UI: its model, datasets and targets (``SmolLM2-135M-Instruct on
    travel_sample for cpu``), where Prefect's own random names tell runs apart by nothing."""
    from prefect.runtime import flow_run

    config = flow_run.parameters["config"]
    read = (
        config.get if isinstance(config, dict) else lambda name, default=None: getattr(config, name, default)
    )
    model = read("model") or "SmolLM2-135M-Instruct"
    datasets = read("datasets") or {Path(str(read("data") or "travel_sample.jsonl")).stem: None}
    targets = read("targets") or ["cpu"]
    return f"{Path(str(model)).name} on {'+'.join(datasets)} for {'+'.join(targets)}"


@flow(name="olivepress", persist_result=False, flow_run_name=run_name)
def olivepress_flow(config: RunConfig, run_dir: Path | None = None) -> dict:
    """One run: every step's output lands in ``run_dir`` (default: a new folder under ``config.output``);
    the summary is printed at the end. ``config`` is the deployment's parameter: the Prefect UI's run form
    is built from its schema, and Prefect validates it before the run starts."""
    with Run(config, run_dir) as run:
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
        report_dir = report(run, branches)
        registration = register(run, model, branches, report_dir) if anything_passed(run, branches) else None
    return outcome(run, branches, report_dir, registration)
