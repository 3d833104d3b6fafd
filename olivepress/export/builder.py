"""ONNX Runtime GenAI's model builder, run on olivepress's checkpoints: the int4 model and the base model.

The builder's "olive" loader reads the int4 checkpoint (:mod:`olivepress.export.int4`) and only reshapes it
into ``MatMulNBits`` initializers, so the ONNX model runs exactly the integers the quantize step chose.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from typing import TYPE_CHECKING

from olivepress.errors import UserError
from olivepress.export.cuda_graph import prepare_cuda_graph

if TYPE_CHECKING:
    from pathlib import Path

    from olivepress.config import LmHead, Target

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
