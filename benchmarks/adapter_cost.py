"""What the LoRA branches cost at decode time on this machine's CPU: the same int4 SmolLM2 exported without
branches, with its adapter off, with the adapter merged (``model.adapter.onnx``) and with it loaded at run
time (``og.Adapters``), for LoRA on q/k/v/o only and on every decoder linear (the default targets).

The int4 weights are round-to-nearest (the speed does not depend on which integers AWQ picks) and the
adapters random (rank 16, alpha 32, as the defaults). Each variant decodes ``--tokens`` tokens after one
prompt, interleaved with the others, ``--repeats`` times after a warm-up; medians. Writes JSON, prints a table:

    .venv/bin/python benchmarks/adapter_cost.py --out benchmarks/results/adapter_cost.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

TARGETS = {
    "q/k/v/o": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "every linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
PROMPT = "Plan three days in Lisbon for me: where to stay, what to see and what to eat."


def random_adapter(checkpoint_dir: Path, target: Path, modules: list[str], seed: int = 0) -> Path:
    """A rank-16 PEFT adapter whose B is random (PEFT starts it at zero, which would add nothing)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from olivepress.export.int4 import load_dequantized_model

    config = LoraConfig(r=16, lora_alpha=32, target_modules=modules, task_type="CAUSAL_LM")
    model = get_peft_model(load_dequantized_model(checkpoint_dir), config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.02)
    model.save_pretrained(target)
    return target


def decode_rate(loaded, ids: list[int], tokens: int, adapter_name: str | None = None) -> float:
    """Tokens/s decoding ``tokens`` after ``ids``; ``adapter_name``: which of ``loaded.adapters`` is active."""
    import numpy as np
    import onnxruntime_genai as og

    from olivepress.genai import ADAPTER_NAME

    params = og.GeneratorParams(loaded.model)
    params.set_search_options(max_length=len(ids) + tokens, min_length=len(ids) + tokens)
    generator = og.Generator(loaded.model, params)
    if loaded.adapters is not None:
        generator.set_active_adapter(loaded.adapters, adapter_name or ADAPTER_NAME)
    generator.append_tokens(np.asarray(ids, dtype=np.int32))
    generator.generate_next_token()
    started, decoded = time.perf_counter(), 0
    while not generator.is_done():
        generator.generate_next_token()
        decoded += 1
    return decoded / (time.perf_counter() - started)


def measure(work: Path, checkpoint: Path, modules: list[str], tokens: int, repeats: int) -> dict:
    from olivepress.export.folder import export_onnx
    from olivepress.genai import ADAPTER_FILE, open_model, prompt_token_ids

    adapter = random_adapter(checkpoint, work / "adapter", modules)
    export_onnx(checkpoint, None, work / "plain")
    onnx_dir = export_onnx(checkpoint, adapter, work / "onnx").model_dir
    own = onnx_dir / ADAPTER_FILE
    loaded = {
        "no branches": open_model(work / "plain"),
        "adapter off": open_model(onnx_dir),
        "adapter merged": open_model(onnx_dir, own),
        "adapter at run time": open_model(onnx_dir, own, run_time_adapter=True),
    }
    ids = prompt_token_ids(loaded["adapter off"], PROMPT)
    rates: dict[str, list[float]] = {name: [] for name in loaded}
    for repeat in range(repeats + 1):
        for name, model in loaded.items():
            rate = decode_rate(model, ids, tokens)
            if repeat:  # the first round warms up
                rates[name].append(rate)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    off = medians["adapter off"]
    return {
        "tokens_per_s": {name: round(value, 1) for name, value in medians.items()},
        "runs": {name: [round(v, 1) for v in values] for name, values in rates.items()},
        "merged_on_off_ratio": round(medians["adapter merged"] / off, 3),
        "run_time_on_off_ratio": round(medians["adapter at run time"] / off, 3),
        "off_vs_no_branches": round(off / medians["no branches"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/adapter_cost.json"))
    args = parser.parse_args()

    from olivepress.default_model import default_model_dir
    from olivepress.export.int4 import write_rtn_checkpoint

    results = {"model": "SmolLM2-135M-Instruct (int4 RTN, group 32)", "tokens": args.tokens, "targets": {}}
    with tempfile.TemporaryDirectory(prefix="adapter-cost-") as scratch:
        checkpoint = write_rtn_checkpoint(default_model_dir(), Path(scratch) / "int4")
        for label, modules in TARGETS.items():
            work = Path(scratch) / label.replace("/", "")
            results["targets"][label] = measure(work, checkpoint, modules, args.tokens, args.repeats)
            shutil.rmtree(work)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"{'LoRA on':<14} {'no branches':>12} {'off':>8} {'merged':>8} {'run time':>9} {'merged/off':>11}")
    for label, row in results["targets"].items():
        rate = row["tokens_per_s"]
        print(
            f"{label:<14} {rate['no branches']:>12} {rate['adapter off']:>8} {rate['adapter merged']:>8}"
            f" {rate['adapter at run time']:>9} {row['merged_on_off_ratio']:>11}"
        )
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
