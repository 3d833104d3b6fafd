"""Caching by content, resume after kill -9, corruption, and an S3 store that goes away mid-run."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from olivepress.config import load_config
from olivepress.flows.pipeline import olivepress_flow, open_store
from tests.flows.test_pipeline import tiny_config

COMPUTED_STEPS = ["validate", "quantize", "finetune", "optimize", "evaluate_base", "evaluate"]


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def statuses(run_dir: Path) -> dict[str, str]:
    return {record["step"]: record["status"] for record in json.loads((run_dir / "summary.json").read_text())}


def task_run_states(flow_run_id: str) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name.rsplit("-", 1)[0]: run.state.name for run in runs}


@pytest.mark.slow
def test_same_inputs_reuse_every_step_and_an_edited_line_invalidates_all(tmp_path, tiny_model_dir):
    data = tmp_path / "data.jsonl"
    data.write_bytes(Path(load_config().data).read_bytes())
    config = tiny_config(tmp_path, tiny_model_dir, data=data)

    first = olivepress_flow(config)
    # building the base early changes no key: a child starts, nothing takes its model, and it is stopped
    again = olivepress_flow(config.model_copy(update={"build_base_early": True}))
    assert list((tmp_path / "cache" / "staging").iterdir()) == [], "the early base's folder is gone"
    assert statuses(Path(again["run_dir"])) == {
        **dict.fromkeys(COMPUTED_STEPS, "reused"),
        "report": "completed",
        "register": "completed",
    }
    assert again["registration"]["version"] == first["registration"]["version"] == "1"
    assert again["registration"]["reused"] is True
    states = task_run_states(again["flow_run_id"])
    assert [states[step] for step in COMPUTED_STEPS] == ["Cached"] * len(COMPUTED_STEPS), (
        "the Prefect UI shows them as cached"
    )

    stricter = tiny_config(tmp_path, tiny_model_dir, data=data, **{"gate.max_size_ratio": 9.0})
    assert statuses(Path(olivepress_flow(stricter)["run_dir"]))["evaluate"] == "reused", (
        "a new threshold is decided on the stored measurements"
    )

    lines = data.read_text(encoding="utf-8").splitlines()
    record = json.loads(lines[0])
    record["response"] += " (edited)"
    data.write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n", encoding="utf-8")
    edited = olivepress_flow(tiny_config(tmp_path, tiny_model_dir, data=data))
    assert [statuses(Path(edited["run_dir"]))[step] for step in COMPUTED_STEPS] == ["completed"] * len(
        COMPUTED_STEPS
    )


@pytest.mark.slow
def test_one_changed_byte_in_a_stored_output_is_recomputed_not_used(tmp_path, tiny_model_dir):
    config = tiny_config(tmp_path, tiny_model_dir)
    first = olivepress_flow(config)
    model_file = Path(first["exports"]["cpu"]) / "model.onnx"
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    model_file.write_bytes(bytes(data))

    second = olivepress_flow(config)
    assert statuses(Path(second["run_dir"])) | {"report": "-", "register": "-"} == {
        "validate": "reused",
        "quantize": "reused",
        "finetune": "reused",
        "optimize": "completed",
        "evaluate_base": "reused",  # the base's measurements never depended on the export
        "evaluate": "reused",  # the re-export is byte-identical, so its measurements still hold
        "report": "-",
        "register": "-",
    }
    assert (Path(second["exports"]["cpu"]) / "model.onnx").read_bytes() != bytes(data)


@pytest.mark.slow
def test_a_run_killed_mid_training_resumes_from_its_last_checkpoint(tmp_path, tiny_model_dir, caplog):
    overrides = {"finetune.max_steps": 150, "finetune.checkpoint_every": 1}
    config = tiny_config(tmp_path, tiny_model_dir, **overrides)
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    process = subprocess.Popen(
        [sys.executable, "-m", "olivepress.flows.cli", "run", "--config", str(config_file)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: kill -9 takes its Prefect server with it
        env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
    )
    work = config.store.cache_dir / "work"
    deadline = time.monotonic() + 240
    try:
        while not list(work.glob("finetune-*/checkpoints/checkpoint-3/trainer_state.json")):
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "training never reached its third checkpoint"
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    store = open_store(config)
    assert any(store.fs.glob(f"{store.root}/quantize/*/manifest.json")), "quantize had finished"
    assert not store.fs.glob(f"{store.root}/finetune/*/manifest.json"), "finetune had not"

    with caplog.at_level(logging.INFO, logger="olivepress.tasks.finetune"):
        result = olivepress_flow(config)
    assert [statuses(Path(result["run_dir"]))[s] for s in COMPUTED_STEPS[:3]] == [
        "reused",
        "reused",
        "completed",
    ]
    resumed = [r.getMessage() for r in caplog.records if "resuming from checkpoint-" in r.getMessage()]
    assert resumed, "training picked up where the killed run stopped"
    assert int(resumed[0].rsplit("-", 1)[1]) >= 3
    losses = json.loads((Path(result["run_dir"]) / "adapter" / "loss_history.json").read_text())
    assert [row["step"] for row in losses] == list(range(1, 151))


@pytest.mark.slow
def test_a_run_on_s3_survives_the_server_going_away(tmp_path, tiny_model_dir, s3_server, caplog):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server.endpoint)
    client.create_bucket(Bucket="runs")
    client.put_object(Bucket="runs", Key="data/sample.jsonl", Body=load_config().data.read_bytes())
    config = tiny_config(
        tmp_path,
        tiny_model_dir,
        **{
            "data": "s3://runs/data/sample.jsonl",
            "store.uri": "s3://runs/olivepress",
            "store.endpoint_url": s3_server.endpoint,
            "retries.store_attempts": 10,
            "retries.backoff_seconds": 0.5,
        },
    )
    store = open_store(config)
    outage = threading.Event()

    def take_the_server_away() -> None:
        # as soon as the first step is stored, stop S3 for long enough that later uploads must wait
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not store.fs.glob(f"{store.root}/quantize/*/manifest.json"):
            store.fs.invalidate_cache()
            time.sleep(0.05)
        s3_server.stop()
        outage.set()
        time.sleep(6)
        s3_server.start()

    chaos = threading.Thread(target=take_the_server_away)
    chaos.start()
    try:
        with caplog.at_level(logging.WARNING, logger="olivepress.retry"):
            result = olivepress_flow(config)
    finally:
        chaos.join()
    assert outage.is_set()
    assert any("retry" in record.getMessage() for record in caplog.records), "an upload met the outage"
    assert result["registration"]["version"] == "1"
    lineage = json.loads((Path(result["registration"]["uri"]) / "lineage.json").read_text())
    assert lineage["data"]["path"] == "s3://runs/data/sample.jsonl"

    fresh = open_store(load_config(overrides={**config.model_dump(), "store.cache_dir": tmp_path / "fresh"}))
    for step in COMPUTED_STEPS:
        manifests = fresh.fs.glob(f"{fresh.root}/{step}/*/manifest.json")
        assert len(manifests) == 1, step
        key = manifests[0].split("/")[-2]
        assert fresh.complete(step, key) is not None, f"{step}'s stored files verify after the outage"


@pytest.mark.slow
def test_two_runs_of_the_same_inputs_at_once_both_succeed_and_register_one_version(tmp_path, tiny_model_dir):
    from prefect.settings import PREFECT_API_URL

    from olivepress.registry import LocalRegistry

    config = tiny_config(tmp_path, tiny_model_dir)
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    # two workers, one --output (store) and one --registry, on the test's Prefect API
    env = {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "olivepress.flows.cli", "run", "--config", str(config_file)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=1200)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], "\n\n".join(output[-3000:] for output in outputs)

    entries = LocalRegistry(config.registry.path).entries()
    assert [entry.version for entry in entries] == ["1"], "the same model is registered once"
    run_dirs = sorted(config.output.glob("run-*"))
    assert len(run_dirs) == 2
    for step in COMPUTED_STEPS:
        assert sorted(statuses(run_dir)[step] for run_dir in run_dirs) == ["completed", "reused"], (
            f"{step} is computed by one run; the other waits for it and reuses it"
        )
    for run_dir in run_dirs:
        export = (run_dir / "onnx" / "cpu").resolve()
        assert export == (run_dirs[0] / "onnx" / "cpu").resolve(), "both link the one export"
    assert not list((config.store.cache_dir / "work").iterdir()), "no training folder is left behind"
