"""The decoder architectures a run accepts: those that go through every step, the ONNX export included.

ONNX Runtime GenAI 0.18's model builder picks its exporter by the config's first ``architectures`` entry
and raises for any other; a model it cannot export would otherwise fail only after quantizing and
fine-tuning. Each entry below runs end to end in ``tests/flows/test_architectures.py`` on a tiny random
model of its shape; the builder knows more families, but only these are tested through our int4 layout,
LoRA export and runtime. By ``model_type``, the HF class the builder expects, and what makes it work:
"""

from __future__ import annotations

import json
from pathlib import Path

from olivepress.errors import UserError

SUPPORTED_ARCHITECTURES = {
    # SmolLM2 (the default model), Llama 3: the reference layout, separate q/k/v and gate/up linears.
    "llama": "LlamaForCausalLM",
    # Mistral 7B: Llama's layout; a sliding window (v0.1) on every layer, marked so for the builder.
    "mistral": "MistralForCausalLM",
    # Qwen2/2.5: q/k/v biases and tied embeddings, read by the builder as they are.
    "qwen2": "Qwen2ForCausalLM",
    # Qwen3: adds q/k RMS norms, which the builder fuses into attention.
    "qwen3": "Qwen3ForCausalLM",
    # Phi-3/3.5: fused qkv_proj and gate_up_proj, stored split in the int4 checkpoint
    # (olivepress.export.int4); LongRoPE short/long factors.
    "phi3": "Phi3ForCausalLM",
    # Gemma 2: alternating sliding-window layers, given full-length KV caches (olivepress/export/builder.py:
    # runtime 0.18 fails on window-sized ones shorter than the window).
    "gemma2": "Gemma2ForCausalLM",
    # Gemma 3 text-only (1B, 270M): as Gemma 2, plus per-layer-type RoPE flattened for the builder.
    "gemma3_text": "Gemma3ForCausalLM",
}

# what a config.json with an auto_map means; the one wording for the config check and the loads
REMOTE_CODE = (
    "its config.json points transformers at code shipped with the model (auto_map), which transformers "
    "runs only with trust_remote_code: true (set it only for a model from a source you trust)"
)


def unsupported_reason(model_dir: Path) -> str | None:
    """Why the model in ``model_dir`` cannot run through the pipeline, or None when it can.

    Reads only config.json, so it answers in milliseconds, before any step runs.
    """
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    model_type = config.get("model_type")
    architecture = (config.get("architectures") or [None])[0]
    expected = SUPPORTED_ARCHITECTURES.get(model_type)
    if expected is not None and architecture == expected:
        return None
    supported = ", ".join(f"{name} ({cls})" for name, cls in SUPPORTED_ARCHITECTURES.items())
    found = f"model_type {model_type!r} with architecture {architecture!r}"
    reason = (
        f"{found} cannot be exported by the ONNX Runtime GenAI model builder here; supported: {supported}"
    )
    if config.get("auto_map"):
        reason += f"; {REMOTE_CODE}, but even then the ONNX export needs one of the supported architectures"
    return reason


def needs_remote_code(config: dict) -> bool:
    """Whether transformers can build the model of this config.json only from the model's own code: an
    auto_map and a model_type transformers does not have (one it has loads with its own class)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return bool(config.get("auto_map")) and config.get("model_type") not in CONFIG_MAPPING_NAMES


def load_config(model_dir: Path, *, trust_remote_code: bool):
    """The transformers config of ``model_dir``, the first load of every step that reads a model: one that
    needs its own code and is not trusted is a UserError naming the setting, not transformers' ValueError
    about an argument the user never sees."""
    from transformers import AutoConfig

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if needs_remote_code(config) and not trust_remote_code:
        raise UserError(
            f"{model_dir}: model_type {config.get('model_type')!r} is not in transformers; {REMOTE_CODE}."
        )
    return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
