"""The olivepress flow: validate → quantize (AWQ) → finetune (LoRA) → optimize (ONNX Runtime GenAI) →
evaluate (the gate) → report → register.

Each step is a Prefect task wrapping a plain function from ``olivepress.tasks``. The steps that compute
(validate, quantize, finetune, optimize, evaluate) declare in their own module what their output depends on
(:class:`olivepress.steps.Step`) and publish it to the artifact store under a key made from that
(:mod:`olivepress.store`): a re-run with the same inputs reuses them, a crashed run resumes from the last
published step. The run folder, the store and the summary are :class:`olivepress.flows.runs.Run`'s. A model
that fails the gate gets its report, and the run fails before register. On a GPU the base model evaluate
compares against is built from the start in a child process (:mod:`olivepress.base_ahead`), beside quantize
and finetune, instead of on evaluate's clock. A run with several datasets
(``datasets``) goes its own way from the start: :mod:`olivepress.flows.datasets`.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from prefect import flow

from olivepress.base_ahead import built_early
from olivepress.config import RunConfig
from olivepress.flows.datasets import link_adapters, run_datasets
from olivepress.flows.runs import (
    Run,
    StepRecord,
    current_flow_run_id,
    format_summary,
    fuller_run_estimate,
    new_run_dir,
    open_store,
    resolve_model,
)
from olivepress.genai import ADAPTER_FILE
from olivepress.registry import ADAPTERS_DIR
from olivepress.tasks.evaluate import GateFailed, evaluate_task
from olivepress.tasks.finetune import finetune_task
from olivepress.tasks.optimize import optimize_task
from olivepress.tasks.quantize import quantize_task
from olivepress.tasks.validate import read_examples, validate_task

# the run's helpers that callers (the CLI, tests, benchmarks) import from here
__all__ = [
    "StepRecord",
    "format_summary",
    "fuller_run_estimate",
    "new_run_dir",
    "olivepress_flow",
    "open_store",
]


@flow(name="olivepress", persist_result=False)
def olivepress_flow(config: RunConfig, run_dir: Path | None = None) -> dict:
    """One run: every step's output lands in ``run_dir`` (default: a new folder under ``config.output``);
    the summary is printed at the end. ``config`` is the deployment's parameter: the Prefect UI's run form
    is built from its schema, and Prefect validates it before the run starts."""
    with Run(config, run_dir) as run:
        if config.datasets is not None:
            return run_datasets(run, resolve_model(config))
        data_file = run.fetch_data()
        run.step(validate_task, data_file=data_file, run_dir=run.dir, data_name=str(config.data))
        examples = read_examples(data_file)
        train, held_out = run.split(examples)
        model = resolve_model(config)
        model_dir = model.path

        with built_early(config, model_dir, run.store.scratch_root()) as base_ahead:
            quantized = run.step(quantize_task, model_dir=model_dir, examples=train)
            adapter = run.step(finetune_task, checkpoint_dir=quantized, examples=train)
            onnx = run.step(optimize_task, checkpoint_dir=quantized, adapter_dir=adapter)
            # the adapter by its dataset's name too, as a run with several datasets names each one
            link_adapters(run.dir / ADAPTERS_DIR, {config.dataset_name(): onnx.folder / ADAPTER_FILE})
            measured = run.step(
                evaluate_task, model_dir=model_dir, onnx_dir=onnx, held_out=held_out, base_ahead=base_ahead
            )
        evaluation = run.evaluation(measured)

        report_dir = run.report(evaluation, examples, train, held_out, adapter)
        if not evaluation.gate.passed:
            raise GateFailed(f"the model is not registered: {evaluation.gate.to_text()}")
        registration = run.register(model, report_dir, evaluation)
    run.announce(registration, trained_pairs=len(train))
    return {
        "flow_run_id": current_flow_run_id(),
        "run_dir": str(run.dir),
        "onnx": str(run.link("optimize")),
        "adapter": str(adapter.folder),
        "report": str(report_dir / "report.md"),
        "registration": asdict(registration),
    }
