"""What reaches the terminal during a run and what goes to run.log, in a real process (file descriptors)."""

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import logging, os, sys, warnings
    from pathlib import Path
    from olivepress import progress
    from olivepress.run_log import run_output

    with run_output(Path(sys.argv[1]), verbose=sys.argv[2] == "verbose"):
        progress.begin("quantize")
        print("a library's print")
        print("a progress bar", file=sys.stderr)
        os.write(2, b"C++ output on fd 2\\n")
        warnings.warn("a library warning")
        logging.getLogger("transformers.trainer").warning("a library's own warning")
        logging.getLogger("olivepress.tasks.quantize").info("AWQ: an olivepress detail")
        logging.getLogger("olivepress.export.cuda_graph").warning("the graph keeps control flow")
        progress.update("quantize", "AWQ layer", 1, 2)
        progress.end("quantize", "completed", 1.5)
    print("after the run")
    """
)


def run(tmp_path, mode: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), mode],
        capture_output=True,
        text=True,
        timeout=120,
    )


CHATTER = [
    "a library's print",
    "a progress bar",
    "C++ output on fd 2",
    "a library warning",
    "a library's own",
]


@pytest.mark.parametrize("mode", ["quiet", "verbose"])
def test_the_terminal_gets_step_lines_and_warnings_the_log_gets_everything(tmp_path, mode):
    result = run(tmp_path, mode)
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "run.log").read_text()
    for text in [*CHATTER, "AWQ: an olivepress detail"]:
        assert text in log
    assert "quantize  completed  1.5 s" in result.stderr
    assert "warning: the graph keeps control flow" in result.stderr, "olivepress's warnings are shown"
    assert result.stdout == "after the run\n", "the terminal is back after the run"
    shown = [text for text in CHATTER if text in result.stdout + result.stderr]
    assert shown == (CHATTER if mode == "verbose" else [])
    assert "AWQ: an olivepress detail" not in result.stderr or mode == "verbose"


def test_a_failed_run_says_where_its_log_is_and_the_error_reaches_the_terminal(tmp_path):
    script = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from olivepress.run_log import run_output
        try:
            with run_output(Path(sys.argv[1])):
                print("library output before the failure")
                raise ValueError("the reason")
        except ValueError as error:
            print(f"olivepress: {error}", file=sys.stderr)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert result.stderr.splitlines() == [
        f"olivepress: the run's log is {tmp_path / 'run.log'}",
        "olivepress: the reason",
    ]
    assert "library output before the failure" in (tmp_path / "run.log").read_text()
