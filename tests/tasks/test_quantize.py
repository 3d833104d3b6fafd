"""The quantize step on a tiny random Llama (seconds), and once on SmolLM2 (slow)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from olivepress.config import SAMPLE_DATA, QuantizeSettings
from olivepress.errors import UserError
from olivepress.export.int4 import (
    load_dequantized_model,
    read_int4_checkpoint,
    rtn_quantize,
    write_int4_checkpoint,
    write_rtn_checkpoint,
)
from olivepress.prompts import format_pair
from olivepress.scoring import response_token_loss, split_by_prompt
from olivepress.tasks.quantize import (
    apply_awq,
    calibration_blocks,
    calibration_token_ids,
    check_group_size,
    quantize_awq,
    take_int4_weights,
)
from tests.conftest import ARCHITECTURES, build_tiny_model

TINY_SETTINGS = QuantizeSettings(group_size=32, calibration_samples=8, calibration_max_tokens=64)
SMOLLM2_SHAPES = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, head_dim=64)


def sample_pairs() -> list[dict]:
    return [json.loads(line) for line in SAMPLE_DATA.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_group_size_must_divide_every_quantized_input():
    config = LlamaConfig(**SMOLLM2_SHAPES)
    check_group_size(config, 32)
    check_group_size(config, 64)
    with pytest.raises(UserError, match=r"quantize\.group_size = 128 does not divide hidden_size = 576"):
        check_group_size(config, 128)
    with pytest.raises(UserError, match=r"quantize\.group_size must be one of"):
        check_group_size(config, 48)


def test_quantize_refuses_a_group_size_before_loading_the_model(tiny_model_dir, tmp_path):
    settings = QuantizeSettings(group_size=128)
    with pytest.raises(UserError, match="hidden_size = 64"):
        quantize_awq(tiny_model_dir, sample_pairs(), tmp_path / "out", settings, progress=False)
    assert not (tmp_path / "out").exists()


def test_calibration_uses_a_seeded_sample_formatted_as_at_inference(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs = sample_pairs()
    first = calibration_token_ids(tokenizer, pairs, TINY_SETTINGS, seed=1)
    assert first == calibration_token_ids(tokenizer, pairs, TINY_SETTINGS, seed=1)
    assert first != calibration_token_ids(tokenizer, pairs, TINY_SETTINGS, seed=2)
    assert len(first) == TINY_SETTINGS.calibration_samples
    assert all(len(ids) <= TINY_SETTINGS.calibration_max_tokens for ids in first)
    full_texts = {format_pair(tokenizer, p["prompt"], p["response"]).full_text for p in pairs}
    assert all(any(text.startswith(tokenizer.decode(ids)) for text in full_texts) for ids in first)


def test_calibration_blocks_keep_every_token_in_order():
    examples = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    assert calibration_blocks(examples, 4) == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    assert calibration_blocks(examples, 100) == [list(range(1, 11))]
    assert calibration_blocks(examples, None) == examples


@pytest.fixture(scope="module")
def tiny_awq(tiny_model_dir, tmp_path_factory):
    """The tiny model through llm-compressor's AWQ, with what its own forward computes recorded first."""
    from compressed_tensors.quantization import forward_quantize

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    token_ids = calibration_token_ids(tokenizer, sample_pairs(), TINY_SETTINGS, seed=0)
    apply_awq(model, tokenizer, token_ids, TINY_SETTINGS.group_size, progress=False)
    probe = torch.tensor([token_ids[0]])
    with torch.no_grad():
        logits = model(probe).logits
        fake_quantized = {
            name: forward_quantize(module, module.weight, "weight", module.quantization_scheme.weights)
            for name, module in model.named_modules()
            if getattr(module, "quantization_scheme", None) is not None
        }
    weights = take_int4_weights(model)
    out_dir = tmp_path_factory.mktemp("tiny-awq")
    write_int4_checkpoint(model, weights, out_dir, TINY_SETTINGS.group_size)
    return {
        "probe": probe,
        "logits": logits,
        "fake_quantized": fake_quantized,
        "weights": weights,
        "dir": out_dir,
    }


def test_int4_weights_are_exactly_llm_compressors_fake_quantized_weights(tiny_awq):
    weights, fake_quantized = tiny_awq["weights"], tiny_awq["fake_quantized"]
    assert set(weights) == set(fake_quantized)
    assert len(weights) == 2 * 7 and "lm_head" not in weights
    for name, weight in weights.items():
        assert weight.group_size == TINY_SETTINGS.group_size
        assert int(weight.q.max()) <= 15 and int(weight.zero_points.max()) <= 15
        torch.testing.assert_close(weight.dequantize(), fake_quantized[name], rtol=0, atol=1e-7)


def test_checkpoint_reloads_to_the_forward_llm_compressor_calibrated(tiny_awq):
    reloaded = load_dequantized_model(tiny_awq["dir"])
    with torch.no_grad():
        logits = reloaded(tiny_awq["probe"]).logits
    torch.testing.assert_close(logits, tiny_awq["logits"], rtol=1e-4, atol=1e-4)


def test_checkpoint_holds_the_smoothed_norms_and_untouched_tied_embeddings(tiny_awq, tiny_model_dir):
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    floats, weights = read_int4_checkpoint(tiny_awq["dir"])
    assert not [name for name in floats if "weight_scale" in name or "zero_point" in name]
    assert not [name for name in weights if f"{name}.weight" in floats]
    torch.testing.assert_close(floats["model.embed_tokens.weight"], original["model.embed_tokens.weight"])
    norms = [name for name in floats if name.endswith("layernorm.weight")]
    assert any(not torch.equal(floats[name], original[name]) for name in norms), "AWQ folded no scales"
    config = json.loads((tiny_awq["dir"] / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert config["quantization_config"]["group_size"] == TINY_SETTINGS.group_size


def test_quantize_awq_writes_a_loadable_checkpoint_and_tokenizer(tiny_model_dir, tmp_path):
    result = quantize_awq(tiny_model_dir, sample_pairs(), tmp_path, TINY_SETTINGS, seed=3, progress=False)
    assert result.quantized_linears == 14
    assert result.calibration_examples == TINY_SETTINGS.calibration_samples
    block = TINY_SETTINGS.calibration_block_tokens
    assert result.calibration_sequences == -(-result.calibration_tokens // block)  # the examples, in blocks
    assert (tmp_path / "tokenizer.json").is_file()
    model = load_dequantized_model(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert torch.isfinite(torch.tensor(response_token_loss(model, tokenizer, sample_pairs()[:4])))


def test_response_token_loss_matches_masked_labels(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs = sample_pairs()[:3]
    summed, counted = 0.0, 0
    for pair in pairs:
        formatted = format_pair(tokenizer, pair["prompt"], pair["response"])
        ids = tokenizer(formatted.full_text, return_tensors="pt")["input_ids"]
        prompt_length = len(tokenizer(formatted.prompt_text)["input_ids"])
        labels = ids.clone()
        labels[:, :prompt_length] = -100
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss.item()
        tokens = ids.shape[1] - prompt_length
        summed, counted = summed + loss * tokens, counted + tokens
    assert response_token_loss(model, tokenizer, pairs) == pytest.approx(summed / counted, rel=1e-5)


@pytest.mark.slow
def test_awq_on_smollm2_beats_round_to_nearest(tmp_path, travel_jsonl):
    from olivepress.default_model import default_model_dir

    model_dir = default_model_dir()
    pairs = [json.loads(line.strip()) for line in travel_jsonl.open(encoding="utf-8-sig") if line.strip()]
    pool, held_out = split_by_prompt(pairs, held_out_fraction=0.1, seed=0)
    settings = QuantizeSettings(calibration_samples=8)
    result = quantize_awq(model_dir, pool, tmp_path, settings, grid_points=10, progress=False)
    assert result.quantized_linears == 30 * 7

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    awq_loss = response_token_loss(load_dequantized_model(tmp_path), tokenizer, held_out)
    rtn = AutoModelForCausalLM.from_pretrained(model_dir)
    for name, module in rtn.named_modules():
        if name.startswith("model.layers.") and isinstance(module, torch.nn.Linear):
            module.weight.data = rtn_quantize(module.weight.data, settings.group_size).dequantize()
    assert awq_loss < response_token_loss(rtn, tokenizer, held_out)


def test_fused_linears_are_stored_split_and_read_back_fused(tmp_path):
    """Phi-3's qkv_proj and gate_up_proj go to disk as q/k/v and gate/up (the builder misreads a fused
    "olive" qzeros); readers get the fused 4-bit integers back exactly, and the HF model loads them."""
    from safetensors.torch import load_file

    model_dir = build_tiny_model(tmp_path / "phi3", architecture="phi3")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    weights = {
        name: rtn_quantize(module.weight.data, 32)
        for name, module in model.named_modules()
        if name.startswith("model.layers.") and isinstance(module, torch.nn.Linear)
    }
    write_int4_checkpoint(model, weights, tmp_path / "int4", group_size=32)

    stored = load_file(tmp_path / "int4" / "model.safetensors")
    layer = "model.layers.0"
    assert not [name for name in stored if "qkv_proj" in name or "gate_up_proj" in name]
    assert stored[f"{layer}.self_attn.q_proj.qzeros"].shape == (64, 1)  # (out, groups / 2): 4 heads of 16
    assert stored[f"{layer}.self_attn.k_proj.qweight"].shape == (32, 32)  # 2 kv heads of 16, 64 inputs / 2
    assert stored[f"{layer}.mlp.up_proj.scales"].shape == (128, 2)
    _, read = read_int4_checkpoint(tmp_path / "int4")
    assert read.keys() == weights.keys()
    for name, weight in weights.items():
        assert torch.equal(read[name].q, weight.q), name
        assert torch.equal(read[name].zero_points, weight.zero_points), name
        assert torch.equal(read[name].scales, weight.scales), name
    dequantized = load_dequantized_model(tmp_path / "int4")
    fused = f"{layer}.self_attn.qkv_proj"
    assert torch.equal(dequantized.get_submodule(fused).weight, weights[fused].dequantize())


def randomly_initialized_then_loaded(checkpoint_dir):
    """The reference: transformers' random init, then every checkpoint tensor copied over it."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoint_dir)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    floats, weights = read_int4_checkpoint(checkpoint_dir)
    model.load_state_dict(
        {**floats, **{f"{n}.weight": w.dequantize() for n, w in weights.items()}}, strict=False
    )
    model.tie_weights()
    return model.eval()


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_dequantized_model_skips_the_random_init_and_loads_the_same(tmp_path, architecture):
    """Every parameter, and every non-persistent buffer (rotary inv_freq, Gemma's embed_scale: computed,
    not left uninitialized), equals what random init plus load gives; tied embeddings stay tied."""
    checkpoint = write_rtn_checkpoint(
        build_tiny_model(tmp_path / "hf", architecture=architecture), tmp_path / "q"
    )
    expected, loaded = randomly_initialized_then_loaded(checkpoint), load_dequantized_model(checkpoint)

    for name, tensor in expected.state_dict().items():
        assert tensor.dtype == loaded.state_dict()[name].dtype
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert expected.state_dict().keys() == loaded.state_dict().keys()
    buffers = dict(loaded.named_buffers())
    assert any("inv_freq" in name for name in buffers)
    for name, buffer in expected.named_buffers():
        assert torch.equal(buffer, buffers[name]), name
    tied = loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    assert tied == loaded.config.tie_word_embeddings
    probe = torch.tensor([list(range(5, 40))])
    with torch.no_grad():
        assert torch.equal(expected(probe).logits, loaded(probe).logits)


def test_dequantized_model_in_bfloat16_is_the_float32_one_cast(tmp_path):
    checkpoint = write_rtn_checkpoint(build_tiny_model(tmp_path / "hf", architecture="qwen2"), tmp_path / "q")
    float32 = load_dequantized_model(checkpoint).state_dict()
    bfloat16 = load_dequantized_model(checkpoint, torch.bfloat16).state_dict()
    assert bfloat16.keys() == float32.keys()
    for name, tensor in bfloat16.items():
        assert torch.equal(tensor, float32[name].to(torch.bfloat16)), name
