"""Trainings in child processes: how many at once, which GPU each gets, what a failed child reports; and two
real trainings at once on the tiny model."""

import io
import json
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import pytest

from olivepress import progress
from olivepress.config import FinetuneSettings
from olivepress.errors import UserError
from olivepress.tasks import finetune_worker
from olivepress.tasks.finetune import finetune_lora
from olivepress.tasks.finetune_worker import TrainingFailed, Trainings, training_slots
from tests.conftest import sample_pairs

LOG = logging.getLogger(__name__)

# A stand-in for the worker that speaks its protocol: one progress report, then per keyword argument
# ``mode`` a result naming its GPU after a pause, a user error, or a crash with a line on standard error.
FAKE_WORKER = """
import os, pickle, sys, time
from multiprocessing.connection import Connection

args, kwargs = pickle.load(sys.stdin.buffer)
with Connection(int(sys.argv[1]), readable=False) as parent:
    parent.send(("progress", "finetune", "step", 1, 2, {"loss": 1.5}))
    if kwargs["mode"] == "crash":
        sys.stderr.write("boom: CUDA out of memory\\n")
        sys.exit(3)
    if kwargs["mode"] == "user":
        parent.send(("error", "the chat template cannot format the examples", True))
        sys.exit(1)
    time.sleep(0.4)
    parent.send(("result", {"gpu": os.environ.get("CUDA_VISIBLE_DEVICES"), "args": args}))
"""


@pytest.fixture
def fake_worker(tmp_path, monkeypatch):
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER, encoding="utf-8")
    monkeypatch.setattr(finetune_worker, "WORKER", [sys.executable, str(script)])
    return script


def read_record(path: Path) -> dict:
    record = json.loads(path.read_text())
    record["started"], record["ended"] = map(datetime.fromisoformat, (record["started"], record["ended"]))
    return record


def overlap(a: dict, b: dict) -> bool:
    return a["started"] < b["ended"] and b["started"] < a["ended"]


def most_at_once(records: list[dict]) -> int:
    """The most trainings that ran at one moment (one ending as another starts: one at a time)."""
    events = sorted([(r["started"], 1) for r in records] + [(r["ended"], -1) for r in records])
    running = most = 0
    for _, change in events:
        running += change
        most = max(most, running)
    return most


def test_one_training_per_visible_gpu_on_gpu_one_on_cpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert training_slots("gpu", None) == ["0", "1"]
    assert training_slots("gpu", 3) == ["0", "1", "0"], "more than the GPUs share them in turn"
    assert training_slots("cpu", None) == [None]
    assert training_slots("cpu", 2) == [None, None]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8f2a, GPU-77c1,")
    assert training_slots("gpu", None) == ["GPU-8f2a", "GPU-77c1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert training_slots("gpu", None) == [None], "no GPU: unpinned, to fail as in-process training would"


def test_trainings_run_at_once_each_child_on_a_gpu_of_its_own(tmp_path, fake_worker, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    trainings = Trainings(training_slots("gpu", None), LOG)
    names = ["a", "b", "c", "d"]
    shown = io.StringIO()

    def train(name: str) -> dict:
        return trainings.trainer(name, tmp_path / f"{name}.json")(name, mode="train")

    with (
        progress.showing(progress.ProgressDisplay(shown, in_place=False, interval=0)),
        ThreadPoolExecutor(len(names)) as pool,
    ):
        results = dict(zip(names, pool.map(train, names), strict=True))

    records = {name: read_record(tmp_path / f"{name}.json") for name in names}
    for name in names:
        assert results[name] == {"gpu": records[name]["gpu"], "args": (name,)}, "the child's own GPU"
        assert records[name]["status"] == "completed"
    assert {record["gpu"] for record in records.values()} == {"0", "1"}
    pairs = [(x, y) for i, x in enumerate(names) for y in names[i + 1 :]]
    overlapping = [(x, y) for x, y in pairs if overlap(records[x], records[y])]
    assert overlapping, "two trainings ran at once"
    for x, y in overlapping:
        assert records[x]["gpu"] != records[y]["gpu"], f"{x} and {y} ran at once on one GPU"
    assert most_at_once(list(records.values())) == 2
    assert "a step 1/2  loss 1.5" in shown.getvalue(), "progress forwarded, named by its dataset"


def test_a_failed_child_raises_its_error_and_its_last_output(tmp_path, fake_worker):
    trainings = Trainings(training_slots("cpu", None), LOG)
    with pytest.raises(
        TrainingFailed, match=r"exited with code 3; its last output:\nboom: CUDA out of memory"
    ):
        trainings.trainer("travel", tmp_path / "travel.json")(mode="crash")
    assert read_record(tmp_path / "travel.json")["status"] == "failed"
    with pytest.raises(UserError, match=r"^the chat template cannot format the examples$"):
        trainings.trainer("travel", tmp_path / "travel.json")(mode="user")
    assert trainings.free.qsize() == 1, "the slot is given back after a failure"


@pytest.mark.slow
def test_two_real_trainings_at_once_in_child_processes(tmp_path, tiny_int4_dir):
    """finetune_lora in two children at once (on CPU with trainings_at_once 2): two adapters, each trained on
    its own data as this process would train it."""
    from safetensors.torch import load_file

    settings = FinetuneSettings(
        max_steps=3, batch_size=2, max_seq_len=64, learning_rate=1e-2, checkpoint_every=2
    )
    pairs = sample_pairs()
    data = {"a": pairs[:12], "b": pairs[12:24]}
    trainings = Trainings(training_slots("cpu", 2), LOG)

    def train(name: str):
        folder = tmp_path / name
        return trainings.trainer(name, folder / "training.json")(
            tiny_int4_dir, data[name], folder / "adapter", settings, work_dir=folder / "work"
        )

    for name in data:
        (tmp_path / name).mkdir()
    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(data, pool.map(train, data), strict=True))

    records = {name: read_record(tmp_path / name / "training.json") for name in data}
    assert overlap(records["a"], records["b"]), "the two trainings ran at once"
    assert records["a"]["pid"] != records["b"]["pid"]
    here = finetune_lora(tiny_int4_dir, data["a"], tmp_path / "here", settings, work_dir=tmp_path / "w")
    assert [entry["step"] for entry in results["a"].losses] == [1, 2, 3]
    losses = {name: [entry["loss"] for entry in result.losses] for name, result in results.items()}
    assert losses["a"] != losses["b"]
    # the first step's loss comes before any update (LoRA B starts at zero): the same model, text and batch as
    # here; later steps differ in the last digits from run to run, in this process too
    assert losses["a"][0] == pytest.approx(here.losses[0]["loss"], rel=1e-6), (
        "the child trains what this does"
    )
    assert results["a"].adapter_dir == tmp_path / "a" / "adapter"
    adapters = {name: load_file(tmp_path / name / "adapter" / "adapter_model.safetensors") for name in data}
    assert adapters["a"].keys() == adapters["b"].keys()
    assert any(
        not adapters["a"][key].equal(adapters["b"][key]) for key in adapters["a"] if "lora_B" in key
    ), "two datasets, two adapters"


def test_a_training_dies_with_its_parent(tmp_path):
    """A killed run takes its children with it: none goes on writing into the key's work folder."""
    import signal
    import subprocess
    import time

    child_pid = tmp_path / "child.pid"
    child = (
        "import os, sys, time; from olivepress.tasks.finetune_worker import die_with_parent; "
        f"die_with_parent(os.getppid()); open({str(child_pid)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])"]
    )
    deadline = time.monotonic() + 30
    while not child_pid.exists() or not child_pid.read_text():
        assert time.monotonic() < deadline, "the child did not start"
        time.sleep(0.05)
    pid = int(child_pid.read_text())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    status = Path(f"/proc/{pid}/status")
    while time.monotonic() < deadline:
        try:
            if "zombie" in status.read_text():  # dead, not reaped yet by whoever adopted it
                return
        except FileNotFoundError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    pytest.fail("the training outlived its parent")
