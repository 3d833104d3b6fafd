"""`olivepress chat` on the layouts a run and the registry write: a folder of targets (a run folder's onnx/,
an entry's model/), the run folder or entry itself, and named adapters in adapters/<target>/ beside them.
Exports from before targets (one folder with genai_config.json) are tests/test_genai.py's."""

import io
import shutil
from pathlib import Path

import pytest

from olivepress import chat as chat_module
from olivepress.chat import Export, chat, chat_session, machine_runs_cuda, resolve_adapter, resolve_target
from olivepress.errors import UserError
from olivepress.export.folder import export_onnx
from olivepress.flows.cli import main
from olivepress.genai import ADAPTER_FILE, GENAI_CONFIG
from tests.conftest import make_lora_adapter


@pytest.fixture(scope="module")
def export_dir(tiny_int4_dir, tmp_path_factory) -> Path:
    """One cpu export with its adapter, as optimize writes it."""
    adapter = make_lora_adapter(tiny_int4_dir, tmp_path_factory.mktemp("lora"), target_modules=["q_proj"])
    return export_onnx(tiny_int4_dir, adapter, tmp_path_factory.mktemp("export")).model_dir


def fake_export(folder: Path) -> Path:
    """A folder that looks like an export to the resolver (it is never loaded)."""
    folder.mkdir(parents=True)
    (folder / GENAI_CONFIG).write_text("{}")
    return folder


def run_folder(root: Path, export_dir: Path, *, cuda: bool = False) -> Path:
    """A run folder's layout: onnx/cpu a link to the export, adapters/cpu/travel.onnx_adapter; with ``cuda``
    an onnx/cuda export too (a stand-in: this machine never loads it)."""
    (root / "onnx").mkdir(parents=True)
    (root / "onnx" / "cpu").symlink_to(export_dir, target_is_directory=True)
    if cuda:
        fake_export(root / "onnx" / "cuda")
    (root / "adapters" / "cpu").mkdir(parents=True)
    shutil.copy(export_dir / ADAPTER_FILE, root / "adapters" / "cpu" / "travel.onnx_adapter")
    return root


cpu_machine = pytest.mark.skipif(machine_runs_cuda(), reason="this machine would run the cuda export")


@cpu_machine
def test_chat_runs_the_cpu_target_of_a_folder_of_targets_and_says_so(export_dir, tmp_path):
    run = run_folder(tmp_path / "run", export_dir, cuda=True)
    out = io.StringIO()
    stats = chat(run / "onnx", "Where should I go?", max_new_tokens=4, out=out)
    assert stats.new_tokens > 0
    first, *_ = out.getvalue().splitlines()
    assert first == f"[target cpu: {run / 'onnx' / 'cpu'}]"
    assert out.getvalue().rstrip().endswith(f"adapter {ADAPTER_FILE}]"), "auto: the export's own adapter"


def test_the_target_that_fits_the_machine_is_the_default(tmp_path, monkeypatch):
    targets = tmp_path / "onnx"
    fake_export(targets / "cpu")
    fake_export(targets / "cuda")
    monkeypatch.setattr(chat_module, "machine_runs_cuda", lambda: False)
    assert resolve_target(targets) == Export(targets / "cpu", "cpu")
    monkeypatch.setattr(chat_module, "machine_runs_cuda", lambda: True)
    assert resolve_target(targets) == Export(targets / "cuda", "cuda")
    assert resolve_target(targets, "cpu") == Export(targets / "cpu", "cpu"), "--target chooses"


def test_a_run_folder_or_registry_entry_leads_to_its_folder_of_targets(tmp_path, monkeypatch):
    monkeypatch.setattr(chat_module, "machine_runs_cuda", lambda: False)
    fake_export(tmp_path / "run" / "onnx" / "cpu")
    fake_export(tmp_path / "entry" / "model" / "cpu")
    assert resolve_target(tmp_path / "run") == Export(tmp_path / "run" / "onnx" / "cpu", "cpu")
    assert resolve_target(tmp_path / "entry") == Export(tmp_path / "entry" / "model" / "cpu", "cpu")
    # an entry registered before targets: model/ is the export itself
    fake_export(tmp_path / "old" / "model")
    assert resolve_target(tmp_path / "old") == Export(tmp_path / "old" / "model", None)
    # one target's export named directly: its folder's name is its target
    assert resolve_target(tmp_path / "run" / "onnx" / "cpu") == Export(
        tmp_path / "run" / "onnx" / "cpu", "cpu"
    )
    with pytest.raises(UserError, match="is the cpu export; --target cuda"):
        resolve_target(tmp_path / "run" / "onnx" / "cpu", "cuda")
    with pytest.raises(UserError, match="nor a folder of targets"):
        resolve_target(tmp_path)


def test_a_missing_target_is_a_user_error_naming_the_targets_there(export_dir, tmp_path, capsys):
    run = run_folder(tmp_path / "run", export_dir)
    assert main(["chat", str(run / "onnx"), "--target", "cuda", "Hi"]) == 1
    error = capsys.readouterr().err
    assert f"olivepress: no cuda export in {run / 'onnx'}; the targets there: cpu" in error
    assert "Traceback" not in error


def test_cuda_alone_on_a_machine_without_cuda_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(chat_module, "machine_runs_cuda", lambda: False)
    fake_export(tmp_path / "onnx" / "cuda")
    with pytest.raises(
        UserError, match=r"no cpu export .*cannot run the cuda export.*the targets there: cuda"
    ):
        resolve_target(tmp_path / "onnx")


def test_a_named_adapter_is_found_in_adapters_of_its_target(export_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(chat_module, "machine_runs_cuda", lambda: False)
    run = run_folder(tmp_path / "run", export_dir, cuda=True)
    (run / "adapters" / "cuda").mkdir()
    (run / "adapters" / "cuda" / "hiking.onnx_adapter").write_bytes(b"not for cpu")
    for named in (run, run / "onnx", run / "onnx" / "cpu"):
        export = resolve_target(named)
        assert resolve_adapter(export, "travel") == run / "adapters" / "cpu" / "travel.onnx_adapter"
        with pytest.raises(
            UserError, match=r"no adapter named 'hiking' in .*adapters/cpu \(named adapters: travel\)"
        ):
            resolve_adapter(export, "hiking")
    # an entry's adapters/<target>/ beside its model/
    entry = tmp_path / "entry"
    fake_export(entry / "model" / "cpu")
    (entry / "adapters" / "cpu").mkdir(parents=True)
    (entry / "adapters" / "cpu" / "travel.onnx_adapter").write_bytes(b"x")
    assert (
        resolve_adapter(resolve_target(entry), "travel") == entry / "adapters" / "cpu" / "travel.onnx_adapter"
    )


@cpu_machine
def test_chat_and_a_session_load_a_named_adapter_of_the_target(export_dir, tmp_path):
    run = run_folder(tmp_path / "run", export_dir)
    out = io.StringIO()
    chat(run / "onnx", "Where should I go?", adapter="travel", max_new_tokens=4, out=out, target="cpu")
    assert out.getvalue().rstrip().endswith("adapter travel.onnx_adapter]")
    out = io.StringIO()
    answers = chat_session(run, ["/adapter off", "Hi", "/adapter travel", "Hi"], max_new_tokens=4, out=out)
    text = out.getvalue()
    assert len(answers) == 2
    assert text.startswith(f"[target cpu: {run / 'onnx' / 'cpu'}]\n")
    assert "[adapter travel.onnx_adapter]" in text and text.rstrip().endswith("adapter travel.onnx_adapter]")
