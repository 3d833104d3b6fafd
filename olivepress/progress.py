"""One progress line per step on the terminal: ``quantize  AWQ layer 12/30  ETA 0:41``.

The steps report where they stand with :func:`begin`, :func:`update` and :func:`end`; the command line
installs a :class:`ProgressDisplay` for the run (:func:`showing`), and without one (a flow run started by a
deployment, a test) every report is a no-op. On a terminal each step's line is rewritten in place and left
behind when the step ends (``quantize  completed  41.2 s``); elsewhere (a pipe, a CI log) a step prints a
plain line at most every ``interval`` seconds, and its end line. :func:`message` prints a line of the
run's own (the gate, the summary) between them.

:func:`awq_layer_progress` and :func:`trainer_progress` count llm-compressor's AWQ layers and the
Trainer's optimizer steps (it is built inside Olive's LoRA pass, so its callback is added for the
duration of the call).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import TextIO

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
            shown = {
                name: f"{value:.3g}" if isinstance(value, float) else str(value)
                for name, value in extras.items()
            }
            self.line = format_line(step, label, done, total, eta=eta, extras=shown)
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


_active: ProgressDisplay | None = None


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


def update(
    step: str, label: str, done: int | None = None, total: int | None = None, **extras: object
) -> None:
    """Where ``step`` stands: ``label`` (``AWQ layer``), ``done`` of ``total`` (the ETA comes from the pace
    since the first report of this label), ``extras`` (``loss=2.31``)."""
    if _active is not None:
        _active.update(step, label, done, total, **extras)


def end(step: str, status: str, seconds: float) -> None:
    if _active is not None:
        _active.end(step, status, seconds)


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
