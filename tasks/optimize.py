"""Export the int4 checkpoint and its LoRA adapter to an ONNX Runtime GenAI folder.

Route: ONNX Runtime GenAI's model builder reads the checkpoint's ``olive`` int4 layout and only reshapes it
into ``MatMulNBits`` initializers, so the ONNX model runs exactly the integers the quantize step chose. The
builder's own LoRA path (``adapter_path``) fails on such a checkpoint: it wraps the loaded model with PEFT,
and the quantized loader's model is not a torch module ('OliveModel' object has no attribute
'named_modules'); on a float model its int4 pass also rounds the LoRA matrices (earlier attempts found
those int4 LoRA nodes fail when no adapter is active). So the LoRA branches are added to the built graph here, as float
``MatMul``s whose A and B matrices are graph inputs with empty default values: with no adapter active
ONNX Runtime uses the empty defaults and the branch adds zeros; with one active, ONNX Runtime GenAI feeds
the matrices from ``adapter_weights.onnx_adapter``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from olivepress.errors import UserError
from olivepress.genai import ADAPTER_FILE
from olivepress.prompts import save_prompt_format
from olivepress.steps import step_task
from olivepress.store import ArtifactStore, Manifest

if TYPE_CHECKING:
    import numpy as np

    from olivepress.config import RunConfig

MODEL_FILE = "model.onnx"
EXECUTION_PROVIDERS = {"cpu": "cpu", "gpu": "cuda"}
# Tied or not, the embedding and LM head stay float as in the checkpoint: rounding them would add an error
# the quantize step never measured. Every other MatMul comes from the checkpoint already in int4.
FLOAT_NODES = ("/lm_head/MatMul", "/model/embed_tokens/Gather")
# The PEFT module names that can carry a LoRA branch: the decoder linears the checkpoint holds in int4.
DECODER_LINEAR = re.compile(
    r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
)
BUILDER_BLOCKS = {"self_attn": "attn", "mlp": "mlp"}
QKV = ("q_proj", "k_proj", "v_proj")
# The rank dimension of every LoRA input: ONNX Runtime GenAI/Olive's name for it.
RANK_DIM = "lora_r"


@dataclass(frozen=True)
class LoraMatrices:
    """One linear's LoRA, as the ONNX branch multiplies it: ``x @ a @ b`` with PEFT's scaling folded into b."""

    a: np.ndarray  # (in_features, rank)
    b: np.ndarray  # (rank, out_features), already multiplied by lora_alpha / r (or its rsLoRA form)


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
    device: Literal["cpu", "gpu"] = "cpu",
    accuracy_level: int | None = None,
) -> ExportResult:
    """Write genai_config.json, the int4 model, tokenizer files and (given an adapter) the adapter file.

    ``accuracy_level`` is MatMulNBits' compute type; None keeps the builder's default for the device: on
    CPU 4, int8 activations, the fastest; 1 computes in float32, the dequantized PyTorch model's math.
    """
    if device not in EXECUTION_PROVIDERS:
        raise UserError(f"device must be one of {sorted(EXECUTION_PROVIDERS)}, not {device!r}")
    started = time.perf_counter()
    lora = read_lora(checkpoint_dir, adapter_dir) if adapter_dir is not None else {}
    split_qkv = any(module_name.endswith(QKV) for module_name in lora)
    build_int4_model(
        checkpoint_dir,
        out_dir,
        EXECUTION_PROVIDERS[device],
        split_qkv=split_qkv,
        accuracy_level=accuracy_level,
    )
    adapter_file = None
    if lora:
        io_dtype = add_lora_inputs(out_dir / MODEL_FILE, lora)
        adapter_file = out_dir / ADAPTER_FILE
        write_adapter(lora, adapter_file, io_dtype)
    model_files = [out_dir / MODEL_FILE, *out_dir.glob(f"{MODEL_FILE}.data")]
    return ExportResult(
        model_dir=out_dir,
        adapter_file=adapter_file,
        lora_modules=len(lora),
        seconds=time.perf_counter() - started,
        model_bytes=sum(path.stat().st_size for path in model_files),
        adapter_bytes=adapter_file.stat().st_size if adapter_file else 0,
    )


def build_int4_model(
    checkpoint_dir: Path,
    out_dir: Path,
    execution_provider: str,
    *,
    split_qkv: bool,
    accuracy_level: int | None,
) -> None:
    """Build the int4 model from the checkpoint's own integers.

    ``split_qkv`` keeps q/k/v as separate nodes (the builder fuses them by default) so each can get its own
    LoRA branch.
    """
    extra_options = [f"nodes_to_exclude={','.join(FLOAT_NODES)}"]
    if split_qkv:
        extra_options.append("fuse_qkv=false")
    if accuracy_level is not None:
        extra_options.append(f"accuracy_level={accuracy_level}")
    run_model_builder(checkpoint_dir, out_dir, "int4", execution_provider, extra_options)


def build_base_model(model_dir: Path, out_dir: Path, device: Literal["cpu", "gpu"] = "cpu") -> Path:
    """The unquantized model through the same builder and runtime (fp32 on CPU, fp16 on CUDA): the
    baseline the evaluate step compares loss, speed and size against, runtime for runtime."""
    precision = "fp16" if device == "gpu" else "fp32"
    run_model_builder(model_dir, out_dir, precision, EXECUTION_PROVIDERS[device], [])
    return out_dir


def run_model_builder(
    input_dir: Path, out_dir: Path, precision: str, execution_provider: str, extra_options: list[str]
) -> None:
    """Run ONNX Runtime GenAI's model builder with its chatter captured, shown only if it fails."""
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    chatter = io.StringIO()
    with (
        tempfile.TemporaryDirectory(prefix="olivepress-builder-") as cache_dir,
        quiet_logger("onnxruntime.quantization"),
        contextlib.redirect_stdout(chatter),
        contextlib.redirect_stderr(chatter),
    ):
        args = (None, str(input_dir), str(out_dir), precision, execution_provider, cache_dir)
        try:
            options = parse_extra_options(*args, extra_options)
            create_model(*args, **options)
        except Exception as error:
            raise RuntimeError(
                f"the ONNX Runtime GenAI model builder failed:\n{chatter.getvalue()[-4000:]}"
            ) from error


@contextlib.contextmanager
def quiet_logger(name: str):
    """The ORT quantizer logs a line per node at INFO; the builder turns that on."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def read_lora(checkpoint_dir: Path, adapter_dir: Path) -> dict[str, LoraMatrices]:
    """The adapter's matrices per linear, as PEFT applies them to the dequantized model it was trained on.

    Loading through PEFT (not parsing the safetensors) gets rank/alpha patterns, rsLoRA and module matching
    exactly as training saw them, and fails loudly if the adapter does not fit this checkpoint.
    """
    from peft import PeftConfig, PeftModel
    from peft.tuners.lora.layer import LoraLayer

    from olivepress.int4 import load_dequantized_model

    config = PeftConfig.from_pretrained(str(adapter_dir))
    unsupported = {
        "peft_type other than LORA": config.peft_type != "LORA",
        "use_dora": getattr(config, "use_dora", False),
        "trained biases (bias / lora_bias)": getattr(config, "bias", "none") != "none"
        or getattr(config, "lora_bias", False),
        "modules_to_save": bool(getattr(config, "modules_to_save", None)),
        "trainable_token_indices": bool(getattr(config, "trainable_token_indices", None)),
    }
    if problems := [name for name, present in unsupported.items() if present]:
        raise UserError(
            f"the adapter in {adapter_dir} uses {', '.join(problems)}; only plain LoRA is exported"
        )
    model = PeftModel.from_pretrained(load_dequantized_model(checkpoint_dir), str(adapter_dir))
    lora = {}
    for name, module in model.base_model.model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if not DECODER_LINEAR.match(name) or "default" not in module.lora_A:
            raise UserError(f"the adapter puts LoRA on {name}; only the decoder's linear layers are exported")
        a = module.lora_A["default"].weight.detach().float()
        b = module.lora_B["default"].weight.detach().float() * module.scaling["default"]
        lora[name] = LoraMatrices(a=a.T.contiguous().numpy(), b=b.T.contiguous().numpy())
    if not lora:
        raise UserError(f"the adapter in {adapter_dir} matches no layer of the checkpoint {checkpoint_dir}")
    return lora


def builder_node_prefix(module_name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``/model/layers.3/attn/q_proj``, the builder's node names."""
    layer, block, linear = DECODER_LINEAR.match(module_name).groups()
    return f"/model/layers.{layer}/{BUILDER_BLOCKS[block]}/{linear}"


def lora_input_names(module_name: str) -> tuple[str, str]:
    """Graph input names for A and B, spelled as Olive's ExtractAdapters spells them for builder graphs."""
    stem = builder_node_prefix(module_name)[1:].replace("/", ".")
    return f"{stem}.lora_A.weight", f"{stem}.lora_B.weight"


def add_lora_inputs(model_path: Path, lora: dict[str, LoraMatrices]) -> int:
    """Add ``y += (x @ A) @ B`` beside each adapted ``MatMulNBits``; returns the graph's float type.

    A and B are inputs with empty ([in, 0] and [0, out]) defaults, so a run with no adapter multiplies by
    nothing and adds zeros. The external weight data is not touched.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    nodes = {node.name: node for node in graph.node}
    initializers = {initializer.name: initializer for initializer in graph.initializer}
    consumers = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, index))

    io_dtype = None
    branches = {}
    for module_name, matrices in lora.items():
        prefix = builder_node_prefix(module_name)
        base = nodes.get(f"{prefix}/MatMulNBits")
        if base is None:
            raise RuntimeError(f"the exported graph has no int4 node {prefix}/MatMulNBits for {module_name}")
        io_dtype = initializers[base.input[2]].data_type  # MatMulNBits' scales share the activations' type
        numpy_dtype = helper.tensor_dtype_to_np_dtype(io_dtype)
        in_features, out_features = matrices.a.shape[0], matrices.b.shape[1]
        a_name, b_name = lora_input_names(module_name)
        for name, shape, empty in (
            (a_name, [in_features, RANK_DIM], (in_features, 0)),
            (b_name, [RANK_DIM, out_features], (0, out_features)),
        ):
            graph.input.append(helper.make_tensor_value_info(name, io_dtype, shape))
            graph.initializer.append(numpy_helper.from_array(np.zeros(empty, dtype=numpy_dtype), name))
        base_output = base.output[0]
        lora_a, lora_b, summed = f"{prefix}/lora_A/MatMul", f"{prefix}/lora_B/MatMul", f"{prefix}/lora/Add"
        for node, index in consumers.get(base_output, []):
            node.input[index] = f"{summed}/output_0"
        branches[base.name] = [
            helper.make_node("MatMul", [base.input[0], a_name], [f"{lora_a}/output_0"], name=lora_a),
            helper.make_node("MatMul", [f"{lora_a}/output_0", b_name], [f"{lora_b}/output_0"], name=lora_b),
            helper.make_node("Add", [base_output, f"{lora_b}/output_0"], [f"{summed}/output_0"], name=summed),
        ]
    # Right after its base node each branch is still in topological order: it reads only the base's input
    # and output, and the base's former consumers all come later.
    ordered = []
    for node in graph.node:
        ordered += [node, *branches.get(node.name, [])]
    del graph.node[:]
    graph.node.extend(ordered)
    onnx.save(model, str(model_path))
    return io_dtype


def write_adapter(lora: dict[str, LoraMatrices], path: Path, io_dtype: int) -> None:
    """Save A and the scaled B per linear in ONNX Runtime's adapter format, in the graph's float type."""
    import onnxruntime as ort
    from onnx import helper

    numpy_dtype = helper.tensor_dtype_to_np_dtype(io_dtype)
    parameters = {}
    for module_name, matrices in lora.items():
        a_name, b_name = lora_input_names(module_name)
        parameters[a_name] = ort.OrtValue.ortvalue_from_numpy(matrices.a.astype(numpy_dtype))
        parameters[b_name] = ort.OrtValue.ortvalue_from_numpy(matrices.b.astype(numpy_dtype))
    adapter = ort.AdapterFormat()
    adapter.set_parameters(parameters)
    adapter.export_adapter(str(path))


@step_task("optimize", "onnx")
def optimize_task(
    store: ArtifactStore, key: str, config: RunConfig, checkpoint_dir: Path, adapter_dir: Path
) -> Manifest:
    """The ONNX folder for ``key``, with the prompt format chat needs to match training."""

    def compute(out: Path) -> None:
        export_onnx(checkpoint_dir, adapter_dir, out, device=config.device)
        save_prompt_format(out, config.text_template)

    return store.produce("optimize", key, compute)
