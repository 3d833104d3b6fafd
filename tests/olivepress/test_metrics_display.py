from dataclasses import asdict

from olivepress.metrics_display import display_row, display_rows, is_raw, readable
from olivepress.tasks.report import metrics_rows
from tests.tasks.test_report import evaluation


def test_a_display_row_rounds_the_raw_fields_under_the_report_columns():
    raw = asdict(evaluation(True).metrics[2])  # fine-tuned: perplexity 2.718**2.88, 191,000,000 bytes
    assert is_raw(raw)
    assert display_row(raw) == {
        "variant": "fine-tuned",
        "loss": 2.88,
        "perplexity": 17.81,
        "rouge_l": 0.25,
        "decode_tok_s": 69.0,
        "first_token_s": 0.1,
        "size_mb": 191.0,
        "peak_mem_mib": 40,
    }


def test_gpu_memory_is_a_column_of_every_row_when_any_variant_measured_it():
    raws = [asdict(m) for m in evaluation(True, gpu_memory_mib=812.6).metrics]
    raws[0]["gpu_memory_mib"] = None
    rows = display_rows(raws)
    assert [row["gpu_mem_mib"] for row in rows] == [None, 813, 813]
    assert "gpu_mem_mib" not in display_rows([asdict(m) for m in evaluation(True).metrics])[0]


def test_the_report_table_is_the_display_rows_and_an_old_display_row_reads_as_it_is():
    rows = metrics_rows(evaluation(True))
    assert rows == display_rows([asdict(m) for m in evaluation(True).metrics])
    assert not is_raw(rows[0])
    assert [readable(row) for row in rows] == rows
