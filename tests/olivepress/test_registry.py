import json
import multiprocessing
import stat
from pathlib import Path

import pytest

from olivepress import registry
from olivepress.registry import LocalRegistry, content_sha256, default_model_name


def make_sources(root: Path, text: str) -> dict[str, Path]:
    model, report = root / "model", root / "report"
    model.mkdir(parents=True)
    report.mkdir()
    (model / "model.onnx").write_text(text)
    (model / "adapter_weights.onnx_adapter").write_bytes(b"\0\1" + text.encode())
    (report / "report.md").write_text(f"# report of {text}")
    return {"model": model, "report": report}


def lineage_of(sources: dict[str, Path]) -> dict:
    return {"content_sha256": content_sha256(sources), "data": {"sha256": "abc"}}


def test_versions_count_up_and_same_content_is_not_registered_twice(tmp_path):
    local = LocalRegistry(tmp_path / "registry")
    first = make_sources(tmp_path / "a", "first")
    second = make_sources(tmp_path / "b", "second")

    one = local.register("m", first, lineage_of(first))
    two = local.register("m", second, lineage_of(second))
    again = local.register("m", first, lineage_of(first))

    assert (one.version, one.reused) == ("1", False)
    assert (two.version, two.reused) == ("2", False)
    assert (again.version, again.reused) == ("1", True)
    assert [e.version for e in local.entries("m")] == ["1", "2"]
    entry = Path(one.uri)
    assert (entry / "model" / "model.onnx").read_text() == "first"
    assert (
        json.loads((entry / "lineage.json").read_text())["content_sha256"]
        == lineage_of(first)["content_sha256"]
    )


def test_registered_entries_are_read_only(tmp_path):
    local = LocalRegistry(tmp_path / "registry")
    sources = make_sources(tmp_path / "a", "x")
    entry = Path(local.register("m", sources, lineage_of(sources)).uri)
    # mode bits, not a write attempt: root (CI's user) may write to read-only files anyway
    writable = [p for p in [entry, *entry.rglob("*")] if stat.S_IMODE(p.stat().st_mode) & 0o222]
    assert writable == []


def test_a_registration_that_fails_half_way_leaves_no_entry(tmp_path, monkeypatch):
    local = LocalRegistry(tmp_path / "registry")
    sources = make_sources(tmp_path / "a", "x")
    real_copytree = registry.shutil.copytree

    def copy_then_fail(source, target, **kwargs):
        real_copytree(source, target, **kwargs)
        if Path(source).name == "report":
            raise OSError("disk full")

    monkeypatch.setattr(registry.shutil, "copytree", copy_then_fail)
    with pytest.raises(OSError, match="disk full"):
        local.register("m", sources, lineage_of(sources))
    assert local.entries() == []
    assert not list((tmp_path / "registry" / "m").glob(".staging-*")), "no staging folder is left"


def test_a_folder_without_lineage_is_not_an_entry(tmp_path):
    (tmp_path / "registry" / "m" / "1" / "model").mkdir(parents=True)
    assert LocalRegistry(tmp_path / "registry").entries() == []


def _register_in_process(root: str, source_root: str, text: str, queue) -> None:
    sources = make_sources(Path(source_root), text)
    queue.put(LocalRegistry(Path(root)).register("m", sources, lineage_of(sources)).version)


@pytest.mark.parametrize("same_content", [False, True])
def test_concurrent_registrations_never_share_a_version(tmp_path, same_content):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    processes = [
        context.Process(
            target=_register_in_process,
            args=(
                str(tmp_path / "registry"),
                str(tmp_path / f"src{i}"),
                "same" if same_content else f"c{i}",
                queue,
            ),
        )
        for i in range(4)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    versions = sorted(queue.get(timeout=5) for _ in processes)
    entries = LocalRegistry(tmp_path / "registry").entries("m")
    if same_content:
        assert versions == ["1"] * 4
        assert len(entries) == 1
    else:
        assert versions == ["1", "2", "3", "4"]
        assert len({e.lineage["content_sha256"] for e in entries}) == 4


def test_content_hash_changes_with_one_byte_and_ignores_location(tmp_path):
    a = make_sources(tmp_path / "a", "same")
    b = make_sources(tmp_path / "b", "same")
    assert content_sha256(a) == content_sha256(b)
    (b["model"] / "model.onnx").write_text("samf")
    assert content_sha256(a) != content_sha256(b)


def test_default_model_name_is_a_safe_slug():
    assert default_model_name(Path("/m/SmolLM2-135M-Instruct-v2")) == "smollm2-135m-instruct-v2-olivepress"
    assert default_model_name(Path("/m/My Model (copy)")) == "my-model-copy-olivepress"
