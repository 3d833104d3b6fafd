"""The optimize and export_adapter steps: their declarations and tasks around :mod:`olivepress.export`, which
builds the int4 ONNX Runtime GenAI folder with its LoRA adapter."""

from __future__ import annotations

from pathlib import Path

from olivepress.config import Target
from olivepress.export.folder import export_onnx
from olivepress.export.lora import export_adapter
from olivepress.genai import ADAPTER_FILE
from olivepress.prompts import save_prompt_format
from olivepress.steps import Step, StepSettings
from olivepress.store import ArtifactStore, Manifest

STEP = Step(
    "optimize",
    __name__,
    inputs=("checkpoint_dir", "adapter_dir", "target"),
    settings=("optimize", "text_template", "trust_remote_code"),
    tags=("onnx",),
)


@STEP.task
def optimize_task(
    store: ArtifactStore,
    key: str,
    settings: StepSettings,
    checkpoint_dir: Path,
    adapter_dir: Path,
    target: Target,
) -> Manifest:
    """The ONNX folder for ``key``, built for ``target``, with the prompt format chat needs to match
    training."""

    def compute(out: Path) -> None:
        export_onnx(
            checkpoint_dir,
            adapter_dir,
            out,
            target=target,
            cuda_graph=settings.optimize.cuda_graph,
            trust_remote_code=settings.trust_remote_code,
            lora_kernel=settings.optimize.lora_kernel,
            lm_head=settings.optimize.lm_head,
            merged_adapter_bits=settings.optimize.merged_adapter_bits,
        )
        save_prompt_format(out, settings.text_template)

    return store.produce("optimize", key, compute)


ADAPTER_STEP = Step(
    "export_adapter",
    __name__,
    inputs=("checkpoint_dir", "adapter_dir", "onnx_dir"),
    settings=(),
    # the target ``onnx_dir`` was built for: it names the output in the run (the export itself keys it)
    context=("target",),
    tags=("onnx",),
)


@ADAPTER_STEP.task
def export_adapter_task(
    store: ArtifactStore,
    key: str,
    settings: StepSettings,
    checkpoint_dir: Path,
    adapter_dir: Path,
    onnx_dir: Path,
    target: Target,
) -> Manifest:
    """A further dataset's adapter for the ``target`` export in ``onnx_dir`` (another dataset's optimize
    output): its own .onnx_adapter, beside which the int4 model is not exported again."""
    return store.produce(
        "export_adapter",
        key,
        lambda out: export_adapter(checkpoint_dir, adapter_dir, onnx_dir, out / ADAPTER_FILE),
    )
