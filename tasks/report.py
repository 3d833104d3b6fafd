"""The run report: one markdown page with plots, written into the run folder and published as Prefect artifacts.

The same page serves both readers: ``report/report.md`` beside its PNGs for someone with only the run
folder, and on the flow run's Artifacts tab (markdown with the plots inlined, a metrics table, the gate
record) for the data team in the Prefect UI.
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from olivepress.files import atomic_dir
from olivepress.metrics_display import display_rows

if TYPE_CHECKING:
    from olivepress.config import RunConfig
    from olivepress.tasks.evaluate import Evaluation
    from olivepress.tasks.validate import ValidationReport

REPORT_KEY = "olivepress-report"
METRICS_KEY = "olivepress-metrics"
GATE_KEY = "olivepress-gate"
VALIDATION_KEY = "olivepress-validation"
LOSS_PLOT = "training_loss.png"
COMPARISON_PLOT = "comparison.png"
TRAINING_MEMORY = "training_memory.json"
MAX_ISSUES_SHOWN = 50


@dataclass(frozen=True)
class ReportInputs:
    config: RunConfig
    data_sha256: str
    n_records: int
    n_warnings: int
    train_pairs: int
    held_out_pairs: int
    steps: list[dict[str, Any]]  # the flow's StepRecords as dicts
    loss_history: list[dict[str, Any]]  # {"step", "loss"} per training step
    evaluation: Evaluation
    flow_run_id: str | None
    # torch's peak GPU memory in training (finetune's training_memory.json); None for an older adapter
    training_memory: dict[str, Any] | None = None


def metrics_rows(evaluation: Evaluation) -> list[dict[str, Any]]:
    """One row per variant, rounded for reading (only the report's page, tables and ``metrics.json`` are
    rounded; evaluation.json and the registry's lineage keep the raw values). GPU memory is a column only
    when it was measured (a GPU run)."""
    return display_rows([asdict(m) for m in evaluation.metrics])


def training_gpu_peak(training_memory: dict[str, Any] | None) -> str | None:
    """The training section's line on GPU memory, when it was measured."""
    if not training_memory or training_memory.get("peak_allocated_mib") is None:
        return None
    return (
        f"peak GPU memory in training (torch): {training_memory['peak_allocated_mib']:.0f} MiB allocated, "
        f"{training_memory['peak_reserved_mib']:.0f} MiB reserved"
    )


def markdown_table(rows: list[dict[str, Any]]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [
        "| " + " | ".join("-" if row[key] is None else str(row[key]) for key in header) + " |" for row in rows
    ]
    return "\n".join(lines)


def plot_training_loss(loss_history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.2), dpi=100)
    axes.plot([row["step"] for row in loss_history], [row["loss"] for row in loss_history], marker=".")
    axes.set(xlabel="training step", ylabel="loss", title="LoRA training loss")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_comparison(evaluation: Evaluation, path: Path) -> None:
    """Base vs quantized vs fine-tuned: held-out loss, decode speed and size side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [m.variant for m in evaluation.metrics]
    panels = [
        ("held-out loss (lower is better)", [m.loss for m in evaluation.metrics]),
        ("decode tokens/s (higher is better)", [m.decode_tokens_per_s for m in evaluation.metrics]),
        ("size on disk, MB (lower is better)", [m.bytes_on_disk / 1e6 for m in evaluation.metrics]),
    ]
    figure, axes = plt.subplots(1, 3, figsize=(11, 3.2), dpi=100)
    for axis, (title, values) in zip(axes, panels, strict=True):
        bars = axis.bar(variants, values, color=["#8c8c8c", "#4c72b0", "#55a868"])
        axis.bar_label(bars, fmt="%.3g")
        axis.set_title(title, fontsize=10)
        axis.margins(y=0.15)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def evaluate_phases(evaluation: Evaluation) -> str:
    """Where evaluate's measurement spent its time, as a sentence under the steps table ("" if unrecorded)."""
    if not evaluation.phase_seconds:
        return ""
    parts = ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in evaluation.phase_seconds.items())
    return f"\n\nEvaluate's measurement ({evaluation.seconds:.1f} s): {parts}."


def render_markdown(inputs: ReportInputs, image: dict[str, str]) -> str:
    """The report page; ``image`` maps each plot's file name to what the page links (a path or data URI)."""
    config, evaluation = inputs.config, inputs.evaluation
    gate = evaluation.gate
    step_rows = [
        {
            "step": s["step"],
            "status": s["status"],
            "seconds": round(s["seconds"], 1),
            "output_mb": None if s.get("output_bytes") is None else round(s["output_bytes"] / 1e6, 1),
        }
        for s in inputs.steps
    ]
    gate_rows = [
        {
            "check": c.name,
            "measured": f"{c.measured:.4g}",
            "limit": f"{c.limit:.4g}",
            "verdict": "pass" if c.passed else "**FAIL**",
        }
        for c in gate.checks
    ]
    model = str(config.model) if config.model else "SmolLM2-135M-Instruct (default)"
    gpu_peak = training_gpu_peak(inputs.training_memory)
    training_notes = f"\n\n{gpu_peak}." if gpu_peak else ""
    return "\n\n".join(
        [
            f"# olivepress run: gate {'passed' if gate.passed else 'FAILED'}",
            f"Model `{model}` on `{Path(str(config.data)).name}` ({config.device}); flow run `{inputs.flow_run_id or '-'}`.",
            "## Data\n\n"
            f"- File `{config.data}`, SHA-256 `{inputs.data_sha256}`.\n"
            f"- Validation: valid, {inputs.n_records} records, {inputs.n_warnings} warnings (see validation.txt).\n"
            f"- Split by prompt (seed {config.seed}): {inputs.train_pairs} training pairs, "
            f"{inputs.held_out_pairs} held out. ROUGE-L and decode speed come from greedy generations for "
            f"{evaluation.generation_prompts} of the held-out prompts.",
            "## Steps\n\n" + markdown_table(step_rows) + evaluate_phases(evaluation),
            "## Metrics on held-out data\n\n"
            + markdown_table(metrics_rows(evaluation))
            + "\n\nbase: the unquantized model in the same runtime; quantized: int4, adapter off; "
            "fine-tuned: int4 with the LoRA adapter. Loss is teacher-forced over response tokens; ROUGE-L F1 "
            "of greedy generations against the references.",
            f"![comparison]({image[COMPARISON_PLOT]})",
            "## Gate\n\n" + markdown_table(gate_rows),
            "## Training\n\n"
            f"{len(inputs.loss_history)} steps, loss {inputs.loss_history[0]['loss']:.3f} → "
            f"{inputs.loss_history[-1]['loss']:.3f}.{training_notes}\n\n![training loss]({image[LOSS_PLOT]})"
            if inputs.loss_history
            else f"## Training\n\nNo loss history.{training_notes}",
        ]
    )


@dataclass(frozen=True)
class AdapterOutcome:
    """One dataset's branch in a run with several: what it trained and measured, and why it failed if it
    did (bad data, a failed training or export, the gate)."""

    name: str
    data: str
    data_sha256: str
    train_pairs: int = 0
    held_out_pairs: int = 0
    loss_history: list[dict[str, Any]] = field(default_factory=list)
    evaluation: Evaluation | None = None
    failure: str | None = None


def adapter_rows(outcomes: list[AdapterOutcome]) -> list[dict[str, Any]]:
    """The adapters side by side: each fine-tuned (int4 + its adapter) on its own held-out split, rounded for
    reading, with the base's loss on that split and the verdict."""
    rows = []
    for outcome in outcomes:
        metrics = {m.variant: m for m in outcome.evaluation.metrics} if outcome.evaluation else {}
        tuned = display_rows([asdict(metrics["fine-tuned"])])[0] if "fine-tuned" in metrics else {}
        rows.append(
            {
                "adapter": outcome.name,
                "held_out": outcome.held_out_pairs or None,
                "loss": tuned.get("loss"),
                "base_loss": round(metrics["base"].loss, 4) if "base" in metrics else None,
                "perplexity": tuned.get("perplexity"),
                "rouge_l": tuned.get("rouge_l"),
                "decode_tok_s": tuned.get("decode_tok_s"),
                "size_mb": tuned.get("size_mb"),
                "result": "registered" if outcome.failure is None else "failed",
            }
        )
    return rows


def plot_adapter_losses(outcomes: list[AdapterOutcome], path: Path) -> None:
    """Every adapter's training loss in one plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.2), dpi=100)
    for outcome in outcomes:
        if outcome.loss_history:
            steps = [row["step"] for row in outcome.loss_history]
            axes.plot(steps, [row["loss"] for row in outcome.loss_history], marker=".", label=outcome.name)
    axes.set(xlabel="training step", ylabel="loss", title="LoRA training loss per adapter")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


@dataclass(frozen=True)
class AdaptersReportInputs:
    """What the report of a run with several datasets shows."""

    config: RunConfig
    outcomes: list[AdapterOutcome]
    steps: list[dict[str, Any]]  # the flow's StepRecords as dicts
    flow_run_id: str | None


def render_adapters_markdown(inputs: AdaptersReportInputs, image: str) -> str:
    """The report page of a run with several datasets; ``image`` is what the page links for the loss plot."""
    config, outcomes = inputs.config, inputs.outcomes
    failed = [outcome for outcome in outcomes if outcome.failure]
    model = str(config.model) if config.model else "SmolLM2-135M-Instruct (default)"
    title = f"{len(outcomes) - len(failed)} of {len(outcomes)} adapters passed"
    sections = [
        f"# olivepress run: {title}",
        f"Model `{model}`, one int4 base and an adapter per dataset ({config.device}); flow run "
        f"`{inputs.flow_run_id or '-'}`.",
        "## Adapters\n\n"
        + markdown_table(adapter_rows(outcomes))
        + "\n\nEach adapter on the int4 base, measured on its own dataset's held-out pairs (loss "
        "teacher-forced over response tokens; base_loss: the unquantized model on the same pairs; ROUGE-L F1 "
        "of greedy generations; size: the int4 model and the adapter file).",
        f"![training loss per adapter]({image})",
    ]
    if failed:
        sections.append(
            "## Failed\n\n" + "\n".join(f"- `{outcome.name}`: {outcome.failure}" for outcome in failed)
        )
    for outcome in outcomes:
        if outcome.evaluation is None:
            continue
        sections.append(
            f"## {outcome.name}\n\n"
            f"`{outcome.data}` (SHA-256 `{outcome.data_sha256}`): {outcome.train_pairs} training pairs, "
            f"{outcome.held_out_pairs} held out.\n\n"
            + markdown_table(metrics_rows(outcome.evaluation))
            + f"\n\n```\n{outcome.evaluation.gate.to_text()}\n```"
        )
    step_rows = [
        {"step": s["step"], "status": s["status"], "seconds": round(s["seconds"], 1)} for s in inputs.steps
    ]
    sections.append("## Steps\n\n" + markdown_table(step_rows))
    return "\n\n".join(sections)


def write_adapters_report(inputs: AdaptersReportInputs, report_dir: Path) -> Path:
    """report.md, the loss plot and adapters.json (the side-by-side rows) of a run with several datasets."""
    with atomic_dir(report_dir) as staging:
        plot_adapter_losses(inputs.outcomes, staging / LOSS_PLOT)
        markdown = render_adapters_markdown(inputs, LOSS_PLOT)
        (staging / "report.md").write_text(markdown + "\n", encoding="utf-8")
        (staging / "adapters.json").write_text(json.dumps(adapter_rows(inputs.outcomes), indent=1))
    return report_dir


@task(name="report", retries=0, cache_policy=NO_CACHE, tags=["olivepress"])
def adapters_report_task(inputs: AdaptersReportInputs, report_dir: Path) -> Path:
    """The report of a run with several datasets, in the run folder and as the flow run's artifacts."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    write_adapters_report(inputs, report_dir)
    page = render_adapters_markdown(inputs, data_uri(report_dir / LOSS_PLOT))
    create_markdown_artifact(key=REPORT_KEY, markdown=page, description="olivepress run report")
    create_table_artifact(
        key=METRICS_KEY, table=adapter_rows(inputs.outcomes), description="held-out metrics per adapter"
    )
    failed = [outcome.name for outcome in inputs.outcomes if outcome.failure]
    create_markdown_artifact(
        key=GATE_KEY,
        markdown="\n\n".join(
            f"**{outcome.name}**\n\n```\n{outcome.evaluation.gate.to_text() if outcome.evaluation else outcome.failure}\n```"
            for outcome in inputs.outcomes
        ),
        description=f"failed: {', '.join(failed)}" if failed else "every adapter passed",
    )
    return report_dir


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def write_report(inputs: ReportInputs, report_dir: Path) -> Path:
    """Write report.md, its plots, metrics.json, gate.json and (from a GPU run) training_memory.json into
    ``report_dir`` (whole or not at all)."""
    with atomic_dir(report_dir) as staging:
        plot_comparison(inputs.evaluation, staging / COMPARISON_PLOT)
        if inputs.loss_history:
            plot_training_loss(inputs.loss_history, staging / LOSS_PLOT)
        markdown = render_markdown(inputs, {COMPARISON_PLOT: COMPARISON_PLOT, LOSS_PLOT: LOSS_PLOT})
        (staging / "report.md").write_text(markdown + "\n", encoding="utf-8")
        (staging / "metrics.json").write_text(json.dumps(metrics_rows(inputs.evaluation), indent=1))
        (staging / "gate.json").write_text(json.dumps(inputs.evaluation.to_dict()["gate"], indent=1))
        if training_gpu_peak(inputs.training_memory):
            (staging / TRAINING_MEMORY).write_text(json.dumps(inputs.training_memory, indent=1))
    return report_dir


def publish_report(inputs: ReportInputs, report_dir: Path) -> None:
    """The report as flow-run artifacts: the page (plots inlined), the metrics table and the gate record."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    images = {
        name: data_uri(report_dir / name)
        for name in (COMPARISON_PLOT, LOSS_PLOT)
        if (report_dir / name).is_file()
    }
    images.setdefault(LOSS_PLOT, "")
    gate = inputs.evaluation.gate
    create_markdown_artifact(
        key=REPORT_KEY, markdown=render_markdown(inputs, images), description="olivepress run report"
    )
    create_table_artifact(
        key=METRICS_KEY, table=metrics_rows(inputs.evaluation), description="held-out metrics per variant"
    )
    create_markdown_artifact(
        key=GATE_KEY,
        markdown=f"```\n{gate.to_text()}\n```",
        description=f"gate {'passed' if gate.passed else 'failed'}",
    )


def publish_validation_failure(report: ValidationReport) -> None:
    """Bad data: the per-line report becomes an artifact on the failed run, so the UI shows why."""
    from prefect.artifacts import create_markdown_artifact

    lines = report.to_text().splitlines()
    shown = "\n".join(lines[:MAX_ISSUES_SHOWN])
    more = (
        f"\n... and {len(lines) - MAX_ISSUES_SHOWN} more lines (validation.txt)"
        if len(lines) > MAX_ISSUES_SHOWN
        else ""
    )
    create_markdown_artifact(
        key=VALIDATION_KEY,
        markdown=f"# Validation failed\n\n{report.summary()}\n\n```\n{shown}{more}\n```",
        description="why the data was rejected",
    )


@task(name="report", retries=0, cache_policy=NO_CACHE, tags=["olivepress"])
def report_task(inputs: ReportInputs, report_dir: Path) -> Path:
    write_report(inputs, report_dir)
    publish_report(inputs, report_dir)
    return report_dir
