"""Which int4 kernel ONNX Runtime runs decides how close decode gets to the bandwidth bound: the int4 group
size × onnxruntime-gpu's MatMulNBits kernel choice, at Phi-3.5-mini's size, with and without the adapter.

MatMulNBits on CUDA has two decode kernels: its own 4-bit GEMV (the default) and TensorRT-LLM's
weight-only GEMV/GEMM ("fpA_intB"), which onnxruntime runs only when asked (``ep.cuda.fpa_intb_gemm`` in
the session options, or ``ORT_FPA_INTB_GEMM=1``) and, in some onnxruntime versions, only for group sizes
64 and 128. So per group size (``--group-sizes``) this exports the same model twice, without LoRA
branches and with a random rank-16 adapter on every decoder linear (merged, as evaluate and chat run the
folder's own adapter), with CUDA graphs, and decodes each under both kernels, each variant alone in a fresh
process (``gpu_lab.decode_variant``: a warm-up, then ``--repeats`` generations of exactly ``--tokens``
tokens; medians), next to the fp16 base. The int4 weights are round-to-nearest: speed does not depend on
which integers AWQ picks. Writes JSON and prints a table.

    python benchmarks/int4_kernels.py --data travel.jsonl --out int4_kernels.json      # on the GPU machine
    .venv/bin/python benchmarks/int4_kernels.py --model smollm2 --device cpu --group-sizes 32 \\
        --tokens 16 --repeats 1 --out /tmp/int4_kernels.json                            # CPU smoke check
"""

from __future__ import annotations

import argparse
import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

from adapter_cost import random_adapter
from gpu_lab import (
    DEFAULT_DATA,
    PROMPT,
    as_error,
    decode_variant,
    device_info,
    in_child,
    known_bandwidth,
    model_bytes,
    prepare_model,
    with_genai_config,
)

# the decoder linears a default run adapts, by the architecture's own names
LORA_TARGETS = {
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
KERNELS = {"default": None, "fpA_intB": "1"}
FPA_INTB_OPTION = "ep.cuda.fpa_intb_gemm"  # session config key; overrides ORT_FPA_INTB_GEMM


def with_kernel(source: Path, target: Path, fpa_intb: str | None) -> Path:
    """``source`` as a folder of links whose genai_config.json asks for the fpA_intB kernel (or not)."""

    def choose(config: dict) -> None:
        options = config["model"]["decoder"]["session_options"]
        options.pop(FPA_INTB_OPTION, None)
        if fpa_intb is not None:
            options[FPA_INTB_OPTION] = fpa_intb

    return with_genai_config(source, target, choose)


def exports(model_dir: Path, work: Path, group_size: int, device: str) -> dict[str, tuple[Path, Path | None]]:
    """The int4 model of ``group_size`` exported without branches and with a random adapter."""
    from transformers import AutoConfig

    from olivepress.export.folder import export_onnx
    from olivepress.export.int4 import write_rtn_checkpoint
    from olivepress.genai import ADAPTER_FILE

    folder = work / f"group-{group_size}"
    checkpoint = write_rtn_checkpoint(model_dir, folder / "int4", group_size)
    modules = LORA_TARGETS[AutoConfig.from_pretrained(model_dir).model_type]
    adapter = random_adapter(checkpoint, folder / "adapter", modules)
    graphs = device == "gpu"
    target = "cuda" if graphs else "cpu"
    plain = export_onnx(checkpoint, None, folder / "plain", target=target, cuda_graph=graphs).model_dir
    adapted = export_onnx(checkpoint, adapter, folder / "onnx", target=target, cuda_graph=graphs).model_dir
    return {"int4": (plain, None), "int4+adapter": (adapted, adapted / ADAPTER_FILE)}


def measure(folder: Path, adapter: Path | None, args: argparse.Namespace, bandwidth: float | None) -> dict:
    try:
        row = in_child(
            decode_variant, folder, adapter, PROMPT, args.tokens, args.repeats, args.device == "gpu"
        )
    except Exception as failure:
        return {"error": as_error(failure)}
    size = model_bytes(folder) + (adapter.stat().st_size if adapter else 0)
    row.pop("tokens", None)
    row["bytes_per_token"] = size
    if bandwidth:
        row["share_of_bound"] = round(row["decode_tokens_per_s"] * size / bandwidth, 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["phi35mini", "smollm2", "phi3tiny"], default="phi35mini")
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="text the random model's tokenizer learns"
    )
    parser.add_argument("--device", choices=["cpu", "gpu"], default="gpu")
    parser.add_argument("--group-sizes", default="32,64,128")
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/olivepress-int4-kernels"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/int4_kernels.json"))
    args = parser.parse_args()

    from olivepress.export.builder import build_base_model

    info = device_info(args.device)
    bandwidth = known_bandwidth(info.get("name", "")) if args.device == "gpu" else None
    work = args.work / args.model
    work.mkdir(parents=True, exist_ok=True)
    model_dir, facts = prepare_model(args.model, work, args.data, args.device)
    base_dir = work / "base-onnx"
    if not (base_dir / "genai_config.json").is_file():
        shutil.rmtree(base_dir, ignore_errors=True)
        gpu = args.device == "gpu"
        in_child(build_base_model, model_dir, base_dir, "cuda" if gpu else "cpu", gpu)
    rows = {"fp16 base" if args.device == "gpu" else "fp32 base": measure(base_dir, None, args, bandwidth)}
    kernels = KERNELS if args.device == "gpu" else {"default": None}
    for group_size in [int(size) for size in args.group_sizes.split(",")]:
        try:
            built = in_child(exports, model_dir, work, group_size, args.device)
        except Exception as failure:
            rows[f"group {group_size}"] = {"error": as_error(failure)}
            continue
        for label, (folder, adapter) in built.items():
            for kernel, option in kernels.items():
                name = f"{label}, group {group_size}, {kernel}"
                linked = with_kernel(
                    folder, work / "decode" / name.replace(" ", "_").replace(",", ""), option
                )
                rows[name] = measure(linked, linked / adapter.name if adapter else None, args, bandwidth)
                print(
                    f"  {name}: {rows[name].get('decode_tokens_per_s', rows[name].get('error'))}", flush=True
                )

    base = rows[next(iter(rows))].get("decode_tokens_per_s")
    for row in rows.values():
        if base and "decode_tokens_per_s" in row:
            row["vs_base"] = round(row["decode_tokens_per_s"] / base, 3)
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": info,
        "bandwidth_bytes_per_s": bandwidth,
        "model": {"name": args.model, **facts},
        "settings": {"tokens": args.tokens, "repeats": args.repeats, "prompt": PROMPT},
        "variants": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"{'variant':<40} {'tok/s':>8} {'vs base':>8} {'of bound':>9}")
    for name, row in rows.items():
        if "error" in row:
            print(f"{name:<40} error: {row['error'][:80]}")
            continue
        share = row.get("share_of_bound")
        print(
            f"{name:<40} {row['decode_tokens_per_s']:>8.1f} {row.get('vs_base', ''):>8}"
            f" {'' if share is None else f'{share:.0%}':>9}"
        )
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
