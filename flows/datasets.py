"""A run's datasets × targets: what each dataset's branch went through, and the steps the flow calls on it.

A run is a list of datasets (``data`` is a list of one) and a list of targets. Each dataset is validated;
AWQ quantizes the base once, calibrated on a sample drawn evenly from the datasets ``calibration_datasets``
names (default: all); a LoRA adapter is fine-tuned per dataset (several as a Prefect fan-out, each in a
child process of its own, as many at once as ``trainings_at_once`` says: :mod:`olivepress.tasks.finetune_worker`
says why a process each). Then for each target the base is exported with the first dataset's adapter (the
optimize step) and every further adapter as its own ``.onnx_adapter`` against that same graph
(``export_adapter``); each adapter is evaluated on its own dataset's held-out pairs in the target's runtime
and gated on its own, against the base's measurements (``evaluate_base``, one per dataset and target).

Every step keeps its content key: a step of one dataset's branch keys on that dataset's data, the shared
ones (quantize, the base's export) on the calibration datasets', a target's on the target; so adding a
dataset later (with ``calibration_datasets`` naming the earlier ones) trains, exports and evaluates only the
new one, and adding a target builds and evaluates only that target.

A dataset or target that fails (bad data, a failed training or export, its gate) fails its branch only: it
is named in the report and the log, what passed is registered, and the flow run then fails with a message
naming what failed and why.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import task
from prefect.cache_policies import NO_CACHE

from olivepress.errors import UserError
from olivepress.files import link_into
from olivepress.flows.runs import Run, current_flow_run_id, fuller_run_estimate, timed
from olivepress.genai import ADAPTER_FILE, MERGED_MODEL_FILE
from olivepress.registry import ADAPTER_SUFFIX, ADAPTERS_DIR
from olivepress.steps import StepOutput
from olivepress.tasks.evaluate import (
    GateFailed,
    evaluate_base_task,
    evaluate_task,
    machine_name,
)
from olivepress.tasks.finetune import LOSS_FILE, finetune_task, read_training_memory
from olivepress.tasks.finetune_worker import TRAINING_FILE, Trainings, training_slots
from olivepress.tasks.optimize import export_adapter_task, optimize_task
from olivepress.tasks.report import (
    AdapterOutcome,
    ReportInputs,
    TargetOutcome,
    registration_line,
    report_task,
    rewrite_page,
)
from olivepress.tasks.validate import InvalidData, read_examples, validate_task

if TYPE_CHECKING:
    from olivepress.base_ahead import BaseAhead
    from olivepress.model_source import ResolvedModel
    from olivepress.registry import Registration
    from olivepress.tasks.evaluate import Evaluation

REGISTERED = "registered"  # the run folder's entry parts: model/<target>/ and adapters/<target>/
REPORT = "report"


class DatasetsFailed(UserError):
    """Some datasets' or targets' branches failed; what passed was registered (or nothing passed)."""


@dataclass
class TargetResult:
    """One dataset's adapter on one target."""

    # the folder holding its .onnx_adapter: the target's export itself for the first dataset
    exported: StepOutput | None = None
    evaluation: Evaluation | None = None
    failure: str | None = None
    error: Exception | None = None  # the failure as raised: a run of one dataset and target raises it as is


@dataclass
class Branch:
    """One dataset's way through the run."""

    name: str
    source: str
    file: Path
    data_sha256: str
    records: int = 0
    warnings: int = 0
    train: list[dict] = field(default_factory=list)
    held_out: list[dict] = field(default_factory=list)
    adapter: StepOutput | None = None  # the PEFT adapter
    targets: dict[str, TargetResult] = field(default_factory=dict)
    failure: str | None = None  # before any target: bad data, a failed training
    error: Exception | None = None

    def passed(self, target: str) -> bool:
        result = self.targets.get(target)
        return self.failure is None and result is not None and result.failure is None

    def outcome(self) -> AdapterOutcome:
        return AdapterOutcome(
            name=self.name,
            data=self.source,
            data_sha256=self.data_sha256,
            n_records=self.records,
            n_warnings=self.warnings,
            train_pairs=len(self.train),
            held_out_pairs=len(self.held_out),
            loss_history=json.loads((self.adapter.folder / LOSS_FILE).read_text()) if self.adapter else [],
            training_memory=read_training_memory(self.adapter.folder) if self.adapter else None,
            targets=[
                TargetOutcome(target, result.evaluation, result.failure)
                for target, result in self.targets.items()
            ],
            failure=self.failure,
        )


@contextmanager
def failing(branch: Branch | TargetResult, what: str) -> Iterator[None]:
    """An error in ``what`` fails ``branch`` (a dataset's, or one of its targets) alone; it is reported
    with the others when the run ends."""
    try:
        yield
    except Exception as error:
        branch.failure, branch.error = f"{what} failed: {error}", error


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


def validated_branches(run: Run) -> list[Branch]:
    """Every dataset fetched and validated, the good ones split; bad data fails its branch only."""
    branches = []
    for name, file in run.fetch_datasets().items():
        source = str(run.config.dataset_sources()[name])
        branch = Branch(name, source, file, run.data_hashes[name])
        branches.append(branch)
        with failing(branch, "validation"):
            run.step(validate_task, dataset=name, data_file=file, run_dir=run.folder(name), data_name=source)
            examples = read_examples(file)
            validation = json.loads((run.folder(name) / "validation.json").read_text())
            branch.records, branch.warnings = len(examples), len(validation["warnings"])
            branch.train, branch.held_out = run.split(examples, name)
        if isinstance(branch.error, InvalidData):
            branch.failure = str(branch.error)
    return branches


def calibration_examples(run: Run, branches: list[Branch]) -> list[dict]:
    """AWQ's calibration sample from the datasets it calibrates on; the shared steps' data hash is theirs.
    No such dataset with good data stops the run here, before any compute."""
    wanted = run.config.calibration_datasets or [b.name for b in branches]
    calibrated = [b for b in branches if not b.failure and b.name in wanted]
    if not calibrated:
        raise_failures(branches, [], "no dataset AWQ calibrates on passed validation")
    run.share_data([b.name for b in calibrated])
    return calibration_pool(
        [b.train for b in calibrated], run.config.quantize.calibration_samples, run.config.seed
    )


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
    """Fine-tune every branch's adapter: one dataset's here, several ``trainings_at_once`` at a time
    (default: one per visible GPU, one on cpu), each in its own process; a training that fails fails its
    branch."""
    from prefect.task_runners import ThreadPoolTaskRunner

    if len(branches) == 1 and not run.several_datasets:
        [branch] = branches
        with failing(branch, "fine-tuning"):
            branch.adapter = run.step(
                finetune_task, dataset=branch.name, checkpoint_dir=quantized, examples=branch.train
            )
        return
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
            with failing(branch, "fine-tuning"):
                branch.adapter = future.result()


def export_target(run: Run, target: str, branches: list[Branch], quantized: StepOutput) -> StepOutput | None:
    """The int4 model for ``target`` with the first branch's adapter, and each further adapter as its own
    .onnx_adapter against that graph. A failed export of the model fails the target for every branch (and
    gives None)."""
    first, *others = branches
    first.targets[target] = TargetResult()
    try:
        onnx = run.step(optimize_task, checkpoint_dir=quantized, adapter_dir=first.adapter, target=target)
    except Exception as error:
        for branch in branches:
            branch.targets[target] = TargetResult(failure=f"the {target} export failed: {error}", error=error)
        return None
    first.targets[target].exported = onnx
    for branch in others:
        result = branch.targets[target] = TargetResult()
        with failing(result, f"the adapter's {target} export"):
            result.exported = run.step(
                export_adapter_task,
                dataset=branch.name,
                checkpoint_dir=quantized,
                adapter_dir=branch.adapter,
                onnx_dir=onnx,
                target=target,
            )
    return onnx


def evaluate_target(
    run: Run,
    target: str,
    branches: list[Branch],
    model: ResolvedModel,
    onnx: StepOutput,
    base_ahead: BaseAhead | None,
) -> None:
    """Each branch's adapter measured on its own held-out pairs in ``target``'s runtime beside the base's
    measurements, and gated; a failed gate fails the branch on that target."""
    for branch in branches:
        result = branch.targets[target]
        if result.failure:
            continue
        with failing(result, f"the {target} evaluation"):
            machine = machine_name(target)
            base = run.step(
                evaluate_base_task,
                dataset=branch.name,
                model_dir=model.path,
                held_out=branch.held_out,
                target=target,
                machine=machine,
                base_ahead=base_ahead,
            )
            measured = run.step(
                evaluate_task,
                dataset=branch.name,
                onnx_dir=onnx,
                adapter_dir=result.exported,
                held_out=branch.held_out,
                base=base,
                target=target,
                machine=machine,
            )
            result.evaluation = run.evaluation(measured, branch.name, target)
        if result.evaluation and not result.evaluation.gate.passed:
            result.failure = "gate failed: " + "; ".join(
                f"{c.name} {c.measured:.4g} (limit {c.limit:.4g})"
                for c in result.evaluation.gate.checks
                if not c.passed
            )
            result.error = GateFailed(f"the model is not registered: {result.evaluation.gate.to_text()}")
            emit_gate_failed(model.name, branch.name, target, result)


def report_inputs(run: Run, branches: list[Branch], registration: str) -> ReportInputs:
    steps = [asdict(record) for record in run.records]
    outcomes = [b.outcome() for b in branches]
    return ReportInputs(run.config, outcomes, steps, current_flow_run_id(), registration)


def report(run: Run, model: ResolvedModel, branches: list[Branch]) -> Path:
    """The run's report (run folder ``report/`` and the flow run's Artifacts tab), written before the
    registry is asked, since the entry keeps a copy: its opening line names what passed will be registered
    under, or says nothing is."""
    from olivepress.tasks.register import registry_name

    name = registry_name(run.config, model.name) if anything_passed(run, branches) else None
    inputs = report_inputs(run, branches, registration_line(name))
    return timed(run.records, "report", report_task, inputs, run.dir / REPORT)


def register_and_report(
    run: Run, model: ResolvedModel, branches: list[Branch], report_dir: Path
) -> Registration | None:
    """Register what passed (None: nothing did), then write the report's page again, its opening line
    naming the version, or saying why the registration failed (whose error is then raised)."""
    from olivepress.tasks.register import registry_name

    if not anything_passed(run, branches):
        return None
    name = registry_name(run.config, model.name)
    try:
        registration = register(run, model, branches, report_dir)
    except Exception as error:
        why = str(error).strip().splitlines() or [type(error).__name__]
        report_registration(run, branches, report_dir, registration_line(name, failure=why[0]))
        raise
    report_registration(run, branches, report_dir, registration_line(name, registration))
    return registration


def report_registration(run: Run, branches: list[Branch], report_dir: Path, registration: str) -> None:
    """The page again with ``registration`` in its opening line and the register step among its steps. The
    registration stands whatever happens here: a failure is logged, and the page keeps its earlier line."""
    try:
        rewrite_page(report_inputs(run, branches, registration), report_dir)
    except Exception as error:
        run.log.warning("the report could not be written again to say %r: %s", registration, error)


def entry_parts(run: Run, branches: list[Branch]) -> dict[str, Path]:
    """The entry's model and adapters as folders of links in the run folder: ``model/<target>/`` (the
    target's export, without the first dataset's adapter files when that adapter failed there) and
    ``adapters/<target>/<name>.onnx_adapter`` for every adapter that passed on that target."""
    model, adapters = run.dir / REGISTERED / "model", run.dir / ADAPTERS_DIR
    first = branches[0]
    for target in run.config.targets:
        passed = [b for b in branches if b.passed(target)]
        if not passed:
            continue
        onnx = run.dir / "onnx" / target
        keep = first.passed(target)
        (model / target).mkdir(parents=True)
        for path in onnx.iterdir():
            if keep or path.name not in (ADAPTER_FILE, MERGED_MODEL_FILE):
                link_into(model / target, path)
        (adapters / target).mkdir(parents=True, exist_ok=True)
        for branch in passed:
            file = branch.targets[target].exported.folder / ADAPTER_FILE
            (adapters / target / f"{branch.name}{ADAPTER_SUFFIX}").symlink_to(file.resolve())
    return {"model": model, ADAPTERS_DIR: adapters}


def register(run: Run, model: ResolvedModel, branches: list[Branch], report_dir: Path) -> Registration:
    """Register every target and adapter that passed, with the report and lineage, retried as
    ``retries.*`` says. Runs sharing a store register one model content one at a time: a backend's
    check-then-create (Azure ML's tag lookup) then sees the other's version and returns it instead of
    adding one."""
    from olivepress.steps import prefect_retries
    from olivepress.tasks.register import build_lineage, register_task

    sources = {**entry_parts(run, branches), "report": report_dir}
    outcomes = [b.outcome() for b in branches]
    record = build_lineage(
        run.config, model.path, run.data_hash, outcomes, sources, current_flow_run_id(), model.lineage()
    )
    task = register_task.with_options(**prefect_retries(run.config.retries))
    with run.store.key_lock("register", record["content_sha256"]):
        registration = timed(run.records, "register", task, run.config, model.name, sources, record)
    verb = "already registered as" if registration.reused else "registered"
    run.log.info("%s %s version %s (%s)", verb, registration.name, registration.version, registration.uri)
    emit_registered(registration, branches, run.config.targets)
    return registration


GATE_FAILED = "olivepress.gate.failed"
MODEL_REGISTERED = "olivepress.model.registered"


def emit(event: str, resource: dict[str, str], payload: dict) -> None:
    """A Prefect event an automation can act on (a notification, a downstream deployment); Prefect relates
    it to the flow run and flow that emitted it."""
    from prefect.events import emit_event

    emit_event(event, resource, payload={**payload, "flow_run_id": current_flow_run_id()})


def gate_checks(evaluation: Evaluation) -> dict[str, dict]:
    return {
        c.name: {"measured": c.measured, "limit": c.limit, "passed": c.passed} for c in evaluation.gate.checks
    }


def emit_gate_failed(model: str, dataset: str, target: str, result: TargetResult) -> None:
    """``olivepress.gate.failed``: one dataset's adapter on one target did not pass; what failed and why."""
    emit(
        GATE_FAILED,
        {
            "prefect.resource.id": f"olivepress.gate.{model}.{dataset}.{target}",
            "prefect.resource.name": f"{model}: {dataset} on {target}",
            "olivepress.model": model,
            "olivepress.dataset": dataset,
            "olivepress.target": target,
        },
        {
            "model": model,
            "dataset": dataset,
            "target": target,
            "why": result.failure,
            "checks": gate_checks(result.evaluation),
        },
    )


def emit_registered(registration: Registration, branches: list[Branch], targets: list[str]) -> None:
    """``olivepress.model.registered``: the name and version, where it lives, and per target the adapters
    that passed with their gate's measurements."""
    passed = {
        target: {b.name: gate_checks(b.targets[target].evaluation) for b in branches if b.passed(target)}
        for target in targets
    }
    emit(
        MODEL_REGISTERED,
        {
            "prefect.resource.id": f"olivepress.model.{registration.name}.{registration.version}",
            "prefect.resource.name": f"{registration.name} version {registration.version}",
            "olivepress.model": registration.name,
            "olivepress.version": registration.version,
        },
        {
            **asdict(registration),
            "targets": [target for target, adapters in passed.items() if adapters],
            "gates": {target: adapters for target, adapters in passed.items() if adapters},
        },
    )


def anything_passed(run: Run, branches: list[Branch]) -> bool:
    return any(b.passed(target) for b in branches for target in run.config.targets)


def failures(branches: list[Branch]) -> list[tuple[str, str | None, str, Exception | None]]:
    """(dataset, target, why, the error as raised) of every dataset that failed before its targets (target
    None) and of every target that failed of the others."""
    found = [(b.name, None, b.failure, b.error) for b in branches if b.failure]
    return found + [
        (b.name, t, r.failure, r.error)
        for b in branches
        if not b.failure
        for t, r in b.targets.items()
        if r.failure
    ]


def raise_failures(branches: list[Branch], targets: list[str], headline: str) -> None:
    """Fail the flow run naming every dataset and target that failed and why; a run of one dataset and one
    target raises its error as it was (bad data as InvalidData, a failed gate as GateFailed)."""
    if not (failed := failures(branches)):
        return
    if len(branches) == 1 and len(targets) <= 1 and len(failed) == 1 and failed[0][3] is not None:
        raise failed[0][3]
    lines = [f"  {name}{f' ({target})' if target else ''}: {why}" for name, target, why, _ in failed]
    raise DatasetsFailed(headline + ":\n" + "\n".join(lines))


def outcome(run: Run, branches: list[Branch], report_dir: Path, registration: Registration | None) -> dict:
    """The flow's result, after the summary; raises naming what failed when anything did."""
    targets = run.config.targets
    finetuned = any(r.step == "finetune" and r.status == "completed" for r in run.records)
    if registration is not None and not run.several_datasets and finetuned:
        run.log.info(fuller_run_estimate(run.config, run.records, len(branches[0].train)))
    failed = len(failures(branches))
    registered = (
        f"registered {registration.name} version {registration.version}"
        if registration
        else "nothing was registered"
    )
    raise_failures(
        branches,
        targets,
        f"{failed} of {len(branches) * len(targets)} dataset × target results failed; {registered}",
    )
    adapters_dir = run.dir / ADAPTERS_DIR
    return {
        "flow_run_id": current_flow_run_id(),
        "run_dir": str(run.dir),
        "onnx": str(run.dir / "onnx"),
        "exports": {t: str(run.dir / "onnx" / t) for t in targets},
        "adapters": {
            t: {b.name: str(adapters_dir / t / f"{b.name}{ADAPTER_SUFFIX}") for b in branches if b.passed(t)}
            for t in targets
        },
        "report": str(report_dir / "report.md"),
        "registration": asdict(registration),
    }
