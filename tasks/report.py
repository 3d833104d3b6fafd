"""The run report: one markdown page with plots, written into the run folder and published as Prefect artifacts.

One page for every run, whatever its datasets and targets: the verdict and what was registered, the
adapters × targets side by side, then each dataset's data, and each target's measurements, comparison plot
(the gate's limits drawn), gate and sample answers. The same page serves both readers: ``report/report.md``
beside its PNGs for someone with only the run folder, and on the flow run's Artifacts tab (markdown with the
plots inlined, a metrics table, the gate records) for the data team in the Prefect UI.

The page is written before the registry is asked, since the entry keeps a copy; once the registry has
answered, the page is written again with the version (or why nothing was registered) in its opening line.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from olivepress.files import atomic_dir, atomic_write_text
from olivepress.metrics_display import BASE, display_rows

if TYPE_CHECKING:
    from olivepress.config import RunConfig
    from olivepress.registry import Registration
    from olivepress.tasks.evaluate import Evaluation
    from olivepress.validation import ValidationReport

REPORT_KEY = "olivepress-report"
METRICS_KEY = "olivepress-metrics"
GATE_KEY = "olivepress-gate"
VALIDATION_KEY = "olivepress-validation"
LOSS_PLOT = "training_loss.png"
TRAINING_MEMORY = "training_memory.json"
MAX_ISSUES_SHOWN = 50


@dataclass(frozen=True)
class TargetOutcome:
    """One adapter on one target: its measurements, and why it failed if it did (export, evaluation,
    gate)."""

    target: str
    evaluation: Evaluation | None = None
    failure: str | None = None


@dataclass(frozen=True)
class AdapterOutcome:
    """One dataset's way through the run: its data, its training, each target's outcome, and why it failed
    before any target if it did (bad data, a failed training)."""

    name: str
    data: str
    data_sha256: str
    n_records: int = 0
    n_warnings: int = 0
    train_pairs: int = 0
    held_out_pairs: int = 0
    loss_history: list[dict[str, Any]] = field(default_factory=list)
    # torch's peak GPU memory in training (finetune's training_memory.json); None when not measured
    training_memory: dict[str, Any] | None = None
    targets: list[TargetOutcome] = field(default_factory=list)
    failure: str | None = None

    def results(self) -> list[tuple[str, TargetOutcome | None, str | None]]:
        """(target, its outcome, why it failed) for every target; a failure before the targets fails each."""
        if not self.targets:
            return [("-", None, self.failure)]
        return [(t.target, t, self.failure or t.failure) for t in self.targets]


@dataclass(frozen=True)
class ReportInputs:
    config: RunConfig
    outcomes: list[AdapterOutcome]
    steps: list[dict[str, Any]]  # the flow's StepRecords as dicts
    flow_run_id: str | None
    # the opening line's end: what became of the registration (registration_line); None: not said
    registration: str | None = None

    def failures(self) -> list[tuple[str, str, str]]:
        """(adapter, target, why) of every adapter × target that failed."""
        return [(o.name, t, why) for o in self.outcomes for t, _, why in o.results() if why]

    def verdict(self) -> str:
        """The headline: the gate's verdict for one adapter on one target, else how many passed."""
        results = [result for outcome in self.outcomes for result in outcome.results()]
        failed = len(self.failures())
        if len(results) == 1:
            return "gate passed" if not failed else "gate FAILED"
        return f"{len(results) - failed} of {len(results)} adapter × target results passed"

    def headline(self) -> str:
        return f"# olivepress run: {self.verdict()}" + (f"; {self.registration}" if self.registration else "")


def registration_line(
    name: str | None, registration: Registration | None = None, failure: str | None = None
) -> str:
    """What became of the registration, for the opening line. ``name``: what passed is registered under
    it (None: nothing passed). Before the registry has answered only the name is known: the entry keeps the
    page as it was then, its version being the entry's own."""
    if name is None:
        return "nothing registered"
    if failure is not None:
        return f"nothing registered: the registration failed ({failure})"
    if registration is None:
        return f"to be registered as `{name}`"
    verb = "already registered as" if registration.reused else "registered"
    return f"{verb} `{registration.name}` version {registration.version}"


def comparison_plot(adapter: str, target: str) -> str:
    return f"comparison_{adapter}_{target}.png"


def metrics_rows(evaluation: Evaluation) -> list[dict[str, Any]]:
    """One row per variant, rounded for reading (only the report's page, tables and ``metrics.json`` are
    rounded; evaluation.json and the registry's lineage keep the raw values). GPU memory is a column only
    when it was measured (the cuda target)."""
    return display_rows([asdict(m) for m in evaluation.metrics])


def result_rows(outcomes: list[AdapterOutcome]) -> list[dict[str, Any]]:
    """The adapters × targets side by side: each fine-tuned model (int4 + its adapter) on its own held-out
    split and its target's runtime, rounded for reading, with the base's loss and speed beside it and the
    verdict."""
    rows = []
    for outcome in outcomes:
        for target, result, failure in outcome.results():
            evaluation = result.evaluation if result else None
            metrics = {m.variant: m for m in evaluation.metrics} if evaluation else {}
            tuned = display_rows([asdict(metrics["fine-tuned"])])[0] if "fine-tuned" in metrics else {}
            base = metrics.get("base")
            speedup = (
                round(metrics["fine-tuned"].decode_tokens_per_s / base.decode_tokens_per_s, 2)
                if base and base.decode_tokens_per_s
                else None
            )
            rows.append(
                {
                    "adapter": outcome.name,
                    "target": target,
                    "held_out": outcome.held_out_pairs or None,
                    "loss": tuned.get("loss"),
                    "base_loss": round(base.loss, 4) if base else None,
                    "perplexity": tuned.get("perplexity"),
                    "rouge_l": tuned.get("rouge_l"),
                    "decode_tok_s": tuned.get("decode_tok_s"),
                    "speedup": speedup,
                    "size_mb": tuned.get("size_mb"),
                    "result": "passed" if failure is None else "failed",
                }
            )
    return rows


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


HELD_OUT_STYLE = {BASE: ":", "quantized": "--", "fine-tuned": "-."}
GATE_COLOR = "#c44e52"


def plot_training_loss(outcomes: list[AdapterOutcome], path: Path) -> None:
    """Every adapter's training loss, and as level lines each variant's held-out loss from its evaluations.
    Not one measure, so the labels say which: the training loss is per token of whole training texts
    (prompt and response), the held-out loss per response token of the held-out pairs, in a target's
    runtime."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    figure, axes = plt.subplots(figsize=(9, 3.6), dpi=100)
    for index, outcome in enumerate(outcomes):
        color, who = colors[index % len(colors)], f"{outcome.name}: " if len(outcomes) > 1 else ""
        if outcome.loss_history:
            steps = [row["step"] for row in outcome.loss_history]
            losses = [row["loss"] for row in outcome.loss_history]
            label = f"{who}training loss (training texts, every token)"
            axes.plot(steps, losses, marker=".", color=color, label=label)
        for target in (t for t in outcome.targets if t.evaluation is not None):
            for m in target.evaluation.metrics:
                label = f"{who}held-out loss, {m.variant} on {target.target} (response tokens)"
                axes.axhline(m.loss, color=color, linestyle=HELD_OUT_STYLE.get(m.variant, ":"), label=label)
    axes.set(xlabel="training step", ylabel="loss (nats per token)", title="LoRA training and held-out loss")
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    axes.grid(alpha=0.3)
    figure.savefig(path, bbox_inches="tight")
    plt.close(figure)


def gate_limits(evaluation: Evaluation) -> dict[str, tuple[float, str]]:
    """Each gate limit where the comparison plot draws it, by panel (loss, speed, size), with its label:
    the fine-tuned bar must stay under the loss and size lines and reach the speed line. Every limit is
    relative to the base's measurement; a perplexity ratio r is the base's loss + ln r."""
    base = next(m for m in evaluation.metrics if m.variant == BASE)
    limits = {check.name: check.limit for check in evaluation.gate.checks}
    lines = {}
    if (ratio := limits.get("perplexity_ratio")) is not None:
        lines["loss"] = (base.loss + math.log(ratio), f"gate: fine-tuned perplexity ≤ base × {ratio:g}")
    if (speedup := limits.get("speedup")) is not None:
        lines["speed"] = (base.decode_tokens_per_s * speedup, f"gate: fine-tuned ≥ base × {speedup:g}")
    if (size := limits.get("size_ratio")) is not None:
        lines["size"] = (base.bytes_on_disk / 1e6 * size, f"gate: fine-tuned ≤ base × {size:g}")
    return lines


def plot_comparison(evaluation: Evaluation, path: Path) -> None:
    """Base vs quantized vs fine-tuned: held-out loss, decode speed and size side by side, each with its
    gate limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [m.variant for m in evaluation.metrics]
    panels = [
        ("loss", "held-out loss (lower is better)", [m.loss for m in evaluation.metrics]),
        ("speed", "decode tokens/s (higher is better)", [m.decode_tokens_per_s for m in evaluation.metrics]),
        ("size", "size on disk, MB (lower is better)", [m.bytes_on_disk / 1e6 for m in evaluation.metrics]),
    ]
    limits = gate_limits(evaluation)
    figure, axes = plt.subplots(1, 3, figsize=(11, 3.6), dpi=100)
    for axis, (panel, title, values) in zip(axes, panels, strict=True):
        bars = axis.bar(variants, values, color=["#8c8c8c", "#4c72b0", "#55a868"])
        axis.bar_label(bars, fmt="%.3g")
        axis.set_title(title, fontsize=10)
        if panel in limits:
            limit, label = limits[panel]
            axis.axhline(limit, color=GATE_COLOR, linestyle="--", linewidth=1.2, label=label)
            axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12))
        axis.margins(y=0.15)
    figure.suptitle(f"{evaluation.target} target", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, bbox_inches="tight")
    plt.close(figure)


def evaluate_phases(evaluation: Evaluation) -> str:
    """Where evaluate's measurement spent its time, as a sentence ("" if unrecorded)."""
    if not evaluation.phase_seconds:
        return ""
    parts = ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in evaluation.phase_seconds.items())
    text = f"\n\nEvaluate's measurement ({evaluation.seconds:.1f} s): {parts}."
    if evaluation.base_phase_seconds:
        base = ", ".join(
            f"{phase} {seconds:.1f} s" for phase, seconds in evaluation.base_phase_seconds.items()
        )
        text += f" The base's ({evaluation.base_seconds:.1f} s, reused while its inputs hold): {base}."
    return text


def gate_table(evaluation: Evaluation) -> str:
    return markdown_table(
        [
            {
                "check": c.name,
                "measured": f"{c.measured:.4g}",
                "limit": f"{c.limit:.4g}",
                "verdict": "pass" if c.passed else "**FAIL**",
            }
            for c in evaluation.gate.checks
        ]
    )


def samples_table(evaluation: Evaluation) -> str:
    """The sample answers side by side, each on one line of its cell ("" when none were kept)."""
    if not evaluation.samples:
        return ""
    rows = [
        {key: " ".join(text.split()).replace("|", "\\|") or "(empty)" for key, text in sample.items()}
        for sample in evaluation.samples
    ]
    note = "Sample answers, greedy, to held-out prompts in this target's runtime."
    return f"\n\n{note}\n\n" + markdown_table(rows)


def held_out_lines(outcome: AdapterOutcome) -> list[str]:
    """The training section's lines on each target's held-out loss, beside the training loss."""
    return [
        f"{outcome.name}: held-out loss per response token on {t.target}: "
        + ", ".join(f"{m.variant} {m.loss:.3f}" for m in t.evaluation.metrics)
        + "."
        for t in outcome.targets
        if t.evaluation is not None
    ]


def dataset_section(outcome: AdapterOutcome, seed: int, image: dict[str, str], heading: str) -> str:
    """One dataset: its data and split, then each target's measurements, comparison plot and gate."""
    lines = [
        f"{heading}\n\n"
        f"- File `{outcome.data}`, SHA-256 `{outcome.data_sha256}`.\n"
        f"- Validation: valid, {outcome.n_records} records, {outcome.n_warnings} warnings (see validation.txt).\n"
        f"- Split by prompt (seed {seed}): {outcome.train_pairs} training pairs, {outcome.held_out_pairs} "
        "held out."
    ]
    for target in outcome.targets:
        evaluation = target.evaluation
        if evaluation is None:
            continue
        lines.append(
            f"### {target.target} target: gate {'passed' if evaluation.gate.passed else 'FAILED'}\n\n"
            + markdown_table(metrics_rows(evaluation))
            + f"\n\n![comparison]({image[comparison_plot(outcome.name, target.target)]})\n\n"
            + gate_table(evaluation)
            + evaluate_phases(evaluation)
            + samples_table(evaluation)
        )
    return "\n\n".join(lines)


def render_markdown(inputs: ReportInputs, image: dict[str, str]) -> str:
    """The report page; ``image`` maps each plot's file name to what the page links (a path or data URI)."""
    config, outcomes = inputs.config, inputs.outcomes
    model = str(config.model) if config.model else "SmolLM2-135M-Instruct (default)"
    sections = [
        inputs.headline(),
        f"Model `{model}`, computed on {config.device}, built for {', '.join(config.targets)}; flow run "
        f"`{inputs.flow_run_id or '-'}`.",
        "## Results\n\n"
        + markdown_table(result_rows(outcomes))
        + "\n\nEach adapter on the int4 model of each target, measured on its own dataset's held-out pairs "
        "in that target's runtime (cpu: this machine's cores, against the fp32 base; cuda: the GPU, against "
        "the fp16 base). Loss is teacher-forced over every held-out response's tokens (base_loss: the "
        "unquantized model on the same pairs); ROUGE-L F1 of the fine-tuned model's greedy answers; decode "
        "speed from a fixed decode of equal length per variant (speedup: ÷ the base's); size: the int4 model "
        "and the adapter file.",
    ]
    if failures := inputs.failures():
        sections.append(
            "## Failed\n\n" + "\n".join(f"- `{name}` ({target}): {why}" for name, target, why in failures)
        )
    single = len(outcomes) == 1
    for outcome in outcomes:
        if outcome.n_records:
            heading = "## Data" if single else f"## {outcome.name}"
            sections.append(dataset_section(outcome, config.seed, image, heading))
    trained = [outcome for outcome in outcomes if outcome.loss_history]
    notes = [f"{o.name}: {peak}." for o in outcomes if (peak := training_gpu_peak(o.training_memory))]
    if trained:
        summaries = [
            line
            for o in trained
            for line in [
                f"{o.name}: {len(o.loss_history)} steps, loss {o.loss_history[0]['loss']:.3f} → "
                f"{o.loss_history[-1]['loss']:.3f}.",
                *held_out_lines(o),
            ]
        ]
        sections.append(
            "## Training\n\n"
            + "\n".join(f"- {line}" for line in summaries + notes)
            + f"\n\n![training loss]({image[LOSS_PLOT]})"
        )
    step_rows = [
        {
            "step": s["step"],
            "status": s["status"],
            "seconds": round(s["seconds"], 1),
            "output_mb": None if s.get("output_bytes") is None else round(s["output_bytes"] / 1e6, 1),
        }
        for s in inputs.steps
    ]
    sections.append("## Steps\n\n" + markdown_table(step_rows))
    return "\n\n".join(sections)


def plots(inputs: ReportInputs) -> list[tuple[str, Evaluation]]:
    """(file name, evaluation) of every comparison plot the page shows."""
    return [
        (comparison_plot(outcome.name, target.target), target.evaluation)
        for outcome in inputs.outcomes
        for target in outcome.targets
        if target.evaluation is not None
    ]


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def write_report(inputs: ReportInputs, report_dir: Path) -> Path:
    """Write report.md, its plots, results.json (the side-by-side rows), metrics.json (every variant's row
    per adapter and target), gate.json and, when measured, training_memory.json into ``report_dir`` (whole
    or not at all)."""
    with atomic_dir(report_dir) as staging:
        names = [LOSS_PLOT]
        plot_training_loss(inputs.outcomes, staging / LOSS_PLOT)
        for name, evaluation in plots(inputs):
            plot_comparison(evaluation, staging / name)
            names.append(name)
        markdown = render_markdown(inputs, {name: name for name in names})
        (staging / "report.md").write_text(markdown + "\n", encoding="utf-8")
        (staging / "results.json").write_text(json.dumps(result_rows(inputs.outcomes), indent=1))
        metrics, gates, memory = [], {}, {}
        for outcome in inputs.outcomes:
            for target in outcome.targets:
                if target.evaluation is not None:
                    where = {"adapter": outcome.name, "target": target.target}
                    metrics += [where | row for row in metrics_rows(target.evaluation)]
                    gates[f"{outcome.name}/{target.target}"] = asdict(target.evaluation.gate)
            if training_gpu_peak(outcome.training_memory):
                memory[outcome.name] = outcome.training_memory
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=1))
        (staging / "gate.json").write_text(json.dumps(gates, indent=1))
        if memory:
            (staging / TRAINING_MEMORY).write_text(json.dumps(memory, indent=1))
    return report_dir


def publish_page(inputs: ReportInputs, report_dir: Path) -> None:
    """The page as the flow run's artifact, its plots (``report_dir``'s PNGs) inlined."""
    from prefect.artifacts import create_markdown_artifact

    images = {path.name: data_uri(path) for path in report_dir.glob("*.png")}
    create_markdown_artifact(
        key=REPORT_KEY, markdown=render_markdown(inputs, images), description="olivepress run report"
    )


def rewrite_page(inputs: ReportInputs, report_dir: Path) -> None:
    """The page again, in the run folder and as a new version of its artifact, its plots and records as
    they are: once the registry has answered, the opening line says what it answered."""
    images = {path.name: path.name for path in report_dir.glob("*.png")}
    atomic_write_text(report_dir / "report.md", render_markdown(inputs, images) + "\n")
    publish_page(inputs, report_dir)


def publish_report(inputs: ReportInputs, report_dir: Path) -> None:
    """The report as flow-run artifacts: the page (plots inlined), the results table and the gate records."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    publish_page(inputs, report_dir)
    create_table_artifact(
        key=METRICS_KEY,
        table=result_rows(inputs.outcomes),
        description="held-out metrics per adapter and target",
    )
    records = []
    for outcome in inputs.outcomes:
        for target, result, failure in outcome.results():
            evaluation = result.evaluation if result else None
            text = evaluation.gate.to_text() if evaluation else failure
            records.append(f"**{outcome.name}** ({target})\n\n```\n{text}\n```")
    failed = sorted({name for name, _, _ in inputs.failures()})
    create_markdown_artifact(
        key=GATE_KEY,
        markdown="\n\n".join(records),
        description=f"failed: {', '.join(failed)}" if failed else inputs.verdict(),
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
    """The run's report, in the run folder and as the flow run's artifacts."""
    write_report(inputs, report_dir)
    publish_report(inputs, report_dir)
    return report_dir
