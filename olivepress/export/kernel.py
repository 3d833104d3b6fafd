"""olivepress's CUDA operators (``kernels/lora_add.cu``), built on the GPU machine: a LoRA branch costs (almost)
no kernel of its own.

Why: on a GPU at batch 1 every dependent kernel costs microseconds however little it reads, and the
export's branch (MatMul by A, MatMul by B, Add) is three of them, ~12 µs a branch
(``benchmarks/lora_branch_forms.py``). ONNX Runtime has no operator that does it in fewer, so this library
registers two for the CUDA execution provider: ``olivepress.MatMulNBitsLora``, the int4 product and its
branch in one kernel (~3 µs a branch over the int4 product alone, whose own speed matches onnxruntime's
MatMulNBits), which the export puts in place of every adapted int4 node it can take, and
``olivepress.LoraAdd``, the branch alone in one kernel (~7 µs), for the others.

Building needs ``nvcc`` and ONNX Runtime's C API header ``onnxruntime_c_api.h`` (it ships with the release
archives, not with the Python wheels): ``ort_include`` or ``$OLIVEPRESS_ORT_INCLUDE`` names its folder. The
library is built once per source and header and machine (:func:`kernel_cache_dir`), and copied into the
model folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from importlib.resources import files
from pathlib import Path

from olivepress.errors import UserError

SOURCE = Path(str(files("olivepress.export") / "kernels" / "lora_add.cu"))
LORA_ADD_DOMAIN = "olivepress"  # the operator's ONNX domain: olivepress.LoraAdd
# genai_config.json's session option naming the library, which ONNX Runtime GenAI resolves to its real path
# and loads only from inside the model folder (or the working directory)
CUSTOM_OPS_LIBRARY = "custom_ops_library"
# Ampere and Hopper machine code, and PTX the driver can compile for newer GPUs
ARCHITECTURES = [
    "-gencode",
    "arch=compute_80,code=sm_80",
    "-gencode",
    "arch=compute_90,code=[sm_90,compute_90]",
]


def ort_include_dir(ort_include: Path | None = None) -> Path:
    named = os.environ.get("OLIVEPRESS_ORT_INCLUDE")
    folder = ort_include or (Path(named) if named else None)
    if folder is None or not (folder / "onnxruntime_c_api.h").is_file():
        raise UserError(
            "building the LoraAdd operator needs ONNX Runtime's C API header: set OLIVEPRESS_ORT_INCLUDE to the "
            "include/ folder of an onnxruntime release archive (onnxruntime_c_api.h)"
        )
    return folder


def build_lora_add(out_dir: Path, ort_include: Path | None = None, source: Path | None = None) -> Path:
    """``out_dir/liblora_add-<digest>.so``, compiled with nvcc unless already there. ``source`` replaces the
    packaged ``kernels/lora_add.cu`` (a benchmark times an earlier version beside it); the digest covers the
    source's bytes, so versions do not overwrite each other.

    ``$OLIVEPRESS_LORA_ADD_LIBRARY`` names a library built from the packaged source beforehand (the GPU
    image builds one where nvcc is, and runs without it): copied into ``out_dir`` instead."""
    prebuilt = os.environ.get("OLIVEPRESS_LORA_ADD_LIBRARY")
    if prebuilt and source is None:
        built = Path(prebuilt).resolve()  # the image's link names the digest-named file
        if not built.is_file():
            raise UserError(f"OLIVEPRESS_LORA_ADD_LIBRARY names {prebuilt}, which is no file")
        out_dir.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy2(built, out_dir / built.name))
    include = ort_include_dir(ort_include)
    source = source or SOURCE
    digest = hashlib.sha256(source.read_bytes() + (include / "onnxruntime_c_api.h").read_bytes()).hexdigest()[
        :16
    ]
    name = f"liblora_add-{digest}.so"
    library = out_dir / name
    if library.is_file():
        return library
    out_dir.mkdir(parents=True, exist_ok=True)
    cached = kernel_cache_dir() / name
    if not cached.is_file():
        compile_library(source, include, cached)
    return Path(shutil.copy2(cached, library))


def kernel_cache_dir() -> Path:
    """Where built libraries are kept between runs, by digest (``$XDG_CACHE_HOME/olivepress/kernels``):
    nvcc takes ~8-15 s, which every export on the machine after the first skips."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "olivepress" / "kernels"


def compile_library(source: Path, include: Path, target: Path) -> None:
    """nvcc ``source`` into ``target``, through a partial file (never taken as built), one architecture a
    thread."""
    nvcc = shutil.which("nvcc") or str(Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc")
    if not Path(nvcc).is_file():
        raise UserError(
            "building the LoraAdd operator needs nvcc (the CUDA toolkit) on PATH or in $CUDA_HOME"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    command = [nvcc, "--threads", "0", "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", *ARCHITECTURES]
    command += ["-I", str(include), str(source), "-o", str(partial)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"nvcc could not build {source.name}:\n{done.stderr[-3000:]}")
    partial.replace(target)


def register_in_genai_config(model_dir: Path, library: Path) -> None:
    """Name ``library``, a file of ``model_dir``, in its genai_config.json, so that every session ONNX
    Runtime GenAI opens on the model registers LoraAdd first. The name is relative: the folder can move.
    Written in place: the model folder is the step's own until it is published."""
    from olivepress.genai import edit_genai_config

    name = library.relative_to(model_dir).as_posix()

    def name_library(config: dict) -> None:
        config["model"]["decoder"]["session_options"][CUSTOM_OPS_LIBRARY] = name

    edit_genai_config(model_dir, name_library)
