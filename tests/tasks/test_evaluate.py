import json
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest

from olivepress.config import GateSettings
from olivepress.tasks.evaluate import (
    BASE,
    FINE_TUNED,
    QUANTIZED,
    VariantMetrics,
    decide_gate,
    read_evaluation,
    rouge_l,
)


def variant(name, *, perplexity=10.0, speed=100.0, size=1000, rouge=0.3):
    return VariantMetrics(
        variant=name,
        loss=float(np.log(perplexity)),
        perplexity=perplexity,
        rouge_l=rouge,
        decode_tokens_per_s=speed,
        time_to_first_token_s=0.1,
        bytes_on_disk=size,
        peak_memory_mib=50.0,
        generated_tokens=64,
    )


def metrics(**tuned):
    return [variant(BASE), variant(QUANTIZED, perplexity=12.0), variant(FINE_TUNED, **tuned)]


def test_a_model_within_every_limit_passes_with_each_check_recorded():
    decision = decide_gate(metrics(perplexity=10.5, speed=150.0, size=300), GateSettings())
    assert decision.passed
    by_name = {check.name: check for check in decision.checks}
    assert by_name["perplexity_ratio"].measured == pytest.approx(1.05)
    assert by_name["speedup"].measured == pytest.approx(1.5)
    assert by_name["size_ratio"].measured == pytest.approx(0.3)
    assert "rouge_l" not in by_name, "ROUGE-L is reported, not gated, unless a limit is set"


@pytest.mark.parametrize(
    ("tuned", "failing"),
    [
        ({"perplexity": 11.5, "speed": 150.0, "size": 300}, "perplexity_ratio"),
        ({"perplexity": 10.0, "speed": 90.0, "size": 300}, "speedup"),
        ({"perplexity": 10.0, "speed": 150.0, "size": 600}, "size_ratio"),
    ],
)
def test_each_limit_alone_can_fail_the_gate(tuned, failing):
    decision = decide_gate(metrics(**tuned), GateSettings())
    assert not decision.passed
    assert [check.name for check in decision.checks if not check.passed] == [failing]
    assert f"FAIL  {failing}: measured" in decision.to_text()


def test_rouge_l_limit_is_applied_when_set():
    decision = decide_gate(
        metrics(perplexity=10.0, speed=150.0, size=300, rouge=0.1), GateSettings(min_rouge_l=0.2)
    )
    assert not decision.passed
    assert [c.name for c in decision.checks if not c.passed] == ["rouge_l"]


def test_a_base_that_generated_nothing_cannot_pass_the_speed_check():
    rows = [variant(BASE, speed=0.0), variant(QUANTIZED), variant(FINE_TUNED, size=300)]
    decision = decide_gate(rows, GateSettings())
    assert not next(c for c in decision.checks if c.name == "speedup").passed


def test_rouge_l_scores_overlap_of_words():
    assert rouge_l(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)
    assert rouge_l(["the cat sat on the mat"], ["dogs run fast"]) == 0.0
    partial = rouge_l(["visit the Louvre in Paris"], ["you should visit the Louvre"])
    assert 0.3 < partial < 0.9


PEAK_PROBE = """
import numpy as np
from olivepress.tasks.evaluate import peak_rss_reset, rss_mib
if not peak_rss_reset():
    raise SystemExit(3)
block = np.ones(200 * 2**20 // 8)  # 200 MiB, touched
peak_with_block = rss_mib("VmHWM")
del block
peak_rss_reset()
print(peak_with_block, rss_mib("VmHWM"))
"""


def test_peak_memory_reset_forgets_an_earlier_peak():
    # a fresh interpreter: a long test process's allocator may keep freed pages resident
    result = subprocess.run([sys.executable, "-c", PEAK_PROBE], capture_output=True, text=True, timeout=60)
    if result.returncode == 3:
        pytest.skip("no /proc/self/clear_refs here")
    assert result.returncode == 0, result.stderr
    peak_with_block, peak_after_reset = map(float, result.stdout.split())
    assert peak_after_reset < peak_with_block - 100


def test_a_record_stored_before_gpu_memory_was_measured_still_loads(tmp_path):
    rows = [asdict(row) for row in metrics(perplexity=10.5, speed=150.0, size=300)]
    for row in rows:
        del row["gpu_memory_mib"]
    record = {"metrics": rows, "held_out_pairs": 5, "generation_prompts": 2, "seconds": 1.0}
    (tmp_path / "metrics.json").write_text(json.dumps(record))
    evaluation = read_evaluation(tmp_path, GateSettings())
    assert [m.gpu_memory_mib for m in evaluation.metrics] == [None, None, None]
    assert evaluation.gate.passed
    assert evaluation.phase_seconds == {}, "nor were its phases timed"


def fake_genai(monkeypatch, free_tokens: int = 4) -> list:
    """ONNX Runtime GenAI stood in for: every answer is "word " repeated; a fine-tuned model's free answers
    end after ``free_tokens``, the others' run to max_new_tokens; a fixed 0.1 s before each decode. Gives
    the calls: (model, prompt ids, max_length, exact)."""
    from olivepress import genai
    from olivepress.genai import GenerationStats

    calls = []

    def generate(loaded, ids, max_new_tokens, on_text, max_length=None, exact=False):
        calls.append((loaded, ids, max_length, exact))
        new = max_new_tokens if exact or loaded != FINE_TUNED else free_tokens
        on_text(f"{loaded} said {len(ids)} ")
        return GenerationStats(len(ids), new, 0.01, 0.01 + 0.1 + (new - 1) * 0.01)

    monkeypatch.setattr(genai, "open_model", lambda model_dir, adapter=None: FINE_TUNED if adapter else "x")
    monkeypatch.setattr(genai, "prompt_token_ids", lambda loaded, prompt, template=None: [1] * len(prompt))
    monkeypatch.setattr(genai, "response_loss", lambda loaded, pairs, template=None: 1.0)
    monkeypatch.setattr(genai, "stream_generate", generate)
    return calls


def test_decode_speed_comes_from_generations_of_equal_length(monkeypatch, tmp_path):
    """The fine-tuned variant stops early in its free answers; its speed must come from exact decodes, and
    only it answers every generation prompt (the gate reads its ROUGE-L alone)."""
    from olivepress.config import EvaluateSettings
    from olivepress.tasks.evaluate import measure_variants

    calls = fake_genai(monkeypatch)
    held_out = [{"prompt": "p" * n, "response": "word"} for n in (3, 5, 4)]
    settings = EvaluateSettings(
        generation_samples=3, report_samples=1, speed_samples=2, max_new_tokens=21, speed_tokens=11
    )
    (tmp_path / "a").write_bytes(b"adapter")
    sources = {QUANTIZED: (tmp_path, None), FINE_TUNED: (tmp_path, tmp_path / "a")}
    phases = {}
    rows, _ = measure_variants(sources, held_out, settings, None, "cpu", phases, answering=(FINE_TUNED,))
    assert list(phases) == ["load", "loss", "generate", "decode_speed"], "on CPU: no GPU memory phase"
    assert all(seconds >= 0 for seconds in phases.values())

    exact = [call for call in calls if call[3]]
    assert len(exact) == 2 * len(rows)  # speed_samples prompts for each variant
    assert {max_length for _, _, max_length, _ in calls} == {5 + 21}  # one generator length: graphs reused
    speeds = {row.variant: row.decode_tokens_per_s for row in rows}
    assert speeds["fine-tuned"] == pytest.approx(speeds["quantized"]) == pytest.approx(10 / 0.2)
    # the int4 model answers the report's one prompt (to max_new_tokens), the fine-tuned model all three
    assert {row.variant: row.generated_tokens for row in rows} == {"quantized": 21, "fine-tuned": 3 * 4}
    assert [row.rouge_l is None for row in rows] == [True, False]


def test_the_reports_samples_are_distinct_prompts_among_the_answered_ones():
    from olivepress.config import EvaluateSettings
    from olivepress.tasks.evaluate import sample_indices

    held_out = [{"prompt": p, "response": "r"} for p in "aabcad"]
    assert sample_indices(held_out, EvaluateSettings(generation_samples=6, report_samples=3)) == [0, 2, 3]
    assert sample_indices(held_out, EvaluateSettings(generation_samples=3, report_samples=3)) == [0, 2]
    assert sample_indices(held_out, EvaluateSettings(report_samples=0)) == []


def test_base_and_int4_answer_only_the_reports_prompts_and_the_answers_are_kept(monkeypatch, tmp_path):
    """evaluate_base's base.json and evaluate's metrics.json keep the answers, so a reused step still shows
    them; the base and the int4 model answer only the report's prompts, the fine-tuned answers are reused."""
    from olivepress.config import EvaluateSettings
    from olivepress.steps import StepSettings
    from olivepress.tasks.evaluate import BASE_FILE, measure, measure_variants

    calls = fake_genai(monkeypatch)
    held_out = [{"prompt": p, "response": f"ref {i}"} for i, p in enumerate(["aa", "aa", "bbb", "cccc", "d"])]
    settings = StepSettings(
        evaluate=EvaluateSettings(generation_samples=4, report_samples=2, speed_samples=1, max_new_tokens=6),
        text_template=None,
    )
    base_out, out = tmp_path / "base", tmp_path / "evaluated"
    base_out.mkdir(), out.mkdir()
    (tmp_path / "model.onnx").write_bytes(b"model")
    phases = {}
    [base], base_samples = measure_variants(
        {BASE: (tmp_path, None)}, held_out, settings.evaluate, None, "cpu", phases
    )
    assert base.generated_tokens == 2 * 6 and "generate" in phases
    assert [len(ids) for loaded, ids, _, exact in calls if not exact][1:] == [2, 3], "after the warm-up"
    record = {"metrics": asdict(base), "samples": base_samples, "seconds": 1.0, "phase_seconds": {}}
    (base_out / BASE_FILE).write_text(json.dumps(record))

    calls.clear()
    (tmp_path / "a").write_bytes(b"adapter")
    measure(settings, tmp_path, tmp_path / "a", held_out, base_out, "cpu", out)
    free = [(loaded, len(ids)) for loaded, ids, _, exact in calls if not exact][2:]  # after two warm-ups
    assert free == [("x", 2), (FINE_TUNED, 2), (FINE_TUNED, 2), ("x", 3), (FINE_TUNED, 3), (FINE_TUNED, 4)]
    evaluation = read_evaluation(out, GateSettings())
    assert evaluation.samples == [
        {
            "prompt": "aa",
            "reference": "ref 0",
            BASE: "x said 2",
            QUANTIZED: "x said 2",
            FINE_TUNED: "fine-tuned said 2",
        },
        {
            "prompt": "bbb",
            "reference": "ref 2",
            BASE: "x said 3",
            QUANTIZED: "x said 3",
            FINE_TUNED: "fine-tuned said 3",
        },
    ]
    assert evaluation.to_dict()["samples"] == evaluation.samples, "evaluation.json keeps them"
