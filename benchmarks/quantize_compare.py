"""Does AWQ earn its time? Held-out response-token loss of SmolLM2 in fp32, RTN int4 and AWQ int4.

The travel pairs are split by prompt (seeded), so no held-out prompt is ever calibrated on. Each AWQ run
happens in a fresh process, so its wall time and peak RSS are its own. RTN uses the same bits and group
size on the same linears, so the gap between the two is the activation-aware scale search alone.

    python benchmarks/quantize_compare.py --samples 16 32 64 --grid-points 10 20 --seeds 0 1 \
        --out runs/quantize_compare.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "travel.jsonl"


def read_pairs(path: Path) -> list[dict]:
    with path.open(encoding="utf-8-sig") as lines:
        return [json.loads(line.strip()) for line in lines if line.strip()]


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.iterdir() if path.is_file())


def weights_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def run_awq(model_dir: str, pool: list[dict], out_dir: str, args: argparse.Namespace, run: dict) -> dict:
    """One AWQ run (``run`` names its samples, grid points and seed), in its own process: what it cost."""
    from olivepress.config import QuantizeSettings
    from olivepress.tasks.quantize import quantize_awq

    started = time.perf_counter()
    settings = QuantizeSettings(
        group_size=args.group_size, calibration_samples=run["samples"], calibration_max_tokens=args.max_tokens
    )
    result = quantize_awq(
        Path(model_dir),
        pool,
        Path(out_dir),
        settings,
        seed=run["seed"],
        grid_points=run["grid_points"],
        progress=False,
    )
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        **run,
        "calibration_examples": result.calibration_examples,
        "calibration_tokens": result.calibration_tokens,
        "awq_seconds": round(result.seconds, 1),
        "process_wall_seconds": round(time.perf_counter() - started, 1),
        "process_cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
        "peak_rss_mib": round(usage.ru_maxrss / 1024),
    }


def rtn_model(model_dir: Path, group_size: int):
    """The fp32 model with every linear AWQ quantizes rounded to the nearest int4 level instead."""
    import torch
    from transformers import AutoModelForCausalLM

    from olivepress.export.int4 import rtn_quantize
    from olivepress.tasks.quantize import IGNORED_LINEARS

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] not in IGNORED_LINEARS:
            module.weight.data = rtn_quantize(module.weight.data, group_size).dequantize()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--model", type=Path, default=None, help="HF folder; default SmolLM2-135M-Instruct")
    parser.add_argument("--samples", type=int, nargs="+", default=[32], help="AWQ calibration sizes to run")
    parser.add_argument("--grid-points", type=int, nargs="+", default=None, help="AWQ scale-search points")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="calibration sample seeds")
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens kept of each calibration example")
    parser.add_argument("--held-out", type=float, default=0.2, help="fraction of distinct prompts held out")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the held-out split")
    parser.add_argument("--out", type=Path, default=Path("runs/quantize_compare.json"))
    parser.add_argument("--keep", type=Path, default=None, help="keep the int4 checkpoints in this folder")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from olivepress.default_model import default_model_dir
    from olivepress.export.int4 import load_dequantized_model
    from olivepress.scoring import response_token_loss
    from olivepress.tasks.quantize import AWQ_GRID_POINTS

    model_dir = args.model or default_model_dir()
    from olivepress.scoring import split_by_prompt

    pool, held_out = split_by_prompt(read_pairs(args.data), args.held_out, args.split_seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    report = {
        "model": str(model_dir),
        "data": str(args.data),
        "calibration_pool_pairs": len(pool),
        "held_out_pairs": len(held_out),
        "group_size": args.group_size,
        "torch_threads": torch.get_num_threads(),
        "fp32_weights_bytes": weights_bytes(model_dir),
        "fp32_folder_bytes": folder_bytes(model_dir),
    }
    print(f"{len(pool)} calibration-pool pairs, {len(held_out)} held-out pairs", file=sys.stderr)

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    report["fp32_loss"] = response_token_loss(base, tokenizer, held_out)
    del base
    report["rtn_loss"] = response_token_loss(rtn_model(model_dir, args.group_size), tokenizer, held_out)

    keep_root = args.keep or Path(tempfile.mkdtemp(prefix="quantize-compare-"))
    report["awq"] = []
    for samples, grid_points, seed in itertools.product(
        args.samples, args.grid_points or [AWQ_GRID_POINTS], args.seeds
    ):
        run = {"samples": samples, "grid_points": grid_points, "seed": seed}
        out_dir = keep_root / f"awq-g{args.group_size}-n{samples}-grid{grid_points}-seed{seed}"
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as executor:
            run = executor.submit(run_awq, str(model_dir), pool, str(out_dir), args, run).result()
        run["loss"] = response_token_loss(load_dequantized_model(out_dir), tokenizer, held_out)
        run["int4_weights_bytes"] = weights_bytes(out_dir)
        run["int4_folder_bytes"] = folder_bytes(out_dir)
        report["awq"].append(run)
        print(f"AWQ {run}", file=sys.stderr)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"\nwritten to {args.out}")


def print_table(report: dict) -> None:
    mib = 1024 * 1024
    print(
        f"\nheld-out response-token loss, {report['held_out_pairs']} pairs, group size {report['group_size']}"
    )
    header = f"{'variant':<30}{'loss':>8}{'AWQ s':>8}{'CPU s':>8}{'peak RSS MiB':>14}{'weights MiB':>13}"
    print(header)
    print(f"{'fp32':<30}{report['fp32_loss']:>8.4f}{'':>30}{report['fp32_weights_bytes'] / mib:>13.1f}")
    print(f"{'RTN int4':<30}{report['rtn_loss']:>8.4f}")
    for run in report["awq"]:
        label = f"AWQ {run['calibration_examples']} ex, grid {run['grid_points']}, seed {run['seed']}"
        print(
            f"{label:<30}{run['loss']:>8.4f}{run['awq_seconds']:>8.0f}{run['process_cpu_seconds']:>8.0f}"
            f"{run['peak_rss_mib']:>14}{run['int4_weights_bytes'] / mib:>13.1f}"
        )


if __name__ == "__main__":
    main()
