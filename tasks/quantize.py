"""The quantize step: activation-aware 4-bit weights (AWQ), calibrated on the user's own examples.

llm-compressor's AWQModifier (AutoAWQ's maintained successor; Olive 0.13's AWQ pass needs CUDA and the
deprecated autoawq) searches per-channel smoothing scales and folds them into the preceding norms and
linears, then its QuantizationModifier fixes a 4-bit grid per group. It runs on CPU. Its compressed-tensors
checkpoint is not used (ORT GenAI's builder rejects it on CPU): we read each quantized linear's grid in
memory and write the "olive" int4 layout of :mod:`olivepress.export.int4`, whose integers the ONNX model
runs as is.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

from olivepress.architectures import load_config
from olivepress.config import QuantizeSettings, group_size_problem
from olivepress.errors import UserError
from olivepress.export.int4 import Int4Weight, write_int4_checkpoint
from olivepress.progress import awq_layer_progress
from olivepress.prompts import format_pair
from olivepress.steps import Step, StepSettings
from olivepress.store import ArtifactStore, Manifest

log = logging.getLogger(__name__)

AWQ_GRID_POINTS = 20  # llm-compressor's default; 10 halves AWQ's time but cost ~0.04 held-out loss on SmolLM2
IGNORED_LINEARS = ["lm_head"]  # tied to the embeddings in small models; 4 bits there cost the most accuracy


@dataclass(frozen=True)
class QuantizeResult:
    out_dir: Path
    group_size: int
    calibration_examples: int
    calibration_sequences: int  # the examples joined and cut into blocks (calibration_block_tokens)
    calibration_tokens: int
    quantized_linears: int
    seconds: float


def quantized_input_sizes(config) -> dict[str, int]:
    """Input sizes of the decoder's linear layers, by the config field that sets each."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads * head_dim": heads * head_dim,
    }


def check_group_size(config, group_size: int) -> None:
    """Raise a UserError unless ``group_size`` is allowed and divides every quantized input size of the model
    (HF ``config``): the rule of :func:`olivepress.config.group_size_problem`, on this model's sizes."""
    _check_divides(quantized_input_sizes(config), group_size)


def _check_divides(sizes: dict[str, int], group_size: int) -> None:
    if problem := group_size_problem(group_size, sizes):
        raise UserError(problem)


def calibration_token_ids(
    tokenizer, examples: list[dict], settings: QuantizeSettings, seed: int, text_template: str | None = None
) -> list[list[int]]:
    """A seeded sample of the examples, formatted exactly as at inference and cut to the token limit."""
    chosen = random.Random(seed).sample(examples, min(settings.calibration_samples, len(examples)))
    texts = [format_pair(tokenizer, ex["prompt"], ex["response"], text_template).full_text for ex in chosen]
    return [tokenizer(text)["input_ids"][: settings.calibration_max_tokens] for text in texts]


def calibration_blocks(token_ids: list[list[int]], block_tokens: int | None) -> list[list[int]]:
    """The examples' tokens joined end to end and cut into blocks of ``block_tokens`` (None: as they are).

    Each example is already a whole formatted conversation, ending in the template's end-of-turn marker, so a
    block reads as consecutive chats. AWQ's scale search runs every candidate over all calibration tokens;
    in blocks it does so in a few large matrix products instead of many small ones (on the quickstart's data
    on 2 cores: 175 s instead of 241 s, held-out loss 3.87 instead of 3.93).
    """
    if block_tokens is None:
        return token_ids
    joined = [token for ids in token_ids for token in ids]
    return [joined[start : start + block_tokens] for start in range(0, len(joined), block_tokens)]


def awq_recipe(group_size: int, grid_points: int = AWQ_GRID_POINTS) -> list:
    """AWQ smoothing, then asymmetric 4-bit min/max groups on every decoder Linear (the W4A16_ASYM scheme
    with our group size; its preset's 128 does not divide SmolLM2's 576)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    weights = QuantizationArgs(
        num_bits=4, type="int", strategy="group", group_size=group_size, symmetric=False, dynamic=False
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    return [
        AWQModifier(n_grid=grid_points),
        QuantizationModifier(config_groups={"int4": scheme}, ignore=IGNORED_LINEARS),
    ]


@contextlib.contextmanager
def pinned_memory_only_with_accelerator():
    """Skip AWQ's cache pinning when there is no accelerator.

    llm-compressor 0.14 pins the cached layer inputs before every mapping's grid search, unconditionally
    (AWQModifier._apply_smoothing), and torch refuses pin_memory() without an accelerator: "Cannot access
    accelerator device when none is available". Pinning only speeds host-to-device copies, so on CPU the
    one method is made a no-op for the duration of the call; no argument turns it off.
    """
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        yield
        return
    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original


def apply_awq(
    model,
    tokenizer,
    token_ids: list[list[int]],
    group_size: int,
    *,
    grid_points: int = AWQ_GRID_POINTS,
    progress: bool = True,
    trust_remote_code: bool = False,
) -> None:
    """Run AWQ and fix the int4 grid, in place: the model's norms and linears now hold the smoothed float
    weights, and each quantized Linear fake-quantizes its weight in forward (llm-compressor's own view).

    A session of its own keeps llm-compressor's global one from holding on to the model afterwards.
    """
    from datasets import Dataset
    from llmcompressor import create_session, oneshot

    calibration = Dataset.from_dict(
        {"input_ids": token_ids, "attention_mask": [[1] * len(i) for i in token_ids]}
    )
    layers = awq_layer_progress(model.config.num_hidden_layers)
    with create_session(), pinned_memory_only_with_accelerator(), _quiet_unless(progress), layers:
        oneshot(
            model=model,
            tokenizer=tokenizer,
            dataset=calibration,
            recipe=awq_recipe(group_size, grid_points),
            num_calibration_samples=len(token_ids),
            shuffle_calibration_samples=False,
            batch_size=1,
            trust_remote_code_model=trust_remote_code,  # it reloads the config from the model's folder
        )


def take_int4_weights(model) -> dict[str, Int4Weight]:
    """Each quantized Linear's grid as an Int4Weight; its quantization parameters leave the model.

    compressed-tensors keeps zero points signed in [-8, 7] and rounds ``w / scale + zero_point``; the
    checkpoint wants unsigned [0, 15]. Rounding its fake-quantized weight (values already on the grid)
    instead of the raw weight gives exactly its integers, even where a raw value falls on a rounding tie.
    Removing ``weight_scale``/``weight_zero_point`` leaves a state_dict of plain float tensors (the AWQ-scaled
    norms and linears among them) for :func:`write_int4_checkpoint`.
    """
    import torch
    from compressed_tensors.quantization import forward_quantize

    weights = {}
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if not isinstance(module, torch.nn.Linear) or scheme is None or scheme.weights is None:
            continue
        with torch.no_grad():
            on_grid = forward_quantize(module, module.weight.data, "weight", scheme.weights)
        signed_offset = -(2 ** (scheme.weights.num_bits - 1))
        zero_points = module.weight_zero_point.data.to(torch.int16) - signed_offset
        weights[name] = Int4Weight.from_qparams(on_grid, module.weight_scale.data, zero_points)
        for extra in [
            key for key in (*module._parameters, *module._buffers) if key not in ("weight", "bias")
        ]:
            delattr(module, extra)
        module.quantization_enabled = False
    return weights


def quantize_awq(
    model_dir: Path,
    examples: list[dict],
    out_dir: Path,
    settings: QuantizeSettings,
    *,
    seed: int = 0,
    text_template: str | None = None,
    grid_points: int = AWQ_GRID_POINTS,
    progress: bool = True,
    trust_remote_code: bool = False,
) -> QuantizeResult:
    """AWQ-quantize the model in ``model_dir`` to 4 bits and write the int4 checkpoint and tokenizer to
    ``out_dir`` (a staging folder: the caller makes it atomic). ``progress`` keeps llm-compressor's
    per-layer progress bars and log lines on stderr."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_group_size(load_config(model_dir, trust_remote_code=trust_remote_code), settings.group_size)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    token_ids = calibration_token_ids(tokenizer, examples, settings, seed, text_template)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, trust_remote_code=trust_remote_code
    )
    linear_inputs = {
        f"{name}.in_features": module.in_features
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] not in IGNORED_LINEARS
    }
    _check_divides(linear_inputs, settings.group_size)

    blocks = calibration_blocks(token_ids, settings.calibration_block_tokens)
    tokens = sum(len(ids) for ids in blocks)
    log.info(
        "AWQ: %d linears, group size %d, calibrating on %d examples (%d tokens in %d sequences)",
        len(linear_inputs),
        settings.group_size,
        len(token_ids),
        tokens,
        len(blocks),
    )
    started = time.perf_counter()
    apply_awq(
        model,
        tokenizer,
        blocks,
        settings.group_size,
        grid_points=grid_points,
        progress=progress,
        trust_remote_code=trust_remote_code,
    )
    weights = take_int4_weights(model)
    seconds = time.perf_counter() - started
    log.info("AWQ: quantized %d linears in %.0f s", len(weights), seconds)

    write_int4_checkpoint(model, weights, out_dir, settings.group_size)
    tokenizer.save_pretrained(out_dir)
    return QuantizeResult(
        out_dir=out_dir,
        group_size=settings.group_size,
        calibration_examples=len(token_ids),
        calibration_sequences=len(blocks),
        calibration_tokens=tokens,
        quantized_linears=len(weights),
        seconds=seconds,
    )


@contextlib.contextmanager
def _quiet_unless(progress: bool):
    """Silence llm-compressor's tqdm bars (stderr) and loguru lines when progress is off."""
    if progress:
        yield
        return
    import os

    from loguru import logger

    logger.disable("llmcompressor")
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
            yield
    finally:
        logger.enable("llmcompressor")


STEP = Step(
    "quantize",
    __name__,
    inputs=("model_dir", "examples"),
    settings=("quantize", "seed", "text_template", "trust_remote_code"),
    tags=("awq",),
)


@STEP.task
def quantize_task(
    store: ArtifactStore, key: str, settings: StepSettings, model_dir: Path, examples: list[dict]
) -> Manifest:
    """The int4 checkpoint for ``key``: reused from the store, or computed and published whole."""
    return store.produce(
        "quantize",
        key,
        lambda out: quantize_awq(
            model_dir,
            examples,
            out,
            settings.quantize,
            seed=settings.seed,
            text_template=settings.text_template,
            trust_remote_code=settings.trust_remote_code,
        ),
    )
