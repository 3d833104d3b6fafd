"""The lab, measured: every step of the flow on SmolLM2 and the lab's data, one process per step.

Writes JSON and prints tables: wall time and peak RSS of each step (each runs in a fresh process, so its
peak is its own), sizes fp32 → AWQ int4 → ONNX (+ adapter), held-out mean response-token loss for base
fp32, RTN, AWQ, AWQ+LoRA (PyTorch) and ONNX with and without the adapter, and decode tokens/s of the ONNX
model with and without the adapter (interleaved, so both see the same machine load).

    .venv/bin/python benchmarks/lab_pipeline.py --out benchmarks/results/lab_pipeline.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "travel.jsonl"


def in_fresh_process(function, *args):
    """Run ``function(*args)`` in a new process; return (its result, wall seconds, its peak RSS in MiB)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        started = time.perf_counter()
        result, peak_kib = pool.submit(_measured, function, *args).result()
        return result, time.perf_counter() - started, peak_kib / 1024


def _measured(function, *args):
    result = function(*args)
    return result, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def step_validate(data: Path) -> int:
    from olivepress.tasks.validate import validate_jsonl

    return validate_jsonl(data).n_records


def step_quantize(model_dir: Path, train: list[dict], out: Path, settings: dict) -> None:
    from olivepress.config import QuantizeSettings
    from olivepress.tasks.quantize import quantize_awq

    quantize_awq(model_dir, train, out, QuantizeSettings(**settings), progress=False)


def step_finetune(checkpoint: Path, train: list[dict], out: Path, work: Path, settings: dict) -> list[dict]:
    from olivepress.config import FinetuneSettings
    from olivepress.tasks.finetune import finetune_lora

    return finetune_lora(checkpoint, train, out, FinetuneSettings(**settings), work_dir=work).losses


def step_optimize(checkpoint: Path, adapter: Path, out: Path) -> None:
    from olivepress.export.folder import export_onnx

    export_onnx(checkpoint, adapter, out)


def torch_losses(model_dir: Path, checkpoint: Path, adapter: Path, held_out: list[dict], group_size: int):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from olivepress.export.int4 import load_dequantized_model, rtn_quantize
    from olivepress.scoring import response_token_loss
    from olivepress.tasks.quantize import IGNORED_LINEARS

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    losses = {"base fp32 (PyTorch)": response_token_loss(base, tokenizer, held_out)}
    with torch.no_grad():
        for name, module in base.named_modules():
            if isinstance(module, torch.nn.Linear) and name.split(".")[-1] not in IGNORED_LINEARS:
                module.weight.copy_(rtn_quantize(module.weight, group_size).dequantize())
    losses["RTN int4 (PyTorch)"] = response_token_loss(base, tokenizer, held_out)
    awq = load_dequantized_model(checkpoint)
    losses["AWQ int4 (PyTorch)"] = response_token_loss(awq, tokenizer, held_out)
    tuned = PeftModel.from_pretrained(awq, adapter).eval()
    losses["AWQ int4 + LoRA (PyTorch)"] = response_token_loss(tuned, tokenizer, held_out)
    return losses


def onnx_measurements(onnx_dir: Path, held_out: list[dict], rounds: int, new_tokens: int):
    from olivepress.genai import ADAPTER_FILE, open_model, prompt_token_ids, response_loss, stream_generate

    models = {"off": open_model(onnx_dir), "on": open_model(onnx_dir, onnx_dir / ADAPTER_FILE)}
    losses = {
        "ONNX int4, adapter off": response_loss(models["off"], held_out),
        "ONNX int4, adapter on": response_loss(models["on"], held_out),
    }
    speeds = {"off": [], "on": []}
    first_token = {"off": [], "on": []}
    for round_index in range(rounds):
        prompt = held_out[round_index % len(held_out)]["prompt"]
        for key, loaded in models.items():
            stats = stream_generate(loaded, prompt_token_ids(loaded, prompt), new_tokens, lambda _text: None)
            speeds[key].append(stats.tokens_per_second)
            first_token[key].append(stats.time_to_first_token_s)
    chat = {
        f"adapter {key}": {
            "decode_tokens_per_s": statistics.median(speeds[key]),
            "time_to_first_token_s": statistics.median(first_token[key]),
        }
        for key in models
    }
    return losses, chat


def bytes_of(*paths: Path) -> int:
    return sum(
        p.stat().st_size
        for path in paths
        for p in ([path] if path.is_file() else path.rglob("*"))
        if p.is_file()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--work", type=Path, default=Path("/tmp/olivepress-lab-bench"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lab_pipeline.json"))
    parser.add_argument("--held-out", type=float, default=0.2, help="fraction of distinct prompts held out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--chat-rounds", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()

    from olivepress.default_model import default_model_dir
    from olivepress.scoring import split_by_prompt
    from olivepress.tasks.validate import read_examples

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    model_dir = default_model_dir()
    train, held_out = split_by_prompt(read_examples(args.data), args.held_out, args.seed)
    quantize_settings = {"calibration_samples": args.calibration_samples}
    finetune_settings = {"max_steps": args.max_steps}
    paths = {name: args.work / name for name in ("quantized", "adapter", "finetune-work", "onnx")}

    steps = {}
    for name, function, step_args in [
        ("validate", step_validate, (args.data,)),
        ("quantize", step_quantize, (model_dir, train, paths["quantized"], quantize_settings)),
        (
            "finetune",
            step_finetune,
            (paths["quantized"], train, paths["adapter"], paths["finetune-work"], finetune_settings),
        ),
        ("optimize", step_optimize, (paths["quantized"], paths["adapter"], paths["onnx"])),
    ]:
        result, seconds, peak_mib = in_fresh_process(function, *step_args)
        steps[name] = {"seconds": round(seconds, 1), "peak_rss_mib": round(peak_mib)}
        if name == "finetune":
            steps[name]["first_last_loss"] = [round(result[0]["loss"], 3), round(result[-1]["loss"], 3)]
        print(f"{name}: {seconds:.1f} s, peak RSS {peak_mib:.0f} MiB", flush=True)

    group_size = json.loads((paths["quantized"] / "config.json").read_text())["quantization_config"][
        "group_size"
    ]
    losses, _, _ = in_fresh_process(
        torch_losses, model_dir, paths["quantized"], paths["adapter"], held_out, group_size
    )
    (onnx_losses, chat), _, _ = in_fresh_process(
        onnx_measurements, paths["onnx"], held_out, args.chat_rounds, args.new_tokens
    )
    losses.update(onnx_losses)
    onnx_model = [p for p in paths["onnx"].iterdir() if p.name.startswith("model.onnx")]
    sizes_mb = {
        "fp32 HF weights": bytes_of(model_dir / "model.safetensors") / 1e6,
        "AWQ int4 checkpoint": bytes_of(paths["quantized"] / "model.safetensors") / 1e6,
        "ONNX int4 model": bytes_of(*onnx_model) / 1e6,
        "ONNX adapter": bytes_of(*paths["onnx"].glob("*.onnx_adapter")) / 1e6,
    }
    results = {
        "data": str(args.data),
        "train_pairs": len(train),
        "held_out_pairs": len(held_out),
        "settings": {"quantize": quantize_settings, "finetune": finetune_settings, "seed": args.seed},
        "cpu_count": os.cpu_count(),
        "steps": steps,
        "sizes_mb": {k: round(v, 1) for k, v in sizes_mb.items()},
        "held_out_loss": {k: round(v, 4) for k, v in losses.items()},
        "chat": chat,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))

    print(f"\n{len(train)} train / {len(held_out)} held-out pairs (split by prompt, seed {args.seed})")
    print(f"\n{'step':<10} {'wall s':>8} {'peak RSS MiB':>13}")
    for name, row in steps.items():
        print(f"{name:<10} {row['seconds']:>8.1f} {row['peak_rss_mib']:>13}")
    print(f"\n{'artifact':<22} {'MB':>8}")
    for name, size in sizes_mb.items():
        print(f"{name:<22} {size:>8.1f}")
    print(f"\n{'model':<28} {'held-out loss':>13}")
    for name, loss in losses.items():
        print(f"{name:<28} {loss:>13.4f}")
    print(f"\n{'ONNX chat':<12} {'decode tok/s':>12} {'first token s':>14}")
    for name, row in chat.items():
        print(f"{name:<12} {row['decode_tokens_per_s']:>12.1f} {row['time_to_first_token_s']:>14.3f}")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
