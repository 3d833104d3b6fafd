"""The gate: measure the exported model against its base on held-out data, and decide whether it may ship.

Three variants run in the same runtime (ONNX Runtime GenAI) on the same machine in the same process:
*base* (the unquantized model through the same builder: fp32 on CPU, fp16 on CUDA), *quantized* (the int4
model, adapter off) and *fine-tuned* (the int4 model with its LoRA adapter). For each: teacher-forced loss
and perplexity of the held-out responses, ROUGE-L of greedy generations against them, decode tokens/s and
time to first token, bytes on disk and the memory it added. Generations are interleaved prompt by prompt, so
a burst of load on a shared machine slows every variant alike and the speed ratio stays fair. Decode speed
comes from separate generations of exactly ``max_new_tokens`` per variant (``speed_samples`` prompts), not
from the free ones: those end at end-of-text after lengths that differ by variant, and a generation's first
decode steps cost a fixed extra time, so a variant that stops early looked slower than it decodes (on an
H100, a 3.8 B fine-tuned model that stopped after 16 tokens measured 180 tokens/s against 255 steady).

On a GPU each variant's device memory is measured too, before the three are loaded here: each alone in a
fresh process (see :mod:`olivepress.gpu_memory` for why and for the method's limits). The base model comes
from :mod:`olivepress.base_ahead` when the flow built it early, else it is built here; ``phase_seconds`` in
``metrics.json`` says where the step's time went.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from olivepress import progress
from olivepress.errors import UserError
from olivepress.steps import Step, StepSettings
from olivepress.store import ArtifactStore, Manifest

if TYPE_CHECKING:
    from olivepress.base_ahead import BaseAhead
    from olivepress.config import EvaluateSettings, GateSettings

log = logging.getLogger(__name__)

BASE, QUANTIZED, FINE_TUNED = "base", "quantized", "fine-tuned"
VARIANTS = (BASE, QUANTIZED, FINE_TUNED)
MODEL_FILES = ("model.onnx", "model.onnx.data")
METRICS_FILE = "metrics.json"


@dataclass
class VariantMetrics:
    variant: str
    loss: float  # mean cross-entropy per held-out response token
    perplexity: float
    rouge_l: float  # mean ROUGE-L F1 of greedy generations against the references
    decode_tokens_per_s: float  # tokens after the first over their time, in generations of equal length
    time_to_first_token_s: float  # median over the prompts
    bytes_on_disk: int  # model files, plus the adapter file for the fine-tuned variant
    peak_memory_mib: float | None  # resident memory the model added, loading and generating
    generated_tokens: int
    # GPU memory the model added, loading and generating, alone in a fresh process; None on CPU and in
    # records measured before it was recorded
    gpu_memory_mib: float | None = None


@dataclass
class GateCheck:
    name: str
    description: str
    measured: float
    limit: float
    passed: bool


@dataclass
class GateDecision:
    passed: bool
    checks: list[GateCheck] = field(default_factory=list)

    def to_text(self) -> str:
        lines = [f"gate {'PASSED' if self.passed else 'FAILED'}"]
        for check in self.checks:
            verdict = "pass" if check.passed else "FAIL"
            lines.append(
                f"  {verdict}  {check.name}: measured {check.measured:.4g}, limit {check.limit:.4g}"
                f" ({check.description})"
            )
        return "\n".join(lines)


class GateFailed(UserError):
    """The model works but is not good enough to register; retrying would measure the same thing."""


@dataclass
class Evaluation:
    metrics: list[VariantMetrics]
    gate: GateDecision
    held_out_pairs: int
    generation_prompts: int
    seconds: float
    # seconds of each part of the measurement, in order: build_base (or the wait for the base built early),
    # gpu_memory (GPU runs), load (with each variant's warm-up generation), loss, generate, decode_speed.
    # Evaluate's two minutes at 3.8 B on a GPU are theirs, and each calls for a different remedy. Empty in
    # records measured before it was recorded.
    phase_seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def peak_rss_reset() -> bool:
    """Reset the kernel's high-water mark of this process's resident memory (Linux; False elsewhere)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_mib(key: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def bytes_on_disk(model_dir: Path, adapter_file: Path | None = None) -> int:
    files = [model_dir / name for name in MODEL_FILES if (model_dir / name).is_file()]
    return sum(path.stat().st_size for path in [*files, *([adapter_file] if adapter_file else [])])


def rouge_l(references: list[str], predictions: list[str]) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [
        scorer.score(ref, pred)["rougeL"].fmeasure for ref, pred in zip(references, predictions, strict=True)
    ]
    return statistics.fmean(scores) if scores else 0.0


@contextmanager
def timed(phase_seconds: dict[str, float], phase: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        phase_seconds[phase] = round(time.perf_counter() - started, 2)


def evaluate_models(
    base_dir: Path,
    onnx_dir: Path,
    adapter_file: Path,
    held_out: list[dict],
    settings: EvaluateSettings,
    text_template: str | None = None,
    device: str = "cpu",
    phase_seconds: dict[str, float] | None = None,
) -> list[VariantMetrics]:
    """Measure the three variants on ``held_out``; see the module docstring. ``phase_seconds`` receives the
    seconds of each phase after build_base (see Evaluation.phase_seconds)."""
    from olivepress.genai import open_model, prompt_token_ids, response_loss, stream_generate

    phases = {} if phase_seconds is None else phase_seconds
    sources = {BASE: (base_dir, None), QUANTIZED: (onnx_dir, None), FINE_TUNED: (onnx_dir, adapter_file)}
    prompts = held_out[: settings.generation_samples]
    gpu_memory = dict.fromkeys(VARIANTS)
    if device == "gpu":
        from olivepress.gpu_memory import variant_peak_mib

        with timed(phases, "gpu_memory"):
            for variant, (model_dir, adapter) in sources.items():
                gpu_memory[variant] = variant_peak_mib(
                    model_dir, adapter, prompts[0]["prompt"], text_template, settings.max_new_tokens
                )
    models, peak_memory, prompt_ids, max_length = {}, {}, {}, {}
    can_measure_memory = peak_rss_reset()
    with timed(phases, "load"):
        for variant, (model_dir, adapter) in sources.items():
            gc.collect()
            before = rss_mib("VmRSS") if can_measure_memory else 0.0
            peak_rss_reset()
            progress.update("evaluate", f"loading {variant}")
            models[variant] = open_model(model_dir, adapter)
            prompt_ids[variant] = [
                prompt_token_ids(models[variant], pair["prompt"], text_template) for pair in prompts
            ]
            # one generator length for every prompt of the variant: with CUDA graphs the warm-up's capture is
            # then replayed by every later generation rather than each one capturing its own (see stream_generate)
            max_length[variant] = max(map(len, prompt_ids[variant])) + settings.max_new_tokens
            warm_up = prompt_ids[variant][0]
            stream_generate(
                models[variant], warm_up, settings.max_new_tokens, lambda _text: None, max_length[variant]
            )
            peak_memory[variant] = rss_mib("VmHWM") - before if can_measure_memory else None

    with timed(phases, "loss"):
        losses = {variant: response_loss(models[variant], held_out, text_template) for variant in VARIANTS}

    outputs: dict[str, list[str]] = {variant: [] for variant in VARIANTS}
    first_token = {variant: [] for variant in VARIANTS}
    generated = dict.fromkeys(VARIANTS, 0)
    progress.update("evaluate", "generating, prompt", 0, len(prompts))
    with timed(phases, "generate"):
        for index in range(len(prompts)):
            for variant in VARIANTS:
                pieces: list[str] = []
                ids = prompt_ids[variant][index]
                stats = stream_generate(
                    models[variant], ids, settings.max_new_tokens, pieces.append, max_length[variant]
                )
                outputs[variant].append("".join(pieces).strip())
                first_token[variant].append(stats.time_to_first_token_s)
                generated[variant] += stats.new_tokens
            log.info("evaluate: generated for %d/%d held-out prompts", index + 1, len(prompts))
            progress.update("evaluate", "generating, prompt", index + 1, len(prompts))

    decode_tokens = dict.fromkeys(VARIANTS, 0)
    decode_seconds = dict.fromkeys(VARIANTS, 0.0)
    with timed(phases, "decode_speed"):
        for index in range(min(settings.speed_samples, len(prompts))):
            progress.update(
                "evaluate", "decode speed, prompt", index + 1, min(settings.speed_samples, len(prompts))
            )
            for variant in VARIANTS:
                ids = prompt_ids[variant][index]
                stats = stream_generate(
                    models[variant],
                    ids,
                    settings.max_new_tokens,
                    lambda _text: None,
                    max_length[variant],
                    exact=True,
                )
                decode_tokens[variant] += stats.new_tokens - 1
                decode_seconds[variant] += stats.seconds - stats.time_to_first_token_s

    references = [pair["response"] for pair in prompts]
    return [
        VariantMetrics(
            variant=variant,
            loss=losses[variant],
            perplexity=math.exp(losses[variant]),
            rouge_l=rouge_l(references, outputs[variant]),
            decode_tokens_per_s=decode_tokens[variant] / decode_seconds[variant]
            if decode_seconds[variant]
            else 0.0,
            time_to_first_token_s=statistics.median(first_token[variant]),
            bytes_on_disk=bytes_on_disk(model_dir, adapter),
            peak_memory_mib=peak_memory[variant],
            generated_tokens=generated[variant],
            gpu_memory_mib=gpu_memory[variant],
        )
        for variant, (model_dir, adapter) in sources.items()
    ]


def at_most(name: str, description: str, measured: float, limit: float) -> GateCheck:
    return GateCheck(name, f"{description}; at most the limit", measured, limit, measured <= limit)


def at_least(name: str, description: str, measured: float, limit: float) -> GateCheck:
    return GateCheck(name, f"{description}; at least the limit", measured, limit, measured >= limit)


def decide_gate(metrics: list[VariantMetrics], gate: GateSettings) -> GateDecision:
    """Compare the fine-tuned variant with the base against each limit; every check is kept, pass or fail.

    A base that decoded nothing gives a speed-up of 0, which fails any positive limit."""
    by_variant = {m.variant: m for m in metrics}
    base, tuned = by_variant[BASE], by_variant[FINE_TUNED]
    speedup = tuned.decode_tokens_per_s / base.decode_tokens_per_s if base.decode_tokens_per_s else 0.0
    checks = [
        at_most(
            "perplexity_ratio",
            "fine-tuned held-out perplexity / base",
            tuned.perplexity / base.perplexity,
            gate.max_perplexity_ratio,
        ),
        at_least("speedup", "fine-tuned decode tokens/s / base", speedup, gate.min_speedup),
        at_most(
            "size_ratio",
            "fine-tuned model + adapter bytes / base",
            tuned.bytes_on_disk / base.bytes_on_disk,
            gate.max_size_ratio,
        ),
    ]
    if gate.min_rouge_l is not None:
        checks.append(
            at_least(
                "rouge_l", "fine-tuned ROUGE-L F1 against the references", tuned.rouge_l, gate.min_rouge_l
            )
        )
    return GateDecision(passed=all(check.passed for check in checks), checks=checks)


def measure(
    config: StepSettings,
    model_dir: Path,
    onnx_dir: Path,
    held_out: list[dict],
    out: Path,
    scratch_root: Path,
    adapter_file: Path | None = None,
    base_ahead: BaseAhead | None = None,
) -> None:
    """Build the base model in scratch space (it is ~3× the int4 model: measured, not kept), or take the one
    ``base_ahead`` built while the earlier steps ran, measure the three variants, and write ``metrics.json``
    into ``out``. The fine-tuned variant runs ``adapter_file``, by default the export's own adapter."""
    from olivepress.genai import ADAPTER_FILE
    from olivepress.tasks.optimize import build_base_model

    started = time.perf_counter()
    phase_seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="base-model-", dir=scratch_root) as scratch:
        progress.update("evaluate", "building the base model")
        with timed(phase_seconds, "build_base"):  # with a build ahead: the wait for it
            base_dir = base_ahead.take() if base_ahead is not None else None
            if base_dir is None:
                base_dir = Path(scratch)
                build_base_model(
                    model_dir, base_dir, config.device, config.optimize.cuda_graph, config.trust_remote_code
                )
        metrics = evaluate_models(
            base_dir,
            onnx_dir,
            adapter_file or onnx_dir / ADAPTER_FILE,
            held_out,
            config.evaluate,
            config.text_template,
            config.device,
            phase_seconds,
        )
    record = {
        "metrics": [asdict(m) for m in metrics],
        "held_out_pairs": len(held_out),
        "generation_prompts": min(len(held_out), config.evaluate.generation_samples),
        "seconds": time.perf_counter() - started,
        "phase_seconds": phase_seconds,
    }
    (out / METRICS_FILE).write_text(json.dumps(record, indent=1))


def read_evaluation(folder: Path, gate: GateSettings) -> Evaluation:
    """The stored measurements with the gate decided now: a changed limit needs no new measurement."""
    record = json.loads((folder / METRICS_FILE).read_text())
    metrics = [VariantMetrics(**row) for row in record["metrics"]]
    return Evaluation(
        metrics=metrics,
        gate=decide_gate(metrics, gate),
        held_out_pairs=record["held_out_pairs"],
        generation_prompts=record["generation_prompts"],
        seconds=record["seconds"],
        phase_seconds=record.get("phase_seconds", {}),
    )


STEP = Step(
    "evaluate",
    __name__,
    inputs=("model_dir", "onnx_dir", "held_out"),
    # optimize, trust_remote_code: the base model is built alike
    settings=("evaluate", "optimize", "device", "text_template", "trust_remote_code"),
    context=("base_ahead",),  # the base model built ahead (or None): the same model, sooner
)


@STEP.task
def evaluate_task(
    store: ArtifactStore,
    key: str,
    settings: StepSettings,
    model_dir: Path,
    onnx_dir: Path,
    held_out: list[dict],
    base_ahead: BaseAhead | None = None,
) -> Manifest:
    """The held-out measurements for ``key``; the gate thresholds are not part of it (see read_evaluation)."""
    return store.produce(
        "evaluate",
        key,
        lambda out: measure(
            settings, model_dir, onnx_dir, held_out, out, store.scratch_root(), base_ahead=base_ahead
        ),
    )


ADAPTER_STEP = Step(
    "evaluate_adapter",
    __name__,
    inputs=("model_dir", "onnx_dir", "adapter_dir", "held_out"),
    settings=STEP.settings,
    context=STEP.context,
)


@ADAPTER_STEP.task
def evaluate_adapter_task(
    store: ArtifactStore,
    key: str,
    settings: StepSettings,
    model_dir: Path,
    onnx_dir: Path,
    adapter_dir: Path,
    held_out: list[dict],
    base_ahead: BaseAhead | None = None,
) -> Manifest:
    """One dataset's adapter (``adapter_dir``'s .onnx_adapter: the export's own, or one written for it by
    export_adapter) measured on that dataset's held-out pairs, in a run with several datasets."""
    from olivepress.genai import ADAPTER_FILE

    return store.produce(
        "evaluate_adapter",
        key,
        lambda out: measure(
            settings,
            model_dir,
            onnx_dir,
            held_out,
            out,
            store.scratch_root(),
            adapter_dir / ADAPTER_FILE,
            base_ahead,
        ),
    )
