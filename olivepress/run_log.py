"""What the terminal shows during ``olivepress run``, and the run's log file.

For the length of the run, the process's standard output and error (file descriptors 1 and 2, so output
from C++ libraries and from subprocesses such as Prefect's temporary server goes too) write to ``run.log``
in the run folder: llm-compressor's loguru lines and tqdm bars, the Trainer's logs, Olive's, Prefect's own
INFO lines, warnings. The terminal keeps one progress line per step (:mod:`olivepress.progress`) and the
run's own messages: what the flow logs (the split, the gate, the summary, the registration) and olivepress
warnings. With ``verbose`` the log is also copied to the terminal as it is written.

Prefect's API logging is untouched: its handler sends records to the API, not to a stream, so the Prefect
UI still gets every log line. The redirection is per process, which is per run for the command line.
"""

from __future__ import annotations

import codecs
import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from olivepress.progress import ProgressDisplay, showing

LOG_FILE = "run.log"
# The flow's own messages the command line has printed already.
ALREADY_SHOWN = frozenset({"run folder %s"})


class RunMessages(logging.Handler):
    """The run's own log records as plain lines between the progress lines: what olivepress code logs
    through Prefect's run loggers (Prefect's engine logs through the same loggers: those stay in the log),
    and olivepress's own warnings and errors."""

    def __init__(self, display: ProgressDisplay) -> None:
        super().__init__(logging.INFO)
        import prefect

        self.display = display
        self.prefect_dir = str(Path(prefect.__file__).parent)

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("prefect."):
            if record.pathname.startswith(self.prefect_dir) or record.msg in ALREADY_SHOWN:
                return
        elif record.levelno < logging.WARNING:
            return
        try:
            text = record.getMessage().strip("\n")
            if record.levelno >= logging.WARNING:
                text = f"{record.levelname.lower()}: {text}"
            self.display.message(text)
        except Exception:
            self.handleError(record)


MESSAGE_LOGGERS = ("prefect.flow_runs", "prefect.task_runs", "olivepress")


@contextlib.contextmanager
def run_output(run_dir: Path, *, verbose: bool = False) -> Iterator[Path]:
    """Inside the block, fds 1 and 2 write to ``run_dir/run.log`` (and, ``verbose``, to the terminal as
    well); progress lines and the run's messages go to the terminal's standard error. Yields the log's path.
    """
    log_path = run_dir / LOG_FILE
    terminal = open(os.dup(2), "w", encoding="utf-8", errors="replace")  # noqa: SIM115
    display = ProgressDisplay(
        terminal, in_place=terminal.isatty() and not verbose, width=terminal_width(terminal)
    )
    try:
        with (
            open(log_path, "ab", buffering=0) as log_file,
            redirected(log_file, display if verbose else None),
        ):
            servers = temporary_prefect_servers()
            try:
                with run_messages(display), showing(display):
                    yield log_path
            finally:
                stop_temporary_prefect_servers(besides=servers)
    except BaseException:
        display.message(f"olivepress: the run's log is {log_path}")
        raise
    finally:
        terminal.close()


@contextlib.contextmanager
def redirected(log_file, tee: ProgressDisplay | None) -> Iterator[None]:
    """fds 1 and 2 write to ``log_file`` (and, given ``tee``, to the terminal too) inside the block."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    copier = None
    if tee is not None:
        read_end, write_end = os.pipe()
        copier = threading.Thread(target=copy_output, args=(read_end, log_file, tee), daemon=True)
        copier.start()
        target = write_end
    else:
        target = log_file.fileno()
    os.dup2(target, 1)
    os.dup2(target, 2)
    if tee is not None:
        os.close(write_end)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, original in zip((1, 2), saved, strict=True):
            os.dup2(original, fd)
            os.close(original)
        if copier is not None:
            # a subprocess that inherited the pipe may hold it open: wait for what was written, not for it
            copier.join(timeout=2)


@contextlib.contextmanager
def run_messages(display: ProgressDisplay) -> Iterator[None]:
    """The run's own messages to ``display`` (:class:`RunMessages`), and olivepress's INFO lines (AWQ's
    sizes, evaluate's prompts, a resumed training) into the log: through the root logger's handler
    (Prefect's console handler, writing to the log now) or, where there is none, one of our own."""
    handler = RunMessages(display)
    own = logging.getLogger("olivepress")
    own_level = own.level
    in_log = logging.StreamHandler(sys.stderr)
    in_log.setFormatter(logging.Formatter("%(asctime)s | %(levelname)s | %(name)s - %(message)s"))
    for name in MESSAGE_LOGGERS:
        logging.getLogger(name).addHandler(handler)
    if not logging.getLogger().handlers:
        own.addHandler(in_log)
    own.setLevel(logging.INFO)
    try:
        yield
    finally:
        for name in MESSAGE_LOGGERS:
            logging.getLogger(name).removeHandler(handler)
        own.removeHandler(in_log)
        own.setLevel(own_level)


def temporary_prefect_servers() -> list:
    """The temporary Prefect API servers this process runs (Prefect starts one for a flow run when no API
    is configured); an empty list where Prefect no longer keeps them this way."""
    try:
        from prefect.server.api.server import SubprocessASGIServer

        return list(SubprocessASGIServer._instances.values())
    except (ImportError, AttributeError):
        return []


def stop_temporary_prefect_servers(besides: list) -> None:
    """Stop the temporary servers the run started, while their goodbye still goes to the log (they would
    stop at exit, after the run's output is back on the terminal); one that was running before is left."""
    started = [server for server in temporary_prefect_servers() if not any(server is o for o in besides)]
    try:
        if started:
            from prefect.logging.handlers import APILogHandler

            APILogHandler().flush()  # the run's last log lines reach the API before it goes
        for server in started:
            server.stop()
    except Exception as error:  # it stops at exit anyway
        print(f"olivepress: could not stop Prefect's temporary server now: {error!r}", file=sys.stderr)


def copy_output(read_end: int, log_file, display: ProgressDisplay) -> None:
    """Copy everything written to the pipe into the log, and to the terminal (--verbose)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while chunk := os.read(read_end, 65536):
        log_file.write(chunk)
        display.write_raw(decoder.decode(chunk))
    os.close(read_end)


def terminal_width(stream):
    def width() -> int:
        try:
            return os.get_terminal_size(stream.fileno()).columns or 100  # 0: a pseudo-terminal of no size
        except OSError:
            return 100

    return width
