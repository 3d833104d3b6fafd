"""The olivepress flow: validate → quantize (AWQ) → finetune (LoRA) → optimize (ONNX Runtime GenAI) →
evaluate (the gate) → report → register.

Each step is a Prefect task wrapping a plain function from ``olivepress.tasks``. The steps that compute
(validate, quantize, finetune, optimize, evaluate) publish their outputs to the artifact store under a key
made from their inputs' content (:mod:`olivepress.cache_keys`, :mod:`olivepress.store`): a re-run with the
same inputs reuses them, a crashed run resumes from the last published step. The run folder holds what is
this run's own (config, validation report, split, evaluation, report, summary) and links to the outputs.
A model that fails the gate gets its report, and the run fails before register.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.tasks import exponential_backoff

from olivepress.cache_keys import records_sha256, step_key
from olivepress.config import RunConfig
from olivepress.errors import UserError
from olivepress.files import atomic_write_text, file_sha256, folder_bytes, folder_sha256
from olivepress.retry import RetryPolicy
from olivepress.scoring import split_by_prompt
from olivepress.store import ArtifactStore, Manifest, fetch_file
from olivepress.tasks import evaluate, finetune, optimize, quantize, validate
from olivepress.tasks.evaluate import GateFailed, evaluate_task, read_evaluation
from olivepress.tasks.finetune import LOSS_FILE, finetune_task, read_training_memory
from olivepress.tasks.optimize import optimize_task
from olivepress.tasks.quantize import quantize_task
from olivepress.tasks.register import build_lineage, register_task
from olivepress.tasks.report import ReportInputs, report_task
from olivepress.tasks.validate import read_examples, validate_task

QUANTIZED = "quantized"
ADAPTER = "adapter"
ONNX = "onnx"
REPORT = "report"
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


def new_run_dir(config: RunConfig) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    config.output.mkdir(parents=True, exist_ok=True)
    suffix = 1
    while True:  # claimed by mkdir itself: two runs starting in the same second get two folders
        run_dir = config.output / (f"run-{stamp}" if suffix == 1 else f"run-{stamp}-{suffix}")
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            suffix += 1


def resolve_model_dir(config: RunConfig) -> Path:
    if config.model is not None:
        return config.model
    from olivepress.default_model import default_model_dir

    return default_model_dir()


def timed(records: list[StepRecord], name: str, function, *args, reused: bool = False):
    """Run one step, recording its status, wall time and output size for the summary table."""
    started = time.perf_counter()
    try:
        result = function(*args)
    except BaseException:
        records.append(StepRecord(name, "failed", time.perf_counter() - started))
        raise
    if isinstance(result, Manifest):
        output, size = f"{name}/{result.key[:12]}", sum(meta["size"] for meta in result.files.values())
    elif isinstance(result, Path):
        output, size = str(result), folder_bytes(result)
    else:
        output, size = None, None
    status = "reused" if reused else "completed"
    records.append(StepRecord(name, status, time.perf_counter() - started, output=output, output_bytes=size))
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


def s3_options(config: RunConfig) -> dict:
    """fsspec options for s3:// (store and data). botocore's own retries are off: s3fs retries a failed call
    for about two seconds, then olivepress's retry (config.retries: logged, exponential, with jitter)."""
    return {
        "config_kwargs": {"retries": {"mode": "standard", "max_attempts": 1}, "connect_timeout": 10},
        "client_kwargs": {"endpoint_url": config.store.endpoint_url} if config.store.endpoint_url else {},
    }


def retry_policy(config: RunConfig) -> RetryPolicy:
    return RetryPolicy(
        attempts=config.retries.store_attempts,
        base_delay_s=config.retries.backoff_seconds,
        jitter=config.retries.jitter,
    )


def open_store(config: RunConfig) -> ArtifactStore:
    uri = config.store.uri or str(config.output.resolve() / "store")
    options = s3_options(config) if uri.startswith("s3://") else {}
    return ArtifactStore(uri, config.store.cache_dir, retry=retry_policy(config), storage_options=options)


def local_data_file(config: RunConfig) -> Path:
    """The run's data as a local file: itself, or a fresh download of its s3:// URI."""
    if isinstance(config.data, Path):
        return config.data
    return fetch_file(config.data, config.store.cache_dir / "data", s3_options(config), retry_policy(config))


def run_step(
    records: list[StepRecord], config: RunConfig, store: ArtifactStore, name: str, step, key: str, *args
):
    """One cached step: Prefect's cache is used only while the store holds a verified output for ``key``.

    Returns the step's manifest and a local folder with its verified files. A step that another run
    computed while this one waited for the key's lock (see ``ArtifactStore.produce``) counts as reused.
    """
    reusable = store.complete(name, key) is not None
    retries = config.retries.step_attempts - 1
    configured = step.with_options(
        refresh_cache=not reusable,
        retries=retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=config.retries.backoff_seconds)(retries)
        if retries
        else 0,
        retry_jitter_factor=config.retries.jitter,
    )
    manifest = timed(records, name, configured, store, key, config, *args, reused=reusable)
    if (name, key) not in store.computed:
        records[-1].status = "reused"
    return manifest, store.local_copy(manifest)


def link_output(run_dir: Path, name: str, folder: Path) -> Path:
    """``run_dir/name`` → the step's output folder in the store (or its local copy), for people and chat."""
    link = run_dir / name
    link.symlink_to(folder.resolve(), target_is_directory=True)
    return link


def key_for(step: str, module, data_hash: str, inputs: dict[str, str], **settings) -> str:
    """Every key includes the data file's hash: one edited line of the JSONL invalidates every step, even
    one whose other inputs (a held-out split, an unchanged export) happen to come out the same."""
    return step_key(step, module.__file__, inputs={"data": data_hash, **inputs}, settings=settings)


@flow(name="olivepress", persist_result=False)
def olivepress_flow(config: RunConfig, run_dir: Path | None = None) -> dict:
    """One run: every step's output lands in ``run_dir`` (default: a new folder under ``config.output``);
    the summary is printed at the end. ``config`` is the deployment's parameter: the Prefect UI's run form
    is built from its schema, and Prefect validates it before the run starts."""
    quiet_user_error_tracebacks()
    logger = get_run_logger()
    run_dir = run_dir or new_run_dir(config)
    logger.info("run folder %s", run_dir)
    records: list[StepRecord] = []
    atomic_write_text(run_dir / "config.json", config.model_dump_json(indent=1))
    store = open_store(config)
    common = {"seed": config.seed, "text_template": config.text_template}
    try:
        data_file = local_data_file(config)
        data_hash = file_sha256(data_file)
        key = key_for("validate", validate, data_hash, {}, validation=config.validation)
        _, validated = run_step(records, config, store, "validate", validate_task, key, run_dir, data_file)
        for report_file in validated.iterdir():
            atomic_write_text(run_dir / report_file.name, report_file.read_text(encoding="utf-8"))
        examples = read_examples(data_file)
        train, held_out = split_by_prompt(examples, config.evaluate.held_out_fraction, config.seed)
        write_split(run_dir, config, train, held_out)
        logger.info("split by prompt: %d training pairs, %d held out", len(train), len(held_out))
        model_dir = resolve_model_dir(config)
        model_hash, train_hash = folder_sha256(model_dir), records_sha256(train)

        key = key_for(
            "quantize",
            quantize,
            data_hash,
            {"model": model_hash, "train": train_hash},
            quantize=config.quantize,
            **common,
        )
        quantized, checkpoint = run_step(
            records, config, store, "quantize", quantize_task, key, model_dir, train
        )
        link_output(run_dir, QUANTIZED, checkpoint)

        key = key_for(
            "finetune",
            finetune,
            data_hash,
            {"quantized": quantized.digest, "train": train_hash},
            finetune=config.finetune,
            device=config.device,
            **common,
        )
        tuned, adapter = run_step(records, config, store, "finetune", finetune_task, key, checkpoint, train)
        link_output(run_dir, ADAPTER, adapter)

        key = key_for(
            "optimize",
            optimize,
            data_hash,
            {"quantized": quantized.digest, "adapter": tuned.digest},
            optimize=config.optimize,
            device=config.device,
            text_template=config.text_template,
        )
        exported, onnx_dir = run_step(
            records, config, store, "optimize", optimize_task, key, checkpoint, adapter
        )
        onnx_dir = link_output(run_dir, ONNX, onnx_dir)

        key = key_for(
            "evaluate",
            evaluate,
            data_hash,
            {"model": model_hash, "onnx": exported.digest, "held_out": records_sha256(held_out)},
            evaluate=config.evaluate,
            optimize=config.optimize,
            device=config.device,
            text_template=config.text_template,
        )
        _, measured = run_step(
            records, config, store, "evaluate", evaluate_task, key, model_dir, onnx_dir, held_out
        )
        evaluation = read_evaluation(measured, config.gate)
        atomic_write_text(run_dir / "evaluation.json", json.dumps(evaluation.to_dict(), indent=1))
        logger.info("\n%s", evaluation.gate.to_text())
        flow_run_id = current_flow_run_id()
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
            training_memory=read_training_memory(adapter),
        )
        report_dir = timed(records, "report", report_task, report_inputs, run_dir / REPORT)
        if not evaluation.gate.passed:
            raise GateFailed(f"the model is not registered: {evaluation.gate.to_text()}")
        sources = {"model": onnx_dir, "report": report_dir}
        lineage = build_lineage(config, model_dir, data_hash, evaluation, sources, flow_run_id)
        # runs sharing a store register one model one at a time: a backend's check-then-create (Azure ML's
        # tag lookup) then sees the other's version and returns it instead of adding one
        with store.key_lock("register", lineage["content_sha256"]):
            registration = timed(records, "register", register_task, config, model_dir, sources, lineage)
    finally:
        logger.info("\n%s", write_summary(run_dir, records))
    verb = "already registered as" if registration.reused else "registered"
    logger.info("%s %s version %s (%s)", verb, registration.name, registration.version, registration.uri)
    if any(record.step == "finetune" and record.status == "completed" for record in records):
        logger.info(fuller_run_estimate(config, records, len(train)))
    return {
        "flow_run_id": flow_run_id,
        "run_dir": str(run_dir),
        "onnx": str(onnx_dir),
        "adapter": str(adapter),
        "report": str(report_dir / "report.md"),
        "registration": asdict(registration),
    }
