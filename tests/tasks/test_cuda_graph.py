"""CUDA graphs for LongRoPE (Phi-3) exports: the builder's cache-choosing ``If`` replaced without control flow,
and any control flow left turning CUDA graphs off, built on CPU (the builder needs no GPU)."""

import json
import logging
import shutil

import numpy as np
import pytest

from olivepress.export import cuda_graph
from olivepress.export.builder import build_base_model
from olivepress.export.cuda_graph import CONTROL_FLOW_OPS, select_rope_caches_without_if
from olivepress.export.folder import export_onnx
from olivepress.genai import GENAI_CONFIG, MODEL_FILE, new_generator, open_model, sequence_logits
from tests.conftest import build_tiny_model


@pytest.fixture(scope="module")
def phi3_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("phi3"), architecture="phi3")


@pytest.fixture(scope="module")
def phi3_int4_dir(phi3_dir, tmp_path_factory):
    from olivepress.export.int4 import write_rtn_checkpoint

    return write_rtn_checkpoint(phi3_dir, tmp_path_factory.mktemp("phi3-int4"))


def original_length(model_dir) -> int:
    """T: LongRoPE's long-factor caches take over once the sequence is longer (4096 in the tiny Phi-3)."""
    return json.loads((model_dir / "config.json").read_text())["original_max_position_embeddings"]


def load_graph(model_dir):
    import onnx

    return onnx.load(str(model_dir / MODEL_FILE), load_external_data=False).graph


def op_types(model_dir) -> set[str]:
    return {node.op_type for node in load_graph(model_dir).node}


def cuda_graph_option(model_dir) -> str | None:
    config = json.loads((model_dir / GENAI_CONFIG).read_text())
    [options] = config["model"]["decoder"]["session_options"]["provider_options"]
    return options["cuda"].get("enable_cuda_graph")


def step_logits(model_dir, prompt: list[int], forced: list[int]) -> np.ndarray:
    """Last-position logits after the prompt and after each forced token appended one at a time (decoding)."""
    loaded = open_model(model_dir)
    generator = new_generator(loaded, max_length=len(prompt) + len(forced))
    generator.append_tokens(np.asarray(prompt, dtype=np.int32))
    rows = [generator.get_output("logits")[0, -1]]
    for token in forced:
        generator.append_tokens(np.asarray([token], dtype=np.int32))
        rows.append(generator.get_output("logits")[0, -1])
    return np.stack(rows)


def test_rope_caches_chosen_without_if_give_the_builders_logits_below_and_above_t(phi3_dir, tmp_path):
    import onnx

    builder = build_base_model(phi3_dir, tmp_path / "builder")  # CPU: the builder's graph, If and all
    assert "If" in op_types(builder)
    surgery = tmp_path / "surgery"
    shutil.copytree(builder, surgery)
    model = onnx.load(str(surgery / MODEL_FILE), load_external_data=False)
    assert select_rope_caches_without_if(model.graph, surgery)
    onnx.save(model, str(surgery / MODEL_FILE))
    assert not op_types(surgery) & set(CONTROL_FLOW_OPS)

    t = original_length(phi3_dir)
    ids = np.random.default_rng(0).integers(3, 500, t + 40).tolist()
    short, long = ids[:64], ids
    for sequence in (short, long):
        expected = sequence_logits(open_model(builder), sequence)
        np.testing.assert_array_equal(sequence_logits(open_model(surgery), sequence), expected)
    # both branches ran: past T the long-factor caches change even the first positions' logits
    long_start = sequence_logits(open_model(builder), long)[: len(short)]
    assert np.abs(long_start - sequence_logits(open_model(builder), short)).max() > 1e-3
    # decoding across T switches caches at the same token (the condition reads seqlens_k, not the mask)
    prompt, forced = ids[: t - 4], ids[t - 4 : t + 4]
    np.testing.assert_array_equal(step_logits(surgery, prompt, forced), step_logits(builder, prompt, forced))


@pytest.mark.parametrize("build", ["int4", "base"])
def test_cuda_export_with_graphs_has_no_control_flow(build, phi3_dir, phi3_int4_dir, tmp_path):
    if build == "int4":
        out = export_onnx(phi3_int4_dir, None, tmp_path / "onnx", target="cuda", cuda_graph=True).model_dir
    else:
        out = build_base_model(phi3_dir, tmp_path / "base", "cuda", cuda_graph=True)
    assert not op_types(out) & set(CONTROL_FLOW_OPS)
    assert {"ReduceSum", "Greater", "Cast", "Gather"} <= op_types(out)
    assert cuda_graph_option(out) == "1"
    stacked = {i.name: list(i.dims) for i in load_graph(out).initializer if i.name.endswith("/stacked")}
    assert stacked == {"cos_cache/stacked": [2, 131072, 8], "sin_cache/stacked": [2, 131072, 8]}


def test_cuda_export_without_graphs_is_the_builders(phi3_dir, tmp_path):
    out = build_base_model(phi3_dir, tmp_path / "eager", "cuda", cuda_graph=False)
    assert "If" in op_types(out)
    assert cuda_graph_option(out) == "0"


def test_control_flow_left_in_the_graph_turns_cuda_graphs_off(phi3_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(cuda_graph, "select_rope_caches_without_if", lambda graph, model_dir: False)
    with caplog.at_level(logging.WARNING, logger=cuda_graph.__name__):
        out = build_base_model(phi3_dir, tmp_path / "kept-if", "cuda", cuda_graph=True)
    assert "If" in op_types(out)
    assert cuda_graph_option(out) == "0"
    assert "control-flow nodes (If)" in caplog.text


def test_graphs_without_rope_if_are_left_as_built(tiny_model_dir, tmp_path):
    eager = build_base_model(tiny_model_dir, tmp_path / "eager", "cuda", cuda_graph=False)
    graphs = build_base_model(tiny_model_dir, tmp_path / "graphs", "cuda", cuda_graph=True)
    assert cuda_graph_option(graphs) == "1"
    assert (graphs / MODEL_FILE).read_bytes() == (eager / MODEL_FILE).read_bytes()
