"""The base model built ahead in a child process: the builder's real output, a failure left to evaluate,
and a child stopped when the run no longer needs it."""

from __future__ import annotations

import json
import logging

from olivepress.base_ahead import BaseAhead


def test_the_child_builds_the_base_model_and_closing_removes_it(tmp_path, tiny_model_dir):
    scratch = tmp_path / "staging"
    with BaseAhead(tiny_model_dir, scratch, "cpu", cuda_graph=False, trust_remote_code=False) as ahead:
        built = ahead.take()
        assert built is not None and built.parent.parent == scratch
        assert (built / "model.onnx").is_file()
        config = json.loads((built / "genai_config.json").read_text())
        assert config["model"]["decoder"]["session_options"]["provider_options"] == [], "the CPU build"
        assert ahead.take() == built, "taking it again waits for nothing"
    assert list(scratch.iterdir()) == []


def test_a_failed_build_is_logged_and_left_to_evaluate(tmp_path, caplog):
    not_a_model = tmp_path / "not-a-model"  # a folder without config.json
    not_a_model.mkdir()
    with (
        BaseAhead(not_a_model, tmp_path / "staging", "cpu", False, False) as ahead,
        caplog.at_level(logging.WARNING, logger="olivepress.base_ahead"),
    ):
        assert ahead.take() is None
        assert ahead.take() is None  # a second evaluation (several datasets) asks again: logged once
    message = caplog.text
    assert message.count("the base model built ahead failed") == 1
    assert "the base model built ahead failed" in message and "evaluate builds it itself" in message
    assert "the ONNX Runtime GenAI model builder failed" in message, "the child's own error is in the log"
    assert not (tmp_path / "staging").exists() or list((tmp_path / "staging").iterdir()) == []


def test_closing_stops_a_child_that_is_still_building(tmp_path, tiny_model_dir):
    ahead = BaseAhead(tiny_model_dir, tmp_path / "staging", "cpu", False, False)
    ahead.close()  # at once: the child is still importing the builder
    assert ahead.child.returncode is not None and ahead.child.returncode != 0
    assert not ahead.folder.exists()
