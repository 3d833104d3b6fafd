"""How fast the cpu target decodes on this machine's cores, by how the LM head is stored (``optimize.lm_head``)
and how the adapter runs, beside the fp32 base the gate compares against.

From one run's quantize and finetune outputs (``--run``: a run folder, whose ``quantized/`` and ``adapter/``
are those steps' outputs), the int4 model is exported once per ``--lm-heads`` value; each export decodes with
its adapter off, merged with float branches and with 8-bit branches (``model.adapter.onnx``;
``optimize.merged_adapter_bits``, 8 being what evaluate gates) and at run time (``og.Adapters``, what ``chat
--adapter`` serves), for each ``--threads`` count (ONNX Runtime's ``intra_op_num_threads``). Every variant
decodes ``--tokens`` tokens after each of ``--prompts`` held-out prompts, interleaved with the others, after a
warm-up round; decode tokens/s are tokens after the first over their time, prompt tokens/s the prompt's length
over the time to the first token (medians). Also: the bytes a variant loads (int4 weights, its graph, the
adapter file at run time) and the held-out loss of the merged graphs and the base. Writes JSON, prints a
table:

    .venv/bin/python benchmarks/cpu_decode.py --run runs/run-... --threads 2 --out benchmarks/results/cpu_decode.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
from pathlib import Path

# the decoder graph each variant runs: model.onnx, the merged graph with float or 8-bit branches
VARIANTS = {
    "adapter off": "model.onnx",
    "merged float": "model.adapter.onnx",
    "merged 8-bit": "model.adapter.q8.onnx",
    "run time": "model.onnx",
}


def open_variant(model_dir: Path, variant: str, threads: int):
    """The exported model (or the base, variant None) with ``threads`` intra-op threads."""
    import onnxruntime_genai as og
    from transformers import AutoTokenizer

    from olivepress.genai import ADAPTER_FILE, ADAPTER_NAME, LoadedModel

    decoder: dict = {"filename": VARIANTS.get(variant, "model.onnx")}
    if threads:  # 0: ONNX Runtime's own choice, what evaluate and chat run with
        decoder["session_options"] = {"intra_op_num_threads": threads}
    config = og.Config(str(model_dir))
    config.overlay(json.dumps({"model": {"decoder": decoder}}))
    model = og.Model(config)
    adapters = None
    if variant == "run time":
        adapters = og.Adapters(model)
        adapters.load(str(model_dir / ADAPTER_FILE), ADAPTER_NAME)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return LoadedModel(
        model=model, tokenizer=tokenizer, adapters=adapters, adapter_merged=variant == "merged"
    )


def model_bytes(model_dir: Path, variant: str) -> int:
    """What the variant loads: the int4 weights, its graph and, at run time, the adapter file."""
    from olivepress.genai import ADAPTER_FILE

    files = [model_dir / "model.onnx.data", model_dir / VARIANTS.get(variant, "model.onnx")]
    files += [model_dir / ADAPTER_FILE] if variant == "run time" else []
    return sum(path.stat().st_size for path in files if path.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--run", type=Path, required=True, help="a run folder (quantized/, adapter/, held_out)"
    )
    parser.add_argument("--lm-heads", nargs="+", default=["float", "int8", "int4"])
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[len(os.sched_getaffinity(0))],
        help="intra-op thread counts to compare; 0: ONNX Runtime's default (default: this process's cores)",
    )
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per decode")
    parser.add_argument(
        "--prompts", type=int, default=3, help="held-out prompts, each decoded once per round"
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-base", action="store_true", help="skip the fp32 base")
    parser.add_argument("--out", type=Path, default=Path("runs/cpu_decode.json"))
    args = parser.parse_args()

    from olivepress.export.builder import build_base_model
    from olivepress.export.folder import export_onnx
    from olivepress.export.merged_bits import quantize_merged_branches
    from olivepress.genai import prompt_token_ids, response_loss, stream_generate

    config = json.loads((args.run / "config.json").read_text())
    held_out = [json.loads(line) for line in (args.run / "held_out.jsonl").read_text().splitlines() if line]
    work = Path(tempfile.mkdtemp(prefix="cpu-decode-"))
    folders = {}
    for lm_head in args.lm_heads:
        folder = export_onnx(
            args.run / "quantized",
            args.run / "adapter",
            work / lm_head,
            lm_head=lm_head,
            merged_adapter_bits=32,
        ).model_dir
        shutil.copy(folder / VARIANTS["merged float"], folder / VARIANTS["merged 8-bit"])
        quantize_merged_branches(folder / VARIANTS["merged 8-bit"])
        folders[lm_head] = folder
    if not args.no_base:
        from olivepress.default_model import default_model_dir

        base_dir = Path(config["model"]) if config.get("model") else default_model_dir()  # a local folder
        folders["fp32 base"] = build_base_model(base_dir, work / "base")

    rows = []
    for threads in args.threads:
        models = {}
        for name, folder in folders.items():
            for variant in ("base",) if name == "fp32 base" else VARIANTS:
                models[(name, variant)] = open_variant(folder, variant, threads)
        speeds = {key: [] for key in models}
        prompt_speeds = {key: [] for key in models}
        for round_index in range(args.rounds + 1):  # the first round warms up
            for pair in held_out[: args.prompts]:
                for key, loaded in models.items():
                    ids = prompt_token_ids(loaded, pair["prompt"], config.get("text_template"))
                    stats = stream_generate(
                        loaded, ids, args.tokens, lambda _text: None, len(ids) + args.tokens, exact=True
                    )
                    if round_index:
                        speeds[key].append(
                            (stats.new_tokens - 1) / (stats.seconds - stats.time_to_first_token_s)
                        )
                        prompt_speeds[key].append(len(ids) / stats.time_to_first_token_s)
        for (name, variant), loaded in models.items():
            rows.append(
                {
                    "lm_head": name,
                    "adapter": variant,
                    "threads": threads,
                    "decode_tok_s": round(statistics.median(speeds[(name, variant)]), 1),
                    "prompt_tok_s": round(statistics.median(prompt_speeds[(name, variant)]), 1),
                    "held_out_loss": round(response_loss(loaded, held_out, config.get("text_template")), 4)
                    if variant not in ("adapter off", "run time")
                    else None,
                    "bytes": model_bytes(folders[name], variant),
                }
            )
        del models

    report = {
        "machine": f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores",
        "run": str(args.run),
        "tokens": args.tokens,
        "prompts": args.prompts,
        "rounds": args.rounds,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(
        f"{'lm_head':<10}{'adapter':<13}{'threads':>8}{'decode tok/s':>14}{'prompt tok/s':>14}{'loss':>8}{'MB':>8}"
    )
    for row in rows:
        loss = f"{row['held_out_loss']:.3f}" if row["held_out_loss"] is not None else "-"
        print(
            f"{row['lm_head']:<10}{row['adapter']:<14}{row['threads']:>8}{row['decode_tok_s']:>14.1f}"
            f"{row['prompt_tok_s']:>14.1f}{loss:>8}{row['bytes'] / 1e6:>8.1f}"
        )
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
