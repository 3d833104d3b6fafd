import json

from prefect.states import Completed, Failed

from olivepress.config import load_config
from olivepress.errors import UserError
from olivepress.registry import content_sha256
from olivepress.retry import retry_if_transient
from olivepress.tasks.evaluate import GateFailed
from olivepress.tasks.register import build_lineage, register_model
from tests.tasks.test_report import evaluation


def test_lineage_records_hashes_config_metrics_gate_and_versions(tmp_path, monkeypatch):
    monkeypatch.setenv("AZURE_CLIENT_SECRET", "do-not-leak-this")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.onnx").write_bytes(b"onnx")
    sources = {"model": tmp_path / "model"}
    config = load_config(overrides={"registry.path": tmp_path / "registry"})
    lineage = build_lineage(config, tmp_path, "d" * 64, evaluation(True), sources, "flow-run-1")

    assert lineage["content_sha256"] == content_sha256(sources)
    assert lineage["data"]["sha256"] == "d" * 64
    assert lineage["config"]["finetune"]["max_steps"] == config.finetune.max_steps
    assert [m["variant"] for m in lineage["metrics"]] == ["base", "quantized", "fine-tuned"]
    assert lineage["gate"]["passed"] is True
    assert {"torch", "transformers", "onnxruntime", "prefect"} <= set(lineage["library_versions"])
    assert lineage["flow_run_id"] == "flow-run-1"
    assert "do-not-leak-this" not in json.dumps(lineage)

    registration = register_model(config, tmp_path / "SmolLM2", sources, lineage)
    assert registration.name == "smollm2-olivepress"
    assert (tmp_path / "registry" / "smollm2-olivepress" / "1" / "lineage.json").is_file()


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
