"""Export the int4 checkpoint and its LoRA adapter to an ONNX Runtime GenAI folder.

Route: ONNX Runtime GenAI's model builder reads the checkpoint's ``olive`` int4 layout and only reshapes it
into ``MatMulNBits`` initializers, so the ONNX model runs exactly the integers the quantize step chose. The
builder's own LoRA path (``adapter_path``) fails on such a checkpoint: it wraps the loaded model with PEFT,
and the quantized loader's model is not a torch module ('OliveModel' object has no attribute
'named_modules'); on a float model its int4 pass also rounds the LoRA matrices. So the LoRA branches are
added to the built graph here (:mod:`olivepress.lora_graph`: float ``MatMul``s, one branch per group of
linears that read the same activation, whose matrices are graph inputs with empty defaults): with no
adapter active the branches add zeros; with one active, ONNX Runtime GenAI feeds the matrices from
``adapter_weights.onnx_adapter``. On CUDA, when olivepress's operators can be built (``optimize.lora_kernel``;
:mod:`olivepress.lora_kernel`), each adapted int4 node and its branch is one ``olivepress.MatMulNBitsLora``
node (``olivepress.LoraAdd`` after the int4 nodes that kernel cannot take): their library ships in the
folder and genai_config.json names it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from olivepress import progress
from olivepress.config import LmHead, Target
from olivepress.errors import UserError
from olivepress.genai import ADAPTER_FILE, MERGED_MODEL_FILE, edit_genai_config
from olivepress.lora_graph import Branch, LoraMatrices
from olivepress.prompts import save_prompt_format
from olivepress.steps import Step, StepSettings
from olivepress.store import ArtifactStore, Manifest

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
EXECUTION_PROVIDERS = {"cpu": "cpu", "cuda": "cuda"}  # target → the builder's execution provider
# The builder's options for each way of storing the LM head and the token embedding (optimize.lm_head), which
# the checkpoint holds in float; every other MatMul comes from it in int4 already, which the builder keeps.
# The builder rounds them to the nearest level (RTN): evaluate's int4 variants measure what that costs. int8
# cannot share one table between embedding and head (the builder's Gather quantizer is 4-bit only), so the
# embedding is a 4-bit table of its own; int4 shares one where the model ties them.
LM_HEAD_OPTIONS: dict[str, list[str]] = {
    "float": ["nodes_to_exclude=/lm_head/MatMul,/model/embed_tokens/Gather"],
    "int8": [
        "shared_embeddings=false",
        "op_types_to_quantize=MatMul/Gather",
        "matmul_mixed_precision=last_matmul:int8",
    ],
    "int4": ["op_types_to_quantize=MatMul/Gather"],
}


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
) -> ExportResult:
    """Write genai_config.json, the int4 model, tokenizer files and (given an adapter) the adapter file.

    ``target`` is the runtime the model is built for (cpu or cuda); building needs no GPU.
    ``accuracy_level`` is MatMulNBits' compute type; None keeps the builder's default for the target: on
    CPU 4, int8 activations, the fastest; 1 computes in float32, the dequantized PyTorch model's math.
    ``cuda_graph`` (cuda only) has the runtime capture decoding in CUDA graphs. ``lora_kernel`` (cuda only)
    is ``optimize.lora_kernel``: whether the branches are olivepress's CUDA operators. ``lm_head`` (cpu only;
    cuda keeps it float) is ``optimize.lm_head``.
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
        if library is not None:
            from olivepress.lora_kernel import register_in_genai_config

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


def build_int4_model(
    checkpoint_dir: Path,
    out_dir: Path,
    execution_provider: str,
    *,
    accuracy_level: int | None,
    cuda_graph: bool = False,
    trust_remote_code: bool = False,
    lm_head: LmHead = "float",
) -> None:
    """Build the int4 model from the checkpoint's own integers (q/k/v fused into one node, the builder's
    default, which the LoRA branches keep), the LM head and embedding as ``lm_head`` says."""
    extra_options = list(LM_HEAD_OPTIONS[lm_head])
    if accuracy_level is not None:
        extra_options.append(f"accuracy_level={accuracy_level}")
    run_model_builder(
        checkpoint_dir, out_dir, "int4", execution_provider, extra_options, cuda_graph, trust_remote_code
    )


def build_base_model(
    model_dir: Path,
    out_dir: Path,
    target: Target = "cpu",
    cuda_graph: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """The unquantized model through the same builder and runtime (fp32 on CPU, fp16 on CUDA, CUDA graphs
    as the int4 model has them): the baseline evaluate compares loss, speed and size against, runtime for
    runtime."""
    precision = "fp16" if target == "cuda" else "fp32"
    run_model_builder(
        model_dir,
        out_dir,
        precision,
        EXECUTION_PROVIDERS[target],
        [],
        cuda_graph and target == "cuda",
        trust_remote_code,
    )
    return out_dir


def runtime_options(cuda_graph: bool) -> list[str]:
    """Builder options that only set genai_config.json's provider options."""
    return ["enable_cuda_graph=1"] if cuda_graph else []


# Sliding-window layers (Gemma 2/3, Mistral) get full-length KV caches like the others. With the builder's
# default window-sized caches, runtime 0.18 sizes a window cache at min(max_length, window) but its attention
# kernel demands at least the window ("KV cache capacity (84) must be at least local_window_size (4096)"):
# every generation shorter than the window fails. A full-length cache is max_length long, never more than
# the window cache would be for such runs; the kernel still masks to the window. No effect on other layers.
BUILDER_OPTIONS = ["windowed_kv_cache=false"]


def run_model_builder(
    input_dir: Path,
    out_dir: Path,
    precision: str,
    execution_provider: str,
    extra_options: list[str],
    cuda_graph: bool = False,
    trust_remote_code: bool = False,
) -> None:
    """Run ONNX Runtime GenAI's model builder with its chatter captured, shown only if it fails; with
    ``cuda_graph``, ask for CUDA graphs and make the built graph capturable (:func:`prepare_cuda_graph`);
    ``trust_remote_code`` is its ``hf_remote`` (its config and tokenizer loads)."""
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    chatter = io.StringIO()
    with (
        tempfile.TemporaryDirectory(prefix="olivepress-builder-") as cache_dir,
        builder_outside_any_git_repository(),
        quiet_logger("onnxruntime.quantization"),
        contextlib.redirect_stdout(chatter),
        contextlib.redirect_stderr(chatter),
    ):
        args = (None, str(input_dir), str(out_dir), precision, execution_provider, cache_dir)
        try:
            options = parse_extra_options(
                *args,
                [
                    *BUILDER_OPTIONS,
                    *extra_options,
                    *runtime_options(cuda_graph),
                    f"hf_remote={str(trust_remote_code).lower()}",
                ],
            )
            adapt_config_for_builder(options["hf_details"]["hf_config"])
            create_model(*args, **options)
        except UserError:
            raise
        except Exception as error:
            raise RuntimeError(
                f"the ONNX Runtime GenAI model builder failed:\n{chatter.getvalue()[-4000:]}"
            ) from error
    if cuda_graph:
        prepare_cuda_graph(out_dir)


@contextlib.contextmanager
def builder_outside_any_git_repository():
    """The builder stamps each ONNX model with ``git rev-parse HEAD`` run from a folder above its package,
    which finds the repository a virtual environment sits in (this project's own, in development): the
    export's bytes, and every key after optimize, would change with each commit there. With ``GIT_DIR``
    pointing nowhere, git fails and the builder stamps its own package's commit."""
    saved = os.environ.get("GIT_DIR")
    os.environ["GIT_DIR"] = os.devnull
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("GIT_DIR", None)
        else:
            os.environ["GIT_DIR"] = saved


CONTROL_FLOW_OPS = ("If", "Loop", "Scan")


def prepare_cuda_graph(model_dir: Path) -> None:
    """Make the built graph capturable in a CUDA graph, or else run the model without one.

    ONNX Runtime refuses graph capture on a graph with control-flow nodes, when the model loads: a run that
    asked for CUDA graphs would fail. LongRoPE models' (Phi-3, Phi-3.5) one ``If`` is replaced
    (:func:`select_rope_caches_without_if`); any other control flow turns ``enable_cuda_graph`` off in
    genai_config.json, with a warning, so the model still runs, only slower.
    """
    import onnx

    model_path = model_dir / MODEL_FILE
    model = onnx.load(str(model_path), load_external_data=False)
    if select_rope_caches_without_if(model.graph, model_dir):
        onnx.save(model, str(model_path))
    control_flow = sorted({node.op_type for node in model.graph.node if node.op_type in CONTROL_FLOW_OPS})
    if control_flow:
        edit_genai_config(model_dir, disable_cuda_graph)
        log.warning(
            "%s holds control-flow nodes (%s), which ONNX Runtime cannot capture in a CUDA graph: "
            "the model runs without CUDA graphs (enable_cuda_graph 0)",
            model_path,
            ", ".join(control_flow),
        )


def disable_cuda_graph(config: dict) -> None:
    """An edit of genai_config.json (:func:`olivepress.genai.edit_genai_config`): every provider's CUDA
    graphs off."""
    for options in config["model"]["decoder"]["session_options"]["provider_options"]:
        for provider in options.values():
            if "enable_cuda_graph" in provider:
                provider["enable_cuda_graph"] = "0"


def select_rope_caches_without_if(graph, model_dir: Path) -> bool:
    """Replace the builder's LongRoPE cache choice, an ``If``, by a ``Gather`` from both caches stacked.

    For LongRoPE the builder makes short-factor cos/sin caches of T = original_max_position_embeddings rows
    and long-factor ones of context_length rows, and its ``If`` (then: long, else: short; the caches are
    ``Constant`` nodes of its branches) picks the long ones once the sequence outgrows T. Here each cache
    becomes ``Gather(stacked, index)`` with ``stacked`` = [else cache zero-padded to the then cache's rows,
    then cache]: GroupQueryAttention reads rows only below the total length, so the short cache's padding
    is never read. The index is 1 when any row's length (GroupQueryAttention's ``seqlens_k`` + 1) is past T,
    not when the attention mask's width is, as the builder compares: with CUDA graphs ONNX Runtime GenAI
    decodes with a mask as wide as max_length, so the width would switch to the long cache for every decoded
    token of a run allowed past T, after a prompt that used the short one. Without graphs the two agree
    (the longest row is unpadded), so the logits are the builder's.

    The cost is a copy of each chosen cache per forward pass (Phi-3.5 in fp16: 2 x 12.6 MB read and written,
    some 20 us on an H100, about 1% of a decode step) and both caches at full length in model.onnx and in
    GPU memory (50 MB for Phi-3.5). CPU exports keep the builder's ``If``: it copies nothing, where these
    copies would cost a CPU more.

    Returns whether the graph changed; an ``If`` of any other shape is left as it is.
    """
    changed = False
    for node in [node for node in graph.node if node.op_type == "If"]:
        if choice := rope_cache_choice(graph, node, model_dir):
            replace_rope_cache_if(graph, node, *choice)
            changed = True
    return changed


def replace_rope_cache_if(graph, node, seqlens_k: str, threshold: int, caches: list) -> None:
    """The replacement :func:`select_rope_caches_without_if` describes. Its ops and types all have CUDA
    kernels at the builder's opset (ReduceSum on int64 as in the builder's own mask subgraph; not ReduceMax,
    whose int32 CUDA kernel for opset 20 is uncertain): a node left to the CPU would bring a copy, and ONNX
    Runtime refuses graph capture on a graph with copies too."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    condition, outputs, prefix = node.input[0], list(node.output), node.name.rsplit("/", 1)[0]
    new_nodes = []

    def add(op_type: str, inputs: list[str], name: str, **attributes) -> str:
        output = f"{prefix}/{name}/output_0"
        new_nodes.append(helper.make_node(op_type, inputs, [output], f"{prefix}/{name}", **attributes))
        return output

    # seqlens_k is int32 (GroupQueryAttention's type), each row's length - 1
    threshold_name, zero_name = f"{prefix}/long_rows/threshold", f"{prefix}/long_rows/zero"
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(threshold - 1, np.int32), threshold_name),
            numpy_helper.from_array(np.array(0, np.int64), zero_name),
        ]
    )
    past_t = add("Greater", [seqlens_k, threshold_name], "long_rows/Greater")
    as_int = add("Cast", [past_t], "long_rows/Cast", to=onnx.TensorProto.INT64)
    count = add("ReduceSum", [as_int], "long_rows/ReduceSum", keepdims=0)
    any_past_t = add("Greater", [count, zero_name], "long_rows/Greater_1")
    index = add("Cast", [any_past_t], "long_rows/Cast_1", to=onnx.TensorProto.INT64)
    for output, (small, large) in zip(outputs, caches, strict=True):
        rows = max(len(small), len(large))
        padded = [
            np.pad(cache, [(0, rows - len(cache))] + [(0, 0)] * (cache.ndim - 1)) for cache in (small, large)
        ]
        graph.initializer.append(numpy_helper.from_array(np.stack(padded), f"{output}/stacked"))
        new_nodes.append(
            helper.make_node(
                "Gather", [f"{output}/stacked", index], [output], f"{prefix}/{output}/Gather", axis=0
            )
        )
    nodes = [other for other in graph.node if other is not node]
    first_user = next(at for at, other in enumerate(nodes) if set(other.input) & set(outputs))
    nodes[first_user:first_user] = new_nodes
    graph.ClearField("node")
    graph.node.extend(nodes)
    remove_unused(graph, [condition])


def rope_cache_choice(graph, node, model_dir: Path) -> tuple[str, int, list] | None:
    """``(seqlens_k, T, [(else cache, then cache) per output])`` when ``node`` is the builder's LongRoPE
    ``If``: it feeds only GroupQueryAttention nodes, its condition is ``Greater(length, T)`` and each branch
    output is a ``Constant`` of the same dtype and row size in both branches; else None."""
    consumers = [user for user in graph.node if set(user.input) & set(node.output)]
    seqlens_k = {user.input[5] for user in consumers if user.op_type == "GroupQueryAttention"}
    if (
        not consumers
        or len(seqlens_k) != 1
        or any(user.op_type != "GroupQueryAttention" for user in consumers)
    ):
        return None
    condition = next((other for other in graph.node if node.input[0] in other.output), None)
    if condition is None or condition.op_type != "Greater":
        return None
    threshold = constant_array(graph, condition.input[1], model_dir)
    if threshold is None or threshold.size != 1:
        return None
    branches = {attribute.name: attribute.g for attribute in node.attribute}
    small, large = (
        [constant_array(branches[branch], output.name, model_dir) for output in branches[branch].output]
        for branch in ("else_branch", "then_branch")
    )
    caches = list(zip(small, large, strict=True))
    for short, long in caches:
        if short is None or long is None or short.dtype != long.dtype or short.shape[1:] != long.shape[1:]:
            return None
    return seqlens_k.pop(), int(threshold.item()), caches


def constant_array(graph, name: str, model_dir: Path):
    """The value of ``name`` when an initializer or a ``Constant`` node's ``value`` of ``graph`` holds it
    (external data read from ``model_dir``), else None."""
    from onnx import numpy_helper

    tensors = [initializer for initializer in graph.initializer if initializer.name == name] + [
        attribute.t
        for node in graph.node
        if node.op_type == "Constant" and node.output[0] == name
        for attribute in node.attribute
        if attribute.name == "value"
    ]
    return numpy_helper.to_array(tensors[0], str(model_dir)) if tensors else None


def remove_unused(graph, names: list[str]) -> None:
    """Remove the nodes and initializers behind ``names`` that nothing reads any more, and theirs in turn
    (ONNX Runtime warns about every unused initializer)."""
    while names:
        name = names.pop()
        if any(name in node.input for node in graph.node) or any(
            name == output.name for output in graph.output
        ):
            continue
        for initializer in [initializer for initializer in graph.initializer if initializer.name == name]:
            graph.initializer.remove(initializer)
        for node in [node for node in graph.node if name in node.output]:
            if not any(output in other.input for other in graph.node for output in node.output):
                names.extend(node.input)
                graph.node.remove(node)


def adapt_config_for_builder(config) -> None:
    """Fill in, in place, config fields the builder reads where a transformers 5 config lacks them.

    - Gemma 3: transformers 5 nests RoPE per layer type (``rope_parameters = {"full_attention": {...},
      "sliding_attention": {...}}``); the builder reads a flat ``rope_parameters`` with ``rope_type``,
      ``rope_theta`` (global layers) and ``rope_local_base_freq`` (sliding layers), and raises
      ``KeyError: 'rope_type'`` on the nested form.
    - Mistral: its ``sliding_window`` holds for every layer, but the builder windows only the layers that
      ``layer_types`` marks sliding, and Mistral's config has no ``layer_types``: without them the export
      attends to the whole context where the model attends to the window.
    """
    rope = getattr(config, "rope_parameters", None)
    if config.model_type == "gemma3_text" and isinstance(rope, dict) and "full_attention" in rope:
        full, sliding = rope["full_attention"], rope["sliding_attention"]
        if full.get("rope_type", "default") != "default" or sliding.get("rope_type", "default") != "default":
            # the builder would scale the sliding layers' RoPE by the global factor too
            raise UserError(
                f"Gemma 3 with scaled RoPE ({rope}) is not exported correctly by the model builder"
            )
        config.rope_parameters = dict(full)
        config.rope_theta = full["rope_theta"]
        config.rope_local_base_freq = sliding["rope_theta"]
    if (
        config.model_type == "mistral"
        and config.sliding_window
        and getattr(config, "layer_types", None) is None
    ):
        config.layer_types = ["sliding_attention"] * config.num_hidden_layers


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


def read_lora(adapter_dir: Path) -> dict[str, LoraMatrices]:
    """The adapter's matrices per linear, with PEFT's scaling folded into B as its LoRA layers apply it.

    Read from the adapter's own files, without building the model it was trained on (a 3.8 B model costs
    15 GB and most of a minute to build): the rank is A's, alpha comes from ``alpha_pattern`` matched by
    PEFT's own rule, and rsLoRA divides by the rank's square root. Whether the matrices fit the checkpoint
    is checked against its config when the branches are built.
    """
    import math

    from peft import PeftConfig
    from peft.utils import load_peft_weights
    from peft.utils.other import get_pattern_key

    from olivepress.lora_graph import PEFT_LINEAR

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
    weights = load_peft_weights(str(adapter_dir), device="cpu")
    lora = {}
    for key, a in weights.items():
        module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        if not PEFT_LINEAR.match(module) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise UserError(f"the adapter holds {key}; only LoRA on the decoder's linear layers is exported")
        if key.endswith(".lora_B.weight"):
            continue
        rank = a.shape[0]
        alpha = config.alpha_pattern.get(
            get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha
        )
        scaling = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
        b = weights[key.removesuffix("lora_A.weight") + "lora_B.weight"].float() * scaling
        lora[module] = LoraMatrices(a=a.float().T.contiguous().numpy(), b=b.T.contiguous().numpy())
    if not lora:
        raise UserError(f"the adapter in {adapter_dir} holds no LoRA matrices")
    return lora


def graph_and_branches(model_dir: Path, checkpoint_dir: Path, lora: dict[str, LoraMatrices]):
    """The exported graph of ``model_dir`` (not its weights) and ``lora`` grouped onto its int4 nodes, with
    the sizes of the checkpoint the adapter was trained on."""
    import onnx

    from olivepress.lora_graph import group_branches, int4_node_modules, part_sizes

    model = onnx.load(str(model_dir / MODEL_FILE), load_external_data=False)
    sizes = part_sizes(json.loads((checkpoint_dir / "config.json").read_text()))
    return model, group_branches(lora, int4_node_modules(model.graph), sizes)


def export_adapter(checkpoint_dir: Path, adapter_dir: Path, model_dir: Path, target: Path) -> Path:
    """Another adapter trained on ``checkpoint_dir``, written as an .onnx_adapter for the model exported
    in ``model_dir``: the int4 model is exported once and each further adapter costs only its own file,
    switched at run time (``og.Adapters``)."""
    from olivepress.lora_graph import adapter_parameters, write_adapter

    model, branches = graph_and_branches(model_dir, checkpoint_dir, read_lora(adapter_dir))
    write_adapter(adapter_parameters(model.graph, branches), target)
    return target


def lora_add_library(out_dir: Path, lora_kernel: Literal["auto", "on", "off"]) -> Path | None:
    """The library of olivepress's CUDA operators (MatMulNBitsLora, LoraAdd) built into ``out_dir``, or None
    for ONNX Runtime's own operators: with ``lora_kernel`` off, or auto where nvcc or ONNX Runtime's header
    is missing (a warning says which)."""
    if lora_kernel == "off":
        return None
    from olivepress.lora_kernel import build_lora_add

    progress.update("optimize", "building olivepress's CUDA operators")
    try:
        return build_lora_add(out_dir)
    except UserError as missing:
        if lora_kernel == "on":
            raise
        log.warning("LoRA branches use three ONNX Runtime kernels each, not LoraAdd: %s", missing)
        return None


def add_lora_branches(model, branches: list[Branch], out_dir: Path, *, lora_add: bool = False) -> None:
    """Graft the branches onto ``model`` (as olivepress's operators with ``lora_add``) and save it, write their
    matrices (in the graph's float type) as the adapter file, and the graph with them merged beside it
    (:func:`olivepress.lora_graph.write_merged_model`). The external weight data is not touched."""
    import onnx

    from olivepress.lora_graph import graft_branches, write_adapter, write_merged_model

    parameters = graft_branches(model, branches, lora_add=lora_add)
    onnx.save(model, str(out_dir / MODEL_FILE))
    write_adapter(parameters, out_dir / ADAPTER_FILE)
    write_merged_model(model, parameters, out_dir / MERGED_MODEL_FILE)


STEP = Step(
    "optimize",
    __name__,
    inputs=("checkpoint_dir", "adapter_dir", "target"),
    settings=("optimize", "text_template", "trust_remote_code"),
    tags=("onnx",),
)


@STEP.task
def optimize_task(
    store: ArtifactStore,
    key: str,
    settings: StepSettings,
    checkpoint_dir: Path,
    adapter_dir: Path,
    target: Target,
) -> Manifest:
    """The ONNX folder for ``key``, built for ``target``, with the prompt format chat needs to match
    training."""

    def compute(out: Path) -> None:
        export_onnx(
            checkpoint_dir,
            adapter_dir,
            out,
            target=target,
            cuda_graph=settings.optimize.cuda_graph,
            trust_remote_code=settings.trust_remote_code,
            lora_kernel=settings.optimize.lora_kernel,
            lm_head=settings.optimize.lm_head,
        )
        save_prompt_format(out, settings.text_template)

    return store.produce("optimize", key, compute)


ADAPTER_STEP = Step(
    "export_adapter",
    __name__,
    inputs=("checkpoint_dir", "adapter_dir", "onnx_dir"),
    settings=(),
    # the target ``onnx_dir`` was built for: it names the output in the run (the export itself keys it)
    context=("target",),
    tags=("onnx",),
)


@ADAPTER_STEP.task
def export_adapter_task(
    store: ArtifactStore,
    key: str,
    settings: StepSettings,
    checkpoint_dir: Path,
    adapter_dir: Path,
    onnx_dir: Path,
    target: Target,
) -> Manifest:
    """A further dataset's adapter for the ``target`` export in ``onnx_dir`` (another dataset's optimize
    output): its own .onnx_adapter, beside which the int4 model is not exported again."""
    return store.produce(
        "export_adapter",
        key,
        lambda out: export_adapter(checkpoint_dir, adapter_dir, onnx_dir, out / ADAPTER_FILE),
    )
