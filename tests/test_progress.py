"""The progress area's record of a run (studio/progress.py): phases from the pipeline's bars, the time left from this
machine's earlier runs, the words and bar the page shows. No model: a clock the test moves."""

import pytest

from studio import progress
from studio.progress import PHASES, RunTracker, Shape, Timings, status_html


@pytest.fixture()
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(progress, "clock", lambda: now[0])

    def advance(seconds: float) -> None:
        now[0] += seconds
    return advance


def run_once(tracker: RunTracker, clock, session="s", shape=Shape(layers=4, steps=10, caption=True), tokens=100,
             seconds=(("caption", 20), ("prepare", 4), ("steps", 30), ("decode", 6), ("export", 3))):
    """One run through every phase as the handler and the pipeline's bars mark them."""
    tracker.queue(session, "decompose", shape)
    clock(1)
    job = tracker.begin(session, "decompose", shape)
    spent = dict(seconds)
    clock(spent["caption"])
    job.on_bars([("caption tokens", tokens, 512)])
    job.on_bars([])  # the caption's bar closed: the prompt is encoded next
    clock(spent["prepare"])
    for step in range(shape.steps + 1):
        job.on_bars([("steps", step, shape.steps)])
        if step < shape.steps:
            clock(spent["steps"] / shape.steps)
    job.on_bars([])  # the steps' bar closed: the layers are decoded
    clock(spent["decode"])
    job.mark("export")
    clock(spent["export"])
    tracker.end(job, "done")
    return job


def test_the_phases_follow_the_pipelines_bars_and_the_handlers_marks(clock):
    tracker = RunTracker()
    job = tracker.queue("s", "decompose", Shape(steps=10))
    assert tracker.status("s").text == "Starting"  # nothing else runs: not "waiting"
    job = tracker.begin("s", "decompose", Shape(steps=10))
    job.on_bars([("caption tokens", 37, 512)])
    assert (tracker.status("s").text, tracker.status("s").detail) == (PHASES["caption"], "37/512 tokens")
    job.on_bars([])
    assert tracker.status("s").text == PHASES["prepare"]
    job.on_bars([("steps", 3, 10)])
    assert (tracker.status("s").text, tracker.status("s").detail) == ("Denoising", "step 3 of 10")
    job.on_bars([])
    assert tracker.status("s").text == "Decoding the layers"
    job.mark("export")
    assert tracker.status("s").text == "Writing the PNG layers, ZIP, PPTX and PSD"


def test_the_time_left_comes_from_this_machines_earlier_runs(clock, tmp_path):
    timings = Timings(tmp_path / ".run-timings.json")
    tracker = RunTracker(timings)
    first = run_once(tracker, clock)
    assert first.caption_tokens == 100
    # The first run is written down; a new tracker (the app started again) reads it.
    tracker = RunTracker(Timings(tmp_path / ".run-timings.json"))
    tracker.queue("s", "decompose", Shape(layers=4, steps=10))
    job = tracker.begin("s", "decompose", Shape(layers=4, steps=10))
    assert tracker.seconds_left(job, progress.clock()) == (pytest.approx(20 + 4 + 30 + 6 + 3), True)
    # Twice the steps at twice the resolution's side: the steps' and decode's work scale, the caption's not.
    big = Shape(layers=4, steps=20, resolution=1280)
    job = tracker.begin("t", "decompose", big)
    left, whole = tracker.seconds_left(job, progress.clock())
    assert whole and left == pytest.approx(20 + 4 * 4 + 30 * 2 * 4 + 6 * 4 + 3 * 4)
    status = tracker.status("t")
    assert status.left_s == pytest.approx(left) and 0 <= status.fraction < 0.01


def test_after_a_step_the_run_uses_its_own_pace(clock):
    tracker = RunTracker()  # no earlier run: nothing to go on but the run itself
    shape = Shape(steps=50, caption=False)
    tracker.queue("s", "decompose", shape)
    job = tracker.begin("s", "decompose", shape)
    assert tracker.seconds_left(job, progress.clock()) == (None, False)
    assert "estimated after a first run on this machine" in status_html(tracker.status("s"))
    job.on_bars([("steps", 0, 50)])
    clock(4)
    job.on_bars([("steps", 2, 50)])  # 2 s a step
    assert tracker.seconds_left(job, progress.clock()) == (pytest.approx(96), False)  # the steps only: decode unknown
    assert "about 1 min 36 s left in this part" in status_html(tracker.status("s"))


def test_how_a_run_ended_is_said_with_its_duration(clock):
    tracker = RunTracker()
    run_once(tracker, clock)
    assert tracker.status("s").text == "Done in 1 min 4 s"
    tracker.queue("s", "decompose", Shape())
    clock(2)
    job = tracker.begin("s", "decompose", Shape())
    clock(10)
    tracker.stopping("s")
    assert tracker.status("s").text == "Stopping at the end of this step…" and tracker.running("s")
    clock(1)
    tracker.end(job, "stopped")
    assert tracker.status("s").text == "Stopped after 13 s. Nothing was saved."
    assert not tracker.running("s")
    # Stop while the run still waits in the queue: it never starts, and says so at once.
    tracker.queue("q", "decompose", Shape())
    tracker.stopping("q")
    assert tracker.status("q").outcome == "stopped"


def test_a_run_waiting_for_another_says_how_long_that_one_has_left(clock):
    tracker = RunTracker()
    run_once(tracker, clock, session="earlier")  # some history
    tracker.queue("a", "decompose", Shape(layers=4, steps=10))
    job = tracker.begin("a", "decompose", Shape(layers=4, steps=10))
    job.on_bars([("caption tokens", 50, 512)])
    tracker.queue("b", "decompose", Shape())
    status = tracker.status("b")
    assert status.text == PHASES["queued"] and status.detail.startswith("it has about ")


def test_the_progress_area_is_one_line_and_a_bar(clock):
    html = status_html(progress.Status("Denoising", "step 12 of 50", 30, 90, 0.25, running=True))
    assert '<span class="phase">Denoising</span> · <span class="detail">step 12 of 50</span>' in html
    assert "30 s so far, about 1 min 30 s left" in html and 'style="width:25.0%"' in html
    assert 'class="bar indeterminate"' in status_html(progress.Status("Starting", running=True))
    assert status_html(None) == ""
    assert "<script>" not in status_html(progress.Status("<script>", running=True))  # escaped


def test_a_broken_timings_file_is_ignored(tmp_path):
    path = tmp_path / ".run-timings.json"
    path.write_text("{not json")
    assert Timings(path).rate("steps") is None
