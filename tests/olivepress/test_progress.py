"""The progress line: formatting, ETA, and what a terminal and a log get."""

import io

import pytest

from olivepress import progress
from olivepress.progress import ProgressDisplay, eta_seconds, format_duration, format_line


@pytest.mark.parametrize(
    ("seconds", "shown"), [(0, "0:00"), (41.4, "0:41"), (62, "1:02"), (725, "12:05"), (3723, "1:02:03")]
)
def test_durations_read_as_a_clock(seconds, shown):
    assert format_duration(seconds) == shown


def test_eta_is_the_pace_since_counting_started():
    assert eta_seconds(done=12, total=30, elapsed=24.0) == pytest.approx(36.0)
    # resumed at step 10: the 10 done before do not count towards the pace
    assert eta_seconds(done=20, total=100, elapsed=10.0, done_at_start=10) == pytest.approx(80.0)
    assert eta_seconds(done=0, total=30, elapsed=5.0) is None, "nothing done yet: no pace"
    assert eta_seconds(done=30, total=30, elapsed=5.0) == 0.0


def test_lines_read_step_label_count_extras_eta():
    assert format_line("quantize", "AWQ layer", 12, 30, eta=41) == "quantize  AWQ layer 12/30  ETA 0:41"
    assert (
        format_line("finetune", "step", 40, 100, eta=62, extras={"loss": "2.31"})
        == "finetune  step 40/100  loss 2.31  ETA 1:02"
    )
    assert format_line("optimize", "exporting the int4 model") == "optimize  exporting the int4 model"
    assert format_line("finetune", "step", 100, 100, eta=0) == "finetune  step 100/100", "no ETA when done"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_terminal_gets_one_line_per_step_rewritten_in_place():
    out, clock = io.StringIO(), Clock()
    display = ProgressDisplay(out, in_place=True, clock=clock)
    display.begin("quantize")
    display.update("quantize", "AWQ layer", 0, 30)
    clock.now += 20
    display.update("quantize", "AWQ layer", 10, 30)
    display.end("quantize", "completed", 61.0)
    display.begin("finetune")
    clock.now += 1
    display.update("finetune", "step", 1, 4, loss=2.3141)
    display.close()

    screen = out.getvalue()
    assert "\rquantize  AWQ layer 10/30  ETA 0:40\x1b[K" in screen
    assert "\rfinetune  step 1/4  loss 2.31\x1b[K" in screen
    final = [line.rsplit("\r", 1)[-1].replace("\x1b[K", "") for line in screen.split("\n")]
    assert final == ["quantize  completed  61.0 s", "finetune  step 1/4  loss 2.31", ""]


def test_a_log_gets_plain_lines_at_most_every_interval_and_each_end():
    out, clock = io.StringIO(), Clock()
    display = ProgressDisplay(out, in_place=False, interval=30, clock=clock)
    display.begin("quantize")
    for layer in range(1, 21):
        clock.now += 2
        display.update("quantize", "AWQ layer", layer, 20)  # printed at 30 s only
    display.end("quantize", "completed", 40.0)
    display.begin("validate")  # a second step: the first one's end line is printed
    display.end("validate", "completed", 0.1)
    display.end("validate", "reused", 0.1)  # the flow learns another run computed it
    display.close()
    assert out.getvalue().splitlines() == [
        "quantize  AWQ layer 15/20  ETA 0:10",
        "quantize  completed  40.0 s",
        "validate  reused  0.1 s",
    ]


def test_messages_come_between_step_lines():
    out = io.StringIO()
    display = ProgressDisplay(out, in_place=False, clock=Clock())
    display.begin("validate")
    display.end("validate", "completed", 0.2)
    display.message("split by prompt: 65 training pairs, 16 held out")
    display.begin("quantize")
    display.message("warning: something")
    display.end("quantize", "failed", 1.0)
    display.close()
    assert out.getvalue().splitlines() == [
        "validate  completed  0.2 s",
        "split by prompt: 65 training pairs, 16 held out",
        "warning: something",
        "quantize  failed  1.0 s",
    ]


def test_reports_without_a_display_do_nothing_and_with_one_reach_it():
    progress.update("quantize", "AWQ layer", 1, 2)  # a deployment's run: no terminal
    out = io.StringIO()
    with progress.showing(ProgressDisplay(out, in_place=False, clock=Clock())):
        progress.begin("optimize")
        progress.update("optimize", "exporting the int4 model")
        progress.end("optimize", "completed", 0.4)
    assert out.getvalue() == "optimize  completed  0.4 s\n"
    progress.end("optimize", "completed", 0.4)
    assert out.getvalue() == "optimize  completed  0.4 s\n"


def test_trainer_steps_are_reported_with_their_loss():
    import transformers.trainer as trainer_module

    before = list(trainer_module.DEFAULT_CALLBACKS)
    lines = []

    class Recorder(ProgressDisplay):
        def update(self, step, label, done=None, total=None, **extras):
            lines.append((step, label, done, total, extras))

    with progress.showing(Recorder(io.StringIO(), in_place=False)), progress.trainer_progress():
        (callback,) = [cls for cls in trainer_module.DEFAULT_CALLBACKS if cls not in before]
        state = type("State", (), {"global_step": 3, "max_steps": 10})()
        callback().on_log(None, state, None, logs={"loss": "2.5"})
    assert list(trainer_module.DEFAULT_CALLBACKS) == before, "restored"
    assert lines == [("finetune", "step", 3, 10, {"loss": 2.5})]


def test_trainings_at_once_each_remove_only_their_own_callback():
    import transformers.trainer as trainer_module

    before = list(trainer_module.DEFAULT_CALLBACKS)
    first, second = progress.trainer_progress(), progress.trainer_progress()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)  # the first training ends while the second still runs
    assert len(trainer_module.DEFAULT_CALLBACKS) == len(before) + 1
    second.__exit__(None, None, None)
    assert list(trainer_module.DEFAULT_CALLBACKS) == before


def test_a_datasets_step_keeps_its_own_line_when_the_step_reports_under_its_name():
    out = io.StringIO()
    display = ProgressDisplay(out, in_place=False, interval=0.0, clock=Clock())
    display.begin("finetune travel")
    display.update("finetune", "step", 3, 10)  # the training reports as "finetune"
    display.end("finetune travel", "completed", 4.0)
    display.begin("evaluate travel")
    display.update("evaluate", "loading base")  # evaluate's code, run for one dataset's adapter
    display.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("finetune travel") and "step 3/10" in lines[0]
    assert not any(line.startswith(("finetune  ", "evaluate  ")) for line in lines), lines
    assert any(line.startswith("evaluate travel") and "loading base" in line for line in lines)


def flow_run_progress_artifacts(flow_run_id) -> dict[str, tuple[float, str]]:
    """Step → (percent, line) of a flow run's progress artifacts, read back from the API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
                type=ArtifactFilterType(any_=["progress"]),
            )
        )
    return {a.description.split("  ")[0]: (float(a.data), a.description) for a in artifacts}


def test_a_flow_runs_steps_show_as_progress_artifacts_at_most_every_interval(monkeypatch):
    """What a team watching the Prefect UI sees of a deployment's run, which has no terminal."""
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    clock = Clock()
    monkeypatch.setattr(progress, "_artifacts", progress.ProgressArtifacts(interval=5.0, clock=clock))
    seen = {}

    @flow
    def two_steps():
        run = progress.flow_run_id()
        progress.begin("quantize")
        progress.update("quantize", "AWQ layer", 1, 4)  # within 5 s of the last: not sent
        seen["throttled"] = flow_run_progress_artifacts(run)["quantize"]
        clock.now += 5
        progress.update("quantize", "AWQ layer", 2, 4, loss=2.3104)
        seen["midway"] = flow_run_progress_artifacts(run)["quantize"]
        progress.end("quantize", "completed", 5.0)
        clock.now += 5
        progress.update("quantize", "AWQ layer", 3, 4)  # after its end: the end line stays
        progress.begin("evaluate_base travel cpu")
        clock.now += 5
        progress.update("evaluate", "decode speed, prompt", 1, 4)  # the step's code, under a generic name
        progress.end("evaluate_base travel cpu", "failed", 7.0)
        return run

    with prefect_test_harness(server_startup_timeout=120):
        shown = flow_run_progress_artifacts(two_steps())
    assert seen["throttled"] == (0.0, "quantize  started")
    assert seen["midway"] == (50.0, "quantize  AWQ layer 2/4  loss 2.31")
    assert shown == {
        "quantize": (100.0, "quantize  completed  5.0 s"),
        "evaluate_base travel cpu": (25.0, "evaluate_base travel cpu  failed  7.0 s"),
    }
    progress.update("quantize", "AWQ layer", 1, 2)  # outside a flow run: nothing is sent
    assert len(progress._artifacts.shown) == 2
