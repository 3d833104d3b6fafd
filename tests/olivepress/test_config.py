import json
from pathlib import Path
from typing import get_args, get_origin

import pytest
from pydantic import BaseModel

from olivepress.architectures import SUPPORTED_ARCHITECTURES
from olivepress.config import (
    GROUP_SIZES,
    SAMPLE_DATA,
    FinetuneSettings,
    RunConfig,
    ValidationSettings,
    checked,
    group_size_problem,
    load_config,
    setting_fields,
)
from olivepress.errors import UserError
from tests.conftest import ARCHITECTURES


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_are_the_offline_demo():
    config = load_config()
    assert config.model is None
    assert config.data == SAMPLE_DATA.resolve()
    assert config.device == "auto" and config.targets == ["cpu"]  # compute where it can, build for CPUs
    assert config.quantize.group_size == 32


def test_yaml_then_flags_with_flags_winning(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    path = write_yaml(tmp_path, "data: d.jsonl\nfinetune:\n  max_steps: 7\n  lora_r: 8\n")
    config = load_config(path, {"finetune.max_steps": 3, "device": None})
    assert config.data == data.resolve()
    assert config.finetune.max_steps == 3
    assert config.finetune.lora_r == 8


@pytest.mark.parametrize(
    ("yaml_text", "overrides", "expected"),
    [
        ("device: tpu\n", {}, "device: Input should be 'auto', 'cpu' or 'gpu'"),
        ("", {"finetune.max_steps": 0}, "finetune.max_steps: Input should be greater than or equal to 1"),
        ("quantize:\n  group_size: 100\n", {}, "quantize.group_size"),
        ("text_template: 'Q: {prompt}'\n", {}, "text_template: the template must contain {response}"),
        ("text_template: '{response} {prompt}'\n", {}, "{prompt} must come before {response}"),
        ("validation:\n  min_chars: 10\n  max_chars: 5\n", {}, "min_chars (10) is larger than max_chars (5)"),
        ("data: missing.jsonl\n", {}, "data: "),
        ("model: nowhere\n", {}, "model: "),
        ("finetune:\n  lora_rank: 8\n", {}, "finetune.lora_rank: Extra inputs are not permitted"),
        ("finetune:\n  learning_rate: 2\n", {}, "finetune.learning_rate"),
    ],
)
def test_bad_settings_name_the_field(tmp_path, yaml_text, overrides, expected):
    with pytest.raises(UserError) as caught:
        load_config(write_yaml(tmp_path, yaml_text), overrides)
    assert expected in str(caught.value)


def test_model_folder_needs_a_config_json(tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(UserError, match=r"model: .*has no config.json"):
        load_config(overrides={"model": tmp_path / "model"})


def test_all_errors_reported_at_once(tmp_path):
    with pytest.raises(UserError) as caught:
        load_config(write_yaml(tmp_path, "device: tpu\nseed: -1\n"))
    assert "device:" in str(caught.value)
    assert "seed:" in str(caught.value)


@pytest.mark.parametrize("text", ["[1, 2]\n", "a: [\n"])
def test_yaml_that_is_not_a_mapping(tmp_path, text):
    with pytest.raises(UserError, match=r"run\.yaml"):
        load_config(write_yaml(tmp_path, text))


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_config_round_trips_through_json():
    config = load_config()
    assert RunConfig.model_validate_json(config.model_dump_json()) == config


def test_paths_in_a_config_file_are_relative_to_it_and_uris_are_kept(tmp_path):
    (tmp_path / "conf").mkdir()
    path = write_yaml(
        tmp_path / "conf",
        "registry:\n  path: reg\nstore:\n  uri: s3://bucket/prefix\n  cache_dir: cache\noutput: out\n",
    )
    config = load_config(path)
    assert config.registry.path == tmp_path / "conf" / "reg"
    assert config.store.cache_dir == tmp_path / "conf" / "cache"
    assert config.output == tmp_path / "conf" / "out"
    assert config.store.uri == "s3://bucket/prefix"


def test_azureml_backend_needs_its_workspace():
    with pytest.raises(UserError, match=r"registry: .*backend azureml needs registry\.azureml"):
        load_config(overrides={"registry.backend": "azureml"})


def test_data_may_be_an_s3_uri_checked_when_the_run_fetches_it():
    config = load_config(overrides={"data": "s3://bucket/data/travel.jsonl"})
    assert config.data == "s3://bucket/data/travel.jsonl"
    with pytest.raises(UserError, match=r"data: /nope\.jsonl does not exist"):
        load_config(overrides={"data": "/nope.jsonl"})


@pytest.mark.parametrize(
    ("model_type", "architecture"),
    [
        ("bert", "BertForMaskedLM"),
        ("falcon", "FalconForCausalLM"),
        ("llama", "LlamaForSequenceClassification"),
    ],
)
def test_a_model_the_builder_cannot_export_is_refused_before_any_step(tmp_path, model_type, architecture):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(
        json.dumps({"model_type": model_type, "architectures": [architecture]})
    )
    with pytest.raises(UserError) as caught:
        load_config(overrides={"model": model})
    message = str(caught.value)
    assert (
        f"model: model_type {model_type!r} with architecture {architecture!r} cannot be exported" in message
    )
    for supported in SUPPORTED_ARCHITECTURES:
        assert supported in message


def test_a_model_with_its_own_code_is_told_what_trust_remote_code_would_and_would_not_do(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    config = {"model_type": "chatglm", "architectures": ["ChatGLMModel"], "auto_map": {"AutoModel": "m.M"}}
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"only with trust_remote_code: true.*even then the ONNX export"):
        load_config(overrides={"model": model})


def test_every_supported_architecture_has_a_tiny_model_in_the_tests():
    assert set(SUPPORTED_ARCHITECTURES) == set(ARCHITECTURES)


def _all_fields(model: type[BaseModel], prefix: str = "") -> dict[str, tuple[str | None, bool]]:
    """Every field of ``model`` and of the models inside it: dotted name -> (description, is a section)."""
    fields = {}
    for name, info in model.model_fields.items():
        sections = [
            kind
            for kind in (info.annotation, *get_args(info.annotation))
            if isinstance(kind, type) and get_origin(kind) is None and issubclass(kind, BaseModel)
        ]
        fields[f"{prefix}{name}"] = (info.description, bool(sections))
        for section in sections:
            fields |= _all_fields(section, f"{prefix}{name}.")
    return fields


def test_every_setting_and_section_has_a_description():
    """The Prefect run form and `olivepress run --help` are built from these descriptions."""
    fields = _all_fields(RunConfig)
    assert len(fields) > 50
    assert [name for name, (description, _) in fields.items() if not (description or "").strip()] == []
    leaves = [name for name, (_, is_section) in fields.items() if not is_section]
    assert [dotted for dotted, _ in setting_fields()] == leaves, "--set and --help list every setting"


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        (["cpu", "cpu"], "targets: each target once"),
        (["tpu"], "targets.0: Input should be 'cpu' or 'cuda'"),
        ([], "targets: List should have at least 1 item"),
    ],
)
def test_bad_targets_name_the_field(targets, expected):
    with pytest.raises(UserError) as caught:
        load_config(overrides={"targets": targets})
    assert expected in str(caught.value)


def test_targets_keep_their_order():
    assert load_config(assignments=["targets=[cuda, cpu]"]).targets == ["cuda", "cpu"]


def test_set_reaches_nested_fields_parsed_as_yaml(tmp_path):
    path = write_yaml(tmp_path, "gate:\n  min_rouge_l: 0.3\nregistry:\n  name: from-file\n")
    config = load_config(
        path,
        {"finetune.max_steps": 5},
        [
            "finetune.max_steps=7",
            "finetune.learning_rate=1e-4",
            "finetune.gradient_checkpointing=true",
            "finetune.target_modules=[q_proj, v_proj]",
            "gate.min_rouge_l=null",
            "registry.name=1.0",
            "text_template={prompt} -> {response}",
            "evaluate.held_out_fraction=0.25",
            "optimize.cuda_graph=false",
        ],
    )
    assert config.finetune.max_steps == 7, "--set comes after the flags"
    assert config.finetune.learning_rate == 1e-4
    assert config.finetune.gradient_checkpointing is True
    assert config.finetune.target_modules == ["q_proj", "v_proj"]
    assert config.gate.min_rouge_l is None, "null unsets a value from the file"
    assert config.registry.name == "1.0", "text settings keep the text"
    assert config.text_template == "{prompt} -> {response}"
    assert config.evaluate.held_out_fraction == 0.25
    assert config.optimize.cuda_graph is False


def test_set_may_fill_a_nested_section():
    config = load_config(
        assignments=[
            "registry.backend=azureml",
            "registry.azureml.subscription_id=sub",
            "registry.azureml.resource_group=rg",
            "registry.azureml.workspace_name=ws",
        ]
    )
    assert config.registry.azureml.workspace_name == "ws"


@pytest.mark.parametrize(
    ("assignment", "expected"),
    [
        (
            "finetune.lora_rank=8",
            "unknown setting 'finetune.lora_rank': section 'finetune' has no 'lora_rank'",
        ),
        ("fintune.max_steps=8", "unknown setting 'fintune.max_steps': the config has no 'fintune'"),
        ("seed.value=1", "unknown setting 'seed.value': seed is a single setting, not a section"),
        ("finetune.max_steps", "expected SECTION.FIELD=VALUE"),
        ("=3", "expected SECTION.FIELD=VALUE"),
    ],
)
def test_set_of_an_unknown_setting_names_it(assignment, expected):
    with pytest.raises(UserError) as caught:
        load_config(assignments=[assignment])
    assert expected in str(caught.value)


def test_unknown_setting_lists_the_valid_names():
    with pytest.raises(UserError) as caught:
        load_config(assignments=["finetune.lora_rank=8"])
    for name in FinetuneSettings.model_fields:
        assert name in str(caught.value)
    with pytest.raises(UserError) as caught:
        load_config(assignments=["fintune.max_steps=8"])
    for name in RunConfig.model_fields:
        assert name in str(caught.value)


@pytest.mark.parametrize(
    ("assignment", "expected"),
    [
        ("finetune.max_steps=zero", "finetune.max_steps: Input should be a valid integer"),
        ("finetune.max_steps=0", "finetune.max_steps: Input should be greater than or equal to 1"),
        ("quantize.group_size=48", "quantize.group_size: Input should be 16, 32, 64 or 128"),
        ("device=tpu", "device: Input should be 'auto', 'cpu' or 'gpu'"),
        ("model=/nonexistent/model", "model: /nonexistent/model is not a folder"),
    ],
)
def test_a_bad_value_given_with_set_names_the_field(assignment, expected):
    with pytest.raises(UserError) as caught:
        load_config(assignments=[assignment])
    assert expected in str(caught.value)


def test_group_size_rule_lives_in_the_config():
    assert GROUP_SIZES == (16, 32, 64, 128)
    assert group_size_problem(32, {"hidden_size": 576}) is None
    assert "does not divide hidden_size = 576" in group_size_problem(128, {"hidden_size": 576})
    assert "must be one of" in group_size_problem(48)


def test_checked_applies_a_sections_rules_naming_the_section():
    assert checked(ValidationSettings, "validation", min_chars=2, max_chars=9).max_chars == 9
    with pytest.raises(UserError, match=r"validation: min_chars \(10\) is larger than max_chars \(5\)"):
        checked(ValidationSettings, "validation", min_chars=10, max_chars=5)
    with pytest.raises(UserError, match=r"validation\.min_chars: Input should be greater than or equal to 1"):
        checked(ValidationSettings, "validation", min_chars=0, max_chars=5)


def test_datasets_are_named_files_instead_of_data(tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for path in (first, second):
        path.write_text('{"prompt": "p", "response": "r"}\n')
    config = load_config(overrides={"datasets": {"travel": first, "support": second}})
    assert config.dataset_sources() == {"travel": first.resolve(), "support": second.resolve()}
    assert load_config(overrides={"data": tmp_path / "a.jsonl"}).dataset_sources() == {"a": first.resolve()}
    odd = tmp_path / "2024 logs.v2.jsonl"
    odd.write_text('{"prompt": "p", "response": "r"}\n')
    assert load_config(overrides={"data": odd}).dataset_name() == "data_2024_logs_v2"
    assert load_config().dataset_name() == "travel_sample"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"datasets": {"1st": "{a}"}}, r"datasets: '1st' is not a dataset name"),
        (
            {"datasets": {"Travel": "{a}", "travel": "{a}"}},
            r"datasets: 'travel' and 'Travel' differ only in case",
        ),
        ({"datasets": {"x": "{tmp}/missing.jsonl"}}, r"datasets: x: .*missing.jsonl does not exist"),
        ({"datasets": {}}, r"datasets: name at least one dataset"),
        ({"datasets": {"x": "{a}"}, "data": "{a}"}, r"give data \(one dataset\) or datasets"),
        ({"datasets": {"x": "{a}"}, "calibration_datasets": ["y"]}, r"calibration_datasets names \['y'\]"),
    ],
)
def test_bad_datasets_name_the_field(tmp_path, raw, expected):
    first = tmp_path / "a.jsonl"
    first.write_text('{"prompt": "p", "response": "r"}\n')
    text = json.dumps(raw).replace("{a}", str(first)).replace("{tmp}", str(tmp_path))  # JSON is YAML
    (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(UserError, match=expected):
        load_config(tmp_path / "run.yaml")
