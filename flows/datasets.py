"""A run with several datasets: one int4 base, one LoRA adapter per dataset.

Each dataset is validated; AWQ quantizes the base once, calibrated on a sample drawn evenly from the
datasets ``calibration_datasets`` names (default: all); a LoRA adapter is fine-tuned per dataset as a Prefect
fan-out, each training in a child process of its own, as many at once as ``trainings_at_once`` says (by
default one per visible GPU, each child pinned to its GPU; one at a time on cpu:
:mod:`olivepress.tasks.finetune_worker` says why a process each); the base is exported with the first
dataset's adapter (the optimize step), every further adapter as its own ``.onnx_adapter`` against that same
graph (``export_adapter``); each adapter is evaluated on its own dataset's held-out pairs and gated on its own.

Every step keeps its content key: a step of one dataset's branch keys on that dataset's data, the shared
ones (quantize, the base's export) on the calibration datasets', so adding a dataset later (with
``calibration_datasets`` naming the earlier ones) trains, exports and evaluates only the new one.

A dataset that fails (bad data, a failed training or export, its gate) fails its branch only: it is named
in the report and the log, the adapters that passed are registered together with the base, and the flow run
then fails with a message naming the failed datasets.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from olivepress.base_ahead import BaseAhead, built_early
from olivepress.errors import UserError
from olivepress.files import link_into
from olivepress.flows.runs import Run, current_flow_run_id
from olivepress.genai import ADAPTER_FILE, MERGED_MODEL_FILE
from olivepress.registry import ADAPTER_SUFFIX, ADAPTERS_DIR
from olivepress.steps import StepOutput
from olivepress.tasks.evaluate import evaluate_adapter_task
from olivepress.tasks.finetune import LOSS_FILE, finetune_task
from olivepress.tasks.finetune_worker import TRAINING_FILE, Trainings, training_slots
from olivepress.tasks.optimize import export_adapter_task, optimize_task
from olivepress.tasks.quantize import quantize_task
from olivepress.tasks.report import AdapterOutcome
from olivepress.tasks.validate import InvalidData, read_examples, validate_task

if TYPE_CHECKING:
    from olivepress.model_source import ResolvedModel
    from olivepress.tasks.evaluate import Evaluation

BASE_ONLY = "base"  # the run folder's copy of the export without its adapter, when that adapter failed


class DatasetsFailed(UserError):
    """Some datasets' branches failed; the others' adapters were registered (or none passed)."""


@dataclass
class Branch:
    """One dataset's way through the run."""

    name: str
    source: str
    file: Path
    data_sha256: str
    train: list[dict] = field(default_factory=list)
    held_out: list[dict] = field(default_factory=list)
    adapter: StepOutput | None = None  # the PEFT adapter
    exported: StepOutput | None = None  # a folder holding its .onnx_adapter (the base export for the first)
    evaluation: Evaluation | None = None
    failure: str | None = None

    def outcome(self) -> AdapterOutcome:
        history = self.adapter.folder / LOSS_FILE if self.adapter else None
        return AdapterOutcome(
            name=self.name,
            data=self.source,
            data_sha256=self.data_sha256,
            train_pairs=len(self.train),
            held_out_pairs=len(self.held_out),
            loss_history=json.loads(history.read_text(encoding="utf-8")) if history else [],
            evaluation=self.evaluation,
            failure=self.failure,
        )


def calibration_pool(trains: list[list[dict]], samples: int, seed: int) -> list[dict]:
    """AWQ's calibration examples drawn evenly from several datasets' training pairs: each one shuffled
    (seeded), then taken in turn, ``samples`` in all. One dataset's are its training pairs as they are, as
    its single-dataset run calibrates on them."""
    if len(trains) == 1:
        return trains[0]
    shuffled = [random.Random(seed).sample(train, len(train)) for train in trains]
    pool = []
    for index in range(max(map(len, shuffled))):
        pool += [pairs[index] for pairs in shuffled if index < len(pairs)]
    return pool[:samples]


@task(name="adapter", cache_policy=NO_CACHE, task_run_name="adapter-{dataset}", tags=["olivepress"])
def train_adapter(
    run: Run, dataset: str, checkpoint: StepOutput, train: list[dict], trainings: Trainings
) -> StepOutput:
    """One branch of the fan-out: its dataset's fine-tuning, a cached step of its own, trained (when not
    reused) in a child process on a GPU of ``trainings``; ``training.json`` in the dataset's folder says
    which GPU and when."""
    trainer = trainings.trainer(dataset, run.folder(dataset) / TRAINING_FILE)
    return run.step(
        finetune_task, dataset=dataset, checkpoint_dir=checkpoint, examples=train, trainer=trainer
    )


def train_adapters(run: Run, branches: list[Branch], quantized: StepOutput) -> None:
    """Fine-tune every branch's adapter, ``trainings_at_once`` at a time (default: one per visible GPU, one
    on cpu), each in its own process; a training that fails fails its branch."""
    from prefect.task_runners import ThreadPoolTaskRunner

    trainings = Trainings(training_slots(run.config.device, run.config.trainings_at_once), run.log)
    with ThreadPoolTaskRunner(max_workers=trainings.at_once) as runner:
        futures = [
            runner.submit(
                train_adapter,
                parameters={
                    "run": run,
                    "dataset": b.name,
                    "checkpoint": quantized,
                    "train": b.train,
                    "trainings": trainings,
                },
            )
            for b in branches
        ]
        for branch, future in zip(branches, futures, strict=True):
            with failing_branch(branch, "fine-tuning"):
                branch.adapter = future.result()


def validated_branch(run: Run, name: str, file: Path) -> Branch:
    source = str(run.config.dataset_sources()[name])
    branch = Branch(name, source, file, run.data_hashes[name])
    try:
        run.step(validate_task, dataset=name, data_file=file, run_dir=run.folder(name), data_name=source)
    except InvalidData as error:
        branch.failure = str(error)
        return branch
    branch.train, branch.held_out = run.split(read_examples(file), dataset=name)
    return branch


def run_datasets(run: Run, model: ResolvedModel) -> dict:
    """The flow of a run with several datasets (see the module docstring); its result as the flow's."""
    config = run.config
    files = run.fetch_datasets()
    branches = [validated_branch(run, name, file) for name, file in files.items()]
    calibrated = [b for b in branches if not b.failure and b.name in (config.calibration_datasets or files)]
    if not calibrated:
        raise DatasetsFailed(failures_text(branches, "no dataset AWQ calibrates on passed validation"))
    run.share_data([b.name for b in calibrated])
    pool = calibration_pool([b.train for b in calibrated], config.quantize.calibration_samples, config.seed)
    with built_early(config, model.path, run.store.scratch_root()) as base_ahead:  # one for every dataset
        quantized = run.step(quantize_task, model_dir=model.path, examples=pool)
        train_adapters(run, [b for b in branches if not b.failure], quantized)
        trained = [b for b in branches if not b.failure]
        if not trained:
            raise DatasetsFailed(failures_text(branches, "no adapter was trained"))
        onnx = export_adapters(run, trained, quantized)
        for branch in trained:
            evaluate_adapter(run, branch, model, onnx, base_ahead)

    passed = [b for b in branches if not b.failure]
    report_dir = run.report_adapters([b.outcome() for b in branches])
    registration = None
    if passed:
        in_model = trained[0].name if trained[0].failure is None else None
        parts = {
            "model": registered_model(run, onnx.folder, keep_adapter=in_model is not None),
            ADAPTERS_DIR: link_adapters(
                run.dir / ADAPTERS_DIR, {b.name: b.exported.folder / ADAPTER_FILE for b in passed}
            ),
        }
        lineage = adapters_lineage(run, branches, calibrated, in_model)
        registration = run.register(model, report_dir, passed[0].evaluation, parts, lineage)
        run.announce(registration, trained_pairs=sum(len(b.train) for b in passed))
    if failed := [b for b in branches if b.failure]:
        registered = (
            f"registered {registration.name} version {registration.version} with "
            f"{', '.join(b.name for b in passed)}"
            if registration
            else "nothing was registered"
        )
        raise DatasetsFailed(
            failures_text(failed, f"{len(failed)} of {len(branches)} datasets failed; {registered}")
        )
    return {
        "flow_run_id": current_flow_run_id(),
        "run_dir": str(run.dir),
        "onnx": str(run.link("optimize")),
        "adapters": {b.name: str(run.dir / ADAPTERS_DIR / f"{b.name}{ADAPTER_SUFFIX}") for b in passed},
        "report": str(report_dir / "report.md"),
        "registration": asdict(registration),
    }


@contextmanager
def failing_branch(branch: Branch, what: str) -> Iterator[None]:
    """An error in ``what`` fails ``branch`` alone; it is reported with the others when the run ends."""
    try:
        yield
    except Exception as error:
        branch.failure = f"{what} failed: {error}"


def export_adapters(run: Run, trained: list[Branch], quantized: StepOutput) -> StepOutput:
    """The int4 base exported with the first branch's adapter, and each further adapter as its own
    .onnx_adapter against that graph."""
    first, *others = trained
    first.exported = run.step(optimize_task, checkpoint_dir=quantized, adapter_dir=first.adapter)
    for branch in others:
        with failing_branch(branch, "the adapter's export"):
            branch.exported = run.step(
                export_adapter_task,
                dataset=branch.name,
                checkpoint_dir=quantized,
                adapter_dir=branch.adapter,
                onnx_dir=first.exported,
            )
    return first.exported


def evaluate_adapter(
    run: Run, branch: Branch, model: ResolvedModel, onnx: StepOutput, base_ahead: BaseAhead | None
) -> None:
    """The branch's adapter measured on its own held-out pairs and gated; a failed gate fails the branch."""
    if branch.failure:
        return
    with failing_branch(branch, "evaluation"):
        measured = run.step(
            evaluate_adapter_task,
            dataset=branch.name,
            model_dir=model.path,
            onnx_dir=onnx,
            adapter_dir=branch.exported,
            held_out=branch.held_out,
            base_ahead=base_ahead,
        )
        branch.evaluation = run.evaluation(measured, dataset=branch.name)
    if branch.evaluation and not branch.evaluation.gate.passed:
        branch.failure = "gate failed: " + "; ".join(
            f"{c.name} {c.measured:.4g} (limit {c.limit:.4g})"
            for c in branch.evaluation.gate.checks
            if not c.passed
        )


def failures_text(branches: list[Branch], headline: str) -> str:
    return headline + ":\n" + "\n".join(f"  {b.name}: {b.failure}" for b in branches if b.failure)


def link_adapters(folder: Path, adapter_files: dict[str, Path]) -> Path:
    """``folder/<name>.onnx_adapter`` → each stored adapter file: what chat's ``--adapter NAME`` finds
    beside the run's onnx folder, and the entry's adapters part."""
    folder.mkdir(exist_ok=True)
    for name, file in adapter_files.items():
        (folder / f"{name}{ADAPTER_SUFFIX}").symlink_to(file.resolve())
    return folder


def registered_model(run: Run, onnx: Path, *, keep_adapter: bool) -> Path:
    """The entry's model folder: the export, or, when its own adapter (the first dataset's) failed, the
    export without that adapter's files (links to the rest, in the run folder)."""
    if keep_adapter:
        return run.link("optimize")
    folder = run.dir / BASE_ONLY
    folder.mkdir()
    for path in onnx.iterdir():
        if path.name not in (ADAPTER_FILE, MERGED_MODEL_FILE):
            link_into(folder, path)
    return folder


def adapters_lineage(
    run: Run, branches: list[Branch], calibrated: list[Branch], in_model: str | None
) -> dict[str, Any]:
    """Per adapter: its file in the entry, its data, its measurements and gate; the failed datasets; every
    dataset's file and hash, and which ones AWQ calibrated on (``data.sha256`` is their joint hash);
    ``model_adapter``: the adapter whose files (and merged graph) the entry's model folder holds, if any."""
    from olivepress.files import file_sha256

    adapters, failed = {}, {}
    for branch in branches:
        if branch.failure:
            failed[branch.name] = {
                "data": {"path": branch.source, "sha256": branch.data_sha256},
                "failure": branch.failure,
            }
            continue
        adapters[branch.name] = {
            "file": f"{ADAPTERS_DIR}/{branch.name}{ADAPTER_SUFFIX}",
            "sha256": file_sha256(branch.exported.folder / ADAPTER_FILE),
            "data": {"path": branch.source, "sha256": branch.data_sha256},
            "train_pairs": len(branch.train),
            "held_out_pairs": len(branch.held_out),
            "metrics": [asdict(m) for m in branch.evaluation.metrics],
            "gate": asdict(branch.evaluation.gate),
        }
    data = {
        "sha256": run.data_hash,
        "calibration_datasets": [b.name for b in calibrated],
        "datasets": {b.name: {"path": b.source, "sha256": b.data_sha256} for b in branches},
    }
    return {"data": data, "adapters": adapters, "failed_adapters": failed, "model_adapter": in_model}
