"""Building and naming the LoraAdd library, the parts that need no GPU (tests/gpu/test_lora_kernel.py runs
it)."""

import json

import pytest

from olivepress.errors import UserError
from olivepress.export.kernel import build_lora_add, register_in_genai_config


def test_building_without_the_header_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("OLIVEPRESS_ORT_INCLUDE", raising=False)
    with pytest.raises(UserError, match="OLIVEPRESS_ORT_INCLUDE"):
        build_lora_add(tmp_path)
    (tmp_path / "include").mkdir()
    monkeypatch.setenv("OLIVEPRESS_ORT_INCLUDE", str(tmp_path / "include"))  # a folder without the header
    with pytest.raises(UserError, match=r"onnxruntime_c_api\.h"):
        build_lora_add(tmp_path / "out")


def test_building_without_nvcc_says_so(tmp_path, monkeypatch):
    (tmp_path / "onnxruntime_c_api.h").write_text("")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "no-cuda"))
    with pytest.raises(UserError, match="nvcc"):
        build_lora_add(tmp_path / "out", ort_include=tmp_path)


def test_the_genai_config_names_the_library_relative_to_the_model(tmp_path):
    (tmp_path / "genai_config.json").write_text(
        json.dumps({"model": {"decoder": {"session_options": {"provider_options": [{"cuda": {}}]}}}})
    )
    library = tmp_path / "liblora_add-0123.so"
    library.write_bytes(b"")
    register_in_genai_config(tmp_path, library)
    options = json.loads((tmp_path / "genai_config.json").read_text())["model"]["decoder"]["session_options"]
    assert options == {"provider_options": [{"cuda": {}}], "custom_ops_library": "liblora_add-0123.so"}


def test_a_prebuilt_library_is_copied_into_the_model_folder(tmp_path, monkeypatch):
    """The GPU image builds LoraAdd where nvcc is and runs where it is not."""
    prebuilt = tmp_path / "liblora_add-0123.so"
    prebuilt.write_bytes(b"\x7fELF")
    monkeypatch.setenv("OLIVEPRESS_LORA_ADD_LIBRARY", str(prebuilt))
    monkeypatch.delenv("OLIVEPRESS_ORT_INCLUDE", raising=False)
    library = build_lora_add(tmp_path / "model")
    assert library == tmp_path / "model" / prebuilt.name and library.read_bytes() == b"\x7fELF"
    monkeypatch.setenv("OLIVEPRESS_LORA_ADD_LIBRARY", str(tmp_path / "missing.so"))
    with pytest.raises(UserError, match="OLIVEPRESS_LORA_ADD_LIBRARY"):
        build_lora_add(tmp_path / "other")


def test_a_library_is_compiled_once_per_machine(tmp_path, monkeypatch):
    """Two exports of the same source and header: nvcc runs for the first only (the build is kept in the
    kernel cache by digest); each model folder gets its own copy. A failed build leaves nothing to take."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    nvcc = bin_dir / "nvcc"  # writes its -o argument, counts its calls
    nvcc.write_text(
        '#!/bin/sh\necho run >> "$CALLS"\nwhile [ "$1" != "-o" ]; do shift; done\n'
        '[ -n "$FAIL" ] && exit 1\necho built > "$2"\n'
    )
    nvcc.chmod(0o755)
    (tmp_path / "onnxruntime_c_api.h").write_text("// header")
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("CALLS", str(calls))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("OLIVEPRESS_LORA_ADD_LIBRARY", raising=False)

    first = build_lora_add(tmp_path / "model-1", ort_include=tmp_path)
    second = build_lora_add(tmp_path / "model-2", ort_include=tmp_path)
    assert first.name == second.name and first.read_text() == second.read_text() == "built\n"
    assert first.parent.name == "model-1" and second.parent.name == "model-2"
    assert calls.read_text().count("run") == 1

    source = tmp_path / "changed.cu"
    source.write_text("// another kernel")
    monkeypatch.setenv("FAIL", "1")
    with pytest.raises(RuntimeError, match="nvcc could not build"):
        build_lora_add(tmp_path / "model-3", ort_include=tmp_path, source=source)
    cached = list((tmp_path / "cache" / "olivepress" / "kernels").iterdir())
    assert [path.name for path in cached] == [first.name]  # no partial file left, nothing half-built
    assert not (tmp_path / "model-3").exists() or not list((tmp_path / "model-3").glob("*.so"))
