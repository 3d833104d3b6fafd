"""Shared fixtures: tiny random decoder models (Llama by default) with a real BPE tokenizer, built offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from olivepress.config import SAMPLE_DATA

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_TRAVEL = REPO_ROOT.parent / "shared" / "data" / "travel.jsonl"

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def travel_jsonl() -> Path:
    if not SHARED_TRAVEL.is_file():
        pytest.skip(f"the lab's dataset is not here ({SHARED_TRAVEL}); it lives in ../shared beside the repo")
    return SHARED_TRAVEL


def sample_pairs() -> list[dict]:
    return [json.loads(line) for line in SAMPLE_DATA.read_text(encoding="utf-8").splitlines() if line.strip()]


# One tiny config per decoder family the pipeline supports, each shaped like its real models where that
# shape is what the exporter or the runtime has to get right: Phi-3's fused linears and LongRoPE (as
# Phi-3.5-mini), Qwen2's q/k/v biases and tied embeddings, Qwen3's q/k norms, Gemma's sliding windows.
# Every input size is a multiple of the group size 32 (hidden 64, head_dim 16, intermediate 128).
ARCHITECTURES = ("llama", "phi3", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text")


def tiny_model_config(architecture: str, vocab_size: int, hidden_size: int, layers: int, token_ids: dict):
    """The transformers config of a tiny random model of ``architecture``."""
    import transformers

    common = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        **token_ids,
    }
    head_dim = hidden_size // 4
    if architecture == "llama":
        return transformers.LlamaConfig(**common)
    if architecture == "phi3":
        factors = [1.0 + index / head_dim for index in range(head_dim // 2)]
        return transformers.Phi3Config(
            **{**common, "max_position_embeddings": 131072, "tie_word_embeddings": False},
            original_max_position_embeddings=4096,
            rope_parameters={"type": "longrope", "short_factor": factors, "long_factor": factors[::-1]},
        )
    if architecture == "qwen2":
        return transformers.Qwen2Config(**common)
    if architecture == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=head_dim)
    if architecture == "mistral":
        return transformers.MistralConfig(**{**common, "tie_word_embeddings": False}, head_dim=head_dim)
    if architecture == "gemma2":
        return transformers.Gemma2Config(**common, head_dim=head_dim, query_pre_attn_scalar=head_dim)
    if architecture == "gemma3_text":
        return transformers.Gemma3TextConfig(
            **common,
            head_dim=head_dim,
            query_pre_attn_scalar=head_dim,
            layer_types=["sliding_attention", "full_attention"] * (layers // 2)
            + ["sliding_attention"] * (layers % 2),
        )
    raise ValueError(f"no tiny config for {architecture!r}; known: {ARCHITECTURES}")


def build_tiny_model(
    target: Path, *, architecture: str = "llama", hidden_size: int = 64, layers: int = 2
) -> Path:
    """A random ``architecture`` model (ChatML tokenizer trained on the sample data) that trains in seconds."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = [f"{pair['prompt']} {pair['response']}" for pair in sample_pairs()]
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    token_ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = tiny_model_config(architecture, len(tokenizer), hidden_size, layers, token_ids)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_int4_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with every decoder linear rounded to 4 bits (RTN), in the builder's checkpoint layout."""
    from olivepress.export.int4 import write_rtn_checkpoint

    return write_rtn_checkpoint(tiny_model_dir, tmp_path_factory.mktemp("tiny-int4"))


def make_lora_adapter(checkpoint_dir, target, seed=0, **lora_options):
    """A PEFT adapter on the dequantized checkpoint, with a random (not zero) B so it changes the output."""
    import torch
    from peft import LoraConfig, get_peft_model

    from olivepress.export.int4 import load_dequantized_model

    options = {"r": 4, "lora_alpha": 8, "target_modules": LINEARS, "task_type": "CAUSAL_LM", **lora_options}
    base = load_dequantized_model(checkpoint_dir)
    # seeded after loading: the adapter depends on the seed alone, not on how the model was built
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(**options))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.2)
    model.save_pretrained(target)
    return target


class S3Server:
    """moto's S3 server on a loopback port; stop() and start() keep the buckets (moto keeps them in-process)."""

    def __init__(self) -> None:
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        self._server.stop()


@pytest.fixture(scope="session")
def s3_server():
    import os

    # moto accepts any credentials; botocore must find some, and must not look for a real account's
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        os.environ[name] = value
    server = S3Server()
    server.start()
    yield server
    server.stop()
