"""Building and naming the LoraAdd library, the parts that need no GPU (tests/gpu/test_lora_kernel.py runs
it)."""

import json

import pytest

from olivepress.errors import UserError
from olivepress.lora_kernel import build_lora_add, register_in_genai_config


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
