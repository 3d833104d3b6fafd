"""The olivepress flow: validate → quantize (AWQ) → finetune (LoRA) → optimize (ONNX Runtime GenAI).

Each step is a Prefect task wrapping a plain function from ``olivepress.tasks``; each writes one folder of
the run directory atomically, so a folder that exists is complete.
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
from olivepress.tasks.finetune import finetune_task
from olivepress.tasks.optimize import optimize_task
from olivepress.tasks.quantize import quantize_task
from olivepress.tasks.validate import validate_task

QUANTIZED = "quantized"
ADAPTER = "adapter"
ONNX = "onnx"
WORK = "work"


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


@flow(name="olivepress", persist_result=False)
def olivepress_flow(config: RunConfig, run_dir: Path) -> dict:
    """One run of the lab: every step's output lands in ``run_dir``; the summary is printed at the end."""
    quiet_user_error_tracebacks()
    logger = get_run_logger()
    records: list[StepRecord] = []
    atomic_write_text(run_dir / "config.json", config.model_dump_json(indent=1))
    try:
        examples = timed(records, "validate", validate_task, config, run_dir)
        model_dir = resolve_model_dir(config)
        checkpoint = timed(
            records, "quantize", quantize_task, config, model_dir, examples, run_dir / QUANTIZED
        )
        adapter = timed(
            records,
            "finetune",
            finetune_task,
            config,
            checkpoint,
            examples,
            run_dir / ADAPTER,
            run_dir / WORK,
        )
        onnx_dir = timed(records, "optimize", optimize_task, config, checkpoint, adapter, run_dir / ONNX)
    finally:
        logger.info("\n%s", write_summary(run_dir, records))
    logger.info(fuller_run_estimate(config, records, len(examples)))
    return {"run_dir": str(run_dir), "onnx": str(onnx_dir), "adapter": str(adapter)}
