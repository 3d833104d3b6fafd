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
