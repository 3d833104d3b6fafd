"""One typed config per run: a YAML file, then CLI flags on top, validated before any compute."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from olivepress.architectures import unsupported_reason
from olivepress.errors import UserError

SAMPLE_DATA = Path(str(files("olivepress") / "data" / "travel_sample.jsonl"))


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ValidationSettings(Section):
    min_chars: int = Field(1, ge=1, description="Shortest prompt or response accepted, in characters.")
    max_chars: int = Field(4000, ge=1, description="Longest prompt or response accepted, in characters.")

    @model_validator(mode="after")
    def _bounds_ordered(self) -> ValidationSettings:
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) is larger than max_chars ({self.max_chars})")
        return self


class QuantizeSettings(Section):
    group_size: Literal[16, 32, 64, 128] = Field(
        32, description="Inputs sharing one 4-bit scale; must divide every quantized layer's input size."
    )
    calibration_samples: int = Field(32, ge=1, le=4096, description="Examples AWQ calibrates on.")
    calibration_max_tokens: int = Field(256, ge=16, le=8192, description="Tokens kept of each example.")


class FinetuneSettings(Section):
    max_steps: int = Field(60, ge=1, le=100_000, description="Optimizer steps of LoRA training.")
    batch_size: int = Field(4, ge=1, le=1024)
    learning_rate: float = Field(2e-4, gt=0, lt=1)
    lora_r: int = Field(16, ge=1, le=512, description="LoRA rank.")
    lora_alpha: float = Field(32.0, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | None = Field(
        None,
        min_length=1,
        description="Names of the linear layers that get a LoRA adapter; default: every attention and MLP "
        "linear of the decoder under the model's own names (q_proj, ..., down_proj; Phi-3: qkv_proj, o_proj, "
        "gate_up_proj, down_proj).",
    )
    max_seq_len: int = Field(256, ge=16, le=32_768, description="Tokens kept of each training example.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory on large models.")
    checkpoint_every: int = Field(10, ge=1, description="Save a resumable checkpoint every N steps.")


class OptimizeSettings(Section):
    cuda_graph: bool = Field(
        True,
        description="With device gpu, decode through CUDA graphs (ONNX Runtime GenAI's enable_cuda_graph): "
        "each token replays one captured graph instead of launching every kernel, which batch-1 decoding is "
        "bound by. Applies to the base model measured by evaluate too. Ignored on cpu.",
    )


class EvaluateSettings(Section):
    held_out_fraction: float = Field(
        0.2, gt=0, lt=1, description="Share of distinct prompts held out of training and used by the gate."
    )
    generation_samples: int = Field(
        16, ge=1, le=10_000, description="Held-out prompts generated from for ROUGE-L and speed."
    )
    max_new_tokens: int = Field(64, ge=2, le=4096, description="Tokens generated per held-out prompt.")


class GateSettings(Section):
    """Limits a model must meet to be registered; each compares the fine-tuned int4 model with the base."""

    max_perplexity_ratio: float = Field(
        1.10, gt=0, description="Fine-tuned held-out perplexity at most this × the base model's."
    )
    min_speedup: float = Field(
        1.0, ge=0, description="Fine-tuned decode tokens/s at least this × the base model's."
    )
    max_size_ratio: float = Field(
        0.5, gt=0, description="Fine-tuned model + adapter bytes at most this × the base model's."
    )
    min_rouge_l: float | None = Field(
        None, ge=0, le=1, description="Lowest ROUGE-L F1 against the references; unset: reported, not gated."
    )


class AzureMLSettings(Section):
    subscription_id: str = Field(min_length=1)
    resource_group: str = Field(min_length=1)
    workspace_name: str = Field(min_length=1)


class RegistrySettings(Section):
    backend: Literal["local", "azureml"] = Field(
        "local", description="Where a model that passed is registered."
    )
    path: Path = Field(Path("registry"), description="Folder of the local registry.")
    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$",
        description="Registered model name; default: derived from the base model's folder name.",
    )
    azureml: AzureMLSettings | None = Field(None, description="Workspace to register in (backend azureml).")

    @model_validator(mode="after")
    def _azureml_has_workspace(self) -> RegistrySettings:
        if self.backend == "azureml" and self.azureml is None:
            raise ValueError(
                "backend azureml needs registry.azureml with subscription_id, resource_group, workspace_name"
            )
        return self


class RetrySettings(Section):
    """Transient failures (network, S3 5xx/throttling, Azure 429/5xx) are retried; user errors never."""

    step_attempts: int = Field(3, ge=1, le=20, description="Tries of a step that failed transiently.")
    store_attempts: int = Field(5, ge=1, le=50, description="Tries of one artifact-store operation.")
    backoff_seconds: float = Field(2.0, ge=0, le=600, description="First delay; doubles on each retry.")
    jitter: float = Field(0.5, ge=0, le=1, description="Each delay is scaled by a random 1 ± jitter.")


class StoreSettings(Section):
    uri: str | None = Field(
        None, description="Artifact store: a folder or s3://bucket/prefix; default: <output>/store."
    )
    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, moto, ...); credentials come from the AWS chain."
    )
    cache_dir: Path = Field(
        Path.home() / ".cache" / "olivepress" / "artifacts",
        description="Local copies of remote outputs, and scratch space of running steps.",
    )


class RunConfig(Section):
    model: Path | None = Field(None, description="Hugging Face model folder; default: SmolLM2-135M-Instruct.")
    data: Path | str = Field(
        SAMPLE_DATA,
        description="JSON Lines file of {prompt, response} pairs: a local path or s3://bucket/key.jsonl.",
    )
    output: Path = Field(Path("runs"), description="Folder that receives one sub-folder per run.")
    device: Literal["cpu", "gpu"] = "cpu"
    text_template: str | None = Field(
        None,
        description="Format of a training example, with {prompt} and {response}; default: the chat template.",
    )
    seed: int = Field(0, ge=0)
    validation: ValidationSettings = Field(default_factory=ValidationSettings)
    quantize: QuantizeSettings = Field(default_factory=QuantizeSettings)
    finetune: FinetuneSettings = Field(default_factory=FinetuneSettings)
    optimize: OptimizeSettings = Field(default_factory=OptimizeSettings)
    evaluate: EvaluateSettings = Field(default_factory=EvaluateSettings)
    gate: GateSettings = Field(default_factory=GateSettings)
    registry: RegistrySettings = Field(default_factory=RegistrySettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    retries: RetrySettings = Field(default_factory=RetrySettings)

    @field_validator("model")
    @classmethod
    def _model_is_hf_folder(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        if not value.is_dir():
            raise ValueError(f"{value} is not a folder (a Hugging Face model folder is expected)")
        if not (value / "config.json").is_file():
            raise ValueError(f"{value} has no config.json, so it is not a Hugging Face model folder")
        if reason := unsupported_reason(value):
            raise ValueError(reason)
        return value.resolve()

    @field_validator("data")
    @classmethod
    def _data_is_file(cls, value: Path | str) -> Path | str:
        if isinstance(value, str) and value.startswith("s3://"):
            return value  # fetched when the run starts, with the store's S3 settings
        path = Path(value)
        if not path.is_file():
            raise ValueError(f"{path} does not exist or is not a file")
        return path.resolve()

    @field_validator("text_template")
    @classmethod
    def _template_has_fields(cls, value: str | None) -> str | None:
        if value is None:
            return None
        missing = [field for field in ("{prompt}", "{response}") if field not in value]
        if missing:
            raise ValueError(f"the template must contain {' and '.join(missing)}")
        if value.index("{prompt}") > value.index("{response}"):
            raise ValueError("{prompt} must come before {response}")
        return value


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "config"
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"  {field}: {message}")
    return "invalid configuration:\n" + "\n".join(lines)


def _set_dotted(target: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        target = target.setdefault(part, {})
    target[leaf] = value


# Paths in a config file are relative to the file, not to wherever the command runs.
RELATIVE_TO_FILE = ("model", "data", "output", "registry.path", "store.uri", "store.cache_dir")


def _resolve_relative(raw: dict[str, Any], dotted: str, base: Path) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        raw = raw.get(part)
        if not isinstance(raw, dict):
            return
    value = raw.get(leaf)
    if isinstance(value, str) and "://" not in value:
        raw[leaf] = str((base / Path(value).expanduser()).resolve())


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read ``path`` (YAML), apply ``overrides`` (dotted keys such as ``finetune.max_steps``), validate.

    Relative paths in the YAML file are taken relative to the file; every problem is raised as one
    ``UserError`` that names each bad field.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        if not path.is_file():
            raise UserError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            raise UserError(f"config file {path} is not valid YAML: {error}") from None
        if not isinstance(raw, dict):
            raise UserError(f"config file {path} must hold a mapping of settings, not {type(raw).__name__}")
        for dotted in RELATIVE_TO_FILE:
            _resolve_relative(raw, dotted, path.parent)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(raw, dotted, value)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as error:
        raise UserError(_describe(error)) from None
