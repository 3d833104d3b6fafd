"""Held-out mean token loss on the responses only: the one number every model variant is compared by.

Prompt tokens are context, not targets, so they are masked; the loss is summed over every response token
of the set and divided once by their count, so long answers weigh by their length rather than per example.
"""

from __future__ import annotations

from olivepress.errors import InvalidArgument
from olivepress.prompts import format_pair

DEFAULT_MAX_TOKENS = 512


def response_token_mask(tokenizer, prompt_text: str, full_text: str, max_tokens: int):
    """Token ids of ``full_text`` (cut to ``max_tokens``) and which of them belong to the response.

    A token belongs to the response when it ends past the prompt text, so a token that straddles the
    boundary (a user template's "A: " joined to the answer's first word) is scored, not dropped.
    """
    encoded = tokenizer(full_text, return_offsets_mapping=True, add_special_tokens=True)
    ids = encoded["input_ids"][:max_tokens]
    is_response = [end > len(prompt_text) for _, end in encoded["offset_mapping"][:max_tokens]]
    return ids, is_response


def response_token_loss(
    model,
    tokenizer,
    pairs: list[dict],
    text_template: str | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> float:
    """Mean cross-entropy of ``model`` over the response tokens of ``pairs``, teacher-forced."""
    import torch

    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for pair in pairs:
                formatted = format_pair(tokenizer, pair["prompt"], pair["response"], text_template)
                ids, is_response = response_token_mask(
                    tokenizer, formatted.prompt_text, formatted.full_text, max_tokens
                )
                targets = torch.tensor(ids[1:], device=device)
                scored = torch.tensor(is_response[1:], device=device)
                if not scored.any():
                    continue
                logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, :-1].float()
                summed = torch.nn.functional.cross_entropy(logits[scored], targets[scored], reduction="sum")
                total_loss += summed.item()
                total_tokens += int(scored.sum())
    finally:
        model.train(was_training)
    if total_tokens == 0:
        raise InvalidArgument(
            "no response tokens to score: every response is empty or cut off by max_tokens "
            f"({max_tokens}); raise the limit or shorten the prompts"
        )
    return total_loss / total_tokens


def split_by_prompt(pairs: list[dict], held_out_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train pairs, held-out pairs), seeded; every pair of a held-out prompt is held out.

    Splitting by prompt, not by line, matters: the lab's data repeats prompts (one 14 times), and a
    held-out line whose prompt was trained on would flatter the fine-tuned model. At least one prompt
    goes to each side; data with fewer than two distinct prompts cannot be split (a UserError).
    """
    import random

    from olivepress.errors import UserError

    prompts = sorted({pair["prompt"] for pair in pairs})
    if len(prompts) < 2:
        raise UserError(
            f"the data has {len(prompts)} distinct prompt(s); at least 2 are needed to hold one out for evaluation"
        )
    random.Random(seed).shuffle(prompts)
    n_held_out = min(max(round(len(prompts) * held_out_fraction), 1), len(prompts) - 1)
    held_out = set(prompts[:n_held_out])
    return [p for p in pairs if p["prompt"] not in held_out], [p for p in pairs if p["prompt"] in held_out]
