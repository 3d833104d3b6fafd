import io

import pytest

from olivepress.chat import chat
from olivepress.errors import UserError
from olivepress.export.folder import export_onnx
from olivepress.genai import (
    ADAPTER_FILE,
    GENAI_CONFIG,
    TextStream,
    open_model,
    prompt_token_ids,
    response_loss,
    stream_generate,
)
from tests.conftest import make_lora_adapter, sample_pairs


@pytest.fixture(scope="module")
def adapter_dir(tiny_int4_dir, tmp_path_factory):
    # on this near-uniform random model a random adapter moves the held-out loss little: seeds 0-5 moved it
    # 0.2e-2 to 1.5e-2; seed 4, 1.5e-2, more than the ONNX losses' tolerance
    return make_lora_adapter(
        tiny_int4_dir, tmp_path_factory.mktemp("lora"), seed=4, target_modules=["q_proj", "v_proj"]
    )


@pytest.fixture(scope="module")
def model_dir(tiny_int4_dir, adapter_dir, tmp_path_factory):
    """Exported as the pipeline exports: the CPU defaults, int8 activations in MatMulNBits included."""
    return export_onnx(tiny_int4_dir, adapter_dir, tmp_path_factory.mktemp("onnx")).model_dir


@pytest.mark.parametrize("with_adapter", [False, True])
def test_generation_streams_text_with_and_without_adapter(model_dir, with_adapter):
    loaded = open_model(model_dir, model_dir / ADAPTER_FILE if with_adapter else None)
    pieces = []
    stats = stream_generate(loaded, prompt_token_ids(loaded, "Where should I go?"), 12, pieces.append)
    assert loaded.adapter_active == with_adapter
    assert 0 < stats.new_tokens <= 12
    assert 0 < stats.time_to_first_token_s <= stats.seconds
    assert all(isinstance(piece, str) and piece for piece in pieces)


def test_a_longer_generator_generates_the_same_tokens(model_dir):
    """Evaluate sizes every generator of a variant alike (graph reuse on CUDA); the text must not change."""
    loaded = open_model(model_dir)
    ids = prompt_token_ids(loaded, "Where should I go?")
    short, long = [], []
    short_stats = stream_generate(loaded, ids, 8, short.append)
    long_stats = stream_generate(loaded, ids, 8, long.append, max_length=len(ids) + 40)
    assert short_stats.new_tokens == long_stats.new_tokens
    assert "".join(long) == "".join(short)
    with pytest.raises(ValueError, match="no room"):
        stream_generate(loaded, ids, 8, long.append, max_length=len(ids) + 7)


def test_an_exact_generation_runs_past_end_of_text(model_dir, tmp_path):
    """Made to end at once: the folder's end-of-text id set to the first token the model picks."""
    import json
    import shutil

    ids = prompt_token_ids(open_model(model_dir), "Where should I go?")
    first = []
    stream_generate(open_model(model_dir), ids, 1, first.append)
    ending = shutil.copytree(model_dir, tmp_path / "ending")
    config = json.loads((ending / GENAI_CONFIG).read_text())
    loaded = open_model(ending)
    config["model"]["eos_token_id"] = loaded.tokenizer(first[0], add_special_tokens=False)["input_ids"][0]
    (ending / GENAI_CONFIG).write_text(json.dumps(config))
    loaded = open_model(ending)
    assert stream_generate(loaded, ids, 40, lambda _text: None).new_tokens == 1
    assert stream_generate(loaded, ids, 40, lambda _text: None, exact=True).new_tokens == 40


def test_onnx_loss_matches_the_pytorch_loss(model_dir, tiny_int4_dir, adapter_dir):
    from peft import PeftModel

    from olivepress.export.int4 import load_dequantized_model
    from olivepress.scoring import response_token_loss

    pairs = sample_pairs()[:4]
    plain, adapted = open_model(model_dir), open_model(model_dir, model_dir / ADAPTER_FILE)
    base = load_dequantized_model(tiny_int4_dir)
    expected_off = response_token_loss(base, plain.tokenizer, pairs)
    expected_on = response_token_loss(PeftModel.from_pretrained(base, adapter_dir), plain.tokenizer, pairs)
    # MatMulNBits' int8 activations move the loss by 1e-5 relative here and 1e-3 on SmolLM2 (3.6535 vs
    # 3.6500 on 20 travel pairs; with float activations both models agree to 1e-6). A wrong weight, mask or
    # LoRA scaling moves it far more; this adapter moves it by 1.5e-2 absolute.
    assert response_loss(plain, pairs) == pytest.approx(expected_off, rel=2e-3)
    assert response_loss(adapted, pairs) == pytest.approx(expected_on, rel=2e-3)
    assert abs(expected_on - expected_off) > 1e-2


def test_text_stream_holds_back_split_characters(model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = "Café 😀 naïve"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # the emoji and accents span several byte tokens
    stream = TextStream(tokenizer)
    pieces = [stream.push(token) for token in ids]
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) + stream.flush() == text


def test_chat_streams_and_reports_speed(model_dir):
    out = io.StringIO()
    stats = chat(model_dir, "Where should I go?", adapter="auto", max_new_tokens=6, out=out)
    assert stats.new_tokens > 0
    assert "tokens/s" in out.getvalue() and f"adapter {ADAPTER_FILE}" in out.getvalue()
    out = io.StringIO()
    chat(model_dir, "Where should I go?", adapter=None, max_new_tokens=6, out=out)
    assert "no adapter" in out.getvalue()


def test_missing_model_or_adapter_is_a_user_error(model_dir, tmp_path):
    with pytest.raises(UserError):
        open_model(tmp_path)
    with pytest.raises(UserError):
        chat(model_dir, "Hi", adapter=tmp_path / "missing.onnx_adapter", out=io.StringIO())


def test_a_chat_session_switches_adapters_between_prompts(model_dir, tmp_path):
    from olivepress.chat import chat_session

    lines = [
        "Where should I go?",
        "/adapter off",
        "Where should I go?",
        f"/adapter {tmp_path / 'missing.onnx_adapter'}",
        "",
        "/adapter auto",
        "Where should I go?",
        "/quit",
        "never answered",
    ]
    out = io.StringIO()
    answers = chat_session(model_dir, lines, max_new_tokens=6, out=out)
    text = out.getvalue()
    assert len(answers) == 3
    footers = [line for line in text.splitlines() if line.startswith("[") and "tokens/s" in line]
    assert [footer.rsplit(", ", 1)[1] for footer in footers] == [
        f"adapter {ADAPTER_FILE}]",
        "no adapter]",
        f"adapter {ADAPTER_FILE}]",
    ]
    assert "missing.onnx_adapter does not exist; still off" in text


def test_chat_without_a_prompt_reads_prompts_from_standard_input(model_dir):
    import subprocess
    import sys

    session = subprocess.run(
        [sys.executable, "-m", "olivepress.flows.cli", "chat", str(model_dir), "--max-new-tokens", "4"],
        input="Where should I go?\n/adapter off\nAnd then?\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert session.returncode == 0, session.stderr
    assert session.stdout.count("tokens/s") == 2
    assert "[adapter off]" in session.stdout


def test_an_adapter_is_chosen_by_name_beside_or_inside_the_model_folder(model_dir, tmp_path):
    """A run folder (or registry entry) holds adapters/<name>.onnx_adapter beside its model folder."""
    import shutil

    from olivepress.chat import chat_session

    (tmp_path / "onnx").symlink_to(model_dir, target_is_directory=True)
    (tmp_path / "adapters").mkdir()
    shutil.copy(model_dir / ADAPTER_FILE, tmp_path / "adapters" / "travel.onnx_adapter")
    out = io.StringIO()
    chat(tmp_path / "onnx", "Where should I go?", adapter="travel", max_new_tokens=4, out=out)
    assert out.getvalue().rstrip().endswith("adapter travel.onnx_adapter]")
    with pytest.raises(UserError, match=r"no adapter named 'hiking' .*\(named adapters: travel\)"):
        chat(tmp_path / "onnx", "Hi", adapter="hiking", out=io.StringIO())
    out = io.StringIO()
    chat_session(tmp_path / "onnx", ["/adapter travel", "Hi", "/adapter hiking"], max_new_tokens=4, out=out)
    assert "[adapter travel.onnx_adapter]" in out.getvalue()
    assert "no adapter named 'hiking'" in out.getvalue() and "still travel.onnx_adapter" in out.getvalue()


def test_a_cpu_model_opens_with_a_thread_per_core_unless_its_folder_says(model_dir, tmp_path):
    """ONNX Runtime's own default ran one thread on a 2-core machine; a CUDA model or a folder that sets a
    count is left as it is."""
    import json
    import os
    import shutil

    from olivepress.genai import GENAI_CONFIG, MERGED_MODEL_FILE, decoder_overlay

    cores = len(os.sched_getaffinity(0))
    overlay = decoder_overlay(model_dir, merged=True)
    assert overlay["filename"] == MERGED_MODEL_FILE
    assert overlay["session_options"]["intra_op_num_threads"] == cores
    assert decoder_overlay(model_dir, merged=False) == {"session_options": overlay["session_options"]}

    def with_session_options(name: str, **options) -> object:
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(model_dir / GENAI_CONFIG, folder / GENAI_CONFIG)
        config = json.loads((folder / GENAI_CONFIG).read_text())
        config["model"]["decoder"]["session_options"].update(options)
        (folder / GENAI_CONFIG).write_text(json.dumps(config))
        return folder

    assert decoder_overlay(with_session_options("cuda", provider_options=[{"cuda": {}}]), merged=False) == {}
    assert decoder_overlay(with_session_options("set", intra_op_num_threads=3), merged=False) == {}
