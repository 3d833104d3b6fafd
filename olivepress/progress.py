"""One progress line per step on the terminal: ``quantize  AWQ layer 12/30  ETA 0:41``.

The steps report where they stand with :func:`begin`, :func:`update` and :func:`end`. Inside a Prefect flow
run each step's reports also go to a progress artifact of the run (:class:`ProgressArtifacts`), so a team
watching the Prefect UI sees them too (a deployment's run has no terminal). The command line installs a
:class:`ProgressDisplay` for the run (:func:`showing`); without one the terminal gets nothing. On a terminal each step's line is rewritten in place and left
behind when the step ends (``quantize  completed  41.2 s``); elsewhere (a pipe, a CI log) a step prints a
plain line at most every ``interval`` seconds, and its end line. :func:`message` prints a line of the
run's own (the gate, the summary) between them.

:func:`awq_layer_progress` and :func:`trainer_progress` count llm-compressor's AWQ layers and the
Trainer's optimizer steps (it is built inside Olive's LoRA pass, so its callback is added for the
duration of the call).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import TextIO
from uuid import UUID

STEP_WIDTH = 8  # the longest step name: validate, quantize, finetune, optimize, evaluate, register


def format_duration(seconds: float) -> str:
    """``0:41``, ``12:05``, ``1:02:03``."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def eta_seconds(done: int, total: int, elapsed: float, done_at_start: int = 0) -> float | None:
    """Time left at the pace since counting started (``elapsed`` seconds ago at ``done_at_start``); None
    while nothing has been done since then."""
    if done >= total:
        return 0.0
    finished = done - done_at_start
    if finished <= 0 or elapsed <= 0:
        return None
    return elapsed / finished * (total - done)


def format_line(
    step: str,
    label: str = "",
    done: int | None = None,
    total: int | None = None,
    *,
    eta: float | None = None,
    extras: dict[str, str] | None = None,
) -> str:
    """``finetune  step 40/100  loss 2.31  ETA 1:02``."""
    parts = [label] if label else []
    if done is not None and total is not None:
        parts[-1:] = [f"{parts[-1]} {done}/{total}" if parts else f"{done}/{total}"]
    parts += [f"{name} {value}" for name, value in (extras or {}).items()]
    if eta is not None and done != total:
        parts.append(f"ETA {format_duration(eta)}")
    return "  ".join([step.ljust(STEP_WIDTH), *parts]).rstrip()


def shown_extras(extras: dict[str, object]) -> dict[str, str]:
    """``loss=2.3104`` as ``loss 2.31``."""
    return {
        name: f"{value:.3g}" if isinstance(value, float) else str(value) for name, value in extras.items()
    }


def format_end(step: str, status: str, seconds: float) -> str:
    """``quantize  completed  41.2 s``."""
    return f"{step.ljust(STEP_WIDTH)}  {status}  {seconds:.1f} s"


class ProgressDisplay:
    """The run's progress lines on ``stream``: rewritten in place (``in_place``, for a terminal) or printed
    as plain lines at most every ``interval`` seconds. Safe to call from Prefect's task threads."""

    def __init__(
        self,
        stream: TextIO,
        *,
        in_place: bool,
        interval: float = 30.0,
        width: Callable[[], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.in_place = in_place
        self.interval = interval
        self.width = width or (lambda: 1000)
        self.clock = clock
        self.lock = threading.RLock()
        self.step: str | None = None  # the step whose line is on screen, not yet left behind
        self.line = ""
        self.ended = False
        self.shown_at = 0.0  # plain mode: when this step last printed a line
        self.counters: dict[tuple[str, str], tuple[float, int]] = {}

    def begin(self, step: str) -> None:
        with self.lock:
            self._commit()
            self.step, self.line, self.ended = step, format_line(step, "started"), False
            self.shown_at = self.clock()
            self._draw()

    def update(
        self, step: str, label: str, done: int | None = None, total: int | None = None, **extras: object
    ) -> None:
        with self.lock:
            # a step's code reports on the line the flow opened for it, under whatever name that line has
            # ("finetune travel" for a dataset's training); ``step`` names a line only when none is open
            if self.step is None or self.ended:
                self.begin(step)
            step = self.step
            now = self.clock()
            eta = None
            if done is not None and total is not None:
                started, done_at_start = self.counters.setdefault((step, label), (now, done))
                eta = eta_seconds(done, total, now - started, done_at_start)
            self.line = format_line(step, label, done, total, eta=eta, extras=shown_extras(extras))
            if self.in_place:
                self._draw()
            elif now - self.shown_at >= self.interval:
                self._print(self.line)
                self.shown_at = now

    def end(self, step: str, status: str, seconds: float) -> None:
        """The step's last line; a second call (the flow learning that another run computed it) replaces
        it until the next step begins."""
        with self.lock:
            if step != self.step:
                self.begin(step)
            self.line, self.ended = format_end(step, status, seconds), True
            self._draw()

    def message(self, text: str) -> None:
        """A line of the run's own, between the steps' lines."""
        with self.lock:
            if self.ended:
                self._commit()
            if self.in_place and self.step is not None:
                self.stream.write("\r\x1b[K")
            self._print(text)
            self._draw()

    def write_raw(self, text: str) -> None:
        """Library output shown live (--verbose), between the steps' lines."""
        with self.lock:
            self.stream.write(text)
            self.stream.flush()

    def close(self) -> None:
        with self.lock:
            self._commit()
            self.stream.flush()

    def _draw(self) -> None:
        if self.in_place and self.step is not None:
            self.stream.write("\r" + self.line[: max(10, self.width() - 1)] + "\x1b[K")
            self.stream.flush()

    def _commit(self) -> None:
        """Leave the current step's line behind: end the in-place line, or print the plain end line."""
        if self.step is None:
            return
        if self.in_place:
            self.stream.write("\n")
        elif self.ended:
            self.stream.write(self.line + "\n")
        self.stream.flush()
        self.step, self.line, self.ended = None, "", False

    def _print(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()


class ProgressArtifacts:
    """Each step of a flow run as a Prefect progress artifact on the run's Artifacts tab: created when the
    step begins, its percentage and line (``quantize  AWQ layer 12/30``, the description) updated at most
    every ``interval`` seconds, 100 with the end line when it completes. A step's code reports under a
    generic name (``evaluate`` inside ``evaluate_base travel cpu``): a report goes to the step its thread
    began, as on the terminal. The API failing loses the progress shown, never the run."""

    def __init__(self, interval: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self.lock = threading.Lock()
        self.shown: dict[tuple[UUID, str], tuple[UUID, float, float]] = {}  # id, percent, when
        self.ended: set[tuple[UUID, str]] = set()  # a late report leaves the end line shown
        self.step: ContextVar[str | None] = ContextVar("olivepress_progress_step", default=None)

    def begin(self, run: UUID, step: str) -> None:
        from prefect.artifacts import create_progress_artifact

        self.step.set(step)
        with self.lock, self._api(step):
            artifact = create_progress_artifact(0.0, description=format_line(step, "started"))
            self.shown[run, step] = (artifact, 0.0, self.clock())

    def update(
        self, run: UUID, step: str, label: str, done: int | None, total: int | None, extras: dict[str, object]
    ) -> None:
        step = self.step.get() or step
        with self.lock:
            if (run, step) not in self.shown or (run, step) in self.ended:
                return
            artifact, percent, shown_at = self.shown[run, step]
            if self.clock() - shown_at < self.interval:
                return
            if done is not None and total:
                percent = 100.0 * done / total
            line = format_line(step, label, done, total, extras=shown_extras(extras))
            self._show(run, step, artifact, percent, line)

    def end(self, run: UUID, step: str, status: str, line: str) -> None:
        with self.lock:
            if (run, step) not in self.shown:
                return
            artifact, percent, _ = self.shown[run, step]
            self.ended.add((run, step))
            self._show(run, step, artifact, percent if status == "failed" else 100.0, line)

    def _show(self, run: UUID, step: str, artifact: UUID, percent: float, line: str) -> None:
        from prefect.artifacts import update_progress_artifact

        with self._api(step):
            update_progress_artifact(artifact, percent, description=line)
        self.shown[run, step] = (artifact, percent, self.clock())

    @contextlib.contextmanager
    def _api(self, step: str) -> Iterator[None]:
        try:
            yield
        except Exception as error:
            logging.getLogger(__name__).warning("%s: progress not shown in Prefect: %s", step, error)


def flow_run_id() -> UUID | None:
    """The running flow run's id; None outside one (and, cheaply, where Prefect was never imported: the
    training's child process)."""
    context = sys.modules.get("prefect.context")
    run_context = context and context.FlowRunContext.get()
    return run_context.flow_run.id if run_context and run_context.flow_run else None


_active: ProgressDisplay | None = None
_artifacts = ProgressArtifacts()


@contextlib.contextmanager
def showing(display: ProgressDisplay) -> Iterator[ProgressDisplay]:
    """Send every step's reports to ``display`` until the block ends."""
    global _active
    previous, _active = _active, display
    try:
        yield display
    finally:
        _active = previous
        display.close()


def begin(step: str) -> None:
    if _active is not None:
        _active.begin(step)
    if run := flow_run_id():
        _artifacts.begin(run, step)


def update(
    step: str, label: str, done: int | None = None, total: int | None = None, **extras: object
) -> None:
    """Where ``step`` stands: ``label`` (``AWQ layer``), ``done`` of ``total`` (the ETA comes from the pace
    since the first report of this label), ``extras`` (``loss=2.31``)."""
    if _active is not None:
        _active.update(step, label, done, total, **extras)
    if run := flow_run_id():
        _artifacts.update(run, step, label, done, total, extras)


def end(step: str, status: str, seconds: float) -> None:
    if _active is not None:
        _active.end(step, status, seconds)
    if run := flow_run_id():
        _artifacts.end(run, step, status, format_end(step, status, seconds))


def message(text: str) -> None:
    if _active is not None:
        _active.message(text)


@contextlib.contextmanager
def awq_layer_progress(layers: int, step: str = "quantize") -> Iterator[None]:
    """Report ``AWQ layer i/N`` as llm-compressor's sequential pipeline finishes each decoder layer (its
    sequential-epoch-end event, where AWQ smooths the layer; the pipeline's last subgraph, after the final
    layer, counts as nothing)."""
    from llmcompressor.core import LifecycleCallbacks

    original = LifecycleCallbacks.__dict__["sequential_epoch_end"]
    done = 0

    def counting(cls, modules, **kwargs):
        nonlocal done
        result = original.__func__(cls, modules, **kwargs)
        done = min(done + 1, layers)
        update(step, "AWQ layer", done, layers)
        return result

    update(step, "AWQ layer", 0, layers)
    LifecycleCallbacks.sequential_epoch_end = classmethod(counting)
    try:
        yield
    finally:
        LifecycleCallbacks.sequential_epoch_end = original


@contextlib.contextmanager
def trainer_progress(step: str = "finetune") -> Iterator[None]:
    """Report ``step i/N  loss x`` from every transformers Trainer built inside the block (Olive's LoRA pass
    builds its own, without a way to pass callbacks: ours joins transformers' default callbacks)."""
    import transformers.trainer as trainer_module
    from transformers import TrainerCallback

    class ReportSteps(TrainerCallback):
        loss: float | None = None

        def report(self, state) -> None:
            extras = {} if self.loss is None else {"loss": self.loss}
            update(step, "step", state.global_step, state.max_steps, **extras)

        def on_train_begin(self, args, state, control, **kwargs):
            self.report(state)

        def on_step_end(self, args, state, control, **kwargs):
            self.report(state)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.loss = float(logs["loss"])
                self.report(state)

    trainer_module.DEFAULT_CALLBACKS = [*trainer_module.DEFAULT_CALLBACKS, ReportSteps]
    try:
        yield
    finally:  # only ours, leaving whatever else was added to the list meanwhile
        trainer_module.DEFAULT_CALLBACKS = [
            callback for callback in trainer_module.DEFAULT_CALLBACKS if callback is not ReportSteps
        ]
