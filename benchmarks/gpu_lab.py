"""The lab on a GPU: the whole flow per model with ``device: gpu`` and the ``--targets`` it builds and gates
(default cpu, the config's), then (unless ``--skip-decode``) a decode micro-benchmark of the device's own
export, held against the memory-bandwidth bound. Per target the JSON records the gate, the speed-up over
that target's base, the fine-tuned model's decode tokens/s, the size ratio and evaluate's phases.

Per model (``--models``): ``smollm2`` (the default SmolLM2-135M-Instruct), ``phi35mini`` (a model of
Phi-3.5-mini's architecture and sizes with random weights, built here, see :func:`build_phi3`) and
``phi3tiny`` (the same at toy size, for smoke checks). For each it records the run's step wall times next
to the seed lab's A100 figures, the evaluate metrics (decode tokens/s, time to first token, GPU memory of
the base / int4 / int4+adapter variants; torch's peak in training) and whether the gate passed. Then, in a
fresh process per variant, batch 1, one fixed prompt, exactly ``--decode-tokens`` new tokens (EOS is held
off with ``min_length``): base, int4 and int4+adapter, and on CUDA the same three with CUDA graphs on
(genai_config.json's ``enable_cuda_graph``, in a copy of the folder). A failure is recorded as an error in
the JSON, never a crash. Writes JSON (``--out``) and prints tables.

    python benchmarks/gpu_lab.py --data data/travel.jsonl                       # on the GPU machine
    .venv/bin/python benchmarks/gpu_lab.py --device cpu --models smollm2 --max-steps 2 \\
        --decode-tokens 16 --calibration-samples 4 --generation-samples 2       # CPU smoke check

Bandwidth bound: at batch 1 every weight is read once per decoded token, so bytes/token ≈ the model files'
size (plus the adapter file with the adapter on) and tokens/s ≤ bandwidth ÷ that. The approximation counts
the whole embedding table (one row is read per token) and leaves out the KV cache and activations.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import UTC, datetime
from multiprocessing import get_context
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "travel.jsonl"
MODELS = ("smollm2", "phi35mini", "phi3tiny")
PROMPT = "Plan three days in Lisbon for me: where to stay, what to see and what to eat."
# The seed lab on an A100 (Phi-3.5-mini): olive quantize --algorithm awq, olive finetune (100 steps),
# olive auto-opt. Reference figures from the lab's text, in seconds, beside this run's steps.
LAB_A100_SECONDS = {"quantize": 8 * 60, "finetune": 6 * 60, "optimize": 5 * 60}
# Peak memory bandwidth (bytes/s) by device name; the first fragment found in the name wins.
BANDWIDTH = [
    ("H100 PCIe", 2.0e12),
    ("H100 NVL", 3.9e12),
    ("H100", 3.35e12),  # SXM5 80 GB, "NVIDIA H100 80GB HBM3"
    ("H200", 4.8e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),  # 40 GB
]
PHI35_MINI = {
    "hidden_size": 3072,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "intermediate_size": 8192,
    "vocab_size": 32064,
}
PHI3_TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
PHI3_SPECIALS = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"]
PHI3_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
MODEL_FILES = ("model.onnx", "model.onnx.data")
# onnxruntime-gpu 1.31's CUDA kernels read these switches (strings in libonnxruntime_providers_cuda.so); with
# --ort-switches each int4 variant with CUDA graphs is decoded again under each, in its own process. On an H100
# (2026-11-26, SmolLM2) none beat the default: int4 672 tok/s; fpA_intB 657, small-N GEMV 631, XQA 663.
ORT_SWITCHES = {
    "fpA_intB": {"ORT_FPA_INTB_GEMM": "1"},  # TensorRT-LLM's weight-only int4 GEMM/GEMV for MatMulNBits
    "small_n_gemv": {"ORT_ENABLE_SMALL_N_GEMV": "1"},  # the LoRA A products have N = rank
    "xqa": {"ORT_ENABLE_XQA": "1"},  # XQA decode attention in GroupQueryAttention
}


def target_of(device: str) -> str:
    """The runtime a device's own export is built for: cuda on gpu, cpu on cpu."""
    return "cuda" if device == "gpu" else "cpu"


def in_child(function, *args, environment: dict[str, str] | None = None):
    """``function(*args)`` in a fresh process: its own CUDA context and allocators, and a crash there
    (a CUDA error, a segfault) becomes an exception here. ``environment`` is added to the child's."""
    saved = dict(os.environ)
    os.environ.update(environment or {})
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            return pool.submit(function, *args).result()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def as_error(error: BaseException) -> str:
    if isinstance(error, BrokenProcessPool):
        return "the process died (crash or out of memory)"
    return f"{type(error).__name__}: {error}"[:2000]


def first_version(*names: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for name in names:
        try:
            return f"{name} {version(name)}"
        except PackageNotFoundError:
            continue
    return None


def device_info(device: str) -> dict:
    import platform

    import torch

    info = {
        "kind": device,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "versions": {
            "torch": torch.__version__,
            "onnxruntime": first_version("onnxruntime-gpu", "onnxruntime"),
            "onnxruntime-genai": first_version("onnxruntime-genai-cuda", "onnxruntime-genai"),
            "transformers": first_version("transformers"),
            "olive": first_version("olive-ai"),
            "llmcompressor": first_version("llmcompressor"),
            "peft": first_version("peft"),
        },
    }
    if device == "gpu":
        import pynvml

        pynvml.nvmlInit()
        cuda_driver = pynvml.nvmlSystemGetCudaDriverVersion()
        info.update(
            name=torch.cuda.get_device_name(0),
            driver=pynvml.nvmlSystemGetDriverVersion(),
            cuda_driver=f"{cuda_driver // 1000}.{cuda_driver % 1000 // 10}",
            cuda_torch=torch.version.cuda,
        )
    else:
        info["name"] = platform.processor() or platform.machine()
    return info


def known_bandwidth(name: str) -> float | None:
    return next((bandwidth for fragment, bandwidth in BANDWIDTH if fragment in name), None)


def train_tokenizer(data: Path, vocab_size: int):
    """A byte-level BPE trained on the data's text (as tests/conftest.py does), with Phi-3's chat markers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from olivepress.tasks.validate import read_examples

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = [f"{pair['prompt']} {pair['response']}" for pair in read_examples(data)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=PHI3_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token="<|end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = PHI3_TEMPLATE
    return tokenizer


def build_phi3(target: Path, sizes: dict, data: Path, device: str) -> dict:
    """A Phi-3 model (LongRoPE, 128k positions from 4k) with random weights, saved as bf16 safetensors.

    The tokenizer is a BPE trained on the data (Phi-3.5's own is not here); it has fewer tokens than the
    model's vocab_size (32064 for phi35mini, as the real model, so the embedding and LM head have its size;
    ids past the tokenizer decode to nothing). For phi3tiny vocab_size is the tokenizer's length. The LongRoPE
    short and long factors are 1.0s (the real model's are not reproduced here)."""
    import torch
    from transformers import AutoModelForCausalLM, Phi3Config

    tokenizer = train_tokenizer(data, sizes.get("vocab_size", 512))
    head_dim = sizes["hidden_size"] // sizes["num_attention_heads"]
    config = Phi3Config(
        **{"vocab_size": len(tokenizer), **sizes},
        num_key_value_heads=sizes["num_attention_heads"],
        max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        # as Phi-3.5-mini's config.json writes it: the builder reads rope_scaling's "type"
        rope_scaling={
            "type": "longrope",
            "short_factor": [1.0] * (head_dim // 2),
            "long_factor": [1.0] * (head_dim // 2),
        },
        rope_theta=10000.0,
        sliding_window=262144,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if device == "gpu" else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return {"parameters": model.num_parameters(), "tokenizer_tokens": len(tokenizer)}


def prepare_model(name: str, work: Path, data: Path, device: str) -> tuple[Path, dict]:
    """The model folder for ``name`` and what is known about it; a built model is reused from ``work``."""
    if name == "smollm2":
        from olivepress.default_model import default_model_dir

        return default_model_dir(), {"weights": "SmolLM2-135M-Instruct"}
    target = work / "model"
    facts_file = work / "model.json"
    if not facts_file.is_file():
        shutil.rmtree(target, ignore_errors=True)
        started = time.perf_counter()
        facts = in_child(build_phi3, target, PHI35_MINI if name == "phi35mini" else PHI3_TINY, data, device)
        facts = {"weights": "random", **facts, "build_seconds": round(time.perf_counter() - started, 1)}
        facts_file.write_text(json.dumps(facts))
    return target, json.loads(facts_file.read_text())


def run_flow(model_dir: Path, work: Path, args: argparse.Namespace) -> dict:
    """One ``olivepress run`` with ``device`` set, its store and registry inside ``work``."""
    from olivepress.config import load_config
    from olivepress.flows.datasets import DatasetsFailed
    from olivepress.flows.pipeline import new_run_dir, olivepress_flow, run_folder
    from olivepress.tasks.evaluate import GateFailed

    overrides = {
        "model": model_dir,
        "data": args.data.resolve(),
        "device": args.device,
        "targets": args.targets,
        "output": work / "runs",
        "registry.path": work / "registry",
        "store.cache_dir": work / "cache",
        "finetune.max_steps": args.max_steps,
        "quantize.calibration_samples": args.calibration_samples,
        "evaluate.generation_samples": args.generation_samples,
    }
    config = load_config(overrides={k: v for k, v in overrides.items() if v is not None})
    run_dir = new_run_dir(config)
    started = time.perf_counter()
    error = None
    try:
        with run_folder(run_dir):
            olivepress_flow(config)
    except (GateFailed, DatasetsFailed) as failure:
        error = f"not every target passed: {str(failure)[:2000]}"  # each evaluation.json says why
    except Exception as failure:
        error = as_error(failure)
    return {"run_dir": str(run_dir), "seconds": round(time.perf_counter() - started, 1), "error": error}


def latest_run(work: Path) -> Path | None:
    runs = sorted((work / "runs").glob("run-*"), key=lambda p: p.stat().st_mtime)
    return runs[-1] if runs else None


def read_run(run_dir: Path, lab_figures: bool) -> dict:
    """Step times, evaluate metrics, training memory and the gate from a run folder (what exists of them)."""
    from olivepress.tasks.finetune import read_training_memory

    result: dict = {}
    if (run_dir / "config.json").is_file():  # optimize.cuda_graph: whether the flow's evaluate used graphs
        result["optimize"] = json.loads((run_dir / "config.json").read_text()).get("optimize")
    if (run_dir / "summary.json").is_file():
        result["steps"] = {
            row["step"]: {
                "status": row["status"],
                "seconds": round(row["seconds"], 1),
                **({"lab_a100_seconds": LAB_A100_SECONDS.get(row["step"])} if lab_figures else {}),
            }
            for row in json.loads((run_dir / "summary.json").read_text())
        }
    if (run_dir / "adapter").is_dir():
        result["training_memory"] = read_training_memory(run_dir / "adapter")
    result["targets"] = {}
    for evaluation_file in sorted((run_dir / "evaluations").glob("*/evaluation.json")):
        evaluation = json.loads(evaluation_file.read_text())
        keys = (
            "decode_tokens_per_s",
            "time_to_first_token_s",
            "gpu_memory_mib",
            "peak_memory_mib",
            "perplexity",
            "bytes_on_disk",
        )
        metrics = {m["variant"]: {key: m.get(key) for key in keys} for m in evaluation["metrics"]}
        result["targets"][evaluation_file.parent.name] = {
            "gate_passed": evaluation["gate"]["passed"],
            "speedup_vs_base": ratio(metrics, "fine-tuned", "base"),
            "decode_tok_s": metrics["fine-tuned"]["decode_tokens_per_s"],
            "base_decode_tok_s": metrics["base"]["decode_tokens_per_s"],
            "size_vs_base": ratio(metrics, "fine-tuned", "base", "bytes_on_disk"),
            "adapter_speed_ratio": ratio(metrics, "fine-tuned", "quantized"),
            "gate_checks": {c["name"]: round(c["measured"], 4) for c in evaluation["gate"]["checks"]},
            "evaluate": metrics,
            "evaluate_phase_seconds": evaluation.get("phase_seconds", {}),
            "evaluate_base_phase_seconds": evaluation.get("base_phase_seconds", {}),
        }
    return result


def ratio(rows: dict, top: str, bottom: str, key: str = "decode_tokens_per_s") -> float | None:
    a, b = rows.get(top, {}).get(key), rows.get(bottom, {}).get(key)
    return round(a / b, 3) if a and b else None


def with_cuda_graph(source: Path, target: Path, enabled: bool) -> Path:
    """``source`` as a folder of links with its own genai_config.json, CUDA graphs switched on or off."""

    def switch(config: dict) -> None:
        providers = config["model"]["decoder"]["session_options"]["provider_options"]
        cuda = [options["cuda"] for options in providers if "cuda" in options]
        if not cuda:
            raise ValueError(f"{source} is not a CUDA export: genai_config.json names no cuda provider")
        cuda[0]["enable_cuda_graph"] = "1" if enabled else "0"

    return with_genai_config(source, target, switch)


def with_genai_config(source: Path, target: Path, edit) -> Path:
    """``source`` as a folder of links with its own genai_config.json, as ``edit(config)`` changes it."""
    from olivepress.files import link_into
    from olivepress.genai import GENAI_CONFIG

    config = json.loads((source / GENAI_CONFIG).read_text())
    edit(config)
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for item in source.iterdir():
        if item.name != GENAI_CONFIG:
            link_into(target, item)
    (target / GENAI_CONFIG).write_text(json.dumps(config, indent=1))
    return target


def decode_run(loaded, ids: list[int], new_tokens: int, sample_memory) -> dict:
    """One greedy generation of exactly ``new_tokens`` tokens, timed as olivepress.genai times chat."""
    import numpy as np
    import onnxruntime_genai as og

    from olivepress.genai import ADAPTER_NAME

    params = og.GeneratorParams(loaded.model)
    params.set_search_options(max_length=len(ids) + new_tokens, min_length=len(ids) + new_tokens)
    generator = og.Generator(loaded.model, params)
    if loaded.adapters is not None:
        generator.set_active_adapter(loaded.adapters, ADAPTER_NAME)
    tokens: list[int] = []
    started = time.perf_counter()
    first_token_at = None
    generator.append_tokens(np.asarray(ids, dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
        first_token_at = first_token_at or time.perf_counter()
    finished = time.perf_counter()
    sample_memory()  # the KV cache is still alive here
    return {
        "tokens": tokens,
        "time_to_first_token_s": first_token_at - started,
        "decode_tokens_per_s": (len(tokens) - 1) / (finished - first_token_at),
    }


def decode_variant(
    model_dir: Path,
    adapter: Path | None,
    prompt: str,
    new_tokens: int,
    repeats: int,
    gpu: bool,
    run_time_adapter: bool = False,
):
    """The decode micro-benchmark of one variant (run it in a fresh process): a warm-up generation (CUDA
    graph capture, kernel choice), then ``repeats`` timed ones; medians, the tokens, GPU memory."""
    from olivepress.genai import open_model, prompt_token_ids
    from olivepress.gpu_memory import MIB, device_used_bytes, nvml_device

    handle = nvml_device() if gpu else None
    before = device_used_bytes(handle) if gpu else 0
    samples: list[int] = []

    def sample_memory() -> None:
        if handle is not None:
            samples.append(device_used_bytes(handle))

    loaded = open_model(model_dir, adapter, run_time_adapter=run_time_adapter)
    ids = prompt_token_ids(loaded, prompt)
    runs = [decode_run(loaded, ids, new_tokens, sample_memory) for _ in range(repeats + 1)][1:]
    return {
        "prompt_tokens": len(ids),
        "new_tokens": len(runs[0]["tokens"]),
        "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in runs),
        "time_to_first_token_s": statistics.median(r["time_to_first_token_s"] for r in runs),
        "runs_tokens_per_s": [round(r["decode_tokens_per_s"], 2) for r in runs],
        "gpu_memory_mib": (max(samples) - before) / MIB if samples else None,
        "tokens": runs[0]["tokens"],
    }


def model_bytes(model_dir: Path) -> int:
    return sum((model_dir / name).stat().st_size for name in MODEL_FILES if (model_dir / name).exists())


def uses_lora_add(onnx_dir: Path) -> bool:
    """Whether the export's branches are olivepress's LoraAdd (optimize.lora_kernel): its config names the
    operator's library."""
    from olivepress.export.kernel import CUSTOM_OPS_LIBRARY
    from olivepress.genai import GENAI_CONFIG

    config = json.loads((onnx_dir / GENAI_CONFIG).read_text())
    return CUSTOM_OPS_LIBRARY in config["model"]["decoder"]["session_options"]


def decode_benchmark(
    model_dir: Path,
    checkpoint_dir: Path,
    adapter_dir: Path,
    onnx_dir: Path,
    work: Path,
    args: argparse.Namespace,
    bandwidth: float | None,
) -> dict:
    """base / int4 / int4+adapter, and on CUDA each again with CUDA graphs; see the module docstring."""
    from olivepress.export.builder import build_base_model
    from olivepress.export.folder import export_onnx
    from olivepress.genai import ADAPTER_FILE

    # built as the flow builds for CUDA graphs (no control flow: a LongRoPE graph keeps the builder's If
    # otherwise, and refuses capture); the eager variants switch graphs off in their genai_config copy
    base_dir = work / "base-onnx"
    if not (base_dir / "genai_config.json").is_file():
        shutil.rmtree(base_dir, ignore_errors=True)
        build_base_model(model_dir, base_dir, target_of(args.device), cuda_graph=args.device == "gpu")
    # the same int4 model exported without an adapter: what the empty LoRA branches cost with none active
    plain_dir = work / "int4-no-branches"
    if not (plain_dir / "genai_config.json").is_file():
        shutil.rmtree(plain_dir, ignore_errors=True)
        export_onnx(
            checkpoint_dir, None, plain_dir, target=target_of(args.device), cuda_graph=args.device == "gpu"
        )
    adapter = onnx_dir / ADAPTER_FILE
    # int4+adapter opens the merged graph (what evaluate and chat use); the run-time form is og.Adapters
    plain = {
        "base": (base_dir, None),
        "int4 no branches": (plain_dir, None),
        "int4": (onnx_dir, None),
        "int4+adapter": (onnx_dir, adapter),
        "int4+run-time adapter": (onnx_dir, adapter),
    }
    if uses_lora_add(onnx_dir):  # the same adapter with ONNX Runtime's MatMul, MatMul, Add per branch
        stock_dir = work / "int4-stock-branches"
        if not (stock_dir / "genai_config.json").is_file():
            shutil.rmtree(stock_dir, ignore_errors=True)
            export_onnx(
                checkpoint_dir, adapter_dir, stock_dir, target="cuda", cuda_graph=True, lora_kernel="off"
            )
        plain["int4 [stock branches]"] = (stock_dir, None)
        plain["int4+adapter [stock branches]"] = (stock_dir, stock_dir / ADAPTER_FILE)
    variants: dict[str, tuple[Path, Path | None, bool, dict]] = {}
    for label, (folder, adapter_file) in plain.items():
        if args.device != "gpu" or not args.graphs_only:
            variants[label] = (folder, adapter_file, False, {})
        if args.device == "gpu":
            variants[f"{label}+cuda_graph"] = (folder, adapter_file, True, {})
    if args.device == "gpu" and args.ort_switches:
        for switch, environment in ORT_SWITCHES.items():
            for label in ("int4", "int4+adapter"):
                folder, adapter_file = plain[label]
                variants[f"{label}+cuda_graph [{switch}]"] = (folder, adapter_file, True, environment)

    results = {}
    for label, (folder, adapter_file, graph, environment) in variants.items():
        try:
            if args.device == "gpu":
                folder = with_cuda_graph(folder, work / "decode" / label.replace(" ", "_"), enabled=graph)
                adapter_file = folder / ADAPTER_FILE if adapter_file else None
            row = in_child(
                decode_variant,
                folder,
                adapter_file,
                args.prompt,
                args.decode_tokens,
                args.decode_repeats,
                args.device == "gpu",
                label.startswith("int4+run-time adapter"),
                environment=environment,
            )
        except Exception as failure:
            results[label] = {"error": as_error(failure)}
            print(f"  decode {label}: {results[label]['error']}", flush=True)
            continue
        size = model_bytes(folder) + (adapter_file.stat().st_size if adapter_file else 0)
        bound = bandwidth / size if bandwidth else None
        row.update(
            bytes_per_token=size,
            bound_tokens_per_s=round(bound, 1) if bound else None,
            share_of_bound=round(row["decode_tokens_per_s"] / bound, 3) if bound else None,
        )
        results[label] = row
        print(f"  decode {label}: {row['decode_tokens_per_s']:.1f} tok/s", flush=True)
    for label, row in results.items():
        if "+cuda_graph" in label and "tokens" in row:
            eager = results.get(label.split("+cuda_graph")[0], {})
            row["same_tokens_as_without_graph"] = row["tokens"] == eager.get("tokens")
    for row in results.values():
        row.pop("tokens", None)
    return results


def benchmark_model(name: str, args: argparse.Namespace, bandwidth: float | None) -> dict:
    work = args.work / name
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"flow": None}
    try:
        model_dir, facts = prepare_model(name, work, args.data, args.device)
    except Exception as failure:
        return {"error": f"building the model: {as_error(failure)}"}
    result.update(model_dir=str(model_dir), **facts)
    result["settings"] = {
        "max_steps": args.max_steps,
        "calibration_samples": args.calibration_samples,
        "generation_samples": args.generation_samples,
    }
    if not args.skip_flow:
        print(f"{name}: running the flow ({args.device})", flush=True)
        result["flow"] = run_flow(model_dir, work, args)
    run_dir = latest_run(work)
    if run_dir is None:
        result["error"] = "no run folder (run without --skip-flow first)"
        return result
    result["run_dir"] = str(run_dir)
    result.update(read_run(run_dir, lab_figures=name == "phi35mini"))
    onnx_dir = run_dir / "onnx" / target_of(args.device)
    if args.skip_decode:
        return result
    if not (onnx_dir / "genai_config.json").is_file():
        result["error"] = f"the run left no {target_of(args.device)} export for the decode benchmark"
        return result
    print(f"{name}: decode micro-benchmark, {args.decode_tokens} tokens", flush=True)
    checkpoint_dir, adapter_dir = (run_dir / "quantized").resolve(), (run_dir / "adapter").resolve()
    decode = decode_benchmark(
        model_dir, checkpoint_dir, adapter_dir, onnx_dir.resolve(), work, args, bandwidth
    )
    result["decode"] = {
        "prompt": args.prompt,
        "new_tokens": args.decode_tokens,
        "repeats": args.decode_repeats,
        "variants": decode,
    }
    # the headline ratios are of what the flow ships: on CUDA, with graphs (optimize.cuda_graph's default)
    shipped = "+cuda_graph" if args.device == "gpu" else ""
    result["adapter_speed_ratio"] = ratio(decode, f"int4+adapter{shipped}", f"int4{shipped}")
    result["speedup_vs_base"] = ratio(decode, f"int4+adapter{shipped}", f"base{shipped}")
    result["empty_branches_speed_ratio"] = ratio(decode, f"int4{shipped}", f"int4 no branches{shipped}")
    result["run_time_adapter_speed_ratio"] = ratio(
        decode, f"int4+run-time adapter{shipped}", f"int4{shipped}"
    )
    result["stock_branches_adapter_speed_ratio"] = ratio(
        decode, f"int4+adapter [stock branches]{shipped}", f"int4{shipped}"
    )
    return result


def print_tables(results: dict) -> None:
    device = results["device"]
    print(f"\n{device['name']} ({device['kind']}), bandwidth {results['bandwidth_bytes_per_s'] or '-'} B/s")
    for name, model in results["models"].items():
        print(f"\n== {name}: error {model.get('error')}")
        if model.get("flow") and model["flow"].get("error"):
            print(f"flow: {model['flow']['error'][:300]}")
        if steps := model.get("steps"):
            print(f"{'step':<22} {'status':<10} {'wall s':>8} {'lab A100 s':>11}")
            for step, row in steps.items():
                lab = row.get("lab_a100_seconds")
                print(f"{step:<22} {row['status']:<10} {row['seconds']:>8.1f} {lab if lab else '-':>11}")
            if model.get("flow"):
                print(f"{'whole run':<22} {'':<10} {model['flow']['seconds']:>8.1f}")
        for target, record in (model.get("targets") or {}).items():
            print(
                f"-- target {target}: gate_passed {record['gate_passed']}  speedup_vs_base "
                f"{record['speedup_vs_base']}  size_vs_base {record['size_vs_base']}  checks {record['gate_checks']}"
            )
            print(f"{'evaluate':<12} {'tok/s':>8} {'TTFT s':>8} {'GPU MiB':>8} {'RSS MiB':>8}")
            for variant, row in record["evaluate"].items():
                gpu = "-" if row["gpu_memory_mib"] is None else f"{row['gpu_memory_mib']:.0f}"
                rss = "-" if row["peak_memory_mib"] is None else f"{row['peak_memory_mib']:.0f}"
                print(
                    f"{variant:<12} {row['decode_tokens_per_s']:>8.1f} {row['time_to_first_token_s']:>8.3f}"
                    f" {gpu:>8} {rss:>8}"
                )
            for label, phases in (
                ("evaluate phases", record["evaluate_phase_seconds"]),
                ("evaluate_base phases", record["evaluate_base_phase_seconds"]),
            ):
                if phases:
                    print(f"{label}: " + ", ".join(f"{phase} {sec:.1f} s" for phase, sec in phases.items()))
        memory = model.get("training_memory") or {}
        if memory.get("peak_allocated_mib") is not None:
            print(f"training peak (torch): {memory['peak_allocated_mib']:.0f} MiB allocated")
        if decode := model.get("decode"):
            print(f"{'decode':<40} {'tok/s':>8} {'TTFT s':>8} {'bound':>8} {'share':>6} {'GPU MiB':>8}")
            for label, row in decode["variants"].items():
                if "error" in row:
                    print(f"{label:<40} error: {row['error'][:80]}")
                    continue
                bound = row["bound_tokens_per_s"] or "-"
                share = row["share_of_bound"] or "-"
                gpu = "-" if row["gpu_memory_mib"] is None else f"{row['gpu_memory_mib']:.0f}"
                print(
                    f"{label:<40} {row['decode_tokens_per_s']:>8.1f} {row['time_to_first_token_s']:>8.3f}"
                    f" {bound:>8} {share:>6} {gpu:>8}"
                )
            print(
                f"adapter_speed_ratio {model['adapter_speed_ratio']}  speedup_vs_base {model['speedup_vs_base']}"
                f"  empty_branches_speed_ratio {model['empty_branches_speed_ratio']}"
                f"  run_time_adapter_speed_ratio {model['run_time_adapter_speed_ratio']}"
                f"  stock_branches_adapter_speed_ratio {model.get('stock_branches_adapter_speed_ratio')}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument(
        "--models", default="smollm2,phi35mini", help=f"comma-separated, of {', '.join(MODELS)}"
    )
    parser.add_argument("--device", choices=["cpu", "gpu"], default="gpu")
    parser.add_argument("--work", type=Path, default=Path("/tmp/olivepress-gpu-lab"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_lab.json"))
    parser.add_argument("--max-steps", type=int, default=100, help="LoRA training steps")
    parser.add_argument("--calibration-samples", type=int, help="AWQ calibration examples (config default)")
    parser.add_argument(
        "--generation-samples", type=int, help="evaluate's generated prompts (config default)"
    )
    parser.add_argument("--skip-flow", action="store_true", help="decode bench on the latest run in --work")
    parser.add_argument(
        "--targets",
        type=lambda text: text.split(","),
        default=["cpu"],
        help="comma-separated targets the flow builds and gates (default: cpu, the config's default)",
    )
    parser.add_argument(
        "--skip-decode",
        action="store_true",
        help="the flow only: no decode micro-benchmark of the device's own export",
    )
    parser.add_argument("--decode-tokens", type=int, default=300)
    parser.add_argument("--decode-repeats", type=int, default=3)
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument(
        "--ort-switches", action="store_true", help="also decode under onnxruntime-gpu's kernel switches"
    )
    parser.add_argument("--bandwidth", type=float, help="device memory bandwidth, B/s (default: known table)")
    parser.add_argument(
        "--graphs-only",
        action="store_true",
        help="on CUDA, decode only with CUDA graphs (what the flow ships; the headline ratios use these): half the time",
    )
    args = parser.parse_args()
    names = [name.strip() for name in args.models.split(",") if name.strip()]
    if unknown := set(names) - set(MODELS):
        parser.error(f"unknown models {sorted(unknown)}; known: {', '.join(MODELS)}")
    if not args.data.is_file():
        parser.error(f"no data file {args.data} (--data)")
    if not args.skip_flow:  # a measured run computes every step: no store, registry or base from before
        for name in names:
            for leftover in ("runs", "cache", "registry", "base-onnx", "int4-no-branches", "decode"):
                shutil.rmtree(args.work / name / leftover, ignore_errors=True)

    device = device_info(args.device)
    bandwidth = args.bandwidth or (known_bandwidth(device["name"]) if args.device == "gpu" else None)
    results = {"device": device, "bandwidth_bytes_per_s": bandwidth, "data": str(args.data), "models": {}}
    for name in names:
        results["models"][name] = benchmark_model(name, args, bandwidth)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    print_tables(results)
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
