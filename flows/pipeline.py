"""The olivepress flow: validate → quantize (AWQ) → finetune (LoRA) → optimize (ONNX Runtime GenAI) →
evaluate (the gate) → report → register.

Each step is a Prefect task wrapping a plain function from ``olivepress.tasks``; each writes one folder or
file of the run directory atomically, so an output that exists is complete. A model that fails the gate
gets its report, and the run fails before register.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from prefect import flow, get_run_logger

from olivepress.atomic import atomic_write_text
from olivepress.config import RunConfig
from olivepress.errors import UserError
from olivepress.registry import file_sha256
from olivepress.scoring import split_by_prompt
from olivepress.tasks.evaluate import GateFailed, evaluate_task
from olivepress.tasks.finetune import LOSS_FILE, finetune_task
from olivepress.tasks.optimize import optimize_task
from olivepress.tasks.quantize import quantize_task
from olivepress.tasks.register import build_lineage, register_task
from olivepress.tasks.report import ReportInputs, report_task
from olivepress.tasks.validate import validate_task

QUANTIZED = "quantized"
ADAPTER = "adapter"
ONNX = "onnx"
REPORT = "report"
WORK = "work"
HELD_OUT_FILE = "held_out.jsonl"


class PlainUserErrors(logging.Filter):
    """Prefect logs every failed run with a traceback; for a user error the message is the whole story."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], UserError):
            record.exc_info = None
            record.exc_text = None
        return True


def quiet_user_error_tracebacks() -> None:
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(existing, PlainUserErrors) for existing in logger.filters):
            logger.addFilter(PlainUserErrors())


@dataclass
class StepRecord:
    step: str
    status: str
    seconds: float
    output: str | None = None
    output_bytes: int | None = None


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


def new_run_dir(config: RunConfig) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    run_dir = config.output / f"run-{stamp}"
    suffix = 1
    while run_dir.exists():
        suffix += 1
        run_dir = config.output / f"run-{stamp}-{suffix}"
    run_dir.mkdir(parents=True)
    return run_dir


def resolve_model_dir(config: RunConfig) -> Path:
    if config.model is not None:
        return config.model
    from olivepress.default_model import default_model_dir

    return default_model_dir()


def timed(records: list[StepRecord], name: str, function, *args):
    """Run one step, recording its status, wall time and output size for the summary table."""
    started = time.perf_counter()
    try:
        result = function(*args)
    except BaseException:
        records.append(StepRecord(name, "failed", time.perf_counter() - started))
        raise
    output = result if isinstance(result, Path) else None
    records.append(
        StepRecord(
            name,
            "completed",
            time.perf_counter() - started,
            output=str(output) if output else None,
            output_bytes=folder_bytes(output) if output else None,
        )
    )
    return result


def format_summary(records: list[StepRecord]) -> str:
    rows = [("step", "status", "time", "output size")]
    for record in records:
        size = f"{record.output_bytes / 1e6:.1f} MB" if record.output_bytes is not None else "-"
        rows.append((record.step, record.status, f"{record.seconds:.1f} s", size))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def write_summary(run_dir: Path, records: list[StepRecord]) -> str:
    table = format_summary(records)
    atomic_write_text(run_dir / "summary.txt", table + "\n")
    atomic_write_text(run_dir / "summary.json", json.dumps([asdict(r) for r in records], indent=1))
    return table


FULLER_EPOCHS = 3


def fuller_run_estimate(config: RunConfig, records: list[StepRecord], n_examples: int) -> str:
    """What a longer fine-tune would cost, scaled linearly from this run's own fine-tuning time."""
    finetune_seconds = next(record.seconds for record in records if record.step == "finetune")
    steps = -(-FULLER_EPOCHS * n_examples // config.finetune.batch_size)
    epochs = config.finetune.max_steps * config.finetune.batch_size / n_examples
    minutes = finetune_seconds / config.finetune.max_steps * steps / 60
    return (
        f"This run trained {config.finetune.max_steps} steps ({epochs:.1f} epochs of {n_examples} examples). "
        f"{FULLER_EPOCHS} epochs would be --max-steps {steps}: about {minutes:.0f} min of fine-tuning on "
        "this machine."
    )


def write_split(run_dir: Path, config: RunConfig, train: list[dict], held_out: list[dict]) -> None:
    """The held-out pairs and how they were chosen, kept with the run so the gate can be re-checked."""
    lines = [
        json.dumps({"prompt": p["prompt"], "response": p["response"]}, ensure_ascii=False) for p in held_out
    ]
    atomic_write_text(run_dir / HELD_OUT_FILE, "\n".join(lines) + "\n")
    split = {
        "by": "prompt",
        "seed": config.seed,
        "held_out_fraction": config.evaluate.held_out_fraction,
        "train_pairs": len(train),
        "held_out_pairs": len(held_out),
        "held_out_lines": [p.get("line") for p in held_out],
    }
    atomic_write_text(run_dir / "split.json", json.dumps(split, indent=1))


def current_flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    return flow_run.id


@flow(name="olivepress", persist_result=False)
def olivepress_flow(config: RunConfig, run_dir: Path) -> dict:
    """One run: every step's output lands in ``run_dir``; the summary is printed at the end."""
    quiet_user_error_tracebacks()
    logger = get_run_logger()
    records: list[StepRecord] = []
    atomic_write_text(run_dir / "config.json", config.model_dump_json(indent=1))
    try:
        examples = timed(records, "validate", validate_task, config, run_dir)
        train, held_out = split_by_prompt(examples, config.evaluate.held_out_fraction, config.seed)
        write_split(run_dir, config, train, held_out)
        logger.info("split by prompt: %d training pairs, %d held out", len(train), len(held_out))
        model_dir = resolve_model_dir(config)
        checkpoint = timed(records, "quantize", quantize_task, config, model_dir, train, run_dir / QUANTIZED)
        adapter = timed(
            records, "finetune", finetune_task, config, checkpoint, train, run_dir / ADAPTER, run_dir / WORK
        )
        onnx_dir = timed(records, "optimize", optimize_task, config, checkpoint, adapter, run_dir / ONNX)
        evaluation = timed(
            records, "evaluate", evaluate_task, config, model_dir, onnx_dir, held_out, run_dir, run_dir / WORK
        )
        logger.info("\n%s", evaluation.gate.to_text())
        flow_run_id = current_flow_run_id()
        data_hash = file_sha256(config.data)
        report_inputs = ReportInputs(
            config=config,
            data_sha256=data_hash,
            n_records=len(examples),
            n_warnings=len(json.loads((run_dir / "validation.json").read_text())["warnings"]),
            train_pairs=len(train),
            held_out_pairs=len(held_out),
            steps=[asdict(record) for record in records],
            loss_history=json.loads((adapter / LOSS_FILE).read_text()),
            evaluation=evaluation,
            flow_run_id=flow_run_id,
        )
        report_dir = timed(records, "report", report_task, report_inputs, run_dir / REPORT)
        if not evaluation.gate.passed:
            raise GateFailed(f"the model is not registered: {evaluation.gate.to_text()}")
        sources = {"model": onnx_dir, "report": report_dir}
        lineage = build_lineage(config, model_dir, data_hash, evaluation, sources, flow_run_id)
        registration = timed(records, "register", register_task, config, model_dir, sources, lineage)
    finally:
        logger.info("\n%s", write_summary(run_dir, records))
    verb = "already registered as" if registration.reused else "registered"
    logger.info("%s %s version %s (%s)", verb, registration.name, registration.version, registration.uri)
    logger.info(fuller_run_estimate(config, records, len(train)))
    return {
        "run_dir": str(run_dir),
        "onnx": str(onnx_dir),
        "adapter": str(adapter),
        "report": str(report_dir / "report.md"),
        "registration": asdict(registration),
    }
