"""What the flow needs around its steps: the run folder, the artifact store, each step's key and Prefect
options, and the summary.

:class:`Run` opens the store (a folder or ``s3://``, with the config's retry budget), claims a run folder
and writes ``config.json`` into it, makes the run's data a local file, and runs each cached step: the key
from the step's declaration (:class:`olivepress.steps.Step`), Prefect's cache refreshed unless the store
holds a verified output, the output linked (or, for validation, copied) into the run folder, and a record
for the summary (``summary.txt``/``summary.json``, written when the run ends, failed or not).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from olivepress import progress
from olivepress.config import RunConfig
from olivepress.errors import UserError
from olivepress.files import atomic_write_text, file_sha256, folder_bytes
from olivepress.retry import RetryPolicy
from olivepress.steps import StepOutput, input_digest, prefect_retries
from olivepress.store import ArtifactStore, Manifest, fetch_file

if TYPE_CHECKING:
    from olivepress.model_source import ResolvedModel

# run-folder names of the stored outputs linked there, for people and chat (a target's export as
# onnx/<target>); the other steps' files (validate's report, evaluate's measurements) are copied instead
LINKS = {"quantize": "quantized", "finetune": "adapter", "optimize": "onnx", "export_adapter": "onnx_adapter"}
HELD_OUT_FILE = "held_out.jsonl"
FULLER_EPOCHS = 3


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


def resolve_model(config: RunConfig) -> ResolvedModel:
    """The run's base model as a local folder: config.model fetched once (a hub id through the hub's cache,
    an Azure ML asset or an s3:// folder into the store's cache), or the default model. A fetched model's
    architecture is checked here, a local one's when the config was read."""
    from olivepress.architectures import unsupported_reason
    from olivepress.model_source import resolve_model as resolve_reference

    if config.model is None:
        from olivepress.default_model import default_model_dir

        reference: Path | str = default_model_dir()
    else:
        reference = config.model
    storage = s3_options(config) if str(reference).startswith("s3://") else None
    model = resolve_reference(
        reference, cache_dir=config.store.cache_dir, storage_options=storage, retry=retry_policy(config)
    )
    if model.kind != "local" and (reason := unsupported_reason(model.path)):
        raise UserError(f"model {model.reference}: {reason}")
    return model


def timed(records: list[StepRecord], name: str, function, *args, reused: bool = False, **kwargs):
    """Run one step, recording its status, wall time and output size for the summary table."""
    progress.begin(name)
    started = time.perf_counter()
    try:
        result = function(*args, **kwargs)
    except BaseException:
        records.append(StepRecord(name, "failed", time.perf_counter() - started))
        progress.end(name, "failed", records[-1].seconds)
        raise
    if isinstance(result, Manifest):
        output, size = f"{name}/{result.key[:12]}", sum(meta["size"] for meta in result.files.values())
    elif isinstance(result, Path):
        output, size = str(result), folder_bytes(result)
    else:
        output, size = None, None
    status = "reused" if reused else "completed"
    records.append(StepRecord(name, status, time.perf_counter() - started, output=output, output_bytes=size))
    progress.end(name, status, records[-1].seconds)
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


def local_data_file(config: RunConfig, source: Path | str | None = None) -> Path:
    """A dataset (default: the run's ``data``) as a local file: itself, or a fresh download of its s3:// URI."""
    source = config.data if source is None else source
    if isinstance(source, Path):
        return source
    return fetch_file(source, config.store.cache_dir / "data", s3_options(config), retry_policy(config))


class Run:
    """One flow run's folder, store and summary. Use as a context manager: the summary is written when the
    block ends, whether the run failed or not. ``config`` is the run's with ``device`` decided for this
    machine (:func:`olivepress.devices.decided`)."""

    def __init__(self, config: RunConfig, run_dir: Path | None = None) -> None:
        from prefect import get_run_logger

        from olivepress.devices import decided
        from olivepress.secrets import apply_secrets

        quiet_user_error_tracebacks()
        self.log = get_run_logger()
        if applied := apply_secrets(config.secrets):  # before anything reads a hub, a bucket or Azure
            self.log.info("credentials from Prefect Secret blocks: %s", ", ".join(applied))
        self.config = decided(config)
        self.dir = run_dir or new_run_dir(config)
        self.log.info(
            "run folder %s; computing on %s for %s", self.dir, self.config.device, self.targets_text()
        )
        self.records: list[StepRecord] = []
        atomic_write_text(self.dir / "config.json", self.config.model_dump_json(indent=1))
        self.store = open_store(self.config)
        self.data_hash: str | None = None  # the steps shared by every dataset (see share_data)
        self.data_hashes: dict[str, str] = {}  # each dataset's, by name
        self._digests: dict[Path, str] = {}

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.log.info("\n%s", write_summary(self.dir, self.records))

    def targets_text(self) -> str:
        return "target " + ", ".join(self.config.targets)

    @property
    def several_datasets(self) -> bool:
        """Named datasets (``datasets``) keep their files in ``datasets/<name>/``; a run's ``data`` in the
        run folder itself."""
        return self.config.datasets is not None

    def fetch_datasets(self) -> dict[str, Path]:
        """Each dataset as a local file, by name. Its hash is part of every key of its branch's steps, so
        one edited line of the JSONL invalidates them, even a step whose other inputs come out the same; the
        steps shared by all key on :meth:`share_data`'s."""
        files = {
            name: local_data_file(self.config, source)
            for name, source in self.config.dataset_sources().items()
        }
        self.data_hashes = {name: file_sha256(file) for name, file in files.items()}
        return files

    def share_data(self, names: list[str]) -> None:
        """The data hash of the steps shared by every dataset (quantize, the base's export): one hash over
        the datasets AWQ calibrates on, so a dataset added beside them leaves the base's keys as they were;
        one dataset's is its own, so a base calibrated on it alone is its single-dataset run's base."""
        hashes = sorted(self.data_hashes[name] for name in names)
        joined = hashlib.sha256("\n".join(hashes).encode()).hexdigest()
        self.data_hash = hashes[0] if len(hashes) == 1 else joined

    def folder(self, dataset: str | None = None, target: str | None = None) -> Path:
        """Where a dataset's branch keeps its files: ``datasets/<name>/`` in the run folder with several
        datasets, the run folder itself otherwise; a target's measurements in ``evaluations/<target>/``
        there."""
        folder = self.dir / "datasets" / dataset if dataset and self.several_datasets else self.dir
        if target:
            folder = folder / "evaluations" / target
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def split(self, examples: list[dict], dataset: str) -> tuple[list[dict], list[dict]]:
        """Training and held-out pairs, split by prompt; the held-out ones are kept in the run folder."""
        from olivepress.scoring import split_by_prompt

        train, held_out = split_by_prompt(examples, self.config.evaluate.held_out_fraction, self.config.seed)
        write_split(self.folder(dataset), self.config, train, held_out)
        self.log.info(
            "%ssplit by prompt: %d training pairs, %d held out",
            f"{dataset}: " if self.several_datasets else "",
            len(train),
            len(held_out),
        )
        return train, held_out

    def digest(self, value: Any) -> str:
        if not isinstance(value, Path):
            return input_digest(value)
        path = value.resolve()  # a run hashes a model folder once, however many steps read it
        if path not in self._digests:
            self._digests[path] = input_digest(path)
        return self._digests[path]

    def label(self, step: str, dataset: str | None, target: str | None) -> str:
        """A step's name in the summary: with the dataset's name when the run has several, with the target's
        when it builds for several."""
        parts = [step]
        parts += [dataset] if dataset and self.several_datasets else []
        parts += [target] if target and len(self.config.targets) > 1 else []
        return " ".join(parts)

    def step(self, task, dataset: str | None = None, **arguments: Any) -> StepOutput:
        """Run one cached step (a task made by :meth:`olivepress.steps.Step.task`) on ``arguments``, its
        declared inputs and context; with ``dataset``, as a step of that dataset's branch (its data hash,
        its folder), and with a ``target`` argument as that target's. Prefect's cache is used only while
        the store holds a verified output for the key; a step that another run computed while this one
        waited for the key's lock (see ``ArtifactStore.produce``) counts as reused."""
        step = task.step
        data_hash = self.data_hashes[dataset] if dataset else self.data_hash
        assert data_hash is not None, "fetch_datasets() and share_data() come first"
        target = arguments.get("target")
        label = self.label(step.name, dataset, target)
        settings = step.settings_of(self.config)
        inputs = {"data": data_hash} | {name: self.digest(arguments[name]) for name in step.inputs}
        key = step.key(inputs, settings)
        stored = self.store.complete(step.name, key)
        reusable = stored is not None
        configured = task.with_options(refresh_cache=not reusable, **prefect_retries(self.config.retries))
        values = {name: v.folder if isinstance(v, StepOutput) else v for name, v in arguments.items()}
        manifest = timed(
            self.records, label, configured, self.store, key, settings, reused=reusable, **values
        )
        record = next(record for record in reversed(self.records) if record.step == label)
        if (step.name, key) not in self.store.computed:
            record.status = "reused"
            progress.end(label, "reused", record.seconds)
        # the store is the truth: Prefect's cache record only shows the reuse (it may name an older publish)
        manifest = stored or manifest
        output = StepOutput(manifest, self.store.local_copy(manifest))
        if step.name in LINKS:
            link_dir = self.folder(dataset) / LINKS[step.name]
            if target:
                link_dir.mkdir(exist_ok=True)
                link_dir = link_dir / target
            link_dir.symlink_to(output.folder.resolve(), target_is_directory=True)
        else:
            for stored in output.folder.iterdir():
                copy = self.folder(dataset, target) / stored.name
                atomic_write_text(copy, stored.read_text(encoding="utf-8"))
        return output

    def evaluation(self, measured: StepOutput, dataset: str, target: str):
        """The stored measurements with the gate decided now, kept beside them as evaluation.json."""
        from olivepress.tasks.evaluate import read_evaluation

        evaluation = read_evaluation(measured.folder, self.config.gate)
        folder = self.folder(dataset, target)
        atomic_write_text(folder / "evaluation.json", json.dumps(evaluation.to_dict(), indent=1))
        who = f"{target} target" + (f", {dataset}" if self.several_datasets else "")
        self.log.info("%s: %s", who, evaluation.gate.to_text())
        return evaluation
