"""Group-wise 4-bit weights in the checkpoint layout ONNX Runtime GenAI's model builder loads as is.

The builder's "olive" loader takes, per linear layer, ``qweight`` (out, in/2) uint8 with two 4-bit values a
byte (low nibble first), ``scales`` (out, groups) and ``qzeros`` (out, groups/2) packed the same way, and
only reshapes them into ``MatMulNBits``: the integers we write are the integers the ONNX model runs, with no
second quantization. Dequantized, ``w = (q - zero_point) * scale`` per group, the same forward as MatMulNBits.

Fused linears (Phi-3's ``qkv_proj`` and ``gate_up_proj``) are stored split, under the unfused names
(``q_proj``/``k_proj``/``v_proj``, ``gate_proj``/``up_proj``): builder 0.18 splits a fused "olive" ``qzeros`` at
the wrong row (``q_size // 2``, as if its rows were packed), and the ONNX model then fails to load. Split
tensors it reads as they are, for every model. Readers here fuse them back, so the HF model loads exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

BITS = 4
MAX_LEVEL = 2**BITS - 1
CHECKPOINT_FORMAT = "olive"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class Int4Weight:
    """One linear layer's weight as 4-bit integers with a scale and zero point per group of inputs."""

    q: torch.Tensor  # (out, in) uint8 in [0, 15]
    scales: torch.Tensor  # (out, in // group_size) float32
    zero_points: torch.Tensor  # (out, in // group_size) uint8 in [0, 15]

    @property
    def group_size(self) -> int:
        return self.q.shape[1] // self.scales.shape[1]

    def dequantize(self) -> torch.Tensor:
        """In place on one float32 copy of ``q``, not three: at 3.8 B parameters each copy is 15 GB."""
        out_features, in_features = self.q.shape
        groups = self.q.float().reshape(out_features, -1, self.group_size)
        groups.sub_(self.zero_points.float().unsqueeze(-1)).mul_(self.scales.float().unsqueeze(-1))
        return groups.reshape(out_features, in_features)

    @classmethod
    def from_qparams(
        cls, weight: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor
    ) -> Int4Weight:
        """Round ``weight`` onto the grid given by per-group ``scales`` and ``zero_points``."""
        import torch

        out_features, in_features = weight.shape
        group_size = in_features // scales.shape[1]
        grouped = weight.float().reshape(out_features, -1, group_size)
        levels = torch.round(grouped / scales.float().unsqueeze(-1)) + zero_points.float().unsqueeze(-1)
        q = levels.clamp(0, MAX_LEVEL).to(torch.uint8).reshape(out_features, in_features)
        return cls(q=q, scales=scales.float(), zero_points=zero_points.to(torch.uint8))


def rtn_qparams(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min/max scales and zero points per group, with 0.0 exactly representable."""
    import torch

    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"group size {group_size} does not divide {in_features} input features")
    grouped = weight.float().reshape(out_features, -1, group_size)
    low = grouped.amin(dim=-1).clamp(max=0.0)
    high = grouped.amax(dim=-1).clamp(min=0.0)
    scales = ((high - low) / MAX_LEVEL).clamp(min=torch.finfo(torch.float32).tiny)
    zero_points = torch.round(-low / scales).clamp(0, MAX_LEVEL)
    return scales, zero_points


def rtn_quantize(weight: torch.Tensor, group_size: int) -> Int4Weight:
    """Round-to-nearest baseline: what AWQ is measured against."""
    scales, zero_points = rtn_qparams(weight, group_size)
    return Int4Weight.from_qparams(weight, scales, zero_points)


def pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """Pack the last dimension two values a byte, low nibble first (MatMulNBits' order)."""
    import torch

    if values.shape[-1] % 2:
        values = torch.nn.functional.pad(values, (0, 1))
    values = values.to(torch.uint8)
    return values[..., 0::2] | (values[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, length: int) -> torch.Tensor:
    import torch

    values = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1)
    return values[..., :length]


# A fused HF linear and the unfused linears it is stored as, in the order its output rows hold them.
FUSED_LINEARS = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
STORED_SPLIT_KEY = "stored_split"  # quantization_config entry: fused name -> the names it is stored under


def quantization_config(group_size: int, stored_split: dict[str, tuple[str, ...]]) -> dict:
    config = {"quant_method": CHECKPOINT_FORMAT, "bits": BITS, "group_size": group_size}
    if stored_split:
        config[STORED_SPLIT_KEY] = {fused: list(parts) for fused, parts in stored_split.items()}
    return config


def fused_part_sizes(config, fused: str) -> list[int]:
    """Output rows of each unfused linear in a fused one, from the model's config."""
    if fused == "self_attn.qkv_proj":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_rows = config.num_key_value_heads * head_dim
        return [config.num_attention_heads * head_dim, kv_rows, kv_rows]
    return [config.intermediate_size, config.intermediate_size]


def split_fused(model_config, weights: dict[str, Int4Weight]) -> dict[str, Int4Weight]:
    """``weights`` with each fused linear replaced by its unfused parts (rows cut by the config's sizes)."""
    split = {}
    for module_name, weight in weights.items():
        fused = next((f for f in FUSED_LINEARS if module_name.endswith(f".{f}")), None)
        if fused is None:
            split[module_name] = weight
            continue
        sizes = fused_part_sizes(model_config, fused)
        if sum(sizes) != weight.q.shape[0]:
            raise ValueError(f"{module_name} has {weight.q.shape[0]} output rows; its config gives {sizes}")
        prefix = module_name.removesuffix(fused)
        pieces = (weight.q.split(sizes), weight.scales.split(sizes), weight.zero_points.split(sizes))
        for part, q, scales, zero_points in zip(FUSED_LINEARS[fused], *pieces, strict=True):
            # copies: safetensors refuses tensors that share memory
            split[prefix + part] = Int4Weight(
                q=q.clone(), scales=scales.clone(), zero_points=zero_points.clone()
            )
    return split


def join_fused(weights: dict[str, Int4Weight], stored_split: dict[str, list[str]]) -> dict[str, Int4Weight]:
    """The inverse of :func:`split_fused`: parts stored under unfused names back under the fused one."""
    import torch

    joined = dict(weights)
    for fused, parts in stored_split.items():
        for first in [name for name in weights if name.endswith(f".{parts[0]}")]:
            prefix = first.removesuffix(parts[0])
            pieces = [joined.pop(prefix + part) for part in parts]
            joined[prefix + fused] = Int4Weight(
                q=torch.cat([piece.q for piece in pieces]),
                scales=torch.cat([piece.scales for piece in pieces]),
                zero_points=torch.cat([piece.zero_points for piece in pieces]),
            )
    return joined


def write_rtn_checkpoint(model_dir: Path, target: Path, group_size: int = 32) -> Path:
    """``model_dir`` with every decoder linear rounded to nearest, as an int4 checkpoint with its tokenizer:
    for tests and benchmarks that need the checkpoint layout, not the integers AWQ would choose."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    weights = {
        name: rtn_quantize(module.weight.data, group_size)
        for name, module in model.named_modules()
        if name.startswith("model.layers.") and isinstance(module, torch.nn.Linear)
    }
    write_int4_checkpoint(model, weights, target, group_size)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(target)
    return target


def write_int4_checkpoint(model, weights: dict[str, Int4Weight], out_dir: Path, group_size: int) -> None:
    """Save ``model`` with the linear layers named in ``weights`` stored as packed 4-bit integers.

    Other tensors (embeddings, norms, an untied lm_head) stay in float32; a tied lm_head is not stored
    twice. Fused linears are stored split (see the module docstring). The tokenizer is the caller's to save
    beside it.
    """
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # the embedding matrix again: readers tie it back from the config
        if not (name.endswith(".weight") and name.removesuffix(".weight") in weights):
            tensors[name] = tensor.detach().float().clone().contiguous()
    for module_name, quantized in split_fused(model.config, weights).items():
        tensors[f"{module_name}.qweight"] = pack_nibbles(quantized.q)
        tensors[f"{module_name}.scales"] = quantized.scales.float()
        tensors[f"{module_name}.qzeros"] = pack_nibbles(quantized.zero_points)
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    save_own_code(model, out_dir)
    stored_split = {
        fused: parts
        for fused, parts in FUSED_LINEARS.items()
        if any(name.endswith(f".{fused}") for name in weights)
    }
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config(group_size, stored_split)
    config["torch_dtype"] = "float32"
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)


def save_own_code(model, out_dir: Path) -> None:
    """Copy the Python files of a model loaded from its own code (trust_remote_code) beside its config, as
    ``save_pretrained`` does, with the config's auto_map pointing at them: the checkpoint loads without
    the folder it came from."""
    from transformers.dynamic_module_utils import custom_object_save

    for loaded in (model.config, model):
        if getattr(loaded, "_auto_class", None) is not None:
            custom_object_save(loaded, out_dir, config=model.config)


def read_int4_checkpoint(checkpoint_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Int4Weight]]:
    """Float tensors and 4-bit weights (by the HF model's module names, fused linears fused again) of a
    checkpoint written by :func:`write_int4_checkpoint`."""
    from safetensors.torch import load_file

    config = json.loads((checkpoint_dir / "config.json").read_text())
    quantization = config["quantization_config"]
    group_size = quantization["group_size"]
    tensors = load_file(str(checkpoint_dir / WEIGHTS_FILE))
    floats, weights = {}, {}
    for name, tensor in tensors.items():
        if name.endswith(".qweight"):
            module_name = name.removesuffix(".qweight")
            scales = tensors[f"{module_name}.scales"]
            in_features = scales.shape[1] * group_size
            weights[module_name] = Int4Weight(
                q=unpack_nibbles(tensor, in_features),
                scales=scales,
                zero_points=unpack_nibbles(tensors[f"{module_name}.qzeros"], scales.shape[1]),
            )
        elif not name.endswith((".scales", ".qzeros")):
            floats[name] = tensor
    return floats, join_fused(weights, quantization.get(STORED_SPLIT_KEY, {}))


def load_dequantized_model(
    checkpoint_dir: Path, dtype: torch.dtype | None = None, *, trust_remote_code: bool = False
):
    """An HF model whose quantized linears hold exactly the checkpoint's dequantized 4-bit weights.

    Every tensor is float32, or cast from float32 to ``dtype`` (the cast ``from_pretrained(dtype=...)``
    makes of a float32 folder). The model is built without transformers' random init, which every loaded
    tensor overwrites: parameters are allocated empty, then the checkpoint's tensors are assigned in their
    place, not copied (a 3.8 B model on an H100 host's 16 cores: 50-56 s with the init and the copy, 13-15 s
    without). Non-persistent buffers (rotary ``inv_freq``, Gemma's ``embed_scale``) are not in the
    checkpoint; the modules' constructors compute them.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from olivepress.architectures import load_config

    dtype = dtype or torch.float32
    config = load_config(checkpoint_dir, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    floats, weights = read_int4_checkpoint(checkpoint_dir)
    state = {name: tensor.to(dtype) for name, tensor in floats.items()}
    state.update({f"{name}.weight": weight.dequantize().to(dtype) for name, weight in weights.items()})
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [name for name in missing if name != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise ValueError(f"checkpoint {checkpoint_dir} does not match its config: {missing=} {unexpected=}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()
