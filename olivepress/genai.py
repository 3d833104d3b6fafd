"""Run an exported model with ONNX Runtime GenAI 0.18: streamed generation and teacher-forced response loss.

Text is formatted, tokenized and detokenized by the Hugging Face tokenizer saved beside the model, as in
training and in :mod:`olivepress.scoring`: the ONNX loss is then over the very token ids the PyTorch loss
is over. The runtime's own tokenizer is not used: it misreads some valid tokenizer.json files (the default
model's GGUF-converted one encodes to -1 ids and decodes byte-level text as "Ġ...").
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from olivepress.errors import UserError
from olivepress.prompts import format_pair, format_prompt
from olivepress.scoring import DEFAULT_MAX_TOKENS, response_token_mask

if TYPE_CHECKING:
    import numpy as np
    import onnxruntime_genai as og

MODEL_FILE = "model.onnx"  # the decoder the builder writes, its weights in model.onnx.data beside it
ADAPTER_FILE = "adapter_weights.onnx_adapter"
# The decoder with the folder's own adapter merged (olivepress.export.lora.write_merged_model): the same
# int4 weight file and LoRA branches, the adapter's matrices held as initializers rather than fed per step.
MERGED_MODEL_FILE = "model.adapter.onnx"
ADAPTER_NAME = "adapter"
GENAI_CONFIG = "genai_config.json"
PARTIAL_CHARACTER = "\ufffd"  # what decode shows for the first bytes of a character split over tokens


def edit_genai_config(model_dir: Path, edit: Callable[[dict], None]) -> None:
    """Rewrite ``model_dir``'s genai_config.json in place as ``edit`` changes its parsed content."""
    path = model_dir / GENAI_CONFIG
    config = json.loads(path.read_text(encoding="utf-8"))
    edit(config)
    path.write_text(json.dumps(config, indent=4), encoding="utf-8")


@dataclass
class LoadedModel:
    model: og.Model
    tokenizer: object  # the Hugging Face tokenizer of the folder
    adapters: og.Adapters | None  # a run-time adapter, active in every generator; kept alive here
    adapter_merged: bool = False  # the model is the folder's merged graph
    adapter_name: str = ADAPTER_NAME  # which of ``adapters`` is active (several loaded: chat sessions)

    @property
    def adapter_active(self) -> bool:
        return self.adapters is not None or self.adapter_merged


@dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int
    new_tokens: int
    time_to_first_token_s: float  # prompt processing plus the first new token
    seconds: float  # from the prompt going in to the last token coming out

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: tokens after the first over the time after the first, so prompt length drops out."""
        decode_seconds = self.seconds - self.time_to_first_token_s
        return (self.new_tokens - 1) / decode_seconds if self.new_tokens > 1 and decode_seconds > 0 else 0.0


def decoder_overlay(model_dir: Path, merged: bool) -> dict:
    """What :func:`open_model` changes in the folder's decoder config: the merged graph's file, and for a CPU
    model one intra-op thread per core this process may use, unless the folder sets a count.

    Why the threads: ONNX Runtime's own default ran one thread on a 2-core machine, so evaluate and chat used
    half of it (int4 decode 97 against 120 tokens/s with both cores, the fp32 base 32 against 54; the gate's
    speed-up read 2.7 where both cores give 1.8: benchmarks/cpu_decode.py --threads 0 2)."""
    import os

    decoder: dict = {"filename": MERGED_MODEL_FILE} if merged else {}
    session = json.loads((model_dir / GENAI_CONFIG).read_text())["model"]["decoder"].get(
        "session_options", {}
    )
    if not session.get("provider_options") and "intra_op_num_threads" not in session:
        decoder["session_options"] = {**session, "intra_op_num_threads": len(os.sched_getaffinity(0))}
    return decoder


def open_model(
    model_dir: Path, adapter_file: Path | None = None, *, run_time_adapter: bool = False
) -> LoadedModel:
    """The model of an exported folder, with ``adapter_file`` (an .onnx_adapter) active when given.

    The folder's own adapter opens as its merged graph (the fast form, same outputs) unless
    ``run_time_adapter``; any other adapter file is loaded at run time (``og.Adapters``).
    """
    import onnxruntime_genai as og
    from transformers import AutoTokenizer

    if not (model_dir / GENAI_CONFIG).is_file():
        raise UserError(f"{model_dir} is not an ONNX Runtime GenAI model folder (no {GENAI_CONFIG})")
    if adapter_file is not None and not adapter_file.is_file():
        raise UserError(f"adapter file {adapter_file} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    own_adapter = adapter_file is not None and adapter_file.resolve() == (model_dir / ADAPTER_FILE).resolve()
    merged = own_adapter and not run_time_adapter and (model_dir / MERGED_MODEL_FILE).is_file()
    config = og.Config(str(model_dir))
    config.overlay(json.dumps({"model": {"decoder": decoder_overlay(model_dir, merged)}}))
    model = og.Model(config)
    if merged:
        return LoadedModel(model=model, tokenizer=tokenizer, adapters=None, adapter_merged=True)
    adapters = None
    if adapter_file is not None:
        adapters = og.Adapters(model)
        adapters.load(str(adapter_file), ADAPTER_NAME)
    return LoadedModel(model=model, tokenizer=tokenizer, adapters=adapters)


def new_generator(loaded: LoadedModel, max_length: int, min_length: int = 0) -> og.Generator:
    """A generator with ``loaded``'s adapter active; end-of-text is suppressed before ``min_length``."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(loaded.model)
    params.set_search_options(max_length=max_length, min_length=min_length)
    generator = og.Generator(loaded.model, params)
    if loaded.adapters is not None:
        generator.set_active_adapter(loaded.adapters, loaded.adapter_name)
    return generator


def prompt_token_ids(loaded: LoadedModel, prompt: str, text_template: str | None = None) -> list[int]:
    """The user's prompt as the model saw prompts in training: formatted, then tokenized as scoring does."""
    text = format_prompt(loaded.tokenizer, prompt, text_template)
    return loaded.tokenizer(text, add_special_tokens=True)["input_ids"]


class TextStream:
    """Generated ids to new text, one id at a time; holds back a character until all its bytes arrived."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self.flush(hold_partial=True)

    def flush(self, hold_partial: bool = False) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if hold_partial and text.endswith(PARTIAL_CHARACTER):
            return ""
        piece, self.emitted = text[self.emitted :], len(text)
        return piece


def stream_generate(
    loaded: LoadedModel,
    prompt_ids: list[int],
    max_new_tokens: int,
    on_text: Callable[[str], None],
    max_length: int | None = None,
    exact: bool = False,
) -> GenerationStats:
    """Generate with the search options of genai_config.json, passing each new piece of text to ``on_text``.

    ``max_length`` (prompt plus new tokens; default: just enough) sizes the generator. With CUDA graphs,
    ONNX Runtime GenAI reuses a captured graph only for generators of the same max_length
    (``CapturedGraphPool``): a series of generations that shares one reuses the graph captured by the
    first instead of capturing a new one each time. ``exact`` suppresses end-of-text so that exactly
    ``max_new_tokens`` come out (a speed measurement of equal work; the text then runs past its end).
    """
    import numpy as np

    if max_length is not None and max_length < len(prompt_ids) + max_new_tokens:
        raise ValueError(
            f"max_length {max_length} leaves no room for {max_new_tokens} tokens after a "
            f"{len(prompt_ids)}-token prompt"
        )
    generator = new_generator(
        loaded,
        max_length=max_length or len(prompt_ids) + max_new_tokens,
        min_length=len(prompt_ids) + max_new_tokens if exact else 0,
    )
    stream = TextStream(loaded.tokenizer)
    started = time.perf_counter()
    first_token_at = None
    new_tokens = 0
    generator.append_tokens(np.asarray(prompt_ids, dtype=np.int32))
    while new_tokens < max_new_tokens and not generator.is_done():
        generator.generate_next_token()
        token = int(generator.get_next_tokens()[0])
        new_tokens += 1
        if first_token_at is None:
            first_token_at = time.perf_counter()
        if piece := stream.push(token):
            on_text(piece)
    if piece := stream.flush():
        on_text(piece)
    finished = time.perf_counter()
    return GenerationStats(
        prompt_tokens=len(prompt_ids),
        new_tokens=new_tokens,
        time_to_first_token_s=(first_token_at or finished) - started,
        seconds=finished - started,
    )


def sequence_logits(loaded: LoadedModel, ids: list[int]) -> np.ndarray:
    """Logits at every position of ``ids`` (seq, vocab), from one forward pass over the whole sequence."""
    import numpy as np

    generator = new_generator(loaded, max_length=len(ids))
    generator.append_tokens(np.asarray(ids, dtype=np.int32))
    return generator.get_output("logits")[0]


def response_loss(
    loaded: LoadedModel,
    pairs: list[dict],
    text_template: str | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> float:
    """Mean cross-entropy over the response tokens of ``pairs``: :func:`olivepress.scoring.response_token_loss`
    for the ONNX model, with the same tokens, mask and averaging, so the two numbers compare directly."""
    import numpy as np

    total_loss, total_tokens = 0.0, 0
    for pair in pairs:
        formatted = format_pair(loaded.tokenizer, pair["prompt"], pair["response"], text_template)
        ids, is_response = response_token_mask(
            loaded.tokenizer, formatted.prompt_text, formatted.full_text, max_tokens
        )
        scored = np.asarray(is_response[1:], dtype=bool)
        if not scored.any():
            continue
        logits = sequence_logits(loaded, ids)[:-1][scored].astype(np.float64)
        targets = np.asarray(ids[1:])[scored]
        peak = logits.max(axis=-1, keepdims=True)
        log_normalizer = np.log(np.exp(logits - peak).sum(axis=-1)) + peak[:, 0]
        total_loss += float((log_normalizer - logits[np.arange(len(targets)), targets]).sum())
        total_tokens += int(scored.sum())
    if total_tokens == 0:
        raise ValueError("no response tokens to score: every response is empty or cut off by max_tokens")
    return total_loss / total_tokens
