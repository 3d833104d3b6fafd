"""The gate: measure the exported model against its base on held-out data, and decide whether it may ship.

Three variants run in the same runtime (ONNX Runtime GenAI) on the same machine, for each target the run
builds: *base* (the unquantized model through the same builder: fp32 for the cpu target, fp16 for cuda),
*quantized* (the int4 model, adapter off) and *fine-tuned* (the int4 model with its LoRA adapter). For
each: teacher-forced loss and perplexity of every held-out response, decode tokens/s and time to first token
from a fixed decode of ``speed_tokens`` (end-of-text suppressed) on ``speed_samples`` prompts, bytes on disk
and the memory it added; and for the fine-tuned model, ROUGE-L of its free (greedy) answers to
``generation_samples`` prompts. That is all the gate needs: the base answers freely only the report's few
``report_samples`` prompts (answering them all at fp32 on a CPU was most of this step's time), as does the
int4 model; the fine-tuned model's answers to them are its ROUGE-L answers, reused. The answers are kept
with the measurements (``samples``), so a reused step still has them.

Two steps: ``evaluate_base`` measures the base model alone and is kept under its own key (the base model,
the held-out pairs, the target and the machine), so a second adapter, another target's export or a later
run on the same data reuses it; ``evaluate`` measures the int4 variants, speed interleaved prompt by prompt
so that a burst of load slows both alike, and records the three side by side. Decode speed is a property of
the machine as much as of the model: both keys hold the machine (:func:`machine_name`), so speeds measured
on different hardware are never compared.

For the cuda target each variant's device memory is measured too, each alone in a fresh process (see
:mod:`olivepress.gpu_memory` for why and for the method's limits). The base model comes from
:mod:`olivepress.base_ahead` when the flow built it early, else it is built here; ``phase_seconds`` says
where each step's time went.
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
from olivepress.metrics_display import BASE, FINE_TUNED, QUANTIZED
from olivepress.steps import Step, StepSettings
from olivepress.store import ArtifactStore, Manifest

if TYPE_CHECKING:
    from olivepress.base_ahead import BaseAhead
    from olivepress.config import EvaluateSettings, GateSettings

log = logging.getLogger(__name__)

MODEL_FILES = ("model.onnx", "model.onnx.data")
METRICS_FILE = "metrics.json"
BASE_FILE = "base.json"


@dataclass
class VariantMetrics:
    variant: str
    loss: float  # mean cross-entropy per held-out response token
    perplexity: float
    # mean ROUGE-L F1 of the free (greedy) answers against the references; None for a variant not scored
    # (the base and the int4 model answer only the report's few prompts; the gate reads the fine-tuned one's)
    rouge_l: float | None
    decode_tokens_per_s: float  # tokens after the first over their time, in generations of equal length
    time_to_first_token_s: float  # median over the prompts
    bytes_on_disk: int  # model files, plus the adapter file for the fine-tuned variant
    peak_memory_mib: float | None  # resident memory the model added, loading and generating
    generated_tokens: int  # tokens of the free answers
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
    # seconds of each part of the int4 variants' measurement, in order: gpu_memory (cuda), load (with each
    # variant's warm-up generation), loss, generate (the fine-tuned model's free answers), decode_speed; the
    # base's (base_phase_seconds) start with build_base (or the wait for the base built early) and answer
    # nothing. Each phase calls for a different remedy when the step is slow.
    phase_seconds: dict[str, float] = field(default_factory=dict)
    target: str = "cpu"  # the runtime measured: cpu or cuda
    # the base's own measurement (evaluate_base): its seconds and phases, measured once per key and reused
    base_seconds: float | None = None
    base_phase_seconds: dict[str, float] = field(default_factory=dict)
    # the report's side-by-side answers: per prompt its reference and each variant's greedy answer (see
    # sample_indices); empty in records measured before they were kept
    samples: list[dict[str, str]] = field(default_factory=list)

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


def sample_indices(held_out: list[dict], settings: EvaluateSettings) -> list[int]:
    """The held-out pairs the report shows answered side by side: the first ``report_samples`` distinct
    prompts among the ``generation_samples`` the fine-tuned model answers, so its answers serve both (the
    data may repeat a prompt, and greedy answers to it would repeat too)."""
    first: dict[str, int] = {}
    for index, pair in enumerate(held_out[: settings.generation_samples]):
        first.setdefault(pair["prompt"], index)
    return list(first.values())[: settings.report_samples]


def measure_variants(
    sources: dict[str, tuple[Path, Path | None]],
    held_out: list[dict],
    settings: EvaluateSettings,
    text_template: str | None,
    target: str,
    phases: dict[str, float],
    answering: tuple[str, ...] = (),
) -> tuple[list[VariantMetrics], list[dict[str, str]]]:
    """Measure each variant of ``sources`` (its model folder and adapter file) on ``held_out``; the ones in
    ``answering`` also answer ``generation_samples`` prompts freely, for ROUGE-L, the others only the
    report's (:func:`sample_indices`). ``phases`` receives the seconds of each phase (see
    Evaluation.phase_seconds). Gives the metrics and the samples: per report prompt, its reference and each
    variant's answer."""
    from olivepress.genai import open_model, prompt_token_ids, response_loss, stream_generate

    answer_prompts = held_out[: settings.generation_samples]
    speed_prompts = held_out[: settings.speed_samples]
    samples = sample_indices(held_out, settings)
    answered = {v: range(len(answer_prompts)) if v in answering else samples for v in sources}
    gpu_memory = dict.fromkeys(sources)
    if target == "cuda":
        from olivepress.gpu_memory import variant_peak_mib

        with timed(phases, "gpu_memory"):
            for variant, (model_dir, adapter) in sources.items():
                gpu_memory[variant] = variant_peak_mib(
                    model_dir, adapter, held_out[0]["prompt"], text_template, settings.speed_tokens
                )
    models, peak_memory, prompt_ids, max_length = {}, {}, {}, {}
    can_measure_memory = peak_rss_reset()
    longest = max(settings.max_new_tokens if any(answered.values()) else 0, settings.speed_tokens)
    with timed(phases, "load"):
        for variant, (model_dir, adapter) in sources.items():
            gc.collect()
            before = rss_mib("VmRSS") if can_measure_memory else 0.0
            peak_rss_reset()
            progress.update("evaluate", f"loading {variant}")
            models[variant] = open_model(model_dir, adapter)
            # the prompts it answers or decodes for speed, whichever are more (the speed ones come first)
            count = max(len(speed_prompts), max(answered[variant], default=-1) + 1)
            prompts = held_out[:count]
            prompt_ids[variant] = [
                prompt_token_ids(models[variant], p["prompt"], text_template) for p in prompts
            ]
            # one generator length for every prompt of the variant: with CUDA graphs the warm-up's capture is
            # then replayed by every later generation rather than each one capturing its own (see stream_generate)
            max_length[variant] = max(map(len, prompt_ids[variant])) + longest
            warm_up = prompt_ids[variant][0]
            stream_generate(
                models[variant], warm_up, settings.speed_tokens, lambda _text: None, max_length[variant]
            )
            peak_memory[variant] = rss_mib("VmHWM") - before if can_measure_memory else None

    with timed(phases, "loss"):
        losses = {variant: response_loss(models[variant], held_out, text_template) for variant in sources}

    answers: dict[str, dict[int, str]] = {variant: {} for variant in sources}
    generated = dict.fromkeys(sources, 0)
    if to_answer := sorted(set().union(*answered.values())):
        progress.update("evaluate", "answering, prompt", 0, len(to_answer))
        with timed(phases, "generate"):
            for done, index in enumerate(to_answer, 1):
                for variant in (v for v in sources if index in answered[v]):
                    pieces: list[str] = []
                    stats = stream_generate(
                        models[variant],
                        prompt_ids[variant][index],
                        settings.max_new_tokens,
                        pieces.append,
                        max_length[variant],
                    )
                    answers[variant][index] = "".join(pieces).strip()
                    generated[variant] += stats.new_tokens
                progress.update("evaluate", "answering, prompt", done, len(to_answer))

    first_token = {variant: [] for variant in sources}
    decode_tokens = dict.fromkeys(sources, 0)
    decode_seconds = dict.fromkeys(sources, 0.0)
    with timed(phases, "decode_speed"):
        for index in range(len(speed_prompts)):
            progress.update("evaluate", "decode speed, prompt", index + 1, len(speed_prompts))
            for variant in sources:  # interleaved: a burst of load slows every variant alike
                stats = stream_generate(
                    models[variant],
                    prompt_ids[variant][index],
                    settings.speed_tokens,
                    lambda _text: None,
                    max_length[variant],
                    exact=True,
                )
                first_token[variant].append(stats.time_to_first_token_s)
                decode_tokens[variant] += stats.new_tokens - 1
                decode_seconds[variant] += stats.seconds - stats.time_to_first_token_s

    references = [pair["response"] for pair in answer_prompts]
    metrics = [
        VariantMetrics(
            variant=variant,
            loss=losses[variant],
            perplexity=math.exp(losses[variant]),
            rouge_l=rouge_l(references, [answers[variant][i] for i in answered[variant]])
            if variant in answering
            else None,
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
    side_by_side = [
        {"prompt": held_out[i]["prompt"], "reference": held_out[i]["response"]}
        | {variant: answers[variant][i] for variant in sources}
        for i in samples
    ]
    return metrics, side_by_side


def machine_name(target: str) -> str:
    """The hardware a target's speed is measured on: the GPU's name for cuda, the processor's model and the
    cores this process may use for cpu. Part of both evaluation keys."""
    import os
    import platform

    if target == "cuda":
        import pynvml

        from olivepress.gpu_memory import nvml_device

        return f"cuda: {pynvml.nvmlDeviceGetName(nvml_device())}"
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        lines = cpuinfo.read_text().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        model = names[0] if names else model
    return f"cpu: {model}, {len(os.sched_getaffinity(0))} cores"


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


def measure_base(
    settings: StepSettings,
    model_dir: Path,
    held_out: list[dict],
    target: str,
    out: Path,
    scratch_root: Path,
    base_ahead: BaseAhead | None = None,
) -> None:
    """Build the base model for ``target`` in scratch space (it is ~3× the int4 model: measured, not kept),
    or take the one ``base_ahead`` built while the earlier steps ran, measure it, and write ``base.json``
    into ``out``."""
    from olivepress.export.builder import build_base_model

    started = time.perf_counter()
    phases: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="base-model-", dir=scratch_root) as scratch:
        progress.update("evaluate", "building the base model")
        with timed(phases, "build_base"):  # with a build ahead: the wait for it
            base_dir = base_ahead.take() if base_ahead is not None else None
            if base_dir is None:
                base_dir = Path(scratch)
                build_base_model(
                    model_dir,
                    base_dir,
                    target,
                    settings.optimize.cuda_graph,
                    settings.trust_remote_code,
                )
        [metrics], samples = measure_variants(
            {BASE: (base_dir, None)}, held_out, settings.evaluate, settings.text_template, target, phases
        )
    record = {
        "metrics": asdict(metrics),
        "samples": samples,
        "seconds": time.perf_counter() - started,
        "phase_seconds": phases,
    }
    (out / BASE_FILE).write_text(json.dumps(record, indent=1))


def measure(
    settings: StepSettings,
    onnx_dir: Path,
    adapter_file: Path,
    held_out: list[dict],
    base_dir: Path,
    target: str,
    out: Path,
) -> None:
    """Measure the int4 model without and with ``adapter_file`` (the export's own, or another dataset's
    .onnx_adapter for it), and write ``metrics.json`` into ``out``: the three variants side by side, the base
    as ``evaluate_base`` measured it (in ``base_dir``)."""
    started = time.perf_counter()
    phases: dict[str, float] = {}
    base = json.loads((base_dir / BASE_FILE).read_text())
    sources = {QUANTIZED: (onnx_dir, None), FINE_TUNED: (onnx_dir, adapter_file)}
    metrics, samples = measure_variants(
        sources, held_out, settings.evaluate, settings.text_template, target, phases, (FINE_TUNED,)
    )
    record = {
        "target": target,
        "metrics": [base["metrics"], *(asdict(m) for m in metrics)],
        "held_out_pairs": len(held_out),
        "generation_prompts": min(len(held_out), settings.evaluate.generation_samples),
        "seconds": time.perf_counter() - started,
        "phase_seconds": phases,
        "base_seconds": base["seconds"],
        "base_phase_seconds": base["phase_seconds"],
        # the same prompts as the base's (one held_out, one sample_indices): its answers beside the int4 ones
        "samples": [b | s for b, s in zip(base["samples"], samples, strict=True)],
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
        target=record.get("target", "cpu"),
        base_seconds=record.get("base_seconds"),
        base_phase_seconds=record.get("base_phase_seconds", {}),
        samples=record.get("samples", []),
    )


BASE_STEP = Step(
    "evaluate_base",
    __name__,
    inputs=("model_dir", "held_out", "target", "machine"),
    # optimize, trust_remote_code: the base model is built as the export is
    settings=("evaluate", "optimize", "text_template", "trust_remote_code"),
    context=("base_ahead",),  # the base model built ahead (or None): the same model, sooner
)


@BASE_STEP.task
def evaluate_base_task(
    store: ArtifactStore,
    key: str,
    settings: StepSettings,
    model_dir: Path,
    held_out: list[dict],
    target: str,
    machine: str,
    base_ahead: BaseAhead | None = None,
) -> Manifest:
    """The base model's measurements for ``target`` on ``machine`` (the hardware this process runs on)."""
    return store.produce(
        "evaluate_base",
        key,
        lambda out: measure_base(
            settings, model_dir, held_out, target, out, store.scratch_root(), base_ahead
        ),
    )


STEP = Step(
    "evaluate",
    __name__,
    inputs=("onnx_dir", "adapter_dir", "held_out", "base", "target", "machine"),
    settings=("evaluate", "text_template"),
)


@STEP.task
def evaluate_task(
    store: ArtifactStore,
    key: str,
    settings: StepSettings,
    onnx_dir: Path,
    adapter_dir: Path,
    held_out: list[dict],
    base: Path,
    target: str,
    machine: str,
) -> Manifest:
    """One dataset's adapter (``adapter_dir``'s .onnx_adapter: the export's own, or one export_adapter wrote
    for it) on the ``target`` export in ``onnx_dir``, measured on that dataset's held-out pairs beside the
    base's measurements in ``base``; the gate's limits are not part of the key (see read_evaluation)."""
    from olivepress.genai import ADAPTER_FILE

    return store.produce(
        "evaluate",
        key,
        lambda out: measure(settings, onnx_dir, adapter_dir / ADAPTER_FILE, held_out, base, target, out),
    )
