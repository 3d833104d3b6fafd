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


def test_decode_speed_comes_from_generations_of_equal_length(monkeypatch, tmp_path):
    """The fine-tuned variant stops early in its free answers; its speed must come from exact decodes, and
    only it answers freely (the gate reads its ROUGE-L alone)."""
    from olivepress import genai
    from olivepress.config import EvaluateSettings
    from olivepress.genai import GenerationStats
    from olivepress.tasks.evaluate import measure_variants

    calls = []

    def generate(loaded, ids, max_new_tokens, on_text, max_length=None, exact=False):
        calls.append((loaded, max_length, exact))
        # free answers: the fine-tuned model ends after 4 tokens; a fixed 0.1 s before each decode
        new = max_new_tokens if exact or loaded != FINE_TUNED else 4
        on_text("word ")
        return GenerationStats(len(ids), new, 0.01, 0.01 + 0.1 + (new - 1) * 0.01)

    monkeypatch.setattr(genai, "open_model", lambda model_dir, adapter=None: FINE_TUNED if adapter else "x")
    monkeypatch.setattr(genai, "prompt_token_ids", lambda loaded, prompt, template=None: [1] * len(prompt))
    monkeypatch.setattr(genai, "response_loss", lambda loaded, pairs, template=None: 1.0)
    monkeypatch.setattr(genai, "stream_generate", generate)
    held_out = [{"prompt": "p" * n, "response": "word"} for n in (3, 5, 4)]
    settings = EvaluateSettings(generation_samples=3, speed_samples=2, max_new_tokens=21, speed_tokens=11)
    (tmp_path / "a").write_bytes(b"adapter")
    sources = {QUANTIZED: (tmp_path, None), FINE_TUNED: (tmp_path, tmp_path / "a")}
    phases = {}
    rows = measure_variants(sources, held_out, settings, None, "cpu", phases, answering=(FINE_TUNED,))
    assert list(phases) == ["load", "loss", "generate", "decode_speed"], "on CPU: no GPU memory phase"
    assert all(seconds >= 0 for seconds in phases.values())

    exact = [call for call in calls if call[2]]
    assert len(exact) == 2 * len(rows)  # speed_samples prompts for each variant
    assert {max_length for _, max_length, _ in calls} == {5 + 21}  # one generator length: graphs reused
    speeds = {row.variant: row.decode_tokens_per_s for row in rows}
    assert speeds["fine-tuned"] == pytest.approx(speeds["quantized"]) == pytest.approx(10 / 0.2)
    assert {row.variant: row.generated_tokens for row in rows} == {"quantized": 0, "fine-tuned": 3 * 4}
    assert [row.rouge_l is None for row in rows] == [True, False]
