"""One typed config per run: a YAML file, then CLI flags and --set on top, validated before any compute."""

from __future__ import annotations

import re
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

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


Target = Literal["cpu", "cuda"]  # the runtimes an export is built and gated for
TARGETS: tuple[str, ...] = get_args(Target)

# a POSIX environment variable name, and a Prefect block document name (lowercase letters, digits, dashes)
EnvironmentVariable = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
BlockName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")]
GroupSize = Literal[16, 32, 64, 128]  # block sizes ONNX Runtime's MatMulNBits runs on CPU and GPU
GROUP_SIZES: tuple[int, ...] = get_args(GroupSize)


def group_size_problem(group_size: int, input_sizes: dict[str, int] | None = None) -> str | None:
    """What is wrong with ``group_size`` (for a model whose quantized linears read ``input_sizes``, by the
    name of what sets each), or None. The one home of the rule; quantize applies it to the model's sizes."""
    if group_size not in GROUP_SIZES:
        return f"quantize.group_size must be one of {GROUP_SIZES}, not {group_size}"
    sizes = input_sizes or {}
    for name, size in sizes.items():
        if size % group_size:
            usable = [g for g in GROUP_SIZES if all(s % g == 0 for s in sizes.values())]
            if not usable:
                return f"quantize.group_size: no allowed group size {GROUP_SIZES} divides {name} = {size}"
            return (
                f"quantize.group_size = {group_size} does not divide {name} = {size} of this model; "
                f"use one of {usable}"
            )
    return None


class QuantizeSettings(Section):
    group_size: GroupSize = Field(
        32, description="Inputs sharing one 4-bit scale; must divide every quantized layer's input size."
    )
    calibration_samples: int = Field(32, ge=1, le=4096, description="Examples AWQ calibrates on.")
    calibration_max_tokens: int = Field(256, ge=16, le=8192, description="Tokens kept of each example.")
    calibration_block_tokens: int | None = Field(
        512,
        ge=16,
        le=8192,
        description="AWQ calibrates on the sampled examples joined end to end and cut into blocks of this many "
        "tokens (the last one shorter), as AutoAWQ does: a few long sequences instead of one short one per "
        "example, the same tokens in fewer, larger matrix products. null: one sequence per example.",
    )


class FinetuneSettings(Section):
    max_steps: int = Field(60, ge=1, le=100_000, description="Optimizer steps of LoRA training.")
    batch_size: int = Field(4, ge=1, le=1024, description="Training examples per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0, lt=1, description="Peak learning rate of the LoRA weights.")
    lora_r: int = Field(16, ge=1, le=512, description="LoRA rank.")
    lora_alpha: float = Field(
        32.0, gt=0, description="LoRA scaling numerator: the update is scaled by lora_alpha / lora_r."
    )
    lora_dropout: float = Field(
        0.05, ge=0, lt=1, description="Dropout on the LoRA branch's input in training."
    )
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


LmHead = Literal["float", "int8", "int4"]


class OptimizeSettings(Section):
    lm_head: LmHead = Field(
        "int8",
        description="For the cpu target, how the LM head and the token embedding are stored (quantize leaves "
        "both float; every other linear is int4 already). int8: the LM head as 8-bit MatMulNBits, the "
        "embedding as 4-bit GatherBlockQuantized (on the quickstart's model on 2 cores: decode with the "
        "adapter 1.4x float's, the model 0.65x the bytes, held-out loss +0.015). int4: both 4-bit (1.5x, "
        "0.48x, loss +0.12). float: as in the checkpoint (the LM head is then most of what a decoded "
        "token reads in a small model). Ignored by the cuda target, whose LM head stays float16.",
    )
    merged_adapter_bits: Literal[8, 32] = Field(
        8,
        description="For the cpu target, the adapter's matrices in the merged graph (model.adapter.onnx: the "
        "export's own adapter as one fixed model, the form evaluate gates) as 8-bit MatMulNBits, blocks of 16, "
        "instead of float32: under a third of the bytes, which a CPU reads for every token (on the quickstart's "
        "model on 2 cores decode with the adapter 96.7 instead of 90.8 tokens/s, 0.82x adapter off instead "
        "of 0.77x; held-out loss 3.247 against 3.248). The .onnx_adapter files stay float32 (run-time adapters). Ignored by the cuda target.",
    )
    cuda_graph: bool = Field(
        True,
        description="For the cuda target, decode through CUDA graphs (ONNX Runtime GenAI's enable_cuda_graph): "
        "each token replays one captured graph instead of launching every kernel, which batch-1 decoding is "
        "bound by. Applies to the base model measured by evaluate too. Ignored by the cpu target.",
    )
    lora_kernel: Literal["auto", "on", "off"] = Field(
        "auto",
        description="For the cuda target, the LoRA branches as olivepress's own CUDA operators, built with nvcc "
        "into the model folder: each adapted int4 linear and its branch as one MatMulNBitsLora kernel (LoraAdd, "
        "the branch alone in one kernel, where that cannot go) instead of onnxruntime's int4 kernel and three "
        "more (MatMul, MatMul, Add). It needs nvcc and ONNX Runtime's C API header ($OLIVEPRESS_ORT_INCLUDE; "
        "the GPU image has both): auto uses them when both are there and warns otherwise, on fails without "
        "them, off keeps ONNX Runtime's own operators. Ignored by the cpu target.",
    )


class EvaluateSettings(Section):
    """What evaluate measures. Quality: teacher-forced loss of every held-out response, for the base, the
    int4 model and the fine-tuned model; ROUGE-L of the fine-tuned model's free answers. Speed: a fixed decode
    of ``speed_tokens`` on ``speed_samples`` prompts per variant. The base answers freely only the report's
    ``report_samples`` prompts (at full length on every prompt, at fp32 on a CPU, that was most of the step's
    time): its measurements are a step of their own, kept under their own key, so another adapter, target
    or run on the same data reuses them."""

    held_out_fraction: float = Field(
        0.2, gt=0, lt=1, description="Share of distinct prompts held out of training and used by the gate."
    )
    generation_samples: int = Field(
        16,
        ge=1,
        le=10_000,
        description="Held-out prompts the fine-tuned model answers freely (greedy) for ROUGE-L and the "
        "report's sample answers.",
    )
    report_samples: int = Field(
        3,
        ge=0,
        le=100,
        description="Held-out prompts the report shows answered side by side by the base, quantized and "
        "fine-tuned models: the first distinct prompts among the generation_samples ones (so at most that "
        "many), whose fine-tuned answers are reused. Each costs one free answer of up to max_new_tokens from "
        "the base (in evaluate_base, kept with its measurements) and one from the int4 model: at 3.8 B on 16 "
        "cores the fp32 base decodes about 4.3 tokens/s, about 15 s a prompt at 64 tokens. 0: none.",
    )
    max_new_tokens: int = Field(64, ge=2, le=4096, description="Longest free answer, in tokens.")
    speed_samples: int = Field(
        2,
        ge=1,
        le=10_000,
        description="Held-out prompts each variant decodes exactly speed_tokens for (end-of-text suppressed) "
        "to measure decode tokens/s and time to first token on equal work. Free answers stop at end-of-text "
        "after different lengths per variant, and each generation's first decode steps cost a fixed extra "
        "time (about 20 ms on an H100 with CUDA graphs), so their tokens/s would favour the variant that "
        "talks longest.",
    )
    speed_tokens: int = Field(
        64,
        ge=2,
        le=4096,
        description="Tokens each speed measurement decodes, the first one included. Each generation's first "
        "steps cost a fixed extra time, which weighs more in a shorter decode and more for a faster model: "
        "at 32 tokens the int4 model's speed-up over the base read 0.9 of what 64 tokens show.",
    )


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
    subscription_id: str = Field(min_length=1, description="Azure subscription ID of the workspace.")
    resource_group: str = Field(min_length=1, description="Resource group of the workspace.")
    workspace_name: str = Field(min_length=1, description="Azure Machine Learning workspace name.")


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
    model: Path | str | None = Field(
        None,
        description="The model to start from: a local Hugging Face model folder, a Hugging Face id "
        "(org/name or org/name@revision, through the hub's cache; HF_HUB_OFFLINE and HF_TOKEN respected), "
        "an Azure ML asset (azureml://registries/<registry>/models/<name>/versions/<v> or "
        "azureml://subscriptions/.../workspaces/<ws>/models/<name>/versions/<v>) or an s3:// folder (the "
        "store's S3 settings). Fetched once when the run starts; caches key on the files' content. "
        "Default: SmolLM2-135M-Instruct.",
    )
    trust_remote_code: bool = Field(
        False,
        description="Let transformers run Python code shipped with the model (a model whose architecture is "
        "not in transformers needs it); only for models from a source you trust.",
    )
    data: Path | str = Field(
        SAMPLE_DATA,
        description="JSON Lines file of {prompt, response} pairs: a local path or s3://bucket/key.jsonl. "
        "One dataset, one adapter named after the file; for several, datasets instead.",
    )
    datasets: dict[str, Path | str] | None = Field(
        None,
        description="Several named datasets, {name: path or s3:// URI}: one int4 base, one LoRA adapter per "
        "dataset (fine-tuned, exported, evaluated and gated on its own held-out split), registered together. "
        "Names: a letter, then letters, digits, _ or - (unique ignoring case). Instead of data, not with it.",
    )
    calibration_datasets: list[str] | None = Field(
        None,
        min_length=1,
        description="Names of the datasets AWQ calibrates on (a seeded sample of their training pairs); "
        "default: all. List the datasets an existing base was calibrated on to add a dataset without "
        "quantizing again and retraining every adapter.",
    )
    output: Path = Field(Path("runs"), description="Folder that receives one sub-folder per run.")
    device: Literal["auto", "cpu", "gpu"] = Field(
        "auto",
        description="Where the heavy steps (quantize, finetune) run: cpu, gpu (CUDA), or auto: gpu when a CUDA "
        "device is visible, else cpu. Decided when the run starts, on the machine that runs it. What the "
        "model is built for is targets.",
    )
    targets: list[Target] = Field(
        default_factory=lambda: ["cpu"],
        min_length=1,
        description="What optimize builds and evaluate gates, each on its own runtime against its own base: cpu "
        "(int4 for ONNX Runtime's CPU provider, gated on this machine's cores against the fp32 base, as in the "
        "Olive lab), cuda (int4 for the CUDA provider, gated on the GPU against the fp16 base; needs a visible "
        "CUDA device). One quantized checkpoint and one adapter per dataset serve every target; a target "
        "added later builds only its own export and evaluation.",
    )
    trainings_at_once: int | None = Field(
        None,
        ge=1,
        le=64,
        description="With several datasets, adapters trained at once, each in its own process; default: one "
        "per visible GPU (CUDA_VISIBLE_DEVICES, else all) with device gpu, each pinned to its GPU (more "
        "than the GPUs share them in turn), one with device cpu. Part of no cache key.",
    )
    build_base_early: bool | None = Field(
        None,
        description="Build the base model evaluate compares against in a child process from the start of the "
        "run (after validate), while quantize and finetune run, instead of inside evaluate: the builder "
        "works on the CPU and the disk, so on a GPU run it overlaps with the GPU steps, and with several "
        "datasets every adapter's evaluation shares the one build (one build per target). Default: on with "
        "device gpu or several datasets, off for one dataset on cpu (there it shares the cores with training "
        "and saves little). "
        "The same model either way: part of no cache key.",
    )
    text_template: str | None = Field(
        None,
        description="Format of a training example, with {prompt} and {response}; default: the chat template.",
    )
    seed: int = Field(
        0, ge=0, description="Seed of the held-out split, the calibration sample and LoRA training."
    )
    validation: ValidationSettings = Field(
        default_factory=ValidationSettings, description="Rules the JSONL data must pass (validate step)."
    )
    quantize: QuantizeSettings = Field(
        default_factory=QuantizeSettings, description="AWQ 4-bit quantization (quantize step)."
    )
    finetune: FinetuneSettings = Field(
        default_factory=FinetuneSettings, description="LoRA training on the int4 weights (finetune step)."
    )
    optimize: OptimizeSettings = Field(
        default_factory=OptimizeSettings, description="ONNX Runtime GenAI export (optimize step)."
    )
    evaluate: EvaluateSettings = Field(
        default_factory=EvaluateSettings, description="Held-out split and measurements (evaluate step)."
    )
    gate: GateSettings = Field(
        default_factory=GateSettings, description="Limits a model must meet to be registered."
    )
    registry: RegistrySettings = Field(
        default_factory=RegistrySettings, description="Where a model that passed the gate is registered."
    )
    store: StoreSettings = Field(
        default_factory=StoreSettings, description="Content-addressed store of every step's output."
    )
    retries: RetrySettings = Field(
        default_factory=RetrySettings, description="Retries of transient failures; user errors never."
    )
    secrets: dict[EnvironmentVariable, BlockName] = Field(
        default_factory=dict,
        description="Credentials from Prefect Secret blocks: environment variable → block name, e.g. "
        "{HF_TOKEN: hf-token, AWS_SECRET_ACCESS_KEY: team-s3-key, AZURE_CLIENT_SECRET: team-aml-secret}. Read "
        "from the Prefect API when the run starts, on the machine that runs it, and set in that process's "
        "environment only (and its child processes'), where a variable of the same name already set is "
        "replaced: never in the config, a job template, a log, the run folder or the report.",
    )

    @field_validator("model")
    @classmethod
    def _model_is_hf_folder(cls, value: Path | str | None) -> Path | str | None:
        from olivepress.model_source import parse_azureml, reference_kind

        if value is None:
            return None
        kind = reference_kind(value)
        if kind == "azureml":
            try:
                parse_azureml(str(value))  # a malformed id fails here, not when the run starts
            except UserError as error:
                raise ValueError(str(error)) from None
        if kind != "local":
            return str(value)  # fetched when the run starts; its folder is checked then
        value = Path(value)
        if not value.is_dir():
            raise ValueError(f"{value} is not a folder (a Hugging Face model folder is expected)")
        if not (value / "config.json").is_file():
            raise ValueError(f"{value} has no config.json, so it is not a Hugging Face model folder")
        if reason := unsupported_reason(value):
            raise ValueError(reason)
        return value.resolve()

    @field_validator("targets")
    @classmethod
    def _targets_once_each(cls, value: list[str]) -> list[str]:
        if len(set(value)) < len(value):
            raise ValueError(f"each target once: {value}")
        return value

    @field_validator("data")
    @classmethod
    def _data_is_file(cls, value: Path | str) -> Path | str:
        return data_source(value)

    @field_validator("datasets")
    @classmethod
    def _datasets_named_files(cls, value: dict[str, Path | str] | None) -> dict[str, Path | str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("name at least one dataset, or leave datasets out and set data")
        problems, seen = [], {}
        for name, source in value.items():
            if not DATASET_NAME.fullmatch(name):
                problems.append(f"{name!r} is not a dataset name (a letter, then letters, digits, _ or -)")
            elif name.lower() in seen:
                problems.append(f"{name!r} and {seen[name.lower()]!r} differ only in case")
            seen.setdefault(name.lower(), name)
            try:
                value[name] = data_source(source)
            except ValueError as error:
                problems.append(f"{name}: {error}")
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @model_validator(mode="after")
    def _one_form_of_data(self) -> RunConfig:
        if self.datasets is not None and "data" in self.model_fields_set:
            raise ValueError("give data (one dataset) or datasets (several, by name), not both")
        if unknown := sorted(set(self.calibration_datasets or ()) - set(self.dataset_sources())):
            raise ValueError(
                f"calibration_datasets names {unknown}, which are not among the datasets "
                f"{sorted(self.dataset_sources())}"
            )
        return self

    def dataset_sources(self) -> dict[str, Path | str]:
        """The run's datasets by name, in the order given: ``datasets``, or ``data`` as one dataset named
        after its file (:meth:`dataset_name`)."""
        if self.datasets is not None:
            return dict(self.datasets)
        return {self.dataset_name(): self.data}

    def dataset_name(self) -> str:
        """The name ``data`` gives its one dataset and adapter: the file's stem, made a dataset name."""
        stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(str(self.data)).stem).strip("_-") or "data"
        return (stem if stem[0].isalpha() else f"data_{stem}")[:64]

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


DATASET_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")


def data_source(value: Path | str) -> Path | str:
    """A dataset as the config keeps it: an s3:// URI as written, a local file as its absolute path."""
    if isinstance(value, str) and value.startswith("s3://"):
        return value  # fetched when the run starts, with the store's S3 settings
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"{path} does not exist or is not a file")
    return path.resolve()


def _describe(error: ValidationError, prefix: str = "") -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in ([prefix] if prefix else []) + list(item["loc"])) or "config"
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"  {field}: {message}")
    return "invalid configuration:\n" + "\n".join(lines)


def checked(section: type[Section], name: str, **values: Any) -> Section:
    """``section`` built from ``values`` by its own rules, for code called with settings outside a RunConfig
    (``validate_jsonl(min_chars=...)``): a UserError naming ``name.field`` instead of a second check."""
    try:
        return section.model_validate(values)
    except ValidationError as error:
        raise UserError(_describe(error, name)) from None


def _section_type(annotation: Any) -> type[Section] | None:
    """The Section a field holds (``AzureMLSettings | None`` included), or None for a single setting."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and get_origin(candidate) is None and issubclass(candidate, Section):
            return candidate
    return None


def setting_fields(model: type[Section] | None = None, prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """Every single setting of the config, depth first, as (``section.field``, its pydantic field)."""
    for name, info in (model or RunConfig).model_fields.items():
        dotted = f"{prefix}{name}"
        section = _section_type(info.annotation)
        if section is None:
            yield dotted, info
        else:
            yield from setting_fields(section, f"{dotted}.")


def setting_field(dotted: str) -> FieldInfo:
    """The field that ``dotted`` (``finetune.max_steps``, ``registry``) names; a UserError naming the unknown
    part and listing the valid names in its place otherwise."""
    model: type[Section] | None = RunConfig
    info: FieldInfo | None = None
    done: list[str] = []
    for part in dotted.split("."):
        where = ".".join(done)
        if model is None:
            raise UserError(f"unknown setting {dotted!r}: {where} is a single setting, not a section")
        if part not in model.model_fields:
            valid = ", ".join(model.model_fields)
            place = f"section {where!r} has" if done else "the config has"
            raise UserError(f"unknown setting {dotted!r}: {place} no {part!r}; valid names there: {valid}")
        info = model.model_fields[part]
        model = _section_type(info.annotation)
        done.append(part)
    assert info is not None
    return info


NULLS = ("", "~", "null", "Null", "NULL")


def parse_value(dotted: str, text: str) -> Any:
    """The value of ``--set dotted=text``: a YAML scalar or flow value (numbers, true/false, null, [lists],
    {mappings}, JSON alike); text settings (paths, names, templates) take ``text`` as it is, null aside."""
    info = setting_field(dotted)
    kinds = get_args(info.annotation) or (info.annotation,)
    if get_origin(info.annotation) is not Literal and any(kind in (str, Path) for kind in kinds):
        return None if text in NULLS and type(None) in kinds else text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # the field's own check says what is wrong with it


def parse_assignments(assignments: list[str]) -> list[tuple[str, Any]]:
    """``["section.field=value", ...]`` (the CLI's ``--set``) as (dotted name, value) pairs, in order."""
    parsed = []
    for assignment in assignments:
        dotted, equals, text = assignment.partition("=")
        dotted = dotted.strip()
        if not equals or not dotted:
            raise UserError(
                f"--set {assignment!r}: expected SECTION.FIELD=VALUE, e.g. finetune.max_steps=120"
            )
        parsed.append((dotted, parse_value(dotted, text)))
    return parsed


def _set_dotted(target: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        if not isinstance(target.get(part), dict):
            target[part] = {}
        target = target[part]
    target[leaf] = value


# Paths in a config file are relative to the file, not to wherever the command runs.
RELATIVE_TO_FILE = ("model", "data", "output", "registry.path", "store.uri", "store.cache_dir")
ONE_OR_THE_OTHER = {"data": "datasets", "datasets": "data"}


def _resolve_relative(raw: dict[str, Any], dotted: str, base: Path) -> None:
    from olivepress.model_source import reference_kind

    *parents, leaf = dotted.split(".")
    for part in parents:
        raw = raw.get(part)
        if not isinstance(raw, dict):
            return
    value = raw.get(leaf)
    if isinstance(value, str) and "://" not in value:
        relative = (base / Path(value).expanduser()).resolve()
        if dotted == "model" and not relative.is_dir() and reference_kind(value) == "huggingface":
            return  # org/name: a Hugging Face id, not a folder beside the file
        raw[leaf] = str(relative)


def load_config(
    path: Path | None = None, overrides: dict[str, Any] | None = None, assignments: list[str] | None = None
) -> RunConfig:
    """Read ``path`` (YAML), apply ``overrides`` (dotted keys such as ``finetune.max_steps``; None values are
    left out, as flags not given), then ``assignments`` (``--set section.field=value``, in order; null is a
    value there), validate.

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
        if isinstance(raw.get("datasets"), dict):
            for name in raw["datasets"]:
                _resolve_relative(raw["datasets"], name, path.parent)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(raw, dotted, value)
            if dotted in ONE_OR_THE_OTHER:  # --data replaces the file's data or datasets, whichever it has
                raw.pop(ONE_OR_THE_OTHER[dotted], None)
    for dotted, value in parse_assignments(assignments or []):
        _set_dotted(raw, dotted, value)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as error:
        raise UserError(_describe(error)) from None
