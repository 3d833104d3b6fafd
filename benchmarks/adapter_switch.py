"""Many adapters on one int4 model: what loading them, switching among them and decoding with each costs.

One int4 SmolLM2 (round-to-nearest: the speed does not depend on which integers AWQ picks) is exported once
with a first random adapter (rank 16 on every decoder linear, the defaults); ``--adapters`` − 1 more random
adapters are written against that export (``olivepress.export.lora.export_adapter``). All are loaded
into one ``og.Adapters``. Then, as a server answering requests for different adapters would: a new
generator per request, the request's adapter made active, ``--tokens`` decoded. Measured:

* load: seconds to load each adapter file into ``og.Adapters``;
* switch: seconds to make an adapter active on a new generator (``set_active_adapter``), against the
  time of one decode step;
* decode tokens/s with no adapter, with each adapter at run time, and with the first adapter merged
  (``model.adapter.onnx``, what chat and evaluate use for the folder's own adapter); requests interleaved
  round-robin, ``--repeats`` rounds after a warm-up, medians.

Targets (issue #13): a switch costs less than one decode step; tokens/s with any adapter ≥ 0.9 × without.

    .venv/bin/python benchmarks/adapter_switch.py --out benchmarks/results/adapter_switch.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from adapter_cost import PROMPT, TARGETS, decode_rate, random_adapter


def switch_seconds(loaded, adapters, name: str, ids: list[int], tokens: int) -> float:
    """Seconds ``set_active_adapter`` takes on a fresh generator sized for a request."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(loaded.model)
    params.set_search_options(max_length=len(ids) + tokens)
    generator = og.Generator(loaded.model, params)
    started = time.perf_counter()
    generator.set_active_adapter(adapters, name)
    return time.perf_counter() - started


def machine_name(gpu: bool) -> str:
    if gpu:
        import torch

        return f"{torch.cuda.get_device_name(0)}, CUDA graphs"
    return f"{platform.processor() or platform.machine()}, device cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--device", choices=["cpu", "gpu"], default="cpu", help="gpu: CUDA export with graphs"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/adapter_switch.json"))
    args = parser.parse_args()
    gpu = args.device == "gpu"

    import onnxruntime_genai as og

    from olivepress.default_model import default_model_dir
    from olivepress.export.folder import export_onnx
    from olivepress.export.int4 import write_rtn_checkpoint
    from olivepress.export.lora import export_adapter
    from olivepress.genai import ADAPTER_FILE, LoadedModel, open_model, prompt_token_ids

    modules = TARGETS["every linear"]
    with tempfile.TemporaryDirectory(prefix="adapter-switch-") as scratch:
        work = Path(scratch)
        checkpoint = write_rtn_checkpoint(default_model_dir(), work / "int4")
        first = random_adapter(checkpoint, work / "adapter-0", modules, seed=0)
        model_dir = export_onnx(
            checkpoint, first, work / "onnx", target="cuda" if gpu else "cpu", cuda_graph=gpu
        ).model_dir
        files = {"adapter-0": model_dir / ADAPTER_FILE}
        for index in range(1, args.adapters):
            peft_dir = random_adapter(checkpoint, work / f"adapter-{index}", modules, seed=index)
            files[f"adapter-{index}"] = export_adapter(
                checkpoint, peft_dir, model_dir, work / f"adapter-{index}.onnx_adapter"
            )

        plain = open_model(model_dir)
        adapters = og.Adapters(plain.model)
        load_seconds = {}
        for name, path in files.items():
            started = time.perf_counter()
            adapters.load(str(path), name)
            load_seconds[name] = time.perf_counter() - started
        shared = LoadedModel(model=plain.model, tokenizer=plain.tokenizer, adapters=adapters)
        # request name -> (model, active adapter)
        requests = {"none": (plain, None), **{name: (shared, name) for name in files}}
        requests["adapter-0 merged"] = (open_model(model_dir, files["adapter-0"]), None)
        ids = prompt_token_ids(plain, PROMPT)

        rates: dict[str, list[float]] = {name: [] for name in requests}
        switches: list[float] = []
        for repeat in range(args.repeats + 1):
            for name, (loaded, adapter_name) in requests.items():
                if adapter_name is not None:
                    switches.append(switch_seconds(plain, adapters, adapter_name, ids, args.tokens))
                rate = decode_rate(loaded, ids, args.tokens, adapter_name)
                if repeat:  # the first round warms up
                    rates[name].append(rate)

    medians = {name: statistics.median(values) for name, values in rates.items()}
    none = medians["none"]
    step_seconds = 1 / none
    switch = statistics.median(switches)
    worst = min(value for name, value in medians.items() if name != "none")
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_name(gpu),
        "model": "SmolLM2-135M-Instruct (int4 RTN, group 32), rank-16 adapters on every decoder linear",
        "settings": {"adapters": args.adapters, "tokens": args.tokens, "repeats": args.repeats},
        "load_seconds": {name: round(value, 4) for name, value in load_seconds.items()},
        "switch_seconds_median": switch,
        "decode_step_seconds": step_seconds,
        "switch_vs_decode_step": switch / step_seconds,
        "tokens_per_s": {name: round(value, 1) for name, value in medians.items()},
        "runs": {name: [round(v, 1) for v in values] for name, values in rates.items()},
        "worst_adapter_vs_none": worst / none,
        "targets_met": {
            "switch_below_one_step": switch < step_seconds,
            "adapter_at_least_0.9": worst >= 0.9 * none,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(
        f"load per adapter: {statistics.median(load_seconds.values()) * 1000:.1f} ms (median of {len(files)})"
    )
    print(
        f"switch: {switch * 1e6:.0f} µs = {switch / step_seconds:.3f} decode steps ({step_seconds * 1000:.1f} ms)"
    )
    print(f"{'decoding with':<18} {'tok/s':>8} {'vs none':>8}")
    for name, value in medians.items():
        print(f"{name:<18} {value:>8.1f} {value / none:>8.3f}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
