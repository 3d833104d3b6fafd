"""Chat with an exported model from the terminal: a prompt in, the answer streamed out, then its speed; or a
session of prompts line by line, switching adapters between them."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Literal, TextIO

from olivepress.config import DATASET_NAME
from olivepress.errors import UserError
from olivepress.genai import (
    ADAPTER_FILE,
    GenerationStats,
    LoadedModel,
    open_model,
    prompt_token_ids,
    stream_generate,
)
from olivepress.prompts import load_prompt_format
from olivepress.registry import ADAPTER_SUFFIX, ADAPTERS_DIR

AUTO = "auto"
SWITCH = "/adapter"
QUIT = "/quit"


def resolve_adapter(model_dir: Path, adapter: Path | Literal["auto"] | None) -> Path | None:
    """``"auto"``: the adapter the export wrote beside the model, if there is one; a file; or an adapter's
    name: ``adapters/<name>.onnx_adapter`` beside ``model_dir`` (a run folder's or a registry entry's) or
    inside it."""
    if adapter == AUTO:
        candidate = model_dir / ADAPTER_FILE
        return candidate if candidate.is_file() else None
    if adapter is None:
        return None
    if Path(adapter).is_file():
        return Path(adapter)
    if DATASET_NAME.fullmatch(str(adapter)):
        places = [folder / ADAPTERS_DIR for folder in (model_dir.parent, model_dir)]
        for place in places:
            if (place / f"{adapter}{ADAPTER_SUFFIX}").is_file():
                return place / f"{adapter}{ADAPTER_SUFFIX}"
        names = sorted(
            {file.name.removesuffix(ADAPTER_SUFFIX) for p in places for file in p.glob(f"*{ADAPTER_SUFFIX}")}
        )
        raise UserError(
            f"no adapter file {adapter} and no adapter named '{adapter}' in {places[0]}"
            + (f" (named adapters: {', '.join(names)})" if names else "")
        )
    raise UserError(f"adapter file {adapter} does not exist")


def chat(
    model_dir: Path,
    prompt: str,
    adapter: Path | Literal["auto"] | None = AUTO,
    max_new_tokens: int = 256,
    out: TextIO | None = None,
    text_template: str | None = None,
) -> GenerationStats:
    """Answer ``prompt`` formatted as in training: ``text_template``, else the one the export recorded,
    else the chat template.

    Streams to ``out`` (default: the current sys.stdout), then one line with tokens/s.
    """
    out = out or sys.stdout
    text_template = text_template if text_template is not None else load_prompt_format(model_dir)
    adapter_file = resolve_adapter(model_dir, adapter)
    loaded = open_model(model_dir, adapter_file)

    return answer(loaded, prompt, adapter_file, max_new_tokens, out, text_template)


def answer(
    loaded: LoadedModel,
    prompt: str,
    adapter_file: Path | None,
    max_new_tokens: int,
    out: TextIO,
    text_template: str | None,
) -> GenerationStats:
    def write(text: str) -> None:
        out.write(text)
        out.flush()

    stats = stream_generate(loaded, prompt_token_ids(loaded, prompt, text_template), max_new_tokens, write)
    adapter_note = f"adapter {adapter_file.name}" if adapter_file else "no adapter"
    out.write(
        f"\n\n[{stats.new_tokens} tokens, {stats.tokens_per_second:.1f} tokens/s, first token after "
        f"{stats.time_to_first_token_s:.2f} s, {adapter_note}]\n"
    )
    return stats


def chat_session(
    model_dir: Path,
    lines: Iterable[str],
    adapter: Path | Literal["auto"] | None = AUTO,
    max_new_tokens: int = 256,
    out: TextIO | None = None,
    text_template: str | None = None,
    show_prompt: bool = False,
) -> list[GenerationStats]:
    """Answer each line of ``lines`` as a prompt, one model for the whole session.

    ``/adapter FILE|NAME`` makes another .onnx_adapter (a file, or a named adapter) active for the prompts after it, ``/adapter off`` none,
    ``/adapter auto`` the folder's own; ``/quit`` (or the end of ``lines``) ends the session. Every adapter
    is loaded once into one ``og.Adapters`` on one int4 model and switched per prompt, so the folder's own
    adapter runs at run time here, not as its merged graph (on a GPU that is slower: README). A bad switch is
    reported and the session goes on with the adapter it had.
    """
    import onnxruntime_genai as og

    out = out or sys.stdout
    text_template = text_template if text_template is not None else load_prompt_format(model_dir)
    plain = open_model(model_dir)
    adapters = og.Adapters(plain.model)
    loaded_files: set[str] = set()

    def select(adapter_file: Path | None) -> LoadedModel:
        if adapter_file is None:
            return plain
        name = str(adapter_file.resolve())
        if name not in loaded_files:
            adapters.load(name, name)
            loaded_files.add(name)
        return LoadedModel(model=plain.model, tokenizer=plain.tokenizer, adapters=adapters, adapter_name=name)

    adapter_file = resolve_adapter(model_dir, adapter)
    current = select(adapter_file)
    answers = []
    if show_prompt:
        out.write("> ")
        out.flush()
    for line in lines:
        text = line.strip()
        if text == QUIT:
            break
        if text == SWITCH or text.startswith(f"{SWITCH} "):
            choice = text.removeprefix(SWITCH).strip()
            try:
                chosen = (
                    None
                    if choice == "off"
                    else resolve_adapter(model_dir, AUTO if choice == AUTO else Path(choice))
                )
                current, adapter_file = select(chosen), chosen
                out.write(f"[adapter {chosen.name if chosen else 'off'}]\n")
            except (UserError, RuntimeError) as error:
                out.write(
                    f"[{SWITCH} {choice}: {error}; still {adapter_file.name if adapter_file else 'off'}]\n"
                )
        elif text:
            answers.append(answer(current, text, adapter_file, max_new_tokens, out, text_template))
        if show_prompt:
            out.write("> ")
            out.flush()
    return answers
