"""How a prompt/response pair becomes model text: the model's own chat template, or a user's text template.

Every step (AWQ calibration, LoRA training, held-out loss, chat) formats through here, so the model is
calibrated, trained and scored on exactly the text it will see at inference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from olivepress.errors import InvalidArgument

PROMPT_FIELD = "{prompt}"
RESPONSE_FIELD = "{response}"


@dataclass(frozen=True)
class FormattedPair:
    prompt_text: str  # everything the model is given before it should answer
    full_text: str  # prompt_text followed by the response and its end marker


def format_pair(tokenizer, prompt: str, response: str, text_template: str | None = None) -> FormattedPair:
    if text_template is not None:
        head = text_template.split(RESPONSE_FIELD, 1)[0]
        return FormattedPair(
            prompt_text=head.replace(PROMPT_FIELD, prompt),
            full_text=text_template.replace(PROMPT_FIELD, prompt).replace(RESPONSE_FIELD, response),
        )
    user = [{"role": "user", "content": prompt}]
    prompt_text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(
        [*user, {"role": "assistant", "content": response}], tokenize=False
    )
    if not full_text.startswith(prompt_text):
        raise InvalidArgument(
            "the model's chat template renders the prompt differently with and without an answer, so the "
            "response cannot be told apart from the prompt; set text_template (e.g. --set "
            "'text_template=Question: {prompt} Answer: {response}') to format the examples yourself"
        )
    return FormattedPair(prompt_text=prompt_text, full_text=full_text)


def format_prompt(tokenizer, prompt: str, text_template: str | None = None) -> str:
    """The text to generate from: the formatted pair up to where the response starts."""
    return format_pair(tokenizer, prompt, "", text_template).prompt_text


PROMPT_FORMAT_FILE = "olivepress_prompt.json"


def save_prompt_format(model_dir: Path, text_template: str | None) -> None:
    """Record beside an exported model how prompts were formatted in training, so chat formats alike."""
    (model_dir / PROMPT_FORMAT_FILE).write_text(
        json.dumps({"text_template": text_template}), encoding="utf-8"
    )


def load_prompt_format(model_dir: Path) -> str | None:
    path = model_dir / PROMPT_FORMAT_FILE
    return json.loads(path.read_text(encoding="utf-8"))["text_template"] if path.is_file() else None
