"""Export the int4 checkpoint and its LoRA adapter to an ONNX Runtime GenAI folder.

Route: ONNX Runtime GenAI's model builder reads the checkpoint's ``olive`` int4 layout and only reshapes it
into ``MatMulNBits`` initializers, so the ONNX model runs exactly the integers the quantize step chose. The
builder's own LoRA path (``adapter_path``) fails on such a checkpoint: it wraps the loaded model with PEFT,
and the quantized loader's model is not a torch module ('OliveModel' object has no attribute
'named_modules'); on a float model its int4 pass also rounds the LoRA matrices. So the LoRA branches are
added to the built graph here (:mod:`olivepress.export.lora`: float ``MatMul``s, one branch per group of
linears that read the same activation, whose matrices are graph inputs with empty defaults): with no
adapter active the branches add zeros; with one active, ONNX Runtime GenAI feeds the matrices from
``adapter_weights.onnx_adapter``. On CUDA, when olivepress's operators can be built (``optimize.lora_kernel``;
:mod:`olivepress.export.kernel`), each adapted int4 node and its branch is one ``olivepress.MatMulNBitsLora``
node (``olivepress.LoraAdd`` after the int4 nodes that kernel cannot take): their library ships in the
folder and genai_config.json names it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from olivepress import progress
from olivepress.errors import UserError
from olivepress.export.builder import EXECUTION_PROVIDERS, build_int4_model
from olivepress.export.lora import add_lora_branches, graph_and_branches, read_lora
from olivepress.genai import ADAPTER_FILE, MERGED_MODEL_FILE, MODEL_FILE

if TYPE_CHECKING:
    from olivepress.config import LmHead, Target

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportResult:
    model_dir: Path
    adapter_file: Path | None
    lora_modules: int  # linears that got a LoRA branch
    seconds: float
    model_bytes: int  # model.onnx and its external data
    adapter_bytes: int


def export_onnx(
    checkpoint_dir: Path,
    adapter_dir: Path | None,
    out_dir: Path,
    target: Target = "cpu",
    accuracy_level: int | None = None,
    cuda_graph: bool = False,
    trust_remote_code: bool = False,
    lora_kernel: Literal["auto", "on", "off"] = "off",
    lm_head: LmHead = "int8",
    merged_adapter_bits: Literal[8, 32] = 8,
) -> ExportResult:
    """Write genai_config.json, the int4 model, tokenizer files and (given an adapter) the adapter file.

    ``target`` is the runtime the model is built for (cpu or cuda); building needs no GPU.
    ``accuracy_level`` is MatMulNBits' compute type; None keeps the builder's default for the target: on
    CPU 4, int8 activations, the fastest; 1 computes in float32, the dequantized PyTorch model's math.
    ``cuda_graph`` (cuda only) has the runtime capture decoding in CUDA graphs. ``lora_kernel`` (cuda only)
    is ``optimize.lora_kernel``: whether the branches are olivepress's CUDA operators. ``lm_head`` (cpu only;
    cuda keeps it float) is ``optimize.lm_head``, ``merged_adapter_bits`` (cpu only) is
    ``optimize.merged_adapter_bits``.
    """
    if target not in EXECUTION_PROVIDERS:
        raise UserError(f"target must be one of {sorted(EXECUTION_PROVIDERS)}, not {target!r}")
    started = time.perf_counter()
    lora = read_lora(adapter_dir) if adapter_dir is not None else {}
    progress.update("optimize", "exporting the int4 model")
    build_int4_model(
        checkpoint_dir,
        out_dir,
        EXECUTION_PROVIDERS[target],
        accuracy_level=accuracy_level,
        cuda_graph=cuda_graph and target == "cuda",
        trust_remote_code=trust_remote_code,
        lm_head=lm_head if target == "cpu" else "float",
    )
    adapter_file = None
    if lora:
        model, branches = graph_and_branches(out_dir, checkpoint_dir, lora)
        adapter_file = out_dir / ADAPTER_FILE
        library = lora_add_library(out_dir, lora_kernel) if target == "cuda" else None
        progress.update("optimize", "adding the LoRA adapter")
        add_lora_branches(model, branches, out_dir, lora_add=library is not None)
        if target == "cpu" and merged_adapter_bits == 8:
            from olivepress.export.merged_bits import quantize_merged_branches

            quantize_merged_branches(out_dir / MERGED_MODEL_FILE)
        if library is not None:
            from olivepress.export.kernel import register_in_genai_config

            register_in_genai_config(out_dir, library)
    model_files = [out_dir / MODEL_FILE, *out_dir.glob(f"{MODEL_FILE}.data")]
    return ExportResult(
        model_dir=out_dir,
        adapter_file=adapter_file,
        lora_modules=len(lora),
        seconds=time.perf_counter() - started,
        model_bytes=sum(path.stat().st_size for path in model_files),
        adapter_bytes=adapter_file.stat().st_size if adapter_file else 0,
    )


def lora_add_library(out_dir: Path, lora_kernel: Literal["auto", "on", "off"]) -> Path | None:
    """The library of olivepress's CUDA operators (MatMulNBitsLora, LoraAdd) built into ``out_dir``, or None
    for ONNX Runtime's own operators: with ``lora_kernel`` off, or auto where nvcc or ONNX Runtime's header
    is missing (a warning says which)."""
    if lora_kernel == "off":
        return None
    from olivepress.export.kernel import build_lora_add

    progress.update("optimize", "building olivepress's CUDA operators")
    try:
        return build_lora_add(out_dir)
    except UserError as missing:
        if lora_kernel == "on":
            raise
        log.warning("LoRA branches use three ONNX Runtime kernels each, not LoraAdd: %s", missing)
        return None
