import json
import math
from dataclasses import replace

from olivepress.config import load_config
from olivepress.tasks.evaluate import (
    BASE,
    FINE_TUNED,
    QUANTIZED,
    Evaluation,
    GateCheck,
    GateDecision,
    VariantMetrics,
)
from olivepress.tasks.report import (
    GATE_COLOR,
    LOSS_PLOT,
    AdapterOutcome,
    ReportInputs,
    TargetOutcome,
    comparison_plot,
    registration_line,
    render_markdown,
    write_report,
)

MEMORY = {"peak_allocated_mib": 9000.4, "peak_reserved_mib": 10240.0, "allocated_at_start_mib": 7.0}
STEPS = [{"step": "validate", "status": "completed", "seconds": 3.1, "output_bytes": None}]
GATE_FAILURE = "gate failed: size_ratio 0.35 (limit 0.1)"


def evaluation(
    passed: bool = True,
    target: str = "cpu",
    gpu_memory_mib: float | None = None,
    tuned_rouge: float | None = 0.25,
    **fields,
) -> Evaluation:
    """Base and int4 are not scored (rouge_l None); only the fine-tuned variant has ROUGE-L."""
    rows = [
        VariantMetrics(name, loss, 2.718**loss, rouge, speed, 0.1, size, 40.0, 64, gpu_memory_mib)
        for name, loss, rouge, speed, size in [
            (BASE, 3.08, None, 50.0, 540_000_000),
            (QUANTIZED, 3.24, None, 70.0, 184_000_000),
            (FINE_TUNED, 2.88, tuned_rouge, 69.0, 191_000_000),
        ]
    ]
    check = GateCheck("size_ratio", "size", 0.35, 0.5 if passed else 0.1, passed)
    return Evaluation(
        rows,
        GateDecision(passed, [check]),
        held_out_pairs=16,
        generation_prompts=16,
        seconds=60.0,
        target=target,
        **fields,
    )


def passed_on(target: str = "cpu", **fields) -> TargetOutcome:
    return TargetOutcome(target, evaluation(True, target, **fields))


def failed_gate_on(target: str = "cpu", **fields) -> TargetOutcome:
    return TargetOutcome(target, evaluation(False, target, **fields), failure=GATE_FAILURE)


def outcome(name: str = "travel", targets: list[TargetOutcome] | None = None, **overrides) -> AdapterOutcome:
    fields = {
        "data": f"/d/{name}.jsonl",
        "data_sha256": "ab" * 32,
        "n_records": 81,
        "n_warnings": 0,
        "train_pairs": 65,
        "held_out_pairs": 16,
        "loss_history": [{"step": 1, "loss": 3.5}, {"step": 2, "loss": 3.1}],
        "targets": [passed_on()] if targets is None else targets,
    }
    return AdapterOutcome(name, **(fields | overrides))


def inputs(*outcomes: AdapterOutcome, targets=("cpu",), steps=STEPS) -> ReportInputs:
    config = load_config().model_copy(update={"targets": list(targets)})
    return ReportInputs(config, list(outcomes) or [outcome()], steps, "1234")


def images(report: ReportInputs) -> dict[str, str]:
    """Every plot the page links, as the page of the run folder links it."""
    names = [LOSS_PLOT] + [
        comparison_plot(o.name, t.target) for o in report.outcomes for t in o.targets if t.evaluation
    ]
    return {name: name for name in names}


def page_of(report: ReportInputs) -> str:
    return render_markdown(report, images(report))


def test_report_folder_holds_the_page_its_plots_and_the_records(tmp_path):
    report_dir = write_report(inputs(), tmp_path / "report")
    page = (report_dir / "report.md").read_text()
    assert page.startswith("# olivepress run: gate passed\n")
    assert "| fine-tuned | 2.88 | 17.81 | 0.25 | 69.0 | 0.1 | 191.0 | 40 |" in page
    assert "| travel | cpu | 16 | 2.88 | 3.08 | 17.81 | 0.25 | 69.0 | 1.38 | 191.0 | passed |" in page
    assert "![training loss](training_loss.png)" in page
    assert "![comparison](comparison_travel_cpu.png)" in page
    assert sorted(path.name for path in report_dir.glob("*.png")) == [
        "comparison_travel_cpu.png",
        "training_loss.png",
    ]
    for plot in report_dir.glob("*.png"):
        assert plot.read_bytes()[:4] == b"\x89PNG"
    results = json.loads((report_dir / "results.json").read_text())
    assert [(row["adapter"], row["target"], row["result"]) for row in results] == [
        ("travel", "cpu", "passed")
    ]
    metrics = json.loads((report_dir / "metrics.json").read_text())
    assert [(row["adapter"], row["target"], row["variant"]) for row in metrics] == [
        ("travel", "cpu", "base"),
        ("travel", "cpu", "quantized"),
        ("travel", "cpu", "fine-tuned"),
    ]
    gates = json.loads((report_dir / "gate.json").read_text())
    assert list(gates) == ["travel/cpu"] and gates["travel/cpu"]["passed"] is True
    assert not list(tmp_path.glob(".tmp-*")), "no staging folder is left behind"
    assert "gpu_mem_mib" not in page and "GPU memory" not in page, "a CPU run shows no GPU columns"
    assert "gpu_mem_mib" not in metrics[0]
    assert not (report_dir / "training_memory.json").exists()


def test_a_report_is_written_whole_over_an_earlier_one(tmp_path):
    write_report(inputs(outcome(targets=[passed_on(), passed_on("cuda")])), tmp_path / "report")
    report_dir = write_report(inputs(), tmp_path / "report")
    assert not (report_dir / "comparison_travel_cuda.png").exists(), "the earlier report is replaced whole"
    assert list(json.loads((report_dir / "gate.json").read_text())) == ["travel/cpu"]
    assert not list(tmp_path.glob(".tmp-*"))


def test_every_sentence_of_the_report_ends():
    timed = passed_on(
        phase_seconds={"load": 12.0, "loss": 3.0},
        base_seconds=41.0,
        base_phase_seconds={"build_base": 30.0},
    )
    page = page_of(inputs(outcome(targets=[timed], training_memory=MEMORY)))
    assert "- Split by prompt (seed 0): 65 training pairs, 16 held out.\n" in page
    assert "## Data\n" in page and "### cpu target: gate passed\n" in page
    prose = [
        line
        for line in page.splitlines()
        if line.strip() and not line.startswith(("#", "|", "!["))  # headings, tables, images
    ]
    assert len(prose) >= 8, prose  # the model line, the results' note, data, phases, training
    assert [line for line in prose if not line.endswith(".")] == []


def test_evaluates_phases_show_when_recorded():
    timed = passed_on(phase_seconds={"gpu_memory": 8.04, "load": 12.0})
    page = page_of(inputs(outcome(targets=[timed])))
    assert "\n\nEvaluate's measurement (60.0 s): gpu_memory 8.0 s, load 12.0 s.\n" in page
    assert "The base's" not in page, "no base phases were recorded"
    assert "Evaluate's measurement" not in page_of(inputs())


def test_the_bases_phases_show_beside_evaluates_when_recorded():
    timed = passed_on(
        phase_seconds={"load": 12.0},
        base_seconds=41.26,
        base_phase_seconds={"build_base": 30.04, "loss": 11.2},
    )
    page = page_of(inputs(outcome(targets=[timed])))
    assert (
        "Evaluate's measurement (60.0 s): load 12.0 s. The base's (41.3 s, reused while its inputs hold): "
        "build_base 30.0 s, loss 11.2 s.\n" in page
    )


def test_the_training_notes_show_gpu_peak_memory_when_measured(tmp_path):
    report_dir = write_report(inputs(outcome(training_memory=MEMORY)), tmp_path / "report")
    page = (report_dir / "report.md").read_text()
    assert (
        "## Training\n\n- travel: 2 steps, loss 3.500 → 3.100.\n"
        "- travel: held-out loss per response token on cpu: base 3.080, quantized 3.240, fine-tuned 2.880.\n"
        "- travel: peak GPU memory in training (torch): 9000 MiB allocated, 10240 MiB reserved.\n" in page
    )
    assert json.loads((report_dir / "training_memory.json").read_text()) == {"travel": MEMORY}


def test_training_memory_unmeasured_shows_no_notes(tmp_path):
    cpu_training = {"peak_allocated_mib": None, "peak_reserved_mib": None}
    report_dir = write_report(inputs(outcome(training_memory=cpu_training)), tmp_path / "report")
    page = (report_dir / "report.md").read_text()
    assert (
        "## Training\n\n- travel: 2 steps, loss 3.500 → 3.100.\n"
        "- travel: held-out loss per response token on cpu: base 3.080, quantized 3.240, fine-tuned 2.880.\n\n"
        "![training loss]" in page
    )
    assert "peak GPU memory" not in page
    assert not (report_dir / "training_memory.json").exists()


def test_no_loss_history_shows_no_training_section(tmp_path):
    report_dir = write_report(inputs(outcome(loss_history=[])), tmp_path / "report")
    page = (report_dir / "report.md").read_text()
    assert "## Training" not in page and "training_loss.png" not in page
    assert (report_dir / LOSS_PLOT).read_bytes()[:4] == b"\x89PNG"


def test_a_failed_gate_is_the_headline_and_marks_the_failing_check():
    page = page_of(inputs(outcome(targets=[failed_gate_on()])))
    assert page.startswith("# olivepress run: gate FAILED\n")
    assert "| size_ratio | 0.35 | 0.1 | **FAIL** |" in page
    assert "### cpu target: gate FAILED\n" in page
    assert f"## Failed\n\n- `travel` (cpu): {GATE_FAILURE}\n" in page
    assert "| travel | cpu | 16 | 2.88 | 3.08 | 17.81 | 0.25 | 69.0 | 1.38 | 191.0 | failed |" in page


def test_a_passed_gate_has_no_failed_section_nor_failing_check():
    page = page_of(inputs())
    assert "## Failed" not in page and "**FAIL**" not in page
    assert "| size_ratio | 0.35 | 0.5 | pass |" in page


def test_rouge_l_none_reads_as_a_dash(tmp_path):
    report = inputs(outcome(targets=[passed_on(tuned_rouge=None)]))
    report_dir = write_report(report, tmp_path / "report")
    page = (report_dir / "report.md").read_text()
    assert "| base | 3.08 | 21.75 | - | 50.0 | 0.1 | 540.0 | 40 |" in page
    assert "| quantized | 3.24 | 25.53 | - | 70.0 | 0.1 | 184.0 | 40 |" in page
    assert "| fine-tuned | 2.88 | 17.81 | - | 69.0 | 0.1 | 191.0 | 40 |" in page
    assert "| travel | cpu | 16 | 2.88 | 3.08 | 17.81 | - | 69.0 | 1.38 | 191.0 | passed |" in page
    assert json.loads((report_dir / "results.json").read_text())[0]["rouge_l"] is None


def test_gpu_memory_shows_only_when_measured(tmp_path):
    cuda = outcome(targets=[passed_on("cuda", gpu_memory_mib=812.6)], training_memory=MEMORY)
    report_dir = write_report(inputs(cuda, targets=("cuda",)), tmp_path / "report")
    page = (report_dir / "report.md").read_text()
    assert "| peak_mem_mib | gpu_mem_mib |" in page
    assert "| fine-tuned | 2.88 | 17.81 | 0.25 | 69.0 | 0.1 | 191.0 | 40 | 813 |" in page
    metrics = json.loads((report_dir / "metrics.json").read_text())
    assert [row["gpu_mem_mib"] for row in metrics] == [813, 813, 813]
    assert {row["target"] for row in metrics} == {"cuda"}


def test_a_run_with_several_datasets_and_targets_puts_them_side_by_side(tmp_path):
    outcomes = [
        outcome(
            "travel",
            [passed_on("cpu"), passed_on("cuda", gpu_memory_mib=812.6)],
            held_out_pairs=16,
            training_memory=MEMORY,
        ),
        outcome(
            "support",
            [failed_gate_on("cpu"), TargetOutcome("cuda", failure="the cuda export failed: boom")],
            data_sha256="cd" * 32,
            held_out_pairs=10,
            loss_history=[{"step": 1, "loss": 3.9}, {"step": 2, "loss": 3.3}],
        ),
        AdapterOutcome("broken", "/d/broken.jsonl", "ef" * 32, failure="2 bad line(s)"),
    ]
    steps = [
        {"step": "validate travel", "status": "completed", "seconds": 3.14, "output_bytes": None},
        {"step": "finetune travel", "status": "completed", "seconds": 12.04, "output_bytes": 52_400_000},
    ]
    report_dir = write_report(inputs(*outcomes, targets=("cpu", "cuda"), steps=steps), tmp_path / "report")
    page = (report_dir / "report.md").read_text()
    assert page.startswith("# olivepress run: 2 of 5 adapter × target results passed\n")
    assert "built for cpu, cuda;" in page

    results = page.split("## Results\n\n")[1].split("\n\n")[0].splitlines()[2:]
    assert results == [
        "| travel | cpu | 16 | 2.88 | 3.08 | 17.81 | 0.25 | 69.0 | 1.38 | 191.0 | passed |",
        "| travel | cuda | 16 | 2.88 | 3.08 | 17.81 | 0.25 | 69.0 | 1.38 | 191.0 | passed |",
        "| support | cpu | 10 | 2.88 | 3.08 | 17.81 | 0.25 | 69.0 | 1.38 | 191.0 | failed |",
        "| support | cuda | 10 | - | - | - | - | - | - | - | failed |",
        "| broken | - | - | - | - | - | - | - | - | - | failed |",
    ]
    assert (
        "## Failed\n\n"
        f"- `support` (cpu): {GATE_FAILURE}\n"
        "- `support` (cuda): the cuda export failed: boom\n"
        "- `broken` (-): 2 bad line(s)\n" in page
    )
    assert "## travel\n" in page and "## support\n" in page and "## broken" not in page
    assert "## Data\n" not in page
    assert page.count("### cpu target: gate passed") == 1 and page.count("### cuda target: gate passed") == 1
    assert "### cpu target: gate FAILED" in page and "### cuda target" not in page.split("## support")[1]
    assert "- travel: peak GPU memory in training (torch): 9000 MiB allocated" in page
    assert "support: peak GPU memory" not in page
    assert "- support: 2 steps, loss 3.900 → 3.300.\n" in page
    assert "| validate travel | completed | 3.1 | - |" in page
    assert "| finetune travel | completed | 12.0 | 52.4 |" in page

    assert sorted(path.name for path in report_dir.glob("*.png")) == [
        "comparison_support_cpu.png",
        "comparison_travel_cpu.png",
        "comparison_travel_cuda.png",
        "training_loss.png",
    ]
    rows = json.loads((report_dir / "results.json").read_text())
    assert [(row["adapter"], row["target"], row["result"]) for row in rows] == [
        ("travel", "cpu", "passed"),
        ("travel", "cuda", "passed"),
        ("support", "cpu", "failed"),
        ("support", "cuda", "failed"),
        ("broken", "-", "failed"),
    ]
    metrics = json.loads((report_dir / "metrics.json").read_text())
    assert [(row["adapter"], row["target"]) for row in metrics[::3]] == [
        ("travel", "cpu"),
        ("travel", "cuda"),
        ("support", "cpu"),
    ]
    assert [row["variant"] for row in metrics] == ["base", "quantized", "fine-tuned"] * 3
    gates = json.loads((report_dir / "gate.json").read_text())
    assert {key: gate["passed"] for key, gate in gates.items()} == {
        "travel/cpu": True,
        "travel/cuda": True,
        "support/cpu": False,
    }
    assert json.loads((report_dir / "training_memory.json").read_text()) == {"travel": MEMORY}
    assert not list(tmp_path.glob(".tmp-*"))


def test_a_failure_before_any_target_fails_the_one_result():
    broken = AdapterOutcome("broken", "/d/broken.jsonl", "ef" * 32, failure="2 bad line(s)")
    page = page_of(inputs(broken))
    assert page.startswith("# olivepress run: gate FAILED\n")
    assert "- `broken` (-): 2 bad line(s)" in page and "## Data" not in page and "## Training" not in page


def test_one_adapter_on_two_targets_counts_its_results():
    report = inputs(outcome(targets=[failed_gate_on(), passed_on("cuda")]), targets=("cpu", "cuda"))
    assert report.failures() == [("travel", "cpu", GATE_FAILURE)]
    assert report.verdict() == "1 of 2 adapter × target results passed"
    page = page_of(report)
    assert page.startswith("# olivepress run: 1 of 2 adapter × target results passed\n")
    assert "## Data\n" in page, "one dataset keeps the single-dataset heading"
    assert "### cpu target: gate FAILED" in page and "### cuda target: gate passed" in page


def test_the_opening_line_says_what_was_registered_or_why_nothing_was():
    from olivepress.registry import Registration

    registered = Registration("local", "tiny-olivepress", "3", "/registry/tiny-olivepress/3", reused=False)
    assert registration_line("tiny-olivepress") == "to be registered as `tiny-olivepress`"
    assert registration_line("tiny-olivepress", registered) == "registered `tiny-olivepress` version 3"
    reused = replace(registered, reused=True)
    assert registration_line("tiny-olivepress", reused) == "already registered as `tiny-olivepress` version 3"
    assert (
        registration_line("tiny-olivepress", failure="workspace not found")
        == "nothing registered: the registration failed (workspace not found)"
    )
    assert registration_line(None) == "nothing registered"

    page = page_of(replace(inputs(), registration=registration_line("tiny-olivepress", registered)))
    assert page.startswith("# olivepress run: gate passed; registered `tiny-olivepress` version 3\n")
    failed = replace(inputs(outcome(targets=[failed_gate_on()])), registration=registration_line(None))
    assert page_of(failed).startswith("# olivepress run: gate FAILED; nothing registered\n")


def test_the_page_written_again_names_the_registration_and_keeps_its_plots(tmp_path, monkeypatch):
    from olivepress.tasks import report

    published = []
    monkeypatch.setattr(report, "publish_page", lambda page, folder: published.append(page.headline()))
    before = inputs(outcome(targets=[passed_on(samples=SAMPLES)]))
    before = replace(before, registration=registration_line("tiny-olivepress"))
    report_dir = write_report(before, tmp_path / "report")
    assert (
        (report_dir / "report.md")
        .read_text()
        .startswith("# olivepress run: gate passed; to be registered as `tiny-olivepress`\n")
    )
    plots = {path.name: path.read_bytes() for path in report_dir.glob("*.png")}
    steps = [*STEPS, {"step": "register", "status": "completed", "seconds": 0.4, "output_bytes": None}]
    after = replace(before, registration="registered `tiny-olivepress` version 2", steps=steps)
    report.rewrite_page(after, report_dir)
    page = (report_dir / "report.md").read_text()
    assert page == render_markdown(after, images(after)) + "\n"
    assert page.startswith("# olivepress run: gate passed; registered `tiny-olivepress` version 2\n")
    assert "| register | completed | 0.4 | - |" in page
    assert {path.name: path.read_bytes() for path in report_dir.glob("*.png")} == plots
    assert published == [after.headline()], "the artifact is written again too"
    assert not list(tmp_path.glob(".tmp-*"))


SAMPLES = [
    {
        "prompt": "What's a must-see in Paris?",
        "reference": "The Louvre.",
        "base": "Paris is\nthe capital | of France.",
        "quantized": "",
        "fine-tuned": "The Louvre, then the Seine.",
    }
]


def test_sample_answers_stand_side_by_side_under_their_target():
    page = page_of(inputs(outcome(targets=[passed_on(samples=SAMPLES)])))
    section = page.split("### cpu target: gate passed")[1].split("## Training")[0]
    assert "Sample answers, greedy, to held-out prompts in this target's runtime.\n\n" in section
    assert "| prompt | reference | base | quantized | fine-tuned |\n" in section
    assert (
        "| What's a must-see in Paris? | The Louvre. | Paris is the capital \\| of France. | (empty) | "
        "The Louvre, then the Seine. |\n" in section
    ), "one line per cell, a pipe escaped, an empty answer said"
    assert "Sample answers" not in page_of(inputs()), "records measured before samples were kept show none"


def recorded_level_lines(monkeypatch) -> list[tuple[float, str, str | None]]:
    """Every horizontal line the plots draw: (y, colour, label)."""
    from matplotlib.axes import Axes

    lines, draw = [], Axes.axhline

    def axhline(self, y=0, *args, **kwargs):
        lines.append((y, kwargs.get("color"), kwargs.get("label")))
        return draw(self, y, *args, **kwargs)

    monkeypatch.setattr(Axes, "axhline", axhline)
    return lines


def test_the_comparison_plot_draws_each_gate_limit_from_the_base(tmp_path, monkeypatch):
    from olivepress.tasks.report import plot_comparison

    checks = [
        GateCheck("perplexity_ratio", "ppl", 0.82, 1.1, True),
        GateCheck("speedup", "speed", 1.38, 1.0, True),
        GateCheck("size_ratio", "size", 0.35, 0.5, True),
    ]
    lines = recorded_level_lines(monkeypatch)
    plot_comparison(replace(evaluation(), gate=GateDecision(True, checks)), tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert [(round(y, 4), color, label) for y, color, label in lines] == [
        (round(3.08 + math.log(1.1), 4), GATE_COLOR, "gate: fine-tuned perplexity ≤ base × 1.1"),
        (50.0, GATE_COLOR, "gate: fine-tuned ≥ base × 1"),
        (270.0, GATE_COLOR, "gate: fine-tuned ≤ base × 0.5"),
    ]


def test_the_training_plot_shows_each_variants_held_out_loss_beside_the_training_loss(tmp_path, monkeypatch):
    from olivepress.tasks.report import plot_training_loss

    lines = recorded_level_lines(monkeypatch)
    plot_training_loss([outcome(targets=[passed_on(), passed_on("cuda")])], tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert [(y, label) for y, _, label in lines[:3]] == [
        (3.08, "held-out loss, base on cpu (response tokens)"),
        (3.24, "held-out loss, quantized on cpu (response tokens)"),
        (2.88, "held-out loss, fine-tuned on cpu (response tokens)"),
    ]
    assert len(lines) == 6 and lines[3][2] == "held-out loss, base on cuda (response tokens)"
