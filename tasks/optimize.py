"""Export the int4 checkpoint and its LoRA adapter to an ONNX Runtime GenAI folder.

Route: ONNX Runtime GenAI's model builder reads the checkpoint's ``olive`` int4 layout and only reshapes it
into ``MatMulNBits`` initializers, so the ONNX model runs exactly the integers the quantize step chose. The
builder's own LoRA path (``adapter_path``) fails on such a checkpoint: it wraps the loaded model with PEFT,
and the quantized loader's model is not a torch module ('OliveModel' object has no attribute
'named_modules'); on a float model its int4 pass also rounds the LoRA matrices. So the LoRA branches are
added to the built graph here (:mod:`olivepress.lora_graph`: float ``MatMul``s, one branch per group of
linears that read the same activation, whose matrices are graph inputs with empty defaults): with no
adapter active the branches add zeros; with one active, ONNX Runtime GenAI feeds the matrices from
``adapter_weights.onnx_adapter``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from olivepress.errors import UserError
from olivepress.genai import ADAPTER_FILE, MERGED_MODEL_FILE
from olivepress.lora_graph import Branch, LoraMatrices
from olivepress.prompts import save_prompt_format
from olivepress.steps import step_task
from olivepress.store import ArtifactStore, Manifest

if TYPE_CHECKING:
    from olivepress.config import RunConfig

MODEL_FILE = "model.onnx"
EXECUTION_PROVIDERS = {"cpu": "cpu", "gpu": "cuda"}
# Tied or not, the embedding and LM head stay float as in the checkpoint: rounding them would add an error
# the quantize step never measured. Every other MatMul comes from the checkpoint already in int4.
FLOAT_NODES = ("/lm_head/MatMul", "/model/embed_tokens/Gather")


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
    cuda_graph: bool = False,
) -> ExportResult:
    """Write genai_config.json, the int4 model, tokenizer files and (given an adapter) the adapter file.

    ``accuracy_level`` is MatMulNBits' compute type; None keeps the builder's default for the device: on
    CPU 4, int8 activations, the fastest; 1 computes in float32, the dequantized PyTorch model's math.
    ``cuda_graph`` (device gpu only) has the runtime capture decoding in CUDA graphs.
    """
    import onnx

    from olivepress.lora_graph import group_branches, int4_node_modules, part_sizes

    if device not in EXECUTION_PROVIDERS:
        raise UserError(f"device must be one of {sorted(EXECUTION_PROVIDERS)}, not {device!r}")
    started = time.perf_counter()
    lora = read_lora(adapter_dir) if adapter_dir is not None else {}
    build_int4_model(
        checkpoint_dir,
        out_dir,
        EXECUTION_PROVIDERS[device],
        accuracy_level=accuracy_level,
        cuda_graph=cuda_graph and device == "gpu",
    )
    adapter_file = None
    if lora:
        graph = onnx.load(str(out_dir / MODEL_FILE), load_external_data=False).graph
        sizes = part_sizes(json.loads((checkpoint_dir / "config.json").read_text()))
        branches = group_branches(lora, int4_node_modules(graph), sizes)
        adapter_file = out_dir / ADAPTER_FILE
        add_lora_branches(out_dir / MODEL_FILE, branches, adapter_file)
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
) -> None:
    """Build the int4 model from the checkpoint's own integers (q/k/v fused into one node, the builder's
    default, which the LoRA branches keep)."""
    extra_options = [f"nodes_to_exclude={','.join(FLOAT_NODES)}", *runtime_options(cuda_graph)]
    if accuracy_level is not None:
        extra_options.append(f"accuracy_level={accuracy_level}")
    run_model_builder(checkpoint_dir, out_dir, "int4", execution_provider, extra_options)


def build_base_model(
    model_dir: Path, out_dir: Path, device: Literal["cpu", "gpu"] = "cpu", cuda_graph: bool = False
) -> Path:
    """The unquantized model through the same builder and runtime (fp32 on CPU, fp16 on CUDA, CUDA graphs
    as the int4 model has them): the baseline evaluate compares loss, speed and size against, runtime for
    runtime."""
    precision = "fp16" if device == "gpu" else "fp32"
    options = runtime_options(cuda_graph and device == "gpu")
    run_model_builder(model_dir, out_dir, precision, EXECUTION_PROVIDERS[device], options)
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
            options = parse_extra_options(*args, [*BUILDER_OPTIONS, *extra_options])
            adapt_config_for_builder(options["hf_details"]["hf_config"])
            create_model(*args, **options)
        except UserError:
            raise
        except Exception as error:
            raise RuntimeError(
                f"the ONNX Runtime GenAI model builder failed:\n{chatter.getvalue()[-4000:]}"
            ) from error


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


def add_lora_branches(model_path: Path, branches: list[Branch], adapter_file: Path) -> None:
    """Graft the branches onto the model, write their matrices (in the graph's float type) as the adapter
    file, and the graph with them merged beside it (:func:`olivepress.lora_graph.write_merged_model`)."""
    from olivepress.lora_graph import graft_branches, write_adapter, write_merged_model

    parameters = graft_branches(model_path, branches)
    write_adapter(parameters, adapter_file)
    write_merged_model(model_path, parameters, model_path.parent / MERGED_MODEL_FILE)


@step_task("optimize", "onnx")
def optimize_task(
    store: ArtifactStore, key: str, config: RunConfig, checkpoint_dir: Path, adapter_dir: Path
) -> Manifest:
    """The ONNX folder for ``key``, with the prompt format chat needs to match training."""

    def compute(out: Path) -> None:
        export_onnx(
            checkpoint_dir, adapter_dir, out, device=config.device, cuda_graph=config.optimize.cuda_graph
        )
        save_prompt_format(out, config.text_template)

    return store.produce("optimize", key, compute)
