"""A run with several datasets: one int4 base, an adapter per dataset, failures per branch, reuse by content."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from olivepress.flows.datasets import DatasetsFailed, calibration_pool
from olivepress.flows.pipeline import new_run_dir, olivepress_flow, run_folder
from olivepress.registry import LocalRegistry
from tests.flows.test_pipeline import read_flow_run_artifacts, tiny_config
from tests.tasks.test_finetune_worker import fake_worker, most_at_once, read_record  # noqa: F401 (a fixture)


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def write_pairs(path: Path, topic: str, n: int = 24) -> Path:
    pairs = [
        {
            "prompt": f"Tell me fact {i} about {topic}.",
            "response": f"Fact {i}: {topic} is {'great ' * (i % 5 + 1)}",
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(pair) + "\n" for pair in pairs), encoding="utf-8")
    return path


def test_calibration_pool_takes_the_datasets_in_turn():
    a = [{"prompt": f"a{i}", "response": ""} for i in range(10)]
    b = [{"prompt": f"b{i}", "response": ""} for i in range(2)]
    pool = calibration_pool([a, b], samples=6, seed=0)
    assert [p["prompt"][0] for p in pool] == ["a", "b", "a", "b", "a", "a"]
    assert calibration_pool([a, b], samples=6, seed=0) == pool, "seeded"
    assert calibration_pool([a], samples=3, seed=0) is a, "one dataset: its pairs as its own run has them"


@pytest.mark.usefixtures("fake_worker")
@pytest.mark.parametrize("at_once", [None, 2])
def test_adapters_train_as_a_fan_out_in_child_processes(monkeypatch, tmp_path, at_once):
    """train_adapters submits one task per branch, each training in a child process, at most
    trainings_at_once (on cpu by default 1) at a time; a branch whose child fails fails alone, named with
    the child's error."""
    import logging
    from types import SimpleNamespace

    from prefect import flow, task

    from olivepress.flows import datasets

    @task
    def training(run, dataset, checkpoint, train, trainings):
        trainer = trainings.trainer(dataset, tmp_path / f"{dataset}.json")
        return trainer(dataset, mode="crash" if dataset == "bad" else "train")["args"]

    monkeypatch.setattr(datasets, "train_adapter", training)
    names = ("a", "b", "bad", "c")
    branches = [datasets.Branch(name, name, Path(name), "0" * 64) for name in names]
    config = SimpleNamespace(device="cpu", trainings_at_once=at_once)
    run = SimpleNamespace(config=config, log=logging.getLogger(__name__), several_datasets=True)
    flow(lambda: datasets.train_adapters(run, branches, quantized=None))()

    assert [b.adapter for b in branches] == [("a",), ("b",), None, ("c",)]
    assert branches[2].failure.startswith("fine-tuning failed: its process exited with code 3")
    with pytest.raises(DatasetsFailed, match=r"^1 of 4 failed:\n  bad: fine-tuning failed: "):
        datasets.raise_failures(branches, ["cpu"], "1 of 4 failed")
    assert "boom: CUDA out of memory" in branches[2].failure, "the end of the child's output"
    records = [read_record(tmp_path / f"{name}.json") for name in names]
    assert most_at_once(records) == (at_once or 1)


def adapter_logits(onnx_dir: Path, adapter_files: dict[str, Path], ids: list[int]) -> dict[str, np.ndarray]:
    """Every adapter loaded into one og.Adapters on one model, each made active in turn."""
    import onnxruntime_genai as og

    from olivepress.genai import LoadedModel, open_model, sequence_logits

    plain = open_model(onnx_dir)
    adapters = og.Adapters(plain.model)
    for name, file in adapter_files.items():
        adapters.load(str(file), name)
    return {
        name: sequence_logits(LoadedModel(plain.model, plain.tokenizer, adapters, adapter_name=name), ids)
        for name in adapter_files
    }


def prefect_states(flow_run_id) -> dict[str, list[str]]:
    """Each task's run states in a flow run, by task name: a step the store served shows as Cached."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    states: dict[str, list[str]] = {}
    for task_run in task_runs:
        states.setdefault(task_run.name.rsplit("-", 1)[0], []).append(task_run.state.name)
    return {name: sorted(names) for name, names in states.items()}


def statuses(run_dir: Path) -> dict[str, str]:
    return {s["step"]: s["status"] for s in json.loads((run_dir / "summary.json").read_text())}


@pytest.mark.slow
def test_two_datasets_then_a_third_and_a_bad_one(tmp_path, tiny_model_dir, travel_jsonl, caplog):
    """Two datasets give one base and two adapters (trained at once) that load together and differ; adding a
    third (and a bad one) later reuses the base and both adapters, registers the three good ones and fails
    naming the bad. Both evaluations compare against one base model, built early."""
    cooking = write_pairs(tmp_path / "cooking.jsonl", "cooking")
    settings = {"finetune.learning_rate": 0.01, "evaluate.speed_samples": 1}
    two = {"travel": travel_jsonl, "cooking": cooking}
    config = tiny_config(tmp_path, tiny_model_dir, datasets=two, trainings_at_once=2, **settings)
    run_dir = new_run_dir(config)
    with caplog.at_level(logging.INFO, logger="olivepress.base_ahead"), run_folder(run_dir):
        result = olivepress_flow(config)
    assert caplog.text.count("building the cpu base model ahead") == 1 and "failed" not in caplog.text
    assert list((tmp_path / "cache" / "staging").iterdir()) == []
    trainings = [read_record(run_dir / "datasets" / name / "training.json") for name in two]
    assert most_at_once(trainings) == 2, "the two adapters trained at once, each in its own process"

    assert set(result["adapters"]["cpu"]) == {"travel", "cooking"}
    assert statuses(run_dir) == {
        "validate travel": "completed",
        "validate cooking": "completed",
        "quantize": "completed",
        "finetune travel": "completed",
        "finetune cooking": "completed",
        "optimize": "completed",
        "export_adapter cooking": "completed",
        "evaluate_base travel": "completed",
        "evaluate travel": "completed",
        "evaluate_base cooking": "completed",
        "evaluate cooking": "completed",
        "report": "completed",
        "register": "completed",
    }
    entry = Path(result["registration"]["uri"])
    files = {name: entry / "adapters" / "cpu" / f"{name}.onnx_adapter" for name in ("travel", "cooking")}
    ids = [1, 17, 42, 99, 7, 3]
    logits = adapter_logits(entry / "model" / "cpu", files, ids)
    assert np.abs(logits["travel"] - logits["cooking"]).max() > 1e-3, "two adapters, two answers"
    lineage = json.loads((entry / "lineage.json").read_text())
    assert set(lineage["adapters"]) == {"travel", "cooking"}
    assert lineage["adapters"]["cooking"]["data"]["path"] == str(cooking)
    assert lineage["adapters"]["cooking"]["targets"]["cpu"]["gate"]["passed"] is True
    assert lineage["data"]["calibration_datasets"] == ["travel", "cooking"]
    report = (run_dir / "report" / "report.md").read_text()
    assert "| adapter | target |" in report and "| travel | cpu |" in report and "| cooking | cpu |" in report
    assert (run_dir / "report" / "training_loss.png").read_bytes()[:4] == b"\x89PNG"

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n["not", "an", "object"]\n', encoding="utf-8")
    later = {**two, "hiking": write_pairs(tmp_path / "hiking.jsonl", "hiking"), "broken": bad}
    config = tiny_config(
        tmp_path, tiny_model_dir, datasets=later, calibration_datasets=["travel", "cooking"], **settings
    )
    run_dir = new_run_dir(config)
    with run_folder(run_dir):
        state = olivepress_flow(config, return_state=True)
    assert state.is_failed()
    with pytest.raises(
        DatasetsFailed, match=r"1 of 4 dataset × target results failed; registered .*:\n  broken: "
    ):
        state.result()
    assert prefect_states(state.state_details.flow_run_id) == {
        "validate": ["Cached", "Cached", "Completed", "Failed"],
        "quantize": ["Cached"],
        "adapter": ["Completed", "Completed", "Completed"],
        "finetune": ["Cached", "Cached", "Completed"],
        "optimize": ["Cached"],
        "export_adapter": ["Cached", "Completed"],
        "evaluate_base": ["Cached", "Cached", "Completed"],
        "evaluate": ["Cached", "Cached", "Completed"],
        "report": ["Completed"],
        "register": ["Completed"],
    }
    status = statuses(run_dir)
    assert status["validate broken"] == "failed"
    reused = ["quantize", "finetune travel", "finetune cooking", "optimize", "export_adapter cooking"]
    assert {step: status[step] for step in reused} == dict.fromkeys(reused, "reused")
    assert status["finetune hiking"] == status["export_adapter hiking"] == "completed"
    assert "broken" in (run_dir / "report" / "report.md").read_text()
    artifacts = read_flow_run_artifacts(str(state.state_details.flow_run_id))
    assert artifacts["olivepress-gate"].description == "failed: broken"
    assert "line 2" in artifacts["olivepress-gate"].data and "**hiking**" in artifacts["olivepress-gate"].data
    assert "| hiking | cpu |" in artifacts["olivepress-report"].data
    [_, second] = LocalRegistry(config.registry.path).entries()
    lineage = second.lineage
    assert set(lineage["adapters"]) == {"travel", "cooking", "hiking"}
    assert lineage["model_adapter"] == "travel"  # the first dataset's adapter is the one inside model/
    assert "line 2" in lineage["failed_adapters"]["broken"]["failure"]
    assert sorted(p.name for p in (second.path / "adapters" / "cpu").iterdir()) == [
        "cooking.onnx_adapter",
        "hiking.onnx_adapter",
        "travel.onnx_adapter",
    ]

    # a gate only one adapter meets: the cached measurements decide it again (travel measured ~0.93 of the
    # base's perplexity, cooking ~0.65); the base is registered without travel's adapter, cooking beside it
    config = tiny_config(
        tmp_path, tiny_model_dir, datasets=two, **{**settings, "gate.max_perplexity_ratio": 0.8}
    )
    with (
        pytest.raises(
            DatasetsFailed,
            match=r"1 of 2 dataset × target results failed; registered .*:\n  travel \(cpu\): gate",
        ),
        run_folder(new_run_dir(config)),
    ):
        olivepress_flow(config)
    third = LocalRegistry(config.registry.path).entries()[-1]
    assert sorted(p.name for p in (third.path / "adapters" / "cpu").iterdir()) == ["cooking.onnx_adapter"]
    assert not (third.path / "model" / "cpu" / "adapter_weights.onnx_adapter").exists()
    assert (third.path / "model" / "cpu" / "model.onnx").is_file()
    assert list(third.lineage["failed_adapters"]) == ["travel"]
    assert third.lineage["model_adapter"] is None


def read_events(flow_run_id, names: list[str], count: int, timeout: float = 60.0) -> list:
    """The events of ``names`` related to a flow run, read back from the API once ``count`` arrived (the
    server stores them a moment after they are sent)."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter

    related = EventRelatedFilter(id=[f"prefect.flow-run.{flow_run_id}"])
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_events(
                # limit: the client's default (100) is more than the server takes
                filter=EventFilter(event=EventNameFilter(name=names), related=related),
                limit=50,
            )
            if len(page.events) >= count or time.monotonic() > deadline:
                return sorted(page.events, key=lambda event: event.event)
            time.sleep(0.5)


def test_a_failed_gate_and_a_registration_are_events_an_automation_can_act_on():
    from prefect import flow
    from prefect.runtime import flow_run

    from olivepress.flows import datasets
    from olivepress.registry import Registration
    from olivepress.tasks.evaluate import Evaluation, GateCheck, GateDecision

    def evaluation(passed: bool) -> Evaluation:
        check = GateCheck("speedup", "int4 decode speed over the base's", 2.5 if passed else 0.9, 1.0, passed)
        return Evaluation(
            metrics=[],
            gate=GateDecision(passed, [check]),
            held_out_pairs=4,
            generation_prompts=2,
            seconds=1.0,
        )

    travel, cooking = (
        datasets.Branch(name, f"{name}.jsonl", Path(f"{name}.jsonl"), "0" * 64)
        for name in ("travel", "cooking")
    )
    travel.targets["cpu"] = datasets.TargetResult(evaluation=evaluation(True))
    cooking.targets["cpu"] = datasets.TargetResult(
        evaluation=evaluation(False), failure="gate failed: speedup 0.9 (limit 1)"
    )
    registration = Registration("local", "tiny-olivepress", "3", "/registry/tiny-olivepress/3", reused=False)

    @flow
    def gated():
        datasets.emit_gate_failed("tiny", "cooking", "cpu", cooking.targets["cpu"])
        datasets.emit_registered(registration, [travel, cooking], ["cpu"])
        return flow_run.id

    run_id = gated()
    failed, registered = read_events(run_id, [datasets.GATE_FAILED, datasets.MODEL_REGISTERED], count=2)
    assert failed.event == "olivepress.gate.failed"
    assert failed.resource.id == "olivepress.gate.tiny.cooking.cpu"
    assert (
        failed.resource["olivepress.dataset"] == "cooking" and failed.resource["olivepress.target"] == "cpu"
    )
    assert failed.payload["why"] == "gate failed: speedup 0.9 (limit 1)"
    assert failed.payload["checks"] == {"speedup": {"measured": 0.9, "limit": 1.0, "passed": False}}
    assert failed.payload["flow_run_id"] == run_id
    assert registered.resource.id == "olivepress.model.tiny-olivepress.3"
    assert registered.payload["version"] == "3" and registered.payload["uri"] == registration.uri
    assert registered.payload["targets"] == ["cpu"]
    assert registered.payload["gates"] == {
        "cpu": {"travel": {"speedup": {"measured": 2.5, "limit": 1.0, "passed": True}}}
    }
    assert {r.id: r.role for r in registered.related}[f"prefect.flow-run.{run_id}"] == "flow-run"


def reporting_run(tmp_path):
    """A run of one dataset that passed on cpu, as far as the report and the registration see it."""
    from types import SimpleNamespace

    from olivepress.config import load_config
    from olivepress.flows import datasets
    from olivepress.flows.runs import StepRecord
    from tests.tasks.test_report import evaluation

    travel = datasets.Branch("travel", "travel.jsonl", Path("travel.jsonl"), "0" * 64, records=20)
    travel.targets["cpu"] = datasets.TargetResult(evaluation=evaluation())
    config = load_config(overrides={"registry.name": "travel-model"})
    records = [StepRecord("validate", "completed", 1.0)]
    run = SimpleNamespace(config=config, records=records, log=logging.getLogger(__name__), dir=tmp_path)
    return run, SimpleNamespace(name="tiny"), [travel]


def report_versions(flow_run_id) -> list[str]:
    """The report artifact's versions on a flow run, oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    from olivepress.tasks.report import REPORT_KEY

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
                key=ArtifactFilterKey(any_=[REPORT_KEY]),
            )
        )
    return [artifact.data for artifact in sorted(found, key=lambda artifact: artifact.created)]


@pytest.mark.parametrize("registry_fails", [False, True])
def test_the_report_opens_with_what_the_registry_answered(tmp_path, monkeypatch, registry_fails):
    """The entry keeps the page as written before registering (the name, its version being the entry's);
    then the run folder's page and the artifact name the version, or why the registration failed."""
    from prefect import flow
    from prefect.runtime import flow_run

    from olivepress.flows import datasets
    from olivepress.flows.runs import StepRecord
    from olivepress.registry import Registration

    run, model, branches = reporting_run(tmp_path)
    kept = []

    def register(run, model, branches, report_dir):
        kept.append((report_dir / "report.md").read_text().splitlines()[0])
        if registry_fails:
            raise RuntimeError("workspace not found\nsee registry.azureml")
        run.records.append(StepRecord("register", "completed", 0.4))
        return Registration("local", "travel-model", "4", "/registry/travel-model/4", reused=False)

    monkeypatch.setattr(datasets, "register", register)

    @flow
    def reported():
        report_dir = datasets.report(run, model, branches)
        try:
            return flow_run.id, datasets.register_and_report(run, model, branches, report_dir)
        except RuntimeError:
            return flow_run.id, None

    run_id, registration = reported()
    assert kept == ["# olivepress run: gate passed; to be registered as `travel-model`"], (
        "what the entry keeps"
    )
    page = (tmp_path / "report" / "report.md").read_text()
    if registry_fails:
        assert registration is None
        headline = (
            "# olivepress run: gate passed; nothing registered: the registration failed (workspace not found)"
        )
    else:
        assert registration.version == "4"
        headline = "# olivepress run: gate passed; registered `travel-model` version 4"
        assert "| register | completed | 0.4 | - |" in page
    assert page.startswith(headline + "\n")
    first, last = report_versions(run_id)
    assert first.startswith(kept[0]) and last.startswith(headline + "\n"), "the artifact says it too"
    assert "data:image/png;base64," in last


def test_a_report_that_cannot_be_written_again_loses_no_registration(tmp_path, monkeypatch, caplog):
    from olivepress.flows import datasets
    from olivepress.registry import Registration

    run, model, branches = reporting_run(tmp_path)
    registered = Registration("local", "travel-model", "4", "/registry/travel-model/4", reused=False)
    monkeypatch.setattr(datasets, "register", lambda *args: registered)

    def rewrite_page(inputs, report_dir):
        raise OSError("disk full")

    monkeypatch.setattr(datasets, "rewrite_page", rewrite_page)
    monkeypatch.setattr(datasets, "current_flow_run_id", lambda: None)
    with caplog.at_level(logging.WARNING):
        assert datasets.register_and_report(run, model, branches, tmp_path / "report") == registered
    assert (
        "the report could not be written again to say 'registered `travel-model` version 4': disk full"
        in (caplog.text)
    )


def test_nothing_passed_asks_no_registry(tmp_path, monkeypatch):
    from olivepress.flows import datasets

    run, model, branches = reporting_run(tmp_path)
    branches[0].targets["cpu"].failure = "gate failed: size_ratio 0.35 (limit 0.1)"
    monkeypatch.setattr(datasets, "register", lambda *args: pytest.fail("nothing passed"))
    assert datasets.register_and_report(run, model, branches, tmp_path / "report") is None
