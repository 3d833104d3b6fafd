"""A LongRoPE (Phi-3) CUDA export decodes through CUDA graphs, and the graphs change no logit."""

import json

import numpy as np
import pytest

from olivepress.export.builder import build_base_model
from olivepress.genai import GENAI_CONFIG, new_generator, open_model
from tests.conftest import build_tiny_model

pytestmark = pytest.mark.gpu


def greedy_logits(model_dir, prompt: list[int], new_tokens: int) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and each step's last-position logits; with CUDA graphs every step after the first
    replays the captured graph."""
    loaded = open_model(model_dir)
    generator = new_generator(loaded, max_length=len(prompt) + new_tokens)
    generator.append_tokens(np.asarray(prompt, dtype=np.int32))
    tokens, rows = [], []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
        rows.append(generator.get_output("logits")[0, -1].astype(np.float32))
    return tokens, np.stack(rows)


def test_phi3_decodes_through_cuda_graphs_with_the_logits_of_eager_cuda(tmp_path):
    model_dir = build_tiny_model(tmp_path / "phi3", architecture="phi3")
    graphs = build_base_model(model_dir, tmp_path / "graphs", "cuda", cuda_graph=True)
    eager = build_base_model(model_dir, tmp_path / "eager", "cuda", cuda_graph=False)
    config = json.loads((graphs / GENAI_CONFIG).read_text())
    assert (
        config["model"]["decoder"]["session_options"]["provider_options"][0]["cuda"]["enable_cuda_graph"]
        == "1"
    )

    # the prompt ends 4 tokens short of T and decoding runs past it, so both RoPE caches are used; with
    # graphs the attention mask is max_length wide while decoding, so a choice by its width would use the
    # long-factor caches from the first decoded token on
    t = json.loads((model_dir / "config.json").read_text())["original_max_position_embeddings"]
    prompt = np.random.default_rng(0).integers(3, 500, t - 4).tolist()
    tokens, logits = greedy_logits(graphs, prompt, 12)
    expected_tokens, expected = greedy_logits(eager, prompt, 12)
    assert tokens == expected_tokens
    np.testing.assert_allclose(logits, expected, atol=1e-2)  # fp16: the same kernels, graph or not
