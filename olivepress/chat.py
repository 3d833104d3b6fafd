"""Chat with an exported model from the terminal: one prompt in, the answer streamed out, then its speed."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal, TextIO

from olivepress.errors import UserError
from olivepress.genai import ADAPTER_FILE, GenerationStats, open_model, prompt_token_ids, stream_generate
from olivepress.prompts import load_prompt_format

AUTO = "auto"


def resolve_adapter(model_dir: Path, adapter: Path | Literal["auto"] | None) -> Path | None:
    """``"auto"``: the adapter the export wrote beside the model, if there is one."""
    if adapter == AUTO:
        candidate = model_dir / ADAPTER_FILE
        return candidate if candidate.is_file() else None
    if adapter is None:
        return None
    if not Path(adapter).is_file():
        raise UserError(f"adapter file {adapter} does not exist")
    return Path(adapter)


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
