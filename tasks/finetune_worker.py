"""Trainings in child processes, one per GPU at once: a run with several datasets (issue #13).

Two trainings cannot share one process: transformers' model loading (accelerate's ``init_empty_weights``)
patches ``torch.nn.Module`` process-wide, so a second load during the first puts meta tensors into the
other training ("Cannot copy out of meta tensor"), and both would share the global RNG and the first GPU.
So each training runs :func:`olivepress.tasks.finetune.finetune_lora`, with the arguments the step gave
it, in a fresh ``python -m olivepress.tasks.finetune_worker``, pinned to one GPU by
``CUDA_VISIBLE_DEVICES``. The parent keeps everything else of the step (its key, the key's lock, the
folder the output is written into and published from, Prefect's retries and cache), takes a GPU from
:class:`Trainings`' pool for the child's lifetime, forwards the child's progress reports to the run's
progress line and its standard error to its own, and raises the child's failure as the training's.

This module runs the finetune step's code elsewhere and computes nothing itself: no step imports it, so it
is part of no step's code version.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
import traceback
from collections import deque
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from olivepress import progress
from olivepress.errors import UserError
from olivepress.files import atomic_write_text

if TYPE_CHECKING:
    import logging
    from collections.abc import Callable

    from olivepress.tasks.finetune import FinetuneResult

# the child's command line; its arguments follow (the message pipe's descriptor, the parent's pid)
WORKER = [sys.executable, "-m", "olivepress.tasks.finetune_worker"]
TRAINING_FILE = "training.json"  # in a dataset's run folder: where and when its adapter was trained
STDERR_TAIL_LINES = 20


class TrainingFailed(RuntimeError):
    """The training's child process failed: its exception, or how it ended and its last output."""


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` names them (indices or UUIDs) when set,
    else ``0 … torch.cuda.device_count() - 1``."""
    if (listed := os.environ.get("CUDA_VISIBLE_DEVICES")) is not None:
        return [gpu.strip() for gpu in listed.split(",") if gpu.strip()]
    import torch

    return [str(index) for index in range(torch.cuda.device_count())]


def training_slots(device: str, at_once: int | None) -> list[str | None]:
    """The GPU of each training that may run at once (None: not pinned). ``at_once`` unset: one per visible
    GPU on gpu, one on cpu; more than the GPUs share them in turn. On gpu with no GPU visible, trainings run
    unpinned, to fail as a training in this process would."""
    gpus = visible_gpus() if device == "gpu" else []
    if not gpus:
        return [None] * (at_once or 1)
    return [gpus[index % len(gpus)] for index in range(at_once or len(gpus))]


class Trainings:
    """Runs trainings in child processes, as many at once as it has slots; a training holds its slot's GPU
    while its child runs. Shared by a run's fan-out threads."""

    def __init__(self, slots: list[str | None], log: logging.Logger | logging.LoggerAdapter) -> None:
        self.at_once = len(slots)
        self.free: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        for slot in slots:
            self.free.put(slot)
        self.log = log

    def trainer(self, dataset: str, record: Path) -> Callable[..., FinetuneResult]:
        """``finetune_lora``'s stand-in for ``dataset``'s training: the same arguments and result, run in a
        child; its GPU, process and start and end times are logged and written to ``record``."""
        return functools.partial(self.train, dataset, record)

    def train(self, dataset: str, record: Path, *args: Any, **kwargs: Any) -> FinetuneResult:
        gpu = self.free.get()
        try:
            return self._run_child(dataset, record, gpu, args, kwargs)
        finally:
            self.free.put(gpu)

    def _run_child(
        self, dataset: str, record: Path, gpu: str | None, args: tuple, kwargs: dict
    ) -> FinetuneResult:
        env = os.environ | ({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {})
        started = datetime.now(UTC)
        read_end, write_end = os.pipe()
        try:
            child = subprocess.Popen(
                [*WORKER, str(write_end), str(os.getpid())],
                stdin=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                pass_fds=(write_end,),
            )
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        where = f"process {child.pid}" + (f" on GPU {gpu}" if gpu is not None else "")
        self.log.info("finetune %s: training in %s", dataset, where)
        tail: deque[bytes] = deque(maxlen=64)
        copying = threading.Thread(target=copy_stderr, args=(child.stderr, tail), daemon=True)
        copying.start()
        outcome: tuple = ()
        try:
            with Connection(read_end, writable=False) as messages:
                with contextlib.suppress(BrokenPipeError), child.stdin:  # a child dead already: told below
                    pickle.dump((args, kwargs), child.stdin)
                outcome = self._receive(dataset, messages)
            child.wait()
        except BaseException:
            child.kill()
            child.wait()
            raise
        finally:
            copying.join()
        ended = datetime.now(UTC)
        seconds = (ended - started).total_seconds()
        status = "completed" if outcome[:1] == ("result",) and child.returncode == 0 else "failed"
        facts = {
            "dataset": dataset,
            "gpu": gpu,
            "pid": child.pid,
            "started": started.isoformat(),
            "ended": ended.isoformat(),
            "seconds": round(seconds, 3),
            "status": status,
        }
        atomic_write_text(record, json.dumps(facts, indent=1))
        self.log.info(
            "finetune %s: %s in %s, %s to %s UTC (%.1f s)",
            dataset,
            status,
            where,
            started.strftime("%H:%M:%S.%f")[:-3],
            ended.strftime("%H:%M:%S.%f")[:-3],
            seconds,
        )
        if status == "completed":
            return outcome[1]
        if outcome[:1] == ("error",):
            _, text, user_error = outcome
            raise UserError(text) if user_error else TrainingFailed(text)
        raise TrainingFailed(
            f"its process {ended_how(child.returncode)}; its last output:\n{last_lines(tail)}"
        )

    def _receive(self, dataset: str, messages: Connection) -> tuple:
        """Forward the child's progress reports until it closes the pipe; its last message, the result or
        the error, is returned (nothing when it died first)."""
        label = "{}" if self.at_once == 1 else f"{dataset} {{}}"  # trainings at once: whose step count
        while True:
            try:
                message = messages.recv()
            except EOFError:
                return ()
            if message[0] != "progress":
                return message
            step, name, done, total, extras = message[1:]
            progress.update(step, label.format(name), done, total, **extras)


def copy_stderr(stream, tail: deque[bytes]) -> None:
    """The child's standard error onto this process's (the run's log), its last chunks kept in ``tail``."""
    with os.fdopen(os.dup(2), "wb") as sink:
        for chunk in iter(lambda: stream.read1(1 << 16), b""):
            sink.write(chunk)
            sink.flush()
            tail.append(chunk)


def last_lines(tail: deque[bytes]) -> str:
    lines = b"".join(tail).decode("utf-8", errors="replace").splitlines()
    return "\n".join(line for line in lines[-STDERR_TAIL_LINES:] if line.strip()) or "(none)"


def ended_how(returncode: int) -> str:
    if returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with code {returncode}" if returncode else "ended without a result"


class ForwardedProgress:
    """The child's progress display: each report goes to the parent, which shows it on the run's line."""

    def __init__(self, parent: Connection) -> None:
        self.parent = parent

    def update(
        self, step: str, label: str, done: int | None = None, total: int | None = None, **extras: object
    ) -> None:
        self.parent.send(("progress", step, label, done, total, extras))

    def close(self) -> None:
        pass


def die_with_parent(parent_pid: int) -> None:
    """On Linux, a killed parent kills its training: none goes on writing checkpoints into the key's work
    folder after the parent's lock on it is gone."""
    if sys.platform != "linux":
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent_pid:  # it died before the call
        os._exit(1)


def main(argv: list[str]) -> int:
    """The child: ``finetune_lora(*args, **kwargs)`` from the pickle on standard input; progress, then the
    result or the error, as messages on the pipe ``argv[0]``."""
    die_with_parent(int(argv[1]))
    args, kwargs = pickle.load(sys.stdin.buffer)
    with Connection(int(argv[0]), readable=False) as parent:
        from olivepress.tasks.finetune import finetune_lora

        with progress.showing(ForwardedProgress(parent)):
            try:
                result = finetune_lora(*args, **kwargs)
            except Exception as error:
                traceback.print_exc()
                user_error = isinstance(error, UserError)
                parent.send(
                    ("error", str(error) if user_error else f"{type(error).__name__}: {error}", user_error)
                )
                return 1
        parent.send(("result", result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
