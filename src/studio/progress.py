"""What a run started from the page is doing, for the one progress area by its buttons: the phase (caption tokens,
steps, decoding, writing the files), the time it has taken, and the time it should still take, estimated from this
machine's own earlier runs (`Timings`, kept in the outputs folder).

The UI's handlers open a `Job` per run (`RunTracker.begin`) and mark the phases they run themselves (`Job.mark`);
the pipeline's progress bars (tqdm, as Gradio's `track_tqdm` reports them: `tap_progress`) give the caption's tokens
and the denoising steps. The page polls `RunTracker.status` and shows `status_html`. No Gradio, no torch.
"""

import dataclasses
import html
import json
import logging
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# The phases of a decomposition in order, with what the page says while each runs. "decode" covers what the pipeline
# does after its last step (the VAE decode) and the recomposition score `infer` computes after it.
PHASES = {
    "queued": "Waiting for the run before it to finish",
    "caption": "Writing a caption of the image",
    "prepare": "Encoding the image and the prompt",
    "steps": "Denoising",
    "decode": "Decoding the layers",
    "export": "Writing the PNG layers, ZIP, PPTX and PSD",
    "edit": "Editing the layer in the edit tool",
}
WORK_PHASES = ("caption", "prepare", "steps", "decode", "export")  # a decomposition's, after the queue
CAPTION_UNIT = "caption tokens"  # the unit of the caption's tqdm bar (app.caption_progress)
STEPS_UNIT = "steps"  # Gradio's name for a tqdm bar without a unit: the pipeline's steps
CAPTION_MAX_TOKENS = 512  # the pipeline's caption stops there
# The estimate: the median of the last few runs' seconds per unit of work (below), so one slow first run (a cold
# disk cache, a compile) does not weigh for long. Kept in a small JSON file next to the run folders.
TIMINGS_FILE = ".run-timings.json"
TIMINGS_KEPT = 40
TIMINGS_USED = 5
# A step's rate measured in the run itself replaces the history's once this many steps are done.
OWN_RATE_AFTER_STEPS = 1
OWN_RATE_AFTER_TOKENS = 16


def clock() -> float:
    """Seconds, for every duration here (tests replace it)."""
    return time.monotonic()


@dataclasses.dataclass(frozen=True)
class Shape:
    """What a run's time depends on: its image tokens per layer (resolution), its layers, steps and whether true CFG
    doubles every step's transformer call; whether the model writes a caption first."""

    layers: int = 4
    resolution: int = 640
    steps: int = 50
    cfg: bool = True
    caption: bool = True

    def work(self, phase: str) -> float:
        """A phase's work in units whose seconds stay about the same between runs of other shapes."""
        pixels = (self.resolution / 640) ** 2
        if phase == "steps":  # per step
            return (self.layers + 1) * pixels * (2 if self.cfg else 1)
        if phase in ("decode", "export"):
            return self.layers * pixels
        if phase == "caption":  # per token
            return 1.0
        return pixels  # prepare: the image's encode and the prompt's

    @classmethod
    def of(cls, params: dict[str, Any], defaults: dict[str, Any]) -> "Shape":
        """The shape of a run's PARAMS values (unchecked: a bad value gives the default; `infer` refuses it later)."""
        def number(name, kind):
            try:
                return kind(params.get(name) if params.get(name) is not None else defaults[name])
            except (TypeError, ValueError):
                return kind(defaults[name])
        return cls(layers=number("layers", int), resolution=number("resolution", int),
                   steps=number("num_inference_steps", int), cfg=number("true_cfg_scale", float) > 1,
                   caption=not str(params.get("prompt") or "").strip())


class Timings:
    """This machine's earlier runs: per phase, seconds per unit of work (`Shape.work`), and the captions' lengths.
    Read from and written to `path` (None: kept in memory only)."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self.records: list[dict[str, Any]] = []
        if self.path is not None and self.path.is_file():
            try:
                self.records = list(json.loads(self.path.read_text(encoding="utf-8")))[-TIMINGS_KEPT:]
            except (OSError, ValueError, TypeError):
                logger.info("Ignored %s: not the timings this app writes", self.path)

    def add(self, shape: Shape, seconds: dict[str, float], caption_tokens: int | None) -> None:
        # A sub-run writes its files inside the pipeline's last phase: its "decode" would overstate a decode's time.
        rates = {phase: s / shape.work(phase) / (shape.steps if phase == "steps" else 1)
                 for phase, s in seconds.items() if phase in WORK_PHASES and (phase != "decode" or "export" in seconds)}
        if "caption" in rates:
            rates["caption"] = seconds["caption"] / max(caption_tokens or 1, 1)
        with self._lock:
            self.records = (self.records + [dict(rates=rates, caption_tokens=caption_tokens)])[-TIMINGS_KEPT:]
            records = list(self.records)
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.path.write_text(json.dumps(records), encoding="utf-8")
            except OSError as err:  # the estimate is a nicety: a read-only outputs folder costs only it
                logger.info("Could not keep the run timings in %s: %s", self.path, err)

    def rate(self, phase: str) -> float | None:
        """Seconds per unit of work of `phase` (per step, per caption token): the median of the last runs'."""
        with self._lock:
            rates = [r["rates"][phase] for r in self.records if phase in r.get("rates", {})][-TIMINGS_USED:]
        return statistics.median(rates) if rates else None

    def caption_tokens(self) -> int:
        """How long a caption usually is here (the most a caption can be, before any was written)."""
        with self._lock:
            tokens = [r["caption_tokens"] for r in self.records if r.get("caption_tokens")][-TIMINGS_USED:]
        return round(statistics.median(tokens)) if tokens else CAPTION_MAX_TOKENS

    def phase_seconds(self, phase: str, shape: Shape) -> float | None:
        rate = self.rate(phase)
        if rate is None:
            return None
        if phase == "caption":
            return rate * self.caption_tokens()
        return rate * shape.work(phase) * (shape.steps if phase == "steps" else 1)


@dataclasses.dataclass
class Job:
    """One run of one session: its phase and counts, when each phase began, and how it ended."""

    kind: str  # "decompose", "layer" (decompose this layer), "edit"
    shape: Shape
    started: float = dataclasses.field(default_factory=lambda: clock())
    phase: str = "queued"
    done: int = 0
    total: int = 0
    phase_started: float = dataclasses.field(default_factory=lambda: clock())
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # the phases that ended
    caption_tokens: int | None = None
    stopping: bool = False
    outcome: str | None = None  # None while it runs; "done", "failed" or "stopped"
    ended: float | None = None

    def mark(self, phase: str, done: int = 0, total: int = 0) -> None:
        """The job is now in `phase` (with `done` of `total` counted, where it counts)."""
        now = clock()
        if phase != self.phase:
            self.seconds[self.phase] = self.seconds.get(self.phase, 0.0) + now - self.phase_started
            if self.phase == "caption":
                self.caption_tokens = self.done
            self.phase, self.phase_started = phase, now
        self.done, self.total = done, total

    def on_bars(self, bars: list[tuple[str | None, float | None, float | None]]) -> None:
        """The pipeline's progress bars now open, as (unit, count, total): the caption's tokens or the steps. When
        the caption's bar closes the prompt is encoded next; when the steps' bar closes the layers are decoded."""
        units = {unit: (int(done or 0), int(total or 0)) for unit, done, total in bars}
        if CAPTION_UNIT in units:
            self.mark("caption", *units[CAPTION_UNIT])
        elif STEPS_UNIT in units:
            self.mark("steps", *units[STEPS_UNIT])
        elif self.phase == "caption":
            self.mark("prepare")
        elif self.phase == "steps":
            self.mark("decode")

    def end(self, outcome: str) -> None:
        self.mark("ended")
        self.outcome, self.ended = outcome, clock()


@dataclasses.dataclass(frozen=True)
class Status:
    """What the progress area shows for a session."""

    text: str  # the phase, or how the run ended
    detail: str = ""  # "37/512 tokens", "step 12 of 50"
    elapsed_s: float = 0.0
    left_s: float | None = None  # None: no estimate yet
    fraction: float | None = None  # of the whole run, for the bar
    running: bool = False
    outcome: str | None = None
    left_whole: bool = True  # False: `left_s` covers this phase and the known ones after it, not the whole run


class RunTracker:
    """The runs of every session, by Gradio's session hash: the one that runs and the one each session waits for."""

    def __init__(self, timings: Timings | None = None):
        self.timings = timings or Timings()
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}

    def queue(self, session: str, kind: str, shape: Shape) -> Job:
        """The page asked for a run: it waits in Gradio's queue until its handler `begin`s it."""
        with self._lock:
            job = self._jobs[session] = Job(kind, shape)
            return job

    def begin(self, session: str, kind: str, shape: Shape) -> Job:
        """The handler runs: the session's queued job (its clock started at the click), or a new one (an API call)."""
        with self._lock:
            job = self._jobs.get(session)
            if job is None or job.outcome is not None or job.kind != kind:
                job = self._jobs[session] = Job(kind, shape)
            job.shape = shape
        job.mark("edit" if kind == "edit" else "caption" if shape.caption else "prepare")
        return job

    def end(self, job: Job, outcome: str) -> None:
        job.end(outcome)
        if outcome == "done" and job.kind != "edit" and "steps" in job.seconds:
            self.timings.add(job.shape, job.seconds, job.caption_tokens)

    def job(self, session: str) -> Job | None:
        with self._lock:
            return self._jobs.get(session)

    def running(self, session: str) -> bool:
        job = self.job(session)
        return job is not None and job.outcome is None

    def stopping(self, session: str) -> None:
        """Stop was pressed: the run ends at its next step (one still in the queue, at once: it never starts)."""
        job = self.job(session)
        if job is not None and job.outcome is None:
            job.stopping = True
            if job.phase == "queued":
                job.end("stopped")

    def forget(self, session: str) -> None:
        with self._lock:
            self._jobs.pop(session, None)

    def seconds_left(self, job: Job, now: float) -> tuple[float | None, bool]:
        """The time `job` should still take, and whether that is all of it: what is left of its phase (at the run's
        own rate once it has one), then the later phases at this machine's earlier rates. A phase that never ran here
        has no estimate: the sum stops before it ((None, False) when that is the phase running now)."""
        if job.kind == "edit":
            return None, False
        phases = [p for p in WORK_PHASES if p != "caption" or job.shape.caption]
        current = job.phase if job.phase in phases else phases[0]
        in_phase = now - job.phase_started if job.phase in phases else 0.0
        left = None
        for phase in phases[phases.index(current):]:
            estimate = self.timings.phase_seconds(phase, job.shape)
            if phase == current and job.phase in phases:
                if phase == "steps" and job.done >= OWN_RATE_AFTER_STEPS:
                    estimate = in_phase / job.done * max(job.total - job.done, 0)
                elif phase == "caption" and job.done >= OWN_RATE_AFTER_TOKENS:
                    expected = min(max(self.timings.caption_tokens(), job.done + 1), CAPTION_MAX_TOKENS)
                    estimate = in_phase / job.done * (expected - job.done)
                elif estimate is not None:
                    estimate = max(estimate - in_phase, 0.0)
            if estimate is None:
                return left, False
            left = (left or 0.0) + estimate
        return left, True

    def status(self, session: str) -> Status | None:
        """What the session's progress area shows now; None before its first run."""
        job = self.job(session)
        if job is None:
            return None
        now = clock()
        if job.outcome is not None:
            took = job.ended - job.started
            text = {"done": f"Done in {duration(took)}",
                    "stopped": f"Stopped after {duration(took)}. Nothing was saved.",
                    "failed": f"Stopped by an error after {duration(took)} (the message says what went wrong)."}
            return Status(text[job.outcome], elapsed_s=took, outcome=job.outcome)
        elapsed = now - job.started
        if job.stopping:
            return Status("Stopping at the end of this step…", elapsed_s=elapsed, running=True)
        if job.phase == "queued":
            ahead = [other for other in self._running_jobs() if other is not job and other.phase != "queued"]
            if not ahead:
                return Status("Starting", "", elapsed, None, None, running=True)
            left, whole = self.seconds_left(ahead[0], now)
            detail = f"it has about {duration(left)} left" if left is not None and whole else ""
            return Status(PHASES["queued"], detail, elapsed, None, None, running=True)
        detail = ""
        if job.phase == "caption":
            detail = f"{job.done}/{job.total or CAPTION_MAX_TOKENS} tokens"
        elif job.phase == "steps" or (job.phase == "edit" and job.total):
            detail = f"step {job.done} of {job.total or job.shape.steps}"
        left, whole = self.seconds_left(job, now)
        worked = now - job.started - job.seconds.get("queued", 0.0)
        fraction = worked / (worked + left) if left is not None and whole and worked + left > 0 else None
        text = PHASES.get(job.phase, job.phase)
        if job.kind == "layer" and job.phase == "decode":  # a sub-run writes the whole stack's files in it too
            text = "Decoding the layers and writing the files"
        return Status(text, detail, elapsed, left, fraction, running=True, left_whole=whole)

    def _running_jobs(self) -> list[Job]:
        with self._lock:
            return [job for job in self._jobs.values() if job.outcome is None]


def tap_progress(progress: Any, on_bars: Callable[[list[tuple]], None]) -> None:
    """Hand every change of a Gradio `Progress`'s tracked tqdm bars to `on_bars` as (unit, count, total) tuples,
    as well as to Gradio (which sends them to an API client). Gradio's patched tqdm asks the Progress for its
    callback at every change (`_progress_callback`); this instance's callback calls both."""
    gradio_callback = progress._progress_callback

    def callback():
        forward = gradio_callback()

        def both(iterables):
            try:
                on_bars([(it.unit, it.index, it.length) for it in iterables])
            except Exception:  # the progress area must never fail a run
                logger.exception("progress tracking failed")
            if forward is not None:
                forward(iterables)
        return both

    progress._progress_callback = callback


def duration(seconds: float | None) -> str:
    """'12 s', '1 min 5 s', '2 h 3 min' (whole seconds)."""
    if seconds is None:
        return "?"
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s" if seconds % 60 else f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def status_html(status: Status | None) -> str:
    """The progress area's HTML: the phase and its count, the time taken and left, and a bar of the whole run."""
    if status is None:
        return ""
    classes = "run-status" + (" running" if status.running else f" {status.outcome}")
    parts = [f'<span class="phase">{html.escape(status.text)}</span>']
    if status.detail:
        parts.append(f'<span class="detail">{html.escape(status.detail)}</span>')
    if status.running:
        times = f"{duration(status.elapsed_s)} so far"
        first_run = " (the whole run's time is estimated after a first run on this machine)"
        if status.left_s is not None and status.left_whole:
            times += f", about {duration(status.left_s)} left"
        elif status.left_s is not None:
            times += f", about {duration(status.left_s)} left in this part" + first_run
        elif status.text not in (PHASES["queued"], "Starting") and "Stopping" not in status.text:
            times += first_run
        parts.append(f'<span class="times">{times}</span>')
    bar = ""
    if status.running:
        if status.fraction is None:
            bar = '<div class="bar indeterminate"><div></div></div>'
        else:
            bar = f'<div class="bar"><div style="width:{100 * min(max(status.fraction, 0.0), 1.0):.1f}%"></div></div>'
    return f'<div class="{classes}" role="status" aria-live="polite"><p>{" · ".join(parts)}</p>{bar}</div>'
