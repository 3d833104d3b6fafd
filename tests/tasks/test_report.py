import dataclasses
import json

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
from olivepress.tasks.report import ReportInputs, render_markdown, write_report


def evaluation(passed: bool, gpu_memory_mib: float | None = None) -> Evaluation:
    rows = [
        VariantMetrics(name, loss, 2.718**loss, rouge, speed, 0.1, size, 40.0, 64, gpu_memory_mib)
        for name, loss, rouge, speed, size in [
            (BASE, 3.08, 0.20, 50.0, 540_000_000),
            (QUANTIZED, 3.24, 0.18, 70.0, 184_000_000),
            (FINE_TUNED, 2.88, 0.25, 69.0, 191_000_000),
        ]
    ]
    check = GateCheck("size_ratio", "size", 0.35, 0.5 if passed else 0.1, passed)
    return Evaluation(
        rows, GateDecision(passed, [check]), held_out_pairs=51, generation_prompts=16, seconds=60.0
    )


def inputs(passed: bool = True, **overrides) -> ReportInputs:
    return ReportInputs(
        config=load_config(),
        data_sha256="ab" * 32,
        n_records=81,
        n_warnings=0,
        train_pairs=65,
        held_out_pairs=16,
        steps=[{"step": "validate", "status": "completed", "seconds": 3.1, "output_bytes": None}],
        loss_history=[{"step": 1, "loss": 3.5}, {"step": 2, "loss": 3.1}],
        flow_run_id="1234",
        **{"evaluation": evaluation(passed), **overrides},
    )


def test_report_folder_holds_the_page_its_plots_and_the_records(tmp_path):
    report_dir = write_report(inputs(), tmp_path / "report")
    page = (report_dir / "report.md").read_text()
    assert page.startswith("# olivepress run: gate passed")
    assert "| fine-tuned | 2.88 | 17.81 | 0.25 | 69.0 | 0.1 | 191.0 | 40 |" in page
    assert "![training loss](training_loss.png)" in page and "![comparison](comparison.png)" in page
    for plot in ("training_loss.png", "comparison.png"):
        assert (report_dir / plot).read_bytes()[:4] == b"\x89PNG"
    assert [row["variant"] for row in json.loads((report_dir / "metrics.json").read_text())] == [
        "base",
        "quantized",
        "fine-tuned",
    ]
    assert json.loads((report_dir / "gate.json").read_text())["passed"] is True
    assert not list(tmp_path.glob(".tmp-*"))
    assert "gpu_mem_mib" not in page and "GPU memory" not in page, "a CPU run shows no GPU columns"
    assert not (report_dir / "training_memory.json").exists()


def test_every_sentence_of_the_report_ends():
    page = render_markdown(inputs(), {"comparison.png": "c.png", "training_loss.png": "t.png"})
    assert (
        "- Split by prompt (seed 0): 65 training pairs, 16 held out. ROUGE-L and decode speed come from "
        "greedy generations for 16 of the held-out prompts.\n" in page
    )
    prose = [
        line
        for line in page.splitlines()
        if line.strip() and not line.startswith(("#", "|", "!["))  # headings, tables, images
    ]
    assert prose and [line for line in prose if not line.endswith(".")] == []


def test_evaluates_phases_show_under_the_steps_when_recorded():
    images = {"comparison.png": "c.png", "training_loss.png": "t.png"}
    timed = dataclasses.replace(evaluation(True), phase_seconds={"build_base": 41.26, "load": 12.0})
    page = render_markdown(inputs(evaluation=timed), images)
    assert "\n\nEvaluate's measurement (60.0 s): build_base 41.3 s, load 12.0 s.\n" in page
    assert "Evaluate's measurement" not in render_markdown(inputs(), images)


def test_the_training_notes_end_too():
    memory = {"peak_allocated_mib": 9000.4, "peak_reserved_mib": 10240.0, "allocated_at_start_mib": 7.0}
    images = {"comparison.png": "c.png", "training_loss.png": "t.png"}
    page = render_markdown(inputs(training_memory=memory), images)
    assert "2 steps, loss 3.500 → 3.100.\n\npeak GPU memory in training (torch): 9000 MiB allocated, " in page
    assert "10240 MiB reserved.\n" in page
    no_history = dataclasses.replace(inputs(), loss_history=[])
    assert "## Training\n\nNo loss history." in render_markdown(no_history, images)


def test_a_failed_gate_is_the_headline_and_marks_the_failing_check():
    page = render_markdown(inputs(passed=False), {"comparison.png": "c.png", "training_loss.png": "t.png"})
    assert page.startswith("# olivepress run: gate FAILED")
    assert "| size_ratio | 0.35 | 0.1 | **FAIL** |" in page


def test_gpu_memory_shows_only_when_measured(tmp_path):
    memory = {"peak_allocated_mib": 9000.4, "peak_reserved_mib": 10240.0, "allocated_at_start_mib": 7.0}
    report_dir = write_report(
        inputs(evaluation=evaluation(True, gpu_memory_mib=812.6), training_memory=memory), tmp_path / "r"
    )
    page = (report_dir / "report.md").read_text()
    assert "| peak_mem_mib | gpu_mem_mib |" in page
    assert "| fine-tuned | 2.88 | 17.81 | 0.25 | 69.0 | 0.1 | 191.0 | 40 | 813 |" in page
    assert "peak GPU memory in training (torch): 9000 MiB allocated, 10240 MiB reserved" in page
    assert json.loads((report_dir / "training_memory.json").read_text()) == memory
    assert json.loads((report_dir / "metrics.json").read_text())[0]["gpu_mem_mib"] == 813


def test_a_run_with_several_datasets_puts_its_adapters_side_by_side(tmp_path):
    from olivepress.tasks.report import AdapterOutcome, AdaptersReportInputs, write_adapters_report

    outcomes = [
        AdapterOutcome(
            "travel", "/d/travel.jsonl", "ab" * 32, 65, 16, [{"step": 1, "loss": 3.5}], evaluation(True)
        ),
        AdapterOutcome(
            "support",
            "/d/support.jsonl",
            "cd" * 32,
            40,
            10,
            [{"step": 1, "loss": 3.9}, {"step": 2, "loss": 3.3}],
            evaluation(False),
            failure="gate failed: size_ratio 0.35 (limit 0.1)",
        ),
        AdapterOutcome("broken", "/d/broken.jsonl", "ef" * 32, failure="2 bad line(s)"),
    ]
    steps = [{"step": "finetune travel", "status": "completed", "seconds": 12.04, "output_bytes": 7}]
    report_dir = write_adapters_report(
        AdaptersReportInputs(load_config(), outcomes, steps, "1234"), tmp_path / "report"
    )
    page = (report_dir / "report.md").read_text()
    assert page.startswith("# olivepress run: 1 of 3 adapters passed")
    assert "| travel | 16 | 2.88 | 3.08 | 17.81 | 0.25 | 69.0 | 191.0 | registered |" in page
    assert "| support | 10 | 2.88 | 3.08 | 17.81 | 0.25 | 69.0 | 191.0 | failed |" in page
    assert "| broken | - | - | - | - | - | - | - | failed |" in page
    assert "- `broken`: 2 bad line(s)" in page and "## support" in page and "## broken" not in page
    assert "| finetune travel | completed | 12.0 |" in page
    assert (report_dir / "training_loss.png").read_bytes()[:4] == b"\x89PNG"
    rows = json.loads((report_dir / "adapters.json").read_text())
    assert [(row["adapter"], row["result"]) for row in rows] == [
        ("travel", "registered"),
        ("support", "failed"),
        ("broken", "failed"),
    ]
