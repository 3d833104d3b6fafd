import json
import math
from pathlib import Path

from prefect.states import Completed, Failed

from olivepress.config import load_config
from olivepress.errors import UserError
from olivepress.registry import content_sha256
from olivepress.retry import retry_if_transient
from olivepress.tasks.evaluate import METRICS_FILE, GateFailed, read_evaluation
from olivepress.tasks.register import build_lineage, register_model
from olivepress.tasks.report import AdapterOutcome, TargetOutcome
from tests.tasks.test_report import evaluation


def entry_sources(tmp_path: Path, adapters: dict[str, list[str]]) -> dict[str, Path]:
    """An entry's model and adapters folders: model/<target>/model.onnx, adapters/<target>/<name>..."""
    for target in {target for targets in adapters.values() for target in targets}:
        (tmp_path / "model" / target).mkdir(parents=True)
        (tmp_path / "model" / target / "model.onnx").write_bytes(f"onnx {target}".encode())
    for name, targets in adapters.items():
        for target in targets:
            (tmp_path / "adapters" / target).mkdir(parents=True, exist_ok=True)
            (tmp_path / "adapters" / target / f"{name}.onnx_adapter").write_bytes(f"{name} {target}".encode())
    return {"model": tmp_path / "model", "adapters": tmp_path / "adapters"}


def outcome(name: str, targets: list[TargetOutcome], failure: str | None = None) -> AdapterOutcome:
    return AdapterOutcome(
        name, f"/d/{name}.jsonl", name[0] * 64, 81, 0, 65, 16, targets=targets, failure=failure
    )


def test_lineage_records_hashes_config_metrics_gate_and_versions(tmp_path, monkeypatch):
    monkeypatch.setenv("AZURE_CLIENT_SECRET", "do-not-leak-this")
    sources = entry_sources(tmp_path, {"travel": ["cpu"]})
    config = load_config(overrides={"registry.path": tmp_path / "registry"})
    outcomes = [outcome("travel", [TargetOutcome("cpu", evaluation(True))])]
    lineage = build_lineage(config, tmp_path, "d" * 64, outcomes, sources, "flow-run-1")

    assert lineage["content_sha256"] == content_sha256(sources)
    assert lineage["data"]["sha256"] == "d" * 64
    assert lineage["targets"] == {"cpu": {"metrics": lineage["metrics"], "gate": lineage["gate"]}}
    assert lineage["adapters"]["travel"]["targets"]["cpu"]["file"] == "adapters/cpu/travel.onnx_adapter"
    assert lineage["model_adapter"] == "travel"
    assert lineage["config"]["finetune"]["max_steps"] == config.finetune.max_steps
    assert [m["variant"] for m in lineage["metrics"]] == ["base", "quantized", "fine-tuned"]
    assert lineage["gate"]["passed"] is True
    assert {"torch", "transformers", "onnxruntime", "prefect"} <= set(lineage["library_versions"])
    assert lineage["flow_run_id"] == "flow-run-1"
    assert "do-not-leak-this" not in json.dumps(lineage)

    registration = register_model(config, tmp_path / "SmolLM2", sources, lineage)
    assert registration.name == "smollm2-olivepress"
    assert (tmp_path / "registry" / "smollm2-olivepress" / "1" / "lineage.json").is_file()


def test_lineage_keeps_the_raw_metrics_of_metrics_json_and_the_gate_record(tmp_path):
    """Unrounded numbers, exactly as evaluate stored them, survive into the registry entry's lineage.json."""
    raw = [
        {
            "variant": variant,
            "loss": loss,
            "perplexity": math.exp(loss),
            "rouge_l": 0.123456789 + loss / 100,
            "decode_tokens_per_s": speed,
            "time_to_first_token_s": 0.0123456789,
            "bytes_on_disk": size,
            "peak_memory_mib": 40.123456789,
            "generated_tokens": 64,
            "gpu_memory_mib": None,
        }
        for variant, loss, speed, size in [
            ("base", 3.0812345678, 50.0487654321, 540_123_456),
            ("quantized", 3.2412345678, 70.0412345678, 184_123_456),
            ("fine-tuned", 2.8812345678, 69.0498765432, 191_123_456),
        ]
    ]
    evaluated = tmp_path / "evaluate"
    evaluated.mkdir()
    record = {"metrics": raw, "held_out_pairs": 16, "generation_prompts": 16, "seconds": 1.0}
    (evaluated / METRICS_FILE).write_text(json.dumps(record, indent=1))
    config = load_config(overrides={"registry.path": tmp_path / "registry"})
    sources = entry_sources(tmp_path, {"travel": ["cpu"]})
    evaluation = read_evaluation(evaluated, config.gate)
    outcomes = [outcome("travel", [TargetOutcome("cpu", evaluation)])]
    lineage = build_lineage(config, tmp_path, "d" * 64, outcomes, sources, "flow-run-1")
    registration = register_model(config, tmp_path / "SmolLM2", sources, lineage)

    stored = json.loads((Path(registration.uri) / "lineage.json").read_text())
    stored_metrics = json.loads((evaluated / METRICS_FILE).read_text())["metrics"]
    assert stored["metrics"] == stored_metrics == raw, "every field, unrounded"
    assert stored["metrics"][2]["perplexity"] == math.exp(2.8812345678)
    assert stored["gate"]["passed"] is evaluation.gate.passed is True
    assert [
        {key: check[key] for key in ("name", "measured", "limit", "passed")}
        for check in stored["gate"]["checks"]
    ] == [
        {
            "name": "perplexity_ratio",
            "measured": math.exp(2.8812345678) / math.exp(3.0812345678),
            "limit": 1.1,
            "passed": True,
        },
        {"name": "speedup", "measured": 69.0498765432 / 50.0487654321, "limit": 1.0, "passed": True},
        {"name": "size_ratio", "measured": 191_123_456 / 540_123_456, "limit": 0.5, "passed": True},
    ]
    assert stored["data"]["path"] == str(config.data) and stored["data"]["sha256"] == "d" * 64
    assert stored["flow_run_id"] == "flow-run-1"
    assert stored["config"] == json.loads(json.dumps(config.model_dump(mode="json")))


def test_lineage_lists_each_adapter_on_each_target_and_what_failed(tmp_path):
    sources = entry_sources(tmp_path, {"travel": ["cpu", "cuda"], "support": ["cuda"]})
    config = load_config(overrides={"targets": ["cpu", "cuda"], "registry.path": tmp_path / "registry"})
    outcomes = [
        outcome("travel", [TargetOutcome("cpu", evaluation(True)), TargetOutcome("cuda", evaluation(True))]),
        outcome(
            "support",
            [
                TargetOutcome("cpu", evaluation(False), "gate failed: size_ratio 0.35 (limit 0.1)"),
                TargetOutcome("cuda", evaluation(True)),
            ],
        ),
        AdapterOutcome("broken", "/d/broken.jsonl", "b" * 64, failure="2 bad line(s)"),  # failed validation
    ]
    lineage = build_lineage(config, tmp_path, "d" * 64, outcomes, sources, "flow-run-1")
    assert list(lineage["targets"]) == ["cpu", "cuda"]
    assert set(lineage["adapters"]) == {"travel", "support"}
    assert lineage["adapters"]["support"]["targets"]["cpu"] == {
        "failure": "gate failed: size_ratio 0.35 (limit 0.1)"
    }
    cuda = lineage["adapters"]["support"]["targets"]["cuda"]
    assert cuda["file"] == "adapters/cuda/support.onnx_adapter" and cuda["gate"]["passed"] is True
    assert lineage["failed_adapters"] == {
        "broken": {"data": {"path": "/d/broken.jsonl", "sha256": "b" * 64}, "failure": "2 bad line(s)"}
    }
    assert lineage["data"]["calibration_datasets"] == ["travel", "support"], "bad data calibrated nothing"


def test_only_transient_failures_are_retried():
    from azure.core.exceptions import HttpResponseError

    throttled = HttpResponseError(message="too many requests")
    throttled.status_code = 429
    not_found = HttpResponseError(message="no such workspace")
    not_found.status_code = 404
    assert retry_if_transient(None, None, Failed(data=GateFailed("gate FAILED"))) is False
    assert retry_if_transient(None, None, Failed(data=UserError("bad config"))) is False
    assert retry_if_transient(None, None, Failed(data=ValueError("a bug"))) is False
    assert retry_if_transient(None, None, Failed(data=ConnectionError("reset by peer"))) is True
    assert retry_if_transient(None, None, Failed(data=throttled)) is True
    assert retry_if_transient(None, None, Failed(data=not_found)) is False
    assert retry_if_transient(None, None, Completed()) is False

    def wrapped(outer: Exception, inner: Exception, *, explicit: bool) -> Exception:
        try:
            try:
                raise inner
            except Exception as cause:
                if explicit:
                    raise outer from cause
                raise outer from None
        except Exception as error:
            return error

    assert retry_if_transient(None, None, Failed(data=wrapped(OSError("s3fs"), throttled, explicit=True)))
    no_credential = wrapped(UserError("registry.azureml: no credential"), ConnectionError(), explicit=False)
    assert retry_if_transient(None, None, Failed(data=no_credential)) is False
