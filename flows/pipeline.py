"""The olivepress flow: validate → quantize (AWQ) → finetune (LoRA) → optimize (ONNX Runtime GenAI).

Each step is a Prefect task wrapping a plain function from ``olivepress.tasks``; each writes one folder of
the run directory atomically, so a folder that exists is complete.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from olivepress.atomic import atomic_dir, atomic_write_text
from olivepress.config import RunConfig
from olivepress.errors import UserError
from olivepress.prompts import save_prompt_format

QUANTIZED = "quantized"
ADAPTER = "adapter"
ONNX = "onnx"
WORK = "work"


class InvalidData(UserError):
    """The data failed validation; the message is the report."""


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
    detail: dict = field(default_factory=dict)


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


@task(name="validate", retries=0, cache_policy=NO_CACHE, tags=["olivepress", "validate"])
def validate_step(config: RunConfig, run_dir: Path) -> list[dict]:
    """Bad data stops the run here, before any model is loaded; never retried (it would fail the same way)."""
    from olivepress.tasks.validate import read_examples, validate_jsonl, write_report

    report = validate_jsonl(
        config.data, min_chars=config.validation.min_chars, max_chars=config.validation.max_chars
    )
    report_path = write_report(report, run_dir)
    if not report.ok:
        raise InvalidData(
            f"{config.data} has {len(report.errors)} bad line(s); nothing was trained "
            f"(report: {report_path}):\n{report.to_text()}"
        )
    return read_examples(config.data)


@task(name="quantize", retries=1, cache_policy=NO_CACHE, tags=["olivepress", "quantize", "awq"])
def quantize_step(config: RunConfig, model_dir: Path, examples: list[dict], run_dir: Path) -> Path:
    from olivepress.tasks.quantize import quantize_awq

    target = run_dir / QUANTIZED
    with atomic_dir(target) as staging:
        quantize_awq(model_dir, examples, staging, config.quantize, text_template=config.text_template)
    return target


@task(name="finetune", retries=1, cache_policy=NO_CACHE, tags=["olivepress", "finetune", "lora"])
def finetune_step(config: RunConfig, checkpoint_dir: Path, examples: list[dict], run_dir: Path) -> Path:
    from olivepress.tasks.finetune import finetune_lora

    target = run_dir / ADAPTER
    work_dir = run_dir / WORK / "finetune"
    with atomic_dir(target) as staging:
        finetune_lora(
            checkpoint_dir,
            examples,
            staging,
            config.finetune,
            work_dir=work_dir,
            text_template=config.text_template,
            device=config.device,
            seed=config.seed,
        )
    shutil.rmtree(work_dir, ignore_errors=True)
    return target


@task(name="optimize", retries=1, cache_policy=NO_CACHE, tags=["olivepress", "optimize", "onnx"])
def optimize_step(config: RunConfig, checkpoint_dir: Path, adapter_dir: Path, run_dir: Path) -> Path:
    from olivepress.tasks.optimize import export_onnx

    target = run_dir / ONNX
    with atomic_dir(target) as staging:
        export_onnx(checkpoint_dir, adapter_dir, staging, device=config.device)
        save_prompt_format(staging, config.text_template)
    return target


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


@flow(name="olivepress", log_prints=True, persist_result=False)
def olivepress_flow(config: RunConfig, run_dir: Path) -> dict:
    """One run of the lab: every step's output lands in ``run_dir``; the summary is printed at the end."""
    quiet_user_error_tracebacks()
    records: list[StepRecord] = []
    atomic_write_text(run_dir / "config.json", config.model_dump_json(indent=1))
    try:
        examples = timed(records, "validate", validate_step, config, run_dir)
        model_dir = resolve_model_dir(config)
        checkpoint = timed(records, "quantize", quantize_step, config, model_dir, examples, run_dir)
        adapter = timed(records, "finetune", finetune_step, config, checkpoint, examples, run_dir)
        onnx_dir = timed(records, "optimize", optimize_step, config, checkpoint, adapter, run_dir)
    finally:
        print("\n" + write_summary(run_dir, records))
    return {"run_dir": str(run_dir), "onnx": str(onnx_dir), "adapter": str(adapter)}
