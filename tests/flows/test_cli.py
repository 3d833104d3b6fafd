"""The command line as a user meets it: exit codes and messages, in a real subprocess."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from olivepress.config import SAMPLE_DATA, setting_fields
from olivepress.errors import UserError
from olivepress.flows.cli import RUN_FLAGS, VALIDATE_FLAGS, build_parser, config_from, main, parse_arguments


def olivepress(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "olivepress.flows.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def test_validate_accepts_the_shipped_sample():
    result = olivepress("validate", str(SAMPLE_DATA))
    assert result.returncode == 0, result.stderr
    assert "valid records" in result.stdout


def test_validate_names_each_bad_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"prompt": "Where?", "response": "Here."}\n'
        "not json\n"
        '{"prompt": "", "response": "Empty prompt."}\n'
        '{"prompt": "Fine?", "response": "Yes."}\n',
        encoding="utf-8",
    )
    result = olivepress("validate", str(bad))
    assert result.returncode == 1
    bad_lines = [line for line in result.stderr.splitlines() if line.startswith("line ")]
    assert [line.split(":")[0] for line in bad_lines] == ["line 2", "line 3"]
    assert "Traceback" not in result.stderr


def test_run_stops_on_bad_data_before_any_model_is_loaded(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Where?"}\n', encoding="utf-8")
    result = olivepress("run", "--data", str(bad), "--output", str(tmp_path / "runs"))
    assert result.returncode == 1
    assert "line 1" in result.stderr
    assert "Traceback" not in result.stderr
    (run_dir,) = (tmp_path / "runs").glob("run-*")
    assert (run_dir / "validation.txt").is_file()
    assert not (run_dir / "quantized").exists()
    # the store may hold the validate step's key lock, never an output of a later step
    assert not list((tmp_path / "runs").glob("store/quantize/*/*"))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--max-steps", "0"], "finetune.max_steps"),
        (["--model", "/nonexistent/model"], "model:"),
        (["--data", "/nonexistent.jsonl"], "data:"),
    ],
)
def test_run_rejects_bad_settings_by_field_name(tmp_path, args, expected):
    result = olivepress("run", *args, "--output", str(tmp_path))
    assert result.returncode == 1
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir()), "nothing is written before the config is valid"


def test_run_rejects_a_bad_config_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("device: tpu\n")
    result = olivepress("run", "--config", str(config))
    assert result.returncode == 1
    assert "device:" in result.stderr


def test_models_lists_each_registered_version_with_its_metrics(tmp_path):
    from dataclasses import asdict

    from olivepress.registry import LocalRegistry, content_sha256
    from tests.tasks.test_report import evaluation

    registry = LocalRegistry(tmp_path / "registry")
    for text in ("one", "two"):
        model = tmp_path / text
        model.mkdir()
        (model / "model.onnx").write_text(text)
        lineage = {
            "content_sha256": content_sha256({"model": model}),
            # the raw metrics build_lineage stores: unrounded, e.g. perplexity 2.718**2.88 = 17.8108...
            "metrics": [asdict(m) for m in evaluation(True).metrics],
            "data": {"sha256": "0123456789abcdef"},
            "registered_at": "2026-11-25T12:00:00+00:00",
        }
        registry.register("travel-model", {"model": model}, lineage)

    result = olivepress("models", "--registry", str(tmp_path / "registry"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["name", "version", "registered"]
    assert [line.split()[:2] for line in lines[1:]] == [["travel-model", "1"], ["travel-model", "2"]]
    assert "17.81 (base 21.75)" in lines[1] and "0123456789ab" in lines[1]
    assert "69.0 (base 50.0)" in lines[1] and "191.0 (base 540.0)" in lines[1], "tok/s and MB from raw fields"

    assert lines[0].split()[3] == "targets" and lines[1].split()[3] == "-", "registered before targets"

    # the lineage of datasets × targets: targets that passed, adapters by name with per-target records
    measured = {"metrics": lineage["metrics"], "gate": {"passed": True, "checks": []}}
    lineage["targets"] = {"cpu": measured, "cuda": measured}
    lineage["adapters"] = {
        name: {
            "data": {"path": f"/data/{name}.jsonl", "sha256": "e" * 64},
            "targets": {
                "cpu": {"file": f"adapters/cpu/{name}.onnx_adapter", "sha256": "a" * 64, **measured},
                "cuda": {"failure": "gate failed: speedup 0.9 (limit 1)"} if name == "support" else measured,
            },
        }
        for name in ("support", "travel")
    }
    registry.register("travel-model", {"model": model, "adapters": model}, lineage | {"content_sha256": "x"})
    result = olivepress("models", "--registry", str(tmp_path / "registry"))
    line = result.stdout.splitlines()[3]
    assert line.split()[:4] == ["travel-model", "3", "2026-11-25T12:00:00+00:00", "cpu,cuda"]
    assert " support,travel " in line, "an entry of several datasets names its adapters"
    assert "17.81 (base 21.75)" in line


def test_models_still_lists_an_entry_registered_with_display_rows(tmp_path):
    """Entries registered before lineage kept raw metrics hold the report's rounded rows: shown as they are."""
    from olivepress.registry import LocalRegistry, content_sha256
    from olivepress.tasks.report import metrics_rows
    from tests.tasks.test_report import evaluation

    model = tmp_path / "old"
    model.mkdir()
    (model / "model.onnx").write_text("old")
    lineage = {
        "content_sha256": content_sha256({"model": model}),
        "metrics": metrics_rows(evaluation(True)),
        "data": {"sha256": "0123456789abcdef"},
    }
    LocalRegistry(tmp_path / "registry").register("travel-model", {"model": model}, lineage)

    result = olivepress("models", "--registry", str(tmp_path / "registry"))
    assert result.returncode == 0, result.stderr
    line = result.stdout.splitlines()[1]
    assert "17.81 (base 21.75)" in line and "69.0 (base 50.0)" in line and "191.0 (base 540.0)" in line


def test_models_on_an_empty_registry_says_so(tmp_path):
    result = olivepress("models", "--registry", str(tmp_path / "none"))
    assert result.returncode == 0
    assert "no registered models" in result.stdout


def parsed_config(*argv: str):
    args = build_parser().parse_args(list(argv))
    return config_from(args, RUN_FLAGS if args.command == "run" else VALIDATE_FLAGS)


def test_set_reaches_nested_settings_of_the_run_config(tmp_path):
    config = parsed_config(
        "run",
        "--set",
        "finetune.lora_dropout=0.1",
        "--set",
        "registry.azureml={subscription_id: s, resource_group: g, workspace_name: w}",
        "--set",
        "registry.backend=azureml",
        "--set",
        "evaluate.generation_samples=4",
        "--set",
        "store.uri=s3://bucket/prefix",
    )
    assert config.finetune.lora_dropout == 0.1
    assert config.registry.backend == "azureml" and config.registry.azureml.workspace_name == "w"
    assert config.evaluate.generation_samples == 4
    assert config.store.uri == "s3://bucket/prefix"


def test_the_named_flags_are_the_same_settings_as_set(tmp_path):
    flags = parsed_config(
        "run",
        *("--device", "gpu", "--max-steps", "7", "--calibration-samples", "3"),
        *("--output", str(tmp_path / "out"), "--registry", str(tmp_path / "reg"), "--data", str(SAMPLE_DATA)),
    )
    sets = parsed_config(
        "run",
        *("--set", "device=gpu", "--set", "finetune.max_steps=7", "--set", "quantize.calibration_samples=3"),
        *("--set", f"output={tmp_path / 'out'}", "--set", f"registry.path={tmp_path / 'reg'}"),
        *("--set", f"data={SAMPLE_DATA}"),
    )
    assert flags == sets
    assert flags.finetune.max_steps == 7 and flags.registry.path == tmp_path / "reg"
    assert parsed_config("run", "--max-steps", "7", "--set", "finetune.max_steps=9").finetune.max_steps == 9


def test_help_describes_every_setting(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    run_help = capsys.readouterr().out
    for dotted, info in setting_fields():
        assert f"  {dotted} = " in run_help
        assert info.description.split()[0] in run_help
    assert "Optimizer steps of LoRA training. [setting finetune.max_steps, default 60]" in " ".join(
        run_help.split()
    )


def test_target_repeated_builds_the_targets_setting(capsys):
    assert parsed_config("run").targets == ["cpu"]
    both = parsed_config("run", "--target", "cpu", "--target", "cuda")
    assert both.targets == ["cpu", "cuda"]
    assert both == parsed_config("run", "--set", "targets=[cpu, cuda]")
    assert parsed_config("run", "--target", "cuda").targets == ["cuda"]
    assert parsed_config("run", "--device", "auto").device == "auto"
    with pytest.raises(SystemExit):
        parsed_config("run", "--target", "tpu")
    assert "invalid choice: 'tpu'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    run_help = " ".join(capsys.readouterr().out.split())
    assert "--target {cpu,cuda} What optimize builds and evaluate gates" in run_help
    assert "--device {auto,cpu,gpu}" in run_help
    with pytest.raises(UserError, match="each target once"):
        parsed_config("run", "--target", "cpu", "--target", "cpu")


def test_a_finished_run_names_each_targets_export_and_adapters_and_a_chat_command_that_works(tmp_path):
    import shlex

    from olivepress.chat import resolve_adapter, resolve_target
    from olivepress.flows.cli import run_summary

    run_dir = tmp_path / "run-1"
    exports, adapters = {}, {}
    for target in ("cpu", "cuda"):
        export = run_dir / "exports" / target
        export.mkdir(parents=True)
        (export / "genai_config.json").write_text("{}")
        (run_dir / "onnx").mkdir(exist_ok=True)
        (run_dir / "onnx" / target).symlink_to(export, target_is_directory=True)
        exports[target] = str(run_dir / "onnx" / target)
        (run_dir / "adapters" / target).mkdir(parents=True)
        adapters[target] = {}
        for name in ("travel", "support"):
            adapters[target][name] = run_dir / "adapters" / target / f"{name}.onnx_adapter"
            adapters[target][name].write_bytes(b"x")
    result = {
        "run_dir": str(run_dir),
        "onnx": str(run_dir / "onnx"),
        "exports": exports,
        "adapters": {t: {n: str(p) for n, p in named.items()} for t, named in adapters.items()},
        "report": str(run_dir / "report" / "report.md"),
        "registration": {"name": "m", "version": "1", "uri": "registry/m/1"},
    }
    lines = run_summary(result).splitlines()
    assert lines[:4] == [
        f"ONNX Runtime GenAI models: {run_dir / 'onnx'}",
        f"  cpu: {run_dir / 'onnx' / 'cpu'}",
        f"    adapter travel: {adapters['cpu']['travel']}",
        f"    adapter support: {adapters['cpu']['support']}",
    ]
    assert f"  cuda: {run_dir / 'onnx' / 'cuda'}" in lines
    assert "Registered: m version 1 (registry/m/1)" in lines
    try_it = lines[-1]
    assert try_it.startswith(f"Try it: olivepress chat {run_dir / 'onnx'} --adapter travel ")
    args = parse_arguments(build_parser(), shlex.split(try_it.removeprefix("Try it: olivepress ")))
    export = resolve_target(args.model_dir, args.target)
    assert resolve_adapter(export, args.adapter) == adapters[export.target]["travel"]

    # an adapter every target has is chosen; else one that passed on one target only, naming that target
    del result["adapters"]["cpu"]["travel"]
    assert f"chat {run_dir / 'onnx'} --adapter support " in run_summary(result).splitlines()[-1]
    result["adapters"]["cpu"] = {}
    assert f"chat {run_dir / 'onnx'} --target cuda --adapter travel " in run_summary(result).splitlines()[-1]


def test_run_refuses_an_unknown_setting_naming_it_and_the_valid_ones(tmp_path):
    result = olivepress("run", "--set", "finetune.lora_rank=8", "--output", str(tmp_path))
    assert result.returncode == 1
    assert "unknown setting 'finetune.lora_rank': section 'finetune' has no 'lora_rank'" in result.stderr
    assert "lora_r, lora_alpha" in result.stderr
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())


def test_run_names_the_field_of_a_bad_set_value(tmp_path):
    result = olivepress("run", "--set", "gate.min_rouge_l=2", "--output", str(tmp_path))
    assert result.returncode == 1
    assert "gate.min_rouge_l: Input should be less than or equal to 1" in result.stderr


def short_answers(tmp_path: Path) -> Path:
    data = tmp_path / "short.jsonl"
    data.write_text(
        '{"prompt": "Where to eat?", "response": "Go"}\n{"prompt": "What to see?", "response": "The old town."}\n',
        encoding="utf-8",
    )
    return data


@pytest.mark.parametrize(
    "settings",
    [
        ["--set", "validation.min_chars=3"],
        ["--min-chars", "3"],
        ["--config", "run.yaml"],
    ],
)
def test_validate_takes_the_runs_validation_settings(tmp_path, settings):
    (tmp_path / "run.yaml").write_text("validation:\n  min_chars: 3\n", encoding="utf-8")
    data = short_answers(tmp_path)
    assert olivepress("validate", str(data), cwd=tmp_path).returncode == 0, "min_chars is 1 by default"

    result = olivepress("validate", str(data), *settings, cwd=tmp_path)
    assert result.returncode == 1
    assert "line 1: response is 2 characters, fewer than min_chars=3" in result.stderr


def test_validate_refuses_bad_validation_settings_by_field_name(tmp_path):
    result = olivepress("validate", str(short_answers(tmp_path)), "--set", "validation.max_chars=0")
    assert result.returncode == 1
    assert "validation.max_chars: Input should be greater than or equal to 1" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_deploy_argument_the_target_cannot_take_is_a_user_error():
    result = olivepress("deploy", "process", "--concurrency", "0")
    assert result.returncode == 1, result.stderr
    assert "olivepress: concurrency must be at least 1" in result.stderr


STEPS = ["validate", "quantize", "finetune", "optimize", "evaluate_base", "evaluate", "report", "register"]
STEP_END = re.compile(r"^(\w+) +(completed|reused|failed)  [\d.]+ s$")


@pytest.mark.slow
def test_a_run_shows_one_line_per_step_and_keeps_library_output_in_its_log(tmp_path, tiny_model_dir):
    from tests.flows.test_pipeline import tiny_config

    config_file = tmp_path / "run.yaml"
    config = tiny_config(tmp_path, tiny_model_dir)
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))

    result = olivepress("run", "--config", str(config_file))
    assert result.returncode == 0, result.stderr[-3000:]
    terminal = result.stdout + result.stderr
    assert len(terminal.splitlines()) <= 40, terminal
    ends = [match for line in result.stderr.splitlines() if (match := STEP_END.match(line))]
    assert [(match[1], match[2]) for match in ends] == [(step, "completed") for step in STEPS], terminal
    assert "gate PASSED" in result.stderr and "Registered: " in result.stdout
    for chatter in [
        "Grid search for model.layers.",
        "Finished in state",
        "Please install tabulate",
        "'loss'",
    ]:
        assert chatter not in terminal
    (run_dir,) = config.output.glob("run-*")
    log = (run_dir / "run.log").read_text()
    for chatter in [
        "Grid search for model.layers.0",
        "Finished in state Completed()",
        "Please install tabulate",
    ]:
        assert chatter in log, f"{chatter!r} is in run.log"
    assert not re.search(r"\x1b\[[\d;]*m", log), "no color codes in the log (Prefect's lines)"

    again = olivepress("run", "--config", str(config_file), "--verbose")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Beginning flow run" in again.stderr, "--verbose shows Prefect's lines (and every library's) live"
    ends = [match for line in again.stderr.splitlines() if (match := STEP_END.match(line))]
    assert [match[2] for match in ends][:5] == ["reused"] * 5


@pytest.mark.slow
def test_a_run_from_a_hugging_face_id_resolves_offline_and_records_its_source(tmp_path, tiny_model_dir):
    """The model named as on the hub, served from the hub's cache with HF_HUB_OFFLINE=1 as a worker with a
    warmed cache would: the run registers it under the repository's name with the commit in its lineage."""
    import json
    import os

    from tests.flows.test_pipeline import tiny_config
    from tests.olivepress.test_model_source import COMMIT, REPO, hub_cache

    hf_home = tmp_path / "hf"
    hub_cache(hf_home, tiny_model_dir)
    raw = tiny_config(tmp_path, tiny_model_dir).model_dump(mode="json")
    raw["model"] = REPO
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    result = subprocess.run(
        [sys.executable, "-m", "olivepress.flows.cli", "run", "--config", str(config_file)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (lineage_file,) = (tmp_path / "registry").glob("*/*/lineage.json")
    assert lineage_file.parent.parent.name == "tiny-llama-olivepress"
    source = json.loads(lineage_file.read_text())["model_source"]
    assert (source["reference"], source["kind"], source["revision"]) == (REPO, "huggingface", COMMIT)
    assert len(source["content_sha256"]) == 64


def test_a_config_file_keeps_a_hugging_face_id_and_refuses_a_malformed_asset_id(tmp_path):
    from olivepress.config import load_config

    config_file = tmp_path / "run.yaml"
    config_file.write_text("model: microsoft/Phi-3.5-mini-instruct@main\n")
    assert load_config(config_file).model == "microsoft/Phi-3.5-mini-instruct@main"
    asset = "azureml://registries/azureml/models/Phi-3.5-mini-instruct/versions/4"
    assert load_config(None, {"model": asset}).model == asset
    result = olivepress(
        "run", "--model", "azureml://registries/azureml/models/Phi", "--output", str(tmp_path / "o")
    )
    assert result.returncode == 1
    assert "model:" in result.stderr and "not an Azure ML model asset id" in result.stderr


def test_data_name_path_repeated_names_several_datasets_and_a_file_stays_one(tmp_path):
    other = tmp_path / "support.jsonl"
    other.write_text(SAMPLE_DATA.read_text())
    several = parsed_config("run", "--data", f"travel={SAMPLE_DATA}", "--data", f"support={other}")
    assert several.datasets == {"travel": SAMPLE_DATA.resolve(), "support": other.resolve()}
    one = parsed_config("run", "--data", str(other))
    assert (one.datasets, one.dataset_sources()) == (None, {"support": other.resolve()})
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump({"datasets": {"a": "support.jsonl"}}))
    assert parsed_config("run", "--config", str(config_file)).datasets == {"a": other.resolve()}
    replaced = parsed_config("run", "--config", str(config_file), "--data", str(SAMPLE_DATA))
    assert (replaced.datasets, replaced.data) == (None, SAMPLE_DATA.resolve()), "--data replaces the file's"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--data", "a.jsonl", "--data", "b.jsonl"], "--data FILE takes one file"),
        (["--data", "a=x.jsonl", "--data", "b.jsonl"], "not both forms"),
        (["--data", "a=x.jsonl", "--data", "a=y.jsonl"], "the dataset name 'a' is given twice"),
        (["--data", "a=/nowhere.jsonl"], r"datasets: a: /nowhere.jsonl does not exist"),
    ],
)
def test_bad_data_flags_are_user_errors_naming_the_flag_or_field(tmp_path, capsys, args, expected):
    assert main(["run", "--output", str(tmp_path), *args]) == 1
    assert re.search(expected, capsys.readouterr().err)


def test_chats_prompt_may_come_before_or_after_its_options(capsys):
    parser = build_parser()
    for argv in (
        ["chat", "m", "hi there", "--adapter", "travel"],
        ["chat", "m", "--adapter", "travel", "hi there"],
    ):
        args = parse_arguments(parser, argv)
        assert (args.prompt, args.adapter) == ("hi there", "travel")
    assert parse_arguments(parser, ["chat", "m", "--max-new-tokens", "4"]).prompt is None
    with pytest.raises(SystemExit):
        parse_arguments(parser, ["chat", "m", "--adapter", "travel", "hi", "there"])
    assert "unrecognized arguments: hi there" in capsys.readouterr().err
