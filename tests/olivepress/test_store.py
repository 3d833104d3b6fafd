"""The artifact store on a local folder and on a real S3-compatible server (moto's, on loopback)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from olivepress.retry import RetryPolicy
from olivepress.store import MANIFEST, ArtifactStore

FAST_RETRY = RetryPolicy(attempts=8, base_delay_s=0.2, max_delay_s=2.0, jitter=0.5)


def make_output(folder: Path, text: str = "weights") -> Path:
    (folder / "sub").mkdir(parents=True)
    (folder / "model.bin").write_bytes(text.encode() * 1000)
    (folder / "sub" / "config.json").write_text('{"a": 1}')
    return folder


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> ArtifactStore:
    if request.param == "local":
        return ArtifactStore(str(tmp_path / "store"), tmp_path / "cache", retry=FAST_RETRY)
    server = request.getfixturevalue("s3_server")
    return s3_store(server, tmp_path / "cache")


def s3_store(server, cache_dir: Path, bucket: str = "olivepress-test") -> ArtifactStore:
    import boto3

    client = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1")
    if bucket not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=bucket)
    return ArtifactStore(
        f"s3://{bucket}/runs",
        cache_dir,
        retry=FAST_RETRY,
        storage_options={"client_kwargs": {"endpoint_url": server.endpoint}, "skip_instance_cache": True},
    )


def test_a_published_output_is_complete_and_reused(store, tmp_path):
    source = make_output(tmp_path / "out")
    calls = []

    def compute(out: Path) -> None:
        calls.append(out)
        make_output(out)

    first = store.produce("quantize", "k1", compute)
    second = store.produce("quantize", "k1", compute)
    assert len(calls) == 1, "the second call reuses the published output"
    assert first == second
    copy = store.local_copy(first)
    assert (copy / "model.bin").read_bytes() == (source / "model.bin").read_bytes()
    assert sorted(first.files) == ["model.bin", "sub/config.json"]


def test_a_crash_inside_a_step_publishes_nothing(store):
    def crash(out: Path) -> None:
        make_output(out)
        raise RuntimeError("killed mid-step")

    with pytest.raises(RuntimeError):
        store.produce("finetune", "k2", crash)
    assert store.manifest("finetune", "k2") is None
    assert store.complete("finetune", "k2") is None


def test_files_without_a_manifest_do_not_count_as_done(store, tmp_path):
    manifest = store.publish("optimize", "k3", make_output(tmp_path / "out"))
    store.fs.rm(store._path("optimize", "k3", MANIFEST))
    assert store.complete("optimize", "k3") is None
    assert store.fs.exists(store._path("optimize", "k3", manifest.publish_id, "model.bin"))


def test_one_changed_byte_is_detected_and_the_step_recomputed(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"), tmp_path / "cache", retry=FAST_RETRY)
    manifest = store.produce("optimize", "k4", make_output)
    stored = store.local_copy(manifest) / "model.bin"
    data = bytearray(stored.read_bytes())
    data[100] ^= 0x01
    stored.write_bytes(bytes(data))

    # the next run opens the store afresh (one store object remembers what it verified during its run)
    store = ArtifactStore(str(tmp_path / "store"), tmp_path / "cache", retry=FAST_RETRY)
    assert store.complete("optimize", "k4") is None
    recomputed = store.produce("optimize", "k4", make_output)
    assert recomputed.publish_id != manifest.publish_id
    assert (store.local_copy(recomputed) / "model.bin").read_bytes() == b"weights" * 1000


def test_a_corrupted_remote_file_is_detected(s3_server, tmp_path):
    store = s3_store(s3_server, tmp_path / "cache", bucket="corrupt")
    manifest = store.produce("quantize", "k5", make_output)
    remote = store._path("quantize", "k5", manifest.publish_id, "model.bin")
    store.fs.pipe_file(remote, b"x" + b"weights" * 1000)
    fresh = s3_store(s3_server, tmp_path / "other-cache", bucket="corrupt")
    assert fresh.complete("quantize", "k5") is None


def test_concurrent_publishers_of_one_key_leave_a_whole_output(store, tmp_path):
    errors = []

    def publish(index: int) -> None:
        try:
            store.publish("evaluate", "k6", make_output(tmp_path / f"out{index}", text="same"))
        except Exception as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    winner = store.complete("evaluate", "k6")
    assert winner is not None
    assert (store.local_copy(winner) / "model.bin").read_bytes() == b"same" * 1000


def test_the_store_rides_out_an_s3_outage(s3_server, tmp_path):
    store = s3_store(s3_server, tmp_path / "cache", bucket="outage")
    source = make_output(tmp_path / "out")
    s3_server.stop()
    restarter = threading.Timer(1.5, s3_server.start)
    restarter.start()
    started = time.monotonic()
    try:
        manifest = store.publish("quantize", "k7", source)
    finally:
        restarter.join()
    assert time.monotonic() - started >= 1.0, "the upload waited for the server"
    assert store.complete("quantize", "k7") == manifest


def test_leftovers_of_an_old_upload_are_removed_and_a_young_one_is_kept(store, tmp_path, monkeypatch):
    from olivepress import store as store_module

    source = make_output(tmp_path / "out")
    crashed = store.publish("quantize", "k8", source)  # stands for an upload no manifest points to now
    live = store.publish("quantize", "k8", source)
    assert store.fs.exists(store._path("quantize", "k8", crashed.publish_id)), "young: maybe still uploading"

    monkeypatch.setattr(store_module, "STALE_PUBLISH_SECONDS", -1.0)
    latest = store.publish("quantize", "k8", source)
    folders = {p.rstrip("/").rsplit("/", 1)[-1] for p in store.fs.ls(store._path("quantize", "k8"))}
    assert folders == {latest.publish_id, MANIFEST}
    assert live.publish_id not in folders
    assert store.complete("quantize", "k8") == latest


def test_scratch_a_killed_run_left_is_removed_and_a_live_one_kept(tmp_path):
    import os

    store = ArtifactStore(str(tmp_path / "store"), tmp_path / "cache", retry=FAST_RETRY)
    staging = tmp_path / "cache" / "staging"
    (staging / "quantize-killed").mkdir(parents=True)
    (staging / "finetune-live").mkdir()
    two_days_ago = time.time() - 2 * 86400
    os.utime(staging / "quantize-killed", (two_days_ago, two_days_ago))
    assert store.scratch_root() == staging
    assert sorted(p.name for p in staging.iterdir()) == ["finetune-live"]


# --- concurrent runs of one step key: computed once, the other run waits and reuses it ----------------


def open_same_store(request, tmp_path, index: int) -> ArtifactStore:
    """A fresh store object (as a second run would open) on the test's store, with its own cache folder."""
    if request.node.callspec.params["store"] == "local":
        return ArtifactStore(str(tmp_path / "store"), tmp_path / f"cache{index}", retry=FAST_RETRY)
    return s3_store(request.getfixturevalue("s3_server"), tmp_path / f"cache{index}")


def test_concurrent_producers_of_one_key_compute_it_once(store, request, tmp_path, monkeypatch):
    from olivepress.store import s3_lease

    monkeypatch.setattr(s3_lease, "POLL_SECONDS", 0.1)
    calls, results, errors = [], {}, []
    start = threading.Barrier(3)

    def compute(out: Path) -> None:
        calls.append(out)
        time.sleep(1.0)  # long enough that every other run arrives while this one computes
        make_output(out, text="once")

    def run(index: int) -> None:
        own = open_same_store(request, tmp_path, index)
        start.wait()
        try:
            results[index] = (own.produce("quantize", "k9", compute), own.computed)
        except Exception as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(calls) == 1, "one run computed; the others waited for its output"
    assert len({manifest.publish_id for manifest, _ in results.values()}) == 1, (
        "every run got the same output"
    )
    assert sorted(len(computed) for _, computed in results.values()) == [0, 0, 1]
    assert (store.local_copy(store.complete("quantize", "k9")) / "model.bin").read_bytes() == b"once" * 1000


def test_a_failed_computation_lets_the_waiting_run_compute(store, request, tmp_path, monkeypatch):
    from olivepress.store import s3_lease

    monkeypatch.setattr(s3_lease, "POLL_SECONDS", 0.1)
    first_started, outcomes = threading.Event(), {}

    def crash(out: Path) -> None:
        first_started.set()
        time.sleep(0.5)
        raise RuntimeError("out of memory")

    def crashing_run() -> None:
        try:
            open_same_store(request, tmp_path, 0).produce("finetune", "k10", crash)
        except RuntimeError as error:
            outcomes["first"] = error

    thread = threading.Thread(target=crashing_run)
    thread.start()
    assert first_started.wait(10)
    second = open_same_store(request, tmp_path, 1)
    manifest = second.produce("finetune", "k10", make_output)  # waits for the lock, then computes
    thread.join()
    assert isinstance(outcomes["first"], RuntimeError)
    assert second.computed == {("finetune", "k10")}
    assert store.complete("finetune", "k10") == manifest


def _produce_in_process(root: str, cache: str, log: str, queue) -> None:
    def compute(out: Path) -> None:
        with open(log, "a") as handle:
            handle.write("computed\n")
        time.sleep(1.0)
        make_output(out, text="process")

    store = ArtifactStore(root, Path(cache), retry=FAST_RETRY)
    queue.put(store.produce("optimize", "k11", compute).publish_id)


def test_concurrent_processes_on_a_local_store_compute_once(tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    log = tmp_path / "computations.log"
    processes = [
        context.Process(
            target=_produce_in_process,
            args=(str(tmp_path / "store"), str(tmp_path / f"cache{i}"), str(log), queue),
        )
        for i in range(3)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    assert len({queue.get(timeout=5) for _ in processes}) == 1, "all three got the one published output"
    assert log.read_text() == "computed\n"


def test_the_work_folder_is_the_keys_and_the_stores_and_goes_once_published(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"), tmp_path / "cache", retry=FAST_RETRY)
    other = ArtifactStore(str(tmp_path / "other-store"), tmp_path / "cache", retry=FAST_RETRY)
    work = store.work_dir("finetune", "k12")
    assert work == store.work_dir("finetune", "k12"), "a re-run finds a crashed run's checkpoints"
    assert work != other.work_dir("finetune", "k12"), "two stores sharing a cache folder never share it"
    assert work.parent == tmp_path / "cache" / "work" and work.name.startswith("finetune-k12")

    def compute(out: Path) -> None:
        (work / "checkpoints").mkdir(parents=True)
        make_output(out)

    store.produce("finetune", "k12", compute)
    assert not work.exists()


def test_an_s3_lease_waits_for_a_live_holder_and_takes_over_a_dead_ones(s3_server, tmp_path):
    import json

    from olivepress.store.s3_lease import S3Lease

    store = s3_store(s3_server, tmp_path / "cache", bucket="leases")
    path = store._path("quantize", "k13.lease")
    # s3fs's first request opens its session (over 1 s on a busy CI machine, past a short lease's expiry,
    # which the holder stamps before sending): open it before timing anything
    store.fs.ls("leases")
    holder = S3Lease(store.fs, path, retry=FAST_RETRY, seconds=2.0, poll_seconds=0.1)
    assert holder.acquire()
    waiter = S3Lease(store.fs, path, retry=FAST_RETRY, seconds=2.0, poll_seconds=0.1)
    got_it = threading.Event()
    thread = threading.Thread(target=lambda: waiter.acquire() and got_it.set())
    thread.start()
    time.sleep(5.0)  # past two of the lease's 2 s: the holder renews it, so the waiter must not take it
    assert not got_it.is_set()
    holder.release()
    thread.join(10)
    assert got_it.is_set(), "released, the lease goes to the waiter"
    waiter.release()
    assert not store.fs.exists(path), "a released lease is gone"

    dead = {"owner": "a-run-that-was-killed", "expires": time.time() - 1, "seconds": 1.0}
    store.fs.pipe_file(path, json.dumps(dead).encode())
    started = time.monotonic()
    with S3Lease(store.fs, path, retry=FAST_RETRY, poll_seconds=0.1) as taker:
        assert taker.held and time.monotonic() - started < 5
        assert json.loads(store.fs.cat_file(path))["owner"] == taker.owner


def test_an_s3_lease_whose_write_answer_was_lost_is_read_back_as_held(s3_server, tmp_path):
    from olivepress.store.s3_lease import S3Lease

    store = s3_store(s3_server, tmp_path / "cache", bucket="lost-answer")
    lease = S3Lease(store.fs, store._path("evaluate", "k14.lease"), retry=FAST_RETRY, poll_seconds=0.1)
    real_put = lease._put
    calls = []

    def put_then_lose_the_answer(**condition):
        calls.append(condition)
        etag = real_put(**condition)
        if len(calls) == 1:
            raise ConnectionError("connection reset after the write")
        return etag

    lease._put = put_then_lose_the_answer
    assert lease.acquire()
    assert len(calls) == 2, "the retry met its own lease (412) and read it back"
    lease.release()


def test_an_s3_server_without_conditional_writes_gets_a_warning_and_no_lease(s3_server, tmp_path, caplog):
    from botocore.exceptions import ClientError

    from olivepress.store.s3_lease import S3Lease

    store = s3_store(s3_server, tmp_path / "cache", bucket="no-conditions")
    lease = S3Lease(store.fs, store._path("quantize", "k15.lease"), retry=FAST_RETRY)
    calls = []

    def refuse(**condition):
        calls.append(condition)
        answer = {"Error": {"Code": "NotImplemented"}, "ResponseMetadata": {"HTTPStatusCode": 501}}
        raise OSError("A header you provided implies functionality that is not implemented") from ClientError(
            answer, "PutObject"
        )

    lease._put = refuse
    assert lease.acquire() is False
    assert len(calls) == 1, "a 501 is not retried"
    assert "does not support conditional writes" in caplog.text
    lease.release()  # nothing held: nothing to do


# --- a failed publish: the kept output is published by the next attempt, never computed again ----------


def failing_uploads(store: ArtifactStore, monkeypatch, failures: int) -> dict[str, int]:
    """Make the store's next ``failures`` uploads fail as an unreachable S3 does; counts what is left."""
    upload, left = store._upload, {"failures": failures}

    def flaky(local: Path, remote: str) -> None:
        if left["failures"]:
            left["failures"] -= 1
            raise ConnectionError("S3 is down")
        upload(local, remote)

    monkeypatch.setattr(store, "_upload", flaky)
    return left


def test_a_failed_publish_keeps_the_output_and_the_next_attempt_publishes_it(store, monkeypatch):
    store.retry = RetryPolicy(attempts=2, base_delay_s=0.01, jitter=0.0)
    calls = []

    def compute(out: Path) -> None:
        calls.append(out)
        make_output(out)

    failing_uploads(store, monkeypatch, failures=2)  # both of the store's tries of the first upload
    with pytest.raises(ConnectionError):
        store.produce("quantize", "k20", compute)
    assert store.complete("quantize", "k20") is None
    assert (store.work_dir("quantize", "k20") / "output" / "model.bin").is_file(), "the output is kept"

    manifest = store.produce("quantize", "k20", compute)
    assert len(calls) == 1, "the second attempt published the kept output; it did not compute"
    assert store.complete("quantize", "k20") == manifest
    assert (store.local_copy(manifest) / "model.bin").read_bytes() == b"weights" * 1000
    assert store.computed == {("quantize", "k20")}
    assert not store.work_dir("quantize", "k20").exists(), "the kept output goes once published"


def test_a_kept_output_that_changed_since_is_computed_again(tmp_path, monkeypatch):
    store = ArtifactStore(
        str(tmp_path / "store"), tmp_path / "cache", retry=RetryPolicy(attempts=1, base_delay_s=0.01)
    )
    calls = []

    def compute(out: Path) -> None:
        calls.append(out)
        make_output(out, text=f"run{len(calls)}")

    failing_uploads(store, monkeypatch, failures=1)
    with pytest.raises(ConnectionError):
        store.produce("finetune", "k21", compute)
    (store.work_dir("finetune", "k21") / "output" / "model.bin").write_bytes(b"truncated")
    manifest = store.produce("finetune", "k21", compute)
    assert len(calls) == 2
    assert (store.local_copy(manifest) / "model.bin").read_bytes() == b"run2" * 1000


def test_a_failed_computation_keeps_nothing_to_publish(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"), tmp_path / "cache", retry=FAST_RETRY)

    def crash(out: Path) -> None:
        make_output(out)
        raise RuntimeError("killed mid-step")

    with pytest.raises(RuntimeError):
        store.produce("optimize", "k22", crash)
    assert store.kept_output("optimize", "k22") is None
    assert not (store.work_dir("optimize", "k22") / "output").exists()
