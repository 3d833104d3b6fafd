import pytest

from olivepress.errors import UserError
from olivepress.prompts import format_pair
from olivepress.scoring import split_by_prompt


def pairs(prompts):
    return [{"prompt": p, "response": f"answer {i}"} for i, p in enumerate(prompts)]


def test_every_copy_of_a_held_out_prompt_is_held_out():
    data = pairs(["paris"] * 14 + [f"q{i}" for i in range(20)])
    train, held_out = split_by_prompt(data, 0.2, seed=0)
    assert {p["prompt"] for p in train}.isdisjoint({p["prompt"] for p in held_out})
    assert len(train) + len(held_out) == len(data)
    assert len({p["prompt"] for p in held_out}) == round(21 * 0.2)


def test_the_split_is_seeded():
    data = pairs([f"q{i}" for i in range(30)])
    assert split_by_prompt(data, 0.2, seed=1) == split_by_prompt(data, 0.2, seed=1)
    assert split_by_prompt(data, 0.2, seed=1) != split_by_prompt(data, 0.2, seed=2)


def test_small_data_keeps_one_prompt_on_each_side():
    train, held_out = split_by_prompt(pairs(["a", "b"]), 0.01, seed=0)
    assert len(train) == len(held_out) == 1
    train, held_out = split_by_prompt(pairs(["a", "b"]), 0.99, seed=0)
    assert len(train) == len(held_out) == 1


def test_one_distinct_prompt_cannot_be_split():
    with pytest.raises(UserError, match="1 distinct prompt"):
        split_by_prompt(pairs(["same", "same"]), 0.2, seed=0)


def test_a_chat_template_that_moves_the_prompt_is_a_user_error():
    """The CLI exits 1 with the message (a user error), not 2 as for an unforeseen failure."""

    class Template:
        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
            return "<q>" + messages[0]["content"] + ("</q>" if add_generation_prompt else "|")

    with pytest.raises(UserError, match="set text_template") as caught:
        format_pair(Template(), "Where?", "Here.")
    assert isinstance(caught.value, ValueError)
