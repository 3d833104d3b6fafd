"""End-to-end flow runs on a real (ephemeral) Prefect API."""

import json
import logging
from pathlib import Path

import pytest

from olivepress.config import load_config
from olivepress.files import file_sha256
from olivepress.flows.pipeline import (
    StepRecord,
    format_summary,
    fuller_run_estimate,
    new_run_dir,
    olivepress_flow,
    run_folder,
)
from olivepress.registry import LocalRegistry
from olivepress.tasks.evaluate import GateFailed
from olivepress.tasks.register import register_model
from olivepress.tasks.validate import InvalidData
from tests.conftest import sample_pairs


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def tiny_config(tmp_path, model_dir, **overrides):
    return load_config(
        overrides={
            "model": model_dir,
            "output": tmp_path / "runs",
            "finetune.max_steps": 2,
            "finetune.batch_size": 2,
            "finetune.max_seq_len": 64,
            "quantize.calibration_samples": 4,
            "quantize.calibration_max_tokens": 64,
            "evaluate.generation_samples": 2,
            "evaluate.max_new_tokens": 8,
            "registry.path": tmp_path / "registry",
            "store.cache_dir": tmp_path / "cache",
            # a random model: the gate's defaults would (rightly) reject it; these limits it can meet
            "gate.max_perplexity_ratio": 100.0,
            "gate.min_speedup": 0.0,
            "gate.max_size_ratio": 10.0,
            **overrides,
        }
    )


def read_flow_run(flow_run_id):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def read_flow_run_artifacts(flow_run_id: str) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {artifact.key: artifact for artifact in artifacts}


SECRET_VALUE = "olivepress-do-not-leak-7f3a"


def texts_under(*folders: Path) -> str:
    return "\n".join(
        path.read_bytes().decode(errors="replace")
        for folder in folders
        for path in folder.rglob("*")
        if path.is_file() and not path.is_symlink()
    )


def read_flow_run_logs(flow_run_id) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


@pytest.mark.slow
def test_tiny_model_end_to_end(tmp_path, tiny_model_dir, caplog, monkeypatch):
    from prefect.blocks.system import Secret

    Secret(value=SECRET_VALUE).save("olivepress-test-secret", overwrite=True)
    monkeypatch.delenv("OLIVEPRESS_TEST_SECRET", raising=False)
    # the base model built early, in a child process beside quantize and finetune (default: on GPU runs only)
    config = tiny_config(
        tmp_path,
        tiny_model_dir,
        build_base_early=True,
        secrets={"OLIVEPRESS_TEST_SECRET": "olivepress-test-secret"},
    )
    run_dir = new_run_dir(config)
    with caplog.at_level(logging.INFO, logger="olivepress.base_ahead"), run_folder(run_dir):
        result = olivepress_flow(config)
    assert "building the cpu base model ahead" in caplog.text and "failed" not in caplog.text

    onnx_dir = run_dir / "onnx" / "cpu"  # the default target's export
    assert result["exports"] == {"cpu": str(onnx_dir)}
    assert (onnx_dir / "genai_config.json").is_file()
    assert list(onnx_dir.glob("*.onnx_adapter"))
    named = run_dir / "adapters" / "cpu" / "travel_sample.onnx_adapter"  # the adapter by its dataset's name
    assert named.resolve() == (onnx_dir / "adapter_weights.onnx_adapter").resolve()
    assert (run_dir / "quantized" / "config.json").is_file()
    losses = json.loads((run_dir / "adapter" / "loss_history.json").read_text())
    assert [entry["step"] for entry in losses] == [1, 2]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [(s["step"], s["status"]) for s in summary] == [
        (step, "completed")
        for step in (
            "validate",
            "quantize",
            "finetune",
            "optimize",
            "evaluate_base",
            "evaluate",
            "report",
            "register",
        )
    ]
    assert not list(run_dir.glob(".tmp-*")), "no staging folder is left behind"
    cache = tmp_path / "cache"
    assert not list((cache / "work").iterdir()), "training checkpoints are removed once the adapter is stored"
    assert not list((cache / "staging").iterdir()), "no step leaves scratch space behind"
    assert [p.name for p in cache.iterdir()] == ["staging", "work"] or sorted(
        p.name for p in cache.iterdir()
    ) == ["staging", "work"]

    split = json.loads((run_dir / "split.json").read_text())
    held_out = [json.loads(line) for line in (run_dir / "held_out.jsonl").read_text().splitlines()]
    assert split["held_out_pairs"] == len(held_out) > 0
    trained_prompts = {p["prompt"] for p in sample_pairs()} - {p["prompt"] for p in held_out}
    assert len(trained_prompts) == len({p["prompt"] for p in sample_pairs()}) - len(
        {p["prompt"] for p in held_out}
    )

    evaluation = json.loads((run_dir / "evaluations" / "cpu" / "evaluation.json").read_text())
    assert [m["variant"] for m in evaluation["metrics"]] == ["base", "quantized", "fine-tuned"]
    assert [m["rouge_l"] is None for m in evaluation["metrics"]] == [True, True, False], "only it is scored"
    assert evaluation["gate"]["passed"] is True and evaluation["target"] == "cpu"
    assert list(evaluation["phase_seconds"]) == ["load", "loss", "generate", "decode_speed"]
    assert list(evaluation["base_phase_seconds"]) == [
        "build_base",
        "load",
        "loss",
        "generate",
        "decode_speed",
    ]
    # the report's prompts (distinct among the generation_samples 2), each answered by all three
    [sample, *_] = evaluation["samples"]
    assert len({s["prompt"] for s in evaluation["samples"]}) == len(evaluation["samples"]) > 0
    assert list(sample) == ["prompt", "reference", "base", "quantized", "fine-tuned"]
    assert sample["prompt"] == held_out[0]["prompt"] and sample["reference"] == held_out[0]["response"]
    assert {c["name"] for c in evaluation["gate"]["checks"]} == {"perplexity_ratio", "speedup", "size_ratio"}
    report = (run_dir / "report" / "report.md").read_text()
    assert "Sample answers" in report and f"| {sample['prompt']} |" in report
    assert (run_dir / "report" / "training_loss.png").read_bytes()[:4] == b"\x89PNG"

    registration = result["registration"]
    assert registration["backend"] == "local" and registration["version"] == "1"
    entry = Path(registration["uri"])
    named = f"`{registration['name']}`"
    assert report.startswith(f"# olivepress run: gate passed; registered {named} version 1\n")
    kept = (entry / "report" / "report.md").read_text()
    assert kept.startswith(f"# olivepress run: gate passed; to be registered as {named}\n"), "as registered"
    lineage = json.loads((entry / "lineage.json").read_text())
    assert lineage["data"]["sha256"] == file_sha256(config.data)
    assert lineage["gate"]["passed"] is True
    assert lineage["metrics"] == evaluation["metrics"], "the raw measurements, unrounded"
    assert lineage["gate"] == evaluation["gate"]
    assert lineage["targets"] == {"cpu": {"metrics": evaluation["metrics"], "gate": evaluation["gate"]}}
    assert lineage["flow_run_id"]
    assert (entry / "model" / "cpu" / "adapter_weights.onnx_adapter").is_file()
    assert (entry / "adapters" / "cpu" / "travel_sample.onnx_adapter").is_file()

    assert read_flow_run(lineage["flow_run_id"]).name == f"{tiny_model_dir.name} on travel_sample for cpu", (
        "the UI tells runs apart"
    )
    artifacts = read_flow_run_artifacts(lineage["flow_run_id"])
    assert {"olivepress-report", "olivepress-metrics", "olivepress-gate"} <= set(artifacts)
    assert "data:image/png;base64," in artifacts["olivepress-report"].data

    parts = {"model": run_dir / "registered" / "model", "adapters": run_dir / "adapters"}
    again = register_model(config, tiny_model_dir, {**parts, "report": run_dir / "report"}, lineage)
    assert (again.version, again.reused) == ("1", True), "the same content is not registered twice"

    # the Secret block's value reached the run's environment, and nowhere the run writes or logs
    import os

    assert os.environ["OLIVEPRESS_TEST_SECRET"] == SECRET_VALUE
    logs = read_flow_run_logs(lineage["flow_run_id"])
    assert "credentials from Prefect Secret blocks: OLIVEPRESS_TEST_SECRET" in logs
    assert SECRET_VALUE not in logs + caplog.text
    assert SECRET_VALUE not in texts_under(run_dir, tmp_path / "registry")
    assert "olivepress-test-secret" in (run_dir / "config.json").read_text(), "the block's name only"


AZURE_WORKSPACE = {"subscription_id": "0000", "resource_group": "rg", "workspace_name": "ws"}


@pytest.mark.slow
@pytest.mark.parametrize(
    "registry",
    [{}, {"registry.backend": "azureml", "registry.azureml": AZURE_WORKSPACE}],
    ids=["local", "azureml"],
)
def test_a_model_that_fails_the_gate_is_reported_not_registered(tmp_path, tiny_model_dir, registry):
    # with Azure ML, reaching register at all would fail differently (no credentials, no workspace here)
    config = tiny_config(tmp_path, tiny_model_dir, **{"gate.max_size_ratio": 0.01, **registry})
    run_dir = new_run_dir(config)
    with run_folder(run_dir):
        state = olivepress_flow(config, return_state=True)
    with pytest.raises(GateFailed, match=r"FAIL  size_ratio: measured [0-9.]+, limit 0\.01"):
        state.result()
    # the event an automation notifies on, from the flow's own gate path
    from tests.flows.test_datasets import read_events  # which imports this module's helpers

    [event] = read_events(state.state_details.flow_run_id, ["olivepress.gate.failed"], count=1)
    assert event.resource["olivepress.target"] == "cpu"
    assert event.payload["checks"]["size_ratio"]["passed"] is False
    assert (
        (run_dir / "report" / "report.md")
        .read_text()
        .startswith("# olivepress run: gate FAILED; nothing registered\n")
    )
    evaluation = json.loads((run_dir / "evaluations" / "cpu" / "evaluation.json").read_text())
    assert evaluation["gate"]["passed"] is False
    assert LocalRegistry(config.registry.path).entries() == []
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [s["step"] for s in summary][-1] == "report"


def test_bad_data_fails_the_flow_before_quantizing(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n["not", "an", "object"]\n', encoding="utf-8")
    config = tiny_config(tmp_path, tiny_model_dir, data=bad)
    run_dir = new_run_dir(config)
    with run_folder(run_dir):
        state = olivepress_flow(config, return_state=True)
    assert state.is_failed()
    with pytest.raises(InvalidData, match="line 2"):
        state.result()
    artifact = read_flow_run_artifacts(str(state.state_details.flow_run_id))["olivepress-validation"]
    assert "line 2: " in artifact.data
    flow_run = read_flow_run(state.state_details.flow_run_id)
    assert flow_run.name == f"{tiny_model_dir.name} on bad for cpu"
    assert set(flow_run.tags) == {f"model:{tiny_model_dir.name}", "data:bad", "target:cpu"}, (
        "the UI's filters"
    )
    assert (run_dir / "validation.json").is_file()
    assert not (run_dir / "quantized").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [(s["step"], s["status"]) for s in summary] == [("validate", "failed")]


def test_summary_table_lists_each_step_with_time_and_size():
    records = [
        StepRecord("validate", "completed", 0.42),
        StepRecord("quantize", "failed", 12.0, output=None, output_bytes=None),
        StepRecord("finetune", "completed", 61.5, output="/x", output_bytes=7_400_000),
    ]
    lines = format_summary(records).splitlines()
    assert lines[0].split() == ["step", "status", "time", "output", "size"]
    assert lines[2].split() == ["validate", "completed", "0.4", "s", "-"]
    assert lines[3].split() == ["quantize", "failed", "12.0", "s", "-"]
    assert lines[4].split() == ["finetune", "completed", "61.5", "s", "7.4", "MB"]


def test_fuller_run_estimate_scales_this_runs_times():
    config = load_config(overrides={"finetune.max_steps": 10, "finetune.batch_size": 4})
    records = [StepRecord("quantize", "completed", 60.0), StepRecord("finetune", "completed", 100.0)]
    text = fuller_run_estimate(config, records, n_examples=200)
    # 10 steps of 4 = 0.2 epochs; 3 epochs of 200 examples at batch 4 = 150 steps at 10 s each
    assert "0.2 epochs of 200 examples" in text
    assert "--max-steps 150: about 25 min" in text


@pytest.mark.slow
def test_a_cuda_target_is_refused_up_front_where_no_gpu_is_visible(tmp_path, tiny_model_dir):
    from olivepress.errors import UserError

    config = tiny_config(tmp_path, tiny_model_dir, targets=["cpu", "cuda"])
    run_dir = new_run_dir(config)
    with (
        pytest.raises(UserError, match=r"^targets: cuda is built for and gated on a GPU"),
        run_folder(run_dir),
    ):
        olivepress_flow(config)
    assert not list(run_dir.iterdir()), "refused before any step, before config.json"


@pytest.mark.slow
def test_a_target_added_later_builds_only_its_own_export_and_evaluation(
    tmp_path, tiny_model_dir, monkeypatch
):
    """Two datasets, then the same two with a cuda target added. On this CPU machine a cuda target passes
    the up-front check only by pretending a GPU is there: its exports build (no GPU needed), its evaluations
    cannot run, and that failure is the target's alone."""
    from olivepress import devices
    from olivepress.config import SAMPLE_DATA
    from olivepress.flows import datasets
    from olivepress.flows.datasets import DatasetsFailed
    from tests.flows.test_datasets import prefect_states, statuses, write_pairs

    two = {"travel": SAMPLE_DATA, "cooking": write_pairs(tmp_path / "cooking.jsonl", "cooking")}
    first = olivepress_flow(tiny_config(tmp_path, tiny_model_dir, datasets=two))
    monkeypatch.setattr(devices, "cuda_visible", lambda: True)
    monkeypatch.setattr(devices, "genai_has_cuda", lambda: True)
    real_machine = datasets.machine_name
    monkeypatch.setattr(
        datasets, "machine_name", lambda t: "cuda: pretended" if t == "cuda" else real_machine(t)
    )
    config = tiny_config(tmp_path, tiny_model_dir, datasets=two, targets=["cpu", "cuda"], device="cpu")
    run_dir = new_run_dir(config)
    with run_folder(run_dir):
        state = olivepress_flow(config, return_state=True)
    with pytest.raises(DatasetsFailed) as failed:
        state.result()
    message = str(failed.value)
    assert message.startswith("2 of 4 dataset × target results failed; registered ")
    for name in two:
        assert f"\n  {name} (cuda): the cuda evaluation failed: " in message

    status = statuses(run_dir)
    reused = ["validate travel", "validate cooking", "quantize", "finetune travel", "finetune cooking"]
    reused += ["optimize cpu", "export_adapter cooking cpu"]
    reused += [f"{step} {name} cpu" for name in two for step in ("evaluate_base", "evaluate")]
    assert {step: status[step] for step in reused} == dict.fromkeys(reused, "reused")
    assert (status["optimize cuda"], status["export_adapter cooking cuda"]) == ("completed", "completed")
    assert status["evaluate_base travel cuda"] == status["evaluate_base cooking cuda"] == "failed"
    states = prefect_states(state.state_details.flow_run_id)
    assert states["quantize"] == ["Cached"] and states["finetune"] == ["Cached", "Cached"], (
        "the UI shows reuse"
    )
    assert states["optimize"] == states["export_adapter"] == ["Cached", "Completed"]

    exports = {
        t: json.loads((run_dir / "onnx" / t / "genai_config.json").read_text()) for t in ("cpu", "cuda")
    }
    providers = {t: exports[t]["model"]["decoder"]["session_options"]["provider_options"] for t in exports}
    assert "cuda" not in json.dumps(providers["cpu"]) and "cuda" in json.dumps(providers["cuda"])
    assert (run_dir / "onnx" / "cpu").resolve() == Path(first["exports"]["cpu"]).resolve(), "one cpu export"
    cooking = run_dir / "datasets" / "cooking" / "onnx_adapter"
    assert (cooking / "cpu").resolve() != (cooking / "cuda").resolve(), "an adapter file per target"

    # only the target that passed is registered: the same model as the first run's, its version reused
    [entry] = LocalRegistry(config.registry.path).entries()
    assert list(entry.lineage["targets"]) == ["cpu"]
    assert sorted(p.name for p in (entry.path / "model").iterdir()) == ["cpu"]
    assert "registered tiny-llama0-olivepress version 1:" in message
    report = (run_dir / "report" / "report.md").read_text()
    assert report.startswith("# olivepress run: 2 of 4 adapter × target results passed")
    assert "- `cooking` (cuda): the cuda evaluation failed: " in report
