"""Fine-tune a LoRA adapter with Olive's LoRA pass, on the AWQ model's own 4-bit weights.

peft cannot wrap quantized linear layers on CPU, so the model trained here is the int4 checkpoint
dequantized and frozen: the same forward as the int4 ONNX model, so the adapter learns to correct the
quantization error it will actually run next to.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from olivepress.config import FinetuneSettings
from olivepress.progress import trainer_progress
from olivepress.prompts import format_pair
from olivepress.steps import Step, StepSettings
from olivepress.store import ArtifactStore, Manifest

log = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
LOSS_FILE = "loss_history.json"
MEMORY_FILE = "training_memory.json"


@dataclass(frozen=True)
class FinetuneResult:
    adapter_dir: Path
    losses: list[dict]  # {"step", "loss", "learning_rate"} per optimizer step


def write_training_text(tokenizer, examples: list[dict], target: Path, text_template: str | None) -> Path:
    """One JSON line per example, holding the exact text the model will see (chat template applied)."""
    with target.open("w", encoding="utf-8") as out:
        for example in examples:
            text = format_pair(tokenizer, example["prompt"], example["response"], text_template).full_text
            out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return target


def training_dtype(device: str) -> str:
    """bfloat16 on a GPU; float32 on CPU, where bfloat16 training is slower and no smaller at our sizes."""
    return "bfloat16" if device == "gpu" else "float32"


def prepare_training_model(
    checkpoint_dir: Path, target: Path, *, device: str, trust_remote_code: bool = False
) -> Path:
    """Save the int4 checkpoint dequantized as a plain HF folder, the input Olive's LoRA pass accepts.

    It is saved in the dtype the pass loads it in (:func:`training_dtype`): on a GPU bfloat16, the same
    float32-to-bfloat16 cast ``from_pretrained`` would make of a float32 folder, so the weights trained on
    are the same, with half the bytes written and read back.
    """
    import torch
    from transformers import AutoTokenizer

    from olivepress.export.int4 import load_dequantized_model

    dtype = getattr(torch, training_dtype(device))
    load_dequantized_model(checkpoint_dir, dtype, trust_remote_code=trust_remote_code).save_pretrained(target)
    AutoTokenizer.from_pretrained(checkpoint_dir, trust_remote_code=trust_remote_code).save_pretrained(target)
    return target


# A linear directly under a decoder layer's attention or MLP block: model.layers.3.self_attn.q_proj, ...
DECODER_LINEAR_NAME = re.compile(r"^model\.layers\.\d+\.(?:self_attn|mlp)\.(\w+)$")


def decoder_linear_names(model_dir: Path, *, trust_remote_code: bool = False) -> list[str]:
    """Every attention and MLP linear of the decoder, by the model's own short names (q_proj, ..., down_proj;
    Phi-3's fused qkv_proj, gate_up_proj): read off its modules, so a new family needs no table entry.

    The model is built on the meta device: names and types only, no weights read or allocated.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from olivepress.architectures import load_config

    config = load_config(model_dir, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    names = []
    for name, module in model.named_modules():
        match = DECODER_LINEAR_NAME.match(name)
        if match and isinstance(module, torch.nn.Linear) and match[1] not in names:
            names.append(match[1])
    return names


def olive_lora_config(
    model_dir: Path,
    train_file: Path,
    work_dir: Path,
    settings: FinetuneSettings,
    *,
    device: str,
    seed: int,
    trust_remote_code: bool = False,
) -> dict:
    """The Olive workflow: one LoRA pass over a local JSON dataset, logging every step's loss."""
    on_gpu = device == "gpu"
    return {
        "input_model": {
            "type": "HfModel",
            "model_path": str(model_dir),
            # Olive hands it on to the data configs' tokenizer loads too
            "load_kwargs": {"trust_remote_code": trust_remote_code},
        },
        "systems": {
            "local_system": {
                "type": "LocalSystem",
                "accelerators": [
                    {
                        "device": device,
                        "execution_providers": [
                            "CUDAExecutionProvider" if on_gpu else "CPUExecutionProvider"
                        ],
                    }
                ],
            }
        },
        "data_configs": [
            {
                "name": "train_data",
                "type": "HuggingfaceContainer",
                "load_dataset_config": {
                    "data_name": "json",
                    "data_files": [str(train_file)],
                    "split": "train",
                },
                "pre_process_data_config": {
                    "text_cols": ["text"],
                    "strategy": "line-by-line",
                    "max_seq_len": settings.max_seq_len,
                    "pad_to_max_len": False,
                    # the chat template already wrote every marker the model needs
                    "add_special_tokens": False,
                },
            }
        ],
        "passes": {
            "lora": {
                "type": "LoRA",
                "r": settings.lora_r,
                "alpha": settings.lora_alpha,
                "lora_dropout": settings.lora_dropout,
                "target_modules": settings.target_modules
                or decoder_linear_names(model_dir, trust_remote_code=trust_remote_code),
                "torch_dtype": training_dtype(device),
                "train_data_config": "train_data",
                "training_args": {
                    "output_dir": str(work_dir / "checkpoints"),
                    # resume from the last checkpoint a crashed run left (Olive's LoRA pass finds it)
                    "overwrite_output_dir": False,
                    "max_steps": settings.max_steps,
                    "per_device_train_batch_size": settings.batch_size,
                    "learning_rate": settings.learning_rate,
                    "seed": seed,
                    # Olive turns it on; at this model size it costs a third more time to save memory we have
                    "gradient_checkpointing": settings.gradient_checkpointing,
                    "logging_steps": 1,
                    "save_strategy": "steps",
                    "save_steps": settings.checkpoint_every,
                    "save_total_limit": 1,
                    "report_to": "none",
                    "disable_tqdm": False,
                    "dataloader_num_workers": 0,
                },
            }
        },
        "host": "local_system",
        "target": "local_system",
        "cache_dir": str(work_dir / "olive-cache"),
        "output_dir": str(work_dir / "olive-output"),
        "log_severity_level": 3,
        "no_artifacts": True,
    }


CHECKPOINT_FILES = ("trainer_state.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt")


def drop_incomplete_checkpoints(checkpoints_dir: Path) -> Path | None:
    """Delete checkpoints a crash cut short (a file missing); return the last complete one, if any."""
    if not checkpoints_dir.is_dir():
        return None
    complete = []
    for folder in checkpoints_dir.iterdir():
        if folder.is_dir() and all((folder / name).is_file() for name in CHECKPOINT_FILES):
            complete.append(folder)
        else:
            shutil.rmtree(folder) if folder.is_dir() else folder.unlink()
    return max(complete, key=lambda f: int(f.name.rsplit("-", 1)[-1]), default=None)


def read_loss_history(checkpoints_dir: Path) -> list[dict]:
    """Per-step losses from the Trainer state saved with the last checkpoint."""
    states = sorted(checkpoints_dir.glob("checkpoint-*/trainer_state.json"), key=lambda p: p.stat().st_mtime)
    if not states:
        raise RuntimeError(f"training wrote no checkpoint under {checkpoints_dir}")
    history = json.loads(states[-1].read_text())["log_history"]
    return [
        {"step": entry["step"], "loss": entry["loss"], "learning_rate": entry.get("learning_rate")}
        for entry in history
        if "loss" in entry
    ]


def reset_training_memory(device: str) -> float | None:
    """Start counting torch's peak GPU memory afresh (CUDA only); return what is allocated already, MiB."""
    if device != "gpu":
        return None
    import torch

    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated() / 2**20


def training_memory(device: str, allocated_at_start_mib: float | None) -> dict:
    """torch's peak GPU memory since :func:`reset_training_memory`, MiB; every value is None on CPU.

    Peak allocated is what tensors held at most (weights, LoRA, optimizer state, activations); reserved is
    what torch's caching allocator held from the driver, closer to what nvidia-smi shows. Both include what
    was allocated at the start, recorded beside them."""
    if device != "gpu":
        return {"peak_allocated_mib": None, "peak_reserved_mib": None, "allocated_at_start_mib": None}
    import torch

    return {
        "peak_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
        "peak_reserved_mib": torch.cuda.max_memory_reserved() / 2**20,
        "allocated_at_start_mib": allocated_at_start_mib,
    }


def read_training_memory(adapter_dir: Path) -> dict | None:
    """The adapter's training memory record; None for an adapter stored before it was recorded."""
    path = adapter_dir / MEMORY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def finetune_lora(
    checkpoint_dir: Path,
    examples: list[dict],
    out_dir: Path,
    settings: FinetuneSettings,
    *,
    work_dir: Path,
    text_template: str | None = None,
    device: str = "cpu",
    seed: int = 0,
    trust_remote_code: bool = False,
) -> FinetuneResult:
    """Train a LoRA adapter on ``examples``; write the PEFT adapter, its loss history and (on a GPU) its
    peak memory to ``out_dir``."""
    from olive.workflows import run as olive_run
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    work_dir.mkdir(parents=True, exist_ok=True)
    if resumable := drop_incomplete_checkpoints(work_dir / "checkpoints"):
        log.info("finetune: resuming from %s", resumable.name)
    model_dir = prepare_training_model(
        checkpoint_dir, work_dir / "dequantized", device=device, trust_remote_code=trust_remote_code
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    train_file = write_training_text(tokenizer, examples, work_dir / "train.jsonl", text_template)
    config = olive_lora_config(
        model_dir,
        train_file,
        work_dir,
        settings,
        device=device,
        seed=seed,
        trust_remote_code=trust_remote_code,
    )
    allocated_at_start = reset_training_memory(device)
    with trainer_progress():
        output = olive_run(config)
    memory = training_memory(device, allocated_at_start)
    adapter_dir = Path(output.get_best_candidate().olive_model_config["config"]["adapter_path"])
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES:
        shutil.copy2(adapter_dir / name, out_dir / name)
    losses = read_loss_history(work_dir / "checkpoints")
    (out_dir / LOSS_FILE).write_text(json.dumps(losses, indent=1))
    (out_dir / MEMORY_FILE).write_text(json.dumps(memory, indent=1))
    return FinetuneResult(adapter_dir=out_dir, losses=losses)


STEP = Step(
    "finetune",
    __name__,
    inputs=("checkpoint_dir", "examples"),
    settings=("finetune", "device", "seed", "text_template", "trust_remote_code"),
    context=("trainer",),
    tags=("lora",),
)


@STEP.task
def finetune_task(
    store: ArtifactStore,
    key: str,
    settings: StepSettings,
    checkpoint_dir: Path,
    examples: list[dict],
    trainer: Callable[..., FinetuneResult] | None = None,
) -> Manifest:
    """The adapter for ``key``. Training checkpoints and Olive's cache live in the store's work folder for
    the key (:meth:`ArtifactStore.work_dir`), so a run that crashed mid-training resumes from its last
    checkpoint; only the run holding the key's lock trains there, and the folder goes once the adapter is
    stored. ``trainer``: where the training runs, called as :func:`finetune_lora` (a run with several
    datasets trains each in a child process, :mod:`olivepress.tasks.finetune_worker`); None: here."""
    work_dir = store.work_dir("finetune", key)
    train = trainer or finetune_lora
    return store.produce(
        "finetune",
        key,
        lambda out: train(
            checkpoint_dir,
            examples,
            out,
            settings.finetune,
            work_dir=work_dir,
            text_template=settings.text_template,
            device=settings.device,
            seed=settings.seed,
            trust_remote_code=settings.trust_remote_code,
        ),
    )
