"""Which edit invalidates which step: code versions from each step's imports, keys from its declared settings."""

from __future__ import annotations

import pytest

from olivepress.config import RunConfig, load_config
from olivepress.store import cache_keys
from olivepress.tasks import evaluate, finetune, optimize, quantize, validate

STEPS = [
    validate.STEP,
    quantize.STEP,
    finetune.STEP,
    optimize.STEP,
    optimize.ADAPTER_STEP,  # export_adapter: a further dataset's adapter against the base export
    evaluate.BASE_STEP,  # evaluate_base: the base model's measurements, reused by every adapter and run
    evaluate.STEP,
]
NAMES = [step.name for step in STEPS]


@pytest.fixture(autouse=True)
def fresh_code_versions():
    cache_keys.code_modules.cache_clear()
    cache_keys.code_version.cache_clear()
    yield
    cache_keys.code_modules.cache_clear()
    cache_keys.code_version.cache_clear()


def code_versions() -> dict[str, str]:
    cache_keys.code_modules.cache_clear()
    cache_keys.code_version.cache_clear()
    return {step.name: cache_keys.code_version(step.module) for step in STEPS}


def edit(monkeypatch, module: str, old: str | None = None, new: str = "") -> None:
    """Make the code versions read ``module``'s source with ``old`` replaced by ``new`` (or a line added)."""
    path = cache_keys.module_file(module)
    original = cache_keys.source_bytes

    def edited(target):
        source = original(target)
        if target != path:
            return source
        if old is None:
            return source + b"\n# edited\n"
        assert source.count(old.encode()) == 1, old
        return source.replace(old.encode(), new.encode())

    monkeypatch.setattr(cache_keys, "source_bytes", edited)


def invalidated(monkeypatch, module: str, old: str | None = None, new: str = "") -> list[str]:
    before = code_versions()
    edit(monkeypatch, module, old, new)
    after = code_versions()
    return [name for name in NAMES if before[name] != after[name]]


def test_a_step_covers_the_modules_it_imports_lazy_ones_included():
    modules = {step.name: set(step.code_modules()) for step in STEPS}
    # evaluate imports the export's build_base_model inside a function
    assert {"olivepress.export.builder", "olivepress.export.cuda_graph"} <= modules["evaluate"]
    assert "olivepress.genai" in modules["evaluate"] and "olivepress.genai" in modules["optimize"]
    assert {"olivepress.export.int4", "olivepress.prompts"} <= modules["quantize"] & modules["finetune"]
    for step in STEPS:
        covered = modules[step.name]
        assert step.module in covered
        assert "olivepress.chat" not in covered, step.name
        assert not covered & cache_keys.NOT_OUTPUT_CODE, step.name


# module edited → the steps whose code version changes (the table in docs/caching.md, "Cache keys")
INVALIDATION = {
    "olivepress.tasks.validate": ["validate"],
    "olivepress.tasks.quantize": ["quantize"],
    "olivepress.tasks.finetune": ["finetune"],
    "olivepress.tasks.optimize": ["optimize", "export_adapter"],
    "olivepress.tasks.evaluate": ["evaluate_base", "evaluate"],
    "olivepress.tasks.report": ["validate"],  # validate publishes a failure's report with it
    "olivepress.export.int4": ["quantize", "finetune"],
    "olivepress.prompts": [
        "quantize",
        "finetune",
        "optimize",
        "export_adapter",
        "evaluate_base",
        "evaluate",
    ],
    "olivepress.genai": ["optimize", "export_adapter", "evaluate_base", "evaluate"],
    # the base model is built as the export is; evaluate reads the export by its digest, not the grafting code
    "olivepress.export.builder": ["optimize", "export_adapter", "evaluate_base", "evaluate"],
    "olivepress.export.cuda_graph": ["optimize", "export_adapter", "evaluate_base", "evaluate"],
    "olivepress.export.folder": ["optimize", "export_adapter"],
    "olivepress.export.lora": ["optimize", "export_adapter"],
    "olivepress.export.kernel": ["optimize", "export_adapter"],
    # the package's own file, which imports none of its modules: every step that imports one of them
    "olivepress.export": ["quantize", "finetune", "optimize", "export_adapter", "evaluate_base", "evaluate"],
    "olivepress.gpu_memory": ["evaluate_base", "evaluate"],
    "olivepress.files": ["validate"],
    "olivepress.validation": ["validate"],
    "olivepress.chat": [],
    "olivepress.registry": [],
    "olivepress.store": [],
    "olivepress.store.s3_lease": [],
    "olivepress.registry.azureml": [],
    "olivepress.retry": [],
    "olivepress.progress": [],
    "olivepress.config": [],
    "olivepress.flows.pipeline": [],
    "olivepress.tasks.finetune_worker": [],  # runs finetune's code in a child process, computes nothing
    "olivepress.base_ahead": [],  # runs build_base_model (optimize's code) in a child process, ahead
}


def test_an_edited_cuda_kernel_invalidates_the_steps_that_build_it(monkeypatch):
    """The LoraAdd library is compiled into optimize's output from a .cu file, no Python module."""
    kernel = cache_keys.module_file("olivepress.export.kernel").parent / "kernels" / "lora_add.cu"
    original = cache_keys.source_bytes
    before = code_versions()
    monkeypatch.setattr(
        cache_keys, "source_bytes", lambda path: original(path) + (b"// edited" if path == kernel else b"")
    )
    after = code_versions()
    assert [name for name in NAMES if before[name] != after[name]] == INVALIDATION["olivepress.export.kernel"]


@pytest.mark.parametrize("module", INVALIDATION)
def test_an_edited_module_invalidates_the_steps_that_import_it(monkeypatch, module):
    assert invalidated(monkeypatch, module) == INVALIDATION[module]


def test_editing_build_base_model_invalidates_evaluate_which_calls_it(monkeypatch):
    changed = invalidated(
        monkeypatch,
        "olivepress.export.builder",
        old='"""The unquantized model through the same builder',
        new='"""The unquantized model (edited) through the same builder',
    )
    assert changed == ["optimize", "export_adapter", "evaluate_base", "evaluate"]


def test_a_new_import_brings_its_module_into_the_code_version(monkeypatch):
    edit(
        monkeypatch,
        "olivepress.tasks.quantize",
        old="import contextlib\n",
        new="import contextlib\n\n\ndef f():\n    import olivepress.chat\n",
    )
    cache_keys.code_modules.cache_clear()
    assert "olivepress.chat" in quantize.STEP.code_modules()


def test_type_checking_imports_are_not_code_the_step_runs():
    assert "olivepress.tasks.evaluate" not in optimize.STEP.code_modules()
    assert cache_keys.imported_modules("olivepress.tasks.report") >= {"olivepress.files"}
    assert "olivepress.tasks.validate" not in cache_keys.imported_modules("olivepress.tasks.report")


def keys(config: RunConfig) -> dict[str, str]:
    inputs = {"data": "d", "data_file": "d", "model_dir": "m", "examples": "e", "checkpoint_dir": "c"}
    inputs |= {
        "adapter_dir": "a",
        "onnx_dir": "o",
        "held_out": "h",
        "target": "t",
        "machine": "x",
        "base": "b",
    }
    return {
        step.name: step.key({name: inputs[name] for name in ("data", *step.inputs)}, step.settings_of(config))
        for step in STEPS
    }


# setting changed → the steps whose key changes
SETTINGS = {
    "validation.max_chars": (100, ["validate"]),
    "quantize.calibration_samples": (8, ["quantize"]),
    "finetune.max_steps": (7, ["finetune"]),
    "optimize.cuda_graph": (False, ["optimize", "evaluate_base"]),
    "evaluate.max_new_tokens": (9, ["evaluate_base", "evaluate"]),
    "seed": (5, ["quantize", "finetune"]),
    "device": ("gpu", ["finetune"]),  # where training runs; what is built for is each step's target input
    "targets": (["cpu", "cuda"], []),  # a target is an input of the steps built for it, never a setting
    "text_template": (
        "U:{prompt} A:{response}",
        ["quantize", "finetune", "optimize", "evaluate_base", "evaluate"],
    ),
    "trust_remote_code": (True, ["quantize", "finetune", "optimize", "evaluate_base"]),
    "gate.min_speedup": (0.5, []),
    "retries.step_attempts": (1, []),
    "registry.name": ("travel", []),
    "output": ("elsewhere", []),
    "trainings_at_once": (2, []),
    "build_base_early": (True, []),
}


@pytest.mark.parametrize("setting", SETTINGS)
def test_a_setting_invalidates_only_the_steps_that_declare_it(setting):
    value, expected = SETTINGS[setting]
    before, after = keys(load_config()), keys(load_config(overrides={setting: value}))
    assert [name for name in NAMES if before[name] != after[name]] == expected


def test_an_input_invalidates_only_its_step():
    config = load_config()
    base = {"data": "d", "checkpoint_dir": "c", "adapter_dir": "a", "target": "cpu"}
    settings = optimize.STEP.settings_of(config)
    assert optimize.STEP.key(base, settings) != optimize.STEP.key({**base, "adapter_dir": "other"}, settings)
    assert optimize.STEP.key(base, settings) != optimize.STEP.key({**base, "target": "cuda"}, settings)
    with pytest.raises(ValueError, match="adapter_dir"):
        optimize.STEP.key({"data": "d", "checkpoint_dir": "c"}, optimize.STEP.settings_of(config))
