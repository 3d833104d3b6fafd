"""The base model that evaluate compares against, built ahead in a child process while quantize and finetune
run.

Why: evaluate measures the unquantized model through the same builder (:func:`build_base_model`); the
builder reads the checkpoint and writes the whole fp16 model (7.7 GB at 3.8 B) on the CPU and the disk,
time that evaluate spent on the critical path while a GPU run's GPU sat idle. Started as the run starts (after
validate: bad data still stops the run first), the build overlaps with the GPU steps.

* **A child process**, not a thread: the builder redirects the process's stdout and stderr and sets
  ``GIT_DIR`` while it runs (:func:`run_model_builder`), and its Python work would hold the GIL the training
  loop needs.
* **Taken only when evaluate computes**: evaluate calls :meth:`BaseAhead.take` inside its computation, so a
  run whose evaluation is already stored never waits for the child; leaving the ``with`` block stops a child
  still running and deletes the folder (scratch space: the base is ~3× the int4 model, measured, not kept).
* **A failed build is not the run's failure**: :meth:`take` logs why and returns None, and evaluate builds
  the base itself, where a failure comes with the step's retries and error.
* **One build per target for every evaluation of the run**: with several datasets each adapter's evaluation
  takes the same folder (it is only read), where each used to build its own.

Default (``build_base_early`` in the config): on with ``device: gpu``, and with several datasets; off for one
dataset on CPU, where the build shares the cores with the training: the quickstart on 2 cores took 354.6 s
without and 350.6 s with it, its base build being 1.8 s.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from olivepress.config import RunConfig

log = logging.getLogger(__name__)

BUILT_MARKER = "built"  # written by the child after the builder returned, beside the model folder
LOG_FILE = "base-build.log"  # the child's output, beside the model folder too
STOP_SECONDS = 10.0  # how long a child asked to stop may take before it is killed


class BaseAhead:
    """One base build in a child process, into a scratch folder of its own."""

    def __init__(
        self,
        model_dir: Path,
        scratch_root: Path,
        target: str,
        cuda_graph: bool,
        trust_remote_code: bool,
    ) -> None:
        scratch_root.mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix="base-ahead-", dir=scratch_root))
        self.base_dir = self.folder / "model"
        command = [sys.executable, "-m", __name__, str(model_dir), str(self.base_dir), target]
        command += ["--done-file", str(self.folder / BUILT_MARKER)]
        command += ["--cuda-graph"] if cuda_graph else []
        command += ["--trust-remote-code"] if trust_remote_code else []
        with (self.folder / LOG_FILE).open("wb") as output:
            self.child = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        log.info(
            "building the %s base model ahead (process %d) into %s", target, self.child.pid, self.base_dir
        )

    def take(self) -> Path | None:
        """The built base model's folder, once the child is done; None if the build failed (logged once)."""
        already_done = self.child.returncode is not None
        returncode = self.child.wait()
        if returncode == 0 and (self.folder / BUILT_MARKER).is_file():
            return self.base_dir
        if not already_done:
            tail = (self.folder / LOG_FILE).read_text(errors="replace")[-2000:]
            log.warning(
                "the base model built ahead failed (exit code %d); evaluate builds it itself. Its output:\n%s",
                returncode,
                tail,
            )
        return None

    def close(self) -> None:
        """Stop the child if it still runs, and delete the folder."""
        if self.child.poll() is None:
            self.child.terminate()
            try:
                self.child.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.child.kill()
                self.child.wait()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> BaseAhead:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


@contextmanager
def built_early(config: RunConfig, model_dir: Path, scratch_root: Path) -> Iterator[dict[str, BaseAhead]]:
    """The base models evaluate compares against, one per target, each building in a child process (none
    where ``build_base_early`` is off, see the module docstring); the children stop and their folders go
    when the block ends. ``config.device`` is the run's, decided (cpu or gpu)."""
    early = config.build_base_early
    if early is None:
        early = config.device == "gpu" or config.datasets is not None
    with ExitStack() as stack:
        yield {
            target: stack.enter_context(
                BaseAhead(
                    model_dir, scratch_root, target, config.optimize.cuda_graph, config.trust_remote_code
                )
            )
            for target in (config.targets if early else ())
        }


def main() -> None:
    from olivepress.export.builder import build_base_model

    parser = argparse.ArgumentParser(description="build the base model evaluate compares against")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("target", choices=["cpu", "cuda"])
    parser.add_argument("--done-file", type=Path, required=True, help="written once the model is built")
    parser.add_argument("--cuda-graph", action="store_true")
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args()
    build_base_model(args.model_dir, args.out_dir, args.target, args.cuda_graph, args.trust_remote_code)
    args.done_file.touch()


if __name__ == "__main__":
    main()
