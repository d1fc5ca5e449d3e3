"""Jobs run outside any UI request, one per device, each in its own run folder.

A run folder holds config.json, plan.json, events.jsonl (appended as events happen), metrics.json and
status.json, and the exported student in student/ (saved before the student is evaluated, so a failing
evaluation loses nothing), and traceback.txt when something failed inside a model or the engine. The app
polls a job's events; closing the browser does not touch the job, and reopening the page finds it again
through the manager.
"""

from __future__ import annotations

import json
import re
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path

from .config import RunConfig
from .errors import ConfigError, JobBusyError, LillamaError, ModelForwardError, RunStopped
from .events import Event, Phase, RunError, read_events
from .modeling.loading import resolve_device
from .runtime.atomic import write_json
from .runtime.devicelock import DeviceLock
from .runtime.failures import TRACEBACK_FILE, keep_traceback
from .runtime.paths import lillama_home

STUDENT_DIR = "student"
LAYERS_DIR = "layers"
STATUS_FILE = "status.json"


def default_runs_root() -> Path:
    return lillama_home() / "runs"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(text).name or text).strip("-")[:40] or "model"


def new_run_dir(root: Path, config: RunConfig, label: str = "") -> Path:
    stamp = datetime.now().strftime("%Y-%m-%d_%H%M%S")
    target = config.plan.reduction
    what = label or (f"{round(target * 100)}pct" if target else f"rank{config.plan.rank}")
    base = root / f"{stamp}_{_slug(config.model.name)}_{what}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    path.mkdir(parents=True)
    return path


def write_status(run_dir: Path, status: str, **facts) -> None:
    """Record a run folder's state in its status.json, which `read_run` reads back after a restart.

    Args:
        run_dir: the run folder.
        status: queued | running | completed | stopped | failed.
        facts: what else the writer knows, e.g. message, the job's id and device, or the sweep it belongs to.

    Raises:
        OSError: the file could not be written; the previous status.json is left as it was.
    """
    write_json(run_dir / STATUS_FILE, {"status": status, **facts})


def append_event(run_dir: Path, event: Event) -> None:
    with (run_dir / "events.jsonl").open("a", encoding="utf-8") as handle:
        handle.write(event.to_json() + "\n")


class JobStatus(StrEnum):
    """A job's state, as status.json and the app show it (plain strings in JSON)."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    STOPPED = "stopped"
    FAILED = "failed"
    INTERRUPTED = "interrupted"  # read back from a folder whose process is gone
    UNKNOWN = "unknown"  # a folder without status.json


@dataclass
class Job:
    """One background task (a compression run or a sweep) and everything it has reported."""

    id: str
    kind: str
    device: str
    run_dir: Path
    stop_event: threading.Event = field(default_factory=threading.Event)
    events: list[Event] = field(default_factory=list)
    status: JobStatus = JobStatus.QUEUED
    message: str = ""
    result: object = None  # the PipelineResult (or list of them for a sweep) while the process lives
    started: float = field(default_factory=time.time)
    finished: float | None = None
    thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)
            append_event(self.run_dir, event)

    def events_since(self, index: int) -> list[Event]:
        with self._lock:
            return self.events[index:]

    @property
    def running(self) -> bool:
        return self.status in (JobStatus.QUEUED, JobStatus.RUNNING)

    def stop(self) -> None:
        self.stop_event.set()

    def wait(self, timeout: float | None = None) -> bool:
        if self.thread is not None:
            self.thread.join(timeout)
        return not self.running


class JobManager:
    """Starts jobs on worker threads, refuses a second job on a busy device, keeps the history."""

    def __init__(self, runs_root: Path | None = None, locks_root: Path | None = None):
        self.runs_root = Path(runs_root or default_runs_root())
        self.runs_root.mkdir(parents=True, exist_ok=True)
        self.locks_root = locks_root  # None: the shared one under $LILLAMA_HOME
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._count = 0

    def run_folder(self, name: str) -> Path:
        """The run folder called `name`; names come from the browser, so nothing outside the runs folder."""
        name = (name or "").strip()
        folder = self.runs_root / name
        if not name or name in (".", "..") or Path(name).name != name or "\\" in name or not folder.is_dir():
            raise ConfigError(f"no run called {name!r} in {self.runs_root}")
        return folder

    def active(self, device: str | None = None) -> Job | None:
        with self._lock:
            for job in self.jobs.values():
                if job.running and (device is None or job.device == device):
                    return job
        return None

    def latest(self) -> Job | None:
        with self._lock:
            return max(self.jobs.values(), key=lambda j: j.started, default=None)

    def submit(self, kind: str, config: RunConfig, work: Callable[[Job], object], label: str = "",
               run_dir: Path | None = None) -> Job:
        """Run `work(job)` in the background on the config's device; refused if that device is busy.
        A new run folder is made unless `run_dir` names one to continue."""
        device = str(resolve_device(config.model.device))
        with self._lock:
            busy = next((j for j in self.jobs.values() if j.running and j.device == device), None)
            if busy is not None:
                raise JobBusyError(f"a {busy.kind} is already running on {device} ({busy.run_dir.name}); "
                                   "stop it or wait for it to finish")
            self._count += 1
            device_lock = DeviceLock(device, self.locks_root).acquire(f"a {kind} started by the app")
            try:
                run_dir = Path(run_dir) if run_dir else new_run_dir(self.runs_root, config, label)
                job = Job(f"{kind}-{self._count}", kind, device, run_dir)
                config.save(run_dir / "config.json")
            except BaseException:
                device_lock.release()
                raise
            self.jobs[job.id] = job
        self._write_status(job)
        job.thread = threading.Thread(target=self._run, args=(job, work, device_lock), name=job.id, daemon=True)
        job.status = JobStatus.RUNNING
        job.thread.start()
        return job

    def _run(self, job: Job, work: Callable[[Job], object], device_lock: DeviceLock) -> None:
        self._write_status(job)
        try:
            job.result = work(job)
            job.status = JobStatus.STOPPED if job.stop_event.is_set() else JobStatus.COMPLETED
        except RunStopped as exc:  # stopped before distillation began: nothing to keep, nothing wrong
            job.status, job.message = JobStatus.STOPPED, str(exc)
        except LillamaError as exc:
            if isinstance(exc, ModelForwardError) and exc.traceback_file is None:
                keep_traceback(exc, job.run_dir)
            job.status, job.message = JobStatus.FAILED, str(exc)
            if not any(isinstance(e, RunError) for e in job.events):
                job.record(RunError(message=str(exc), error_type=type(exc).__name__))
        except Exception as exc:  # a bug: keep the trace in the run folder, show one line in the UI
            job.status, job.message = JobStatus.FAILED, f"internal error: {type(exc).__name__}: {exc}"
            (job.run_dir / TRACEBACK_FILE).write_text(traceback.format_exc())
            job.record(RunError(message=job.message, error_type=type(exc).__name__))
        finally:
            device_lock.release()
            job.finished = time.time()
            self._write_status(job)

    @staticmethod
    def _write_status(job: Job) -> None:
        write_status(job.run_dir, job.status, id=job.id, kind=job.kind, message=job.message, device=job.device,
                     started=job.started, finished=job.finished)


@dataclass
class RunRecord:
    """What a run folder says about itself, readable after a restart."""

    path: Path
    config: RunConfig | None
    status: str
    metrics: dict
    has_student: bool

    @property
    def name(self) -> str:
        return self.path.name

    def events(self) -> list[Event]:
        log = self.path / "events.jsonl"
        return read_events(log) if log.exists() else []


def read_run(path: Path) -> RunRecord:
    def load(name):
        try:
            return json.loads((path / name).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    raw_config = load("config.json")
    try:
        config = RunConfig.from_dict(raw_config) if raw_config else None
    except LillamaError:
        config = None
    status = (load(STATUS_FILE) or {}).get("status", JobStatus.UNKNOWN)
    if status in (JobStatus.QUEUED, JobStatus.RUNNING):
        status = JobStatus.INTERRUPTED  # the process that ran it is gone
    return RunRecord(path, config, status, load("metrics.json") or {}, (path / STUDENT_DIR / "lillama.json").exists())


def list_runs(root: Path | None = None, running: dict[str, Job] | None = None) -> list[RunRecord]:
    """Every run folder, newest first; folders of jobs alive in this process show their live status."""
    root = Path(root or default_runs_root())
    if not root.exists():
        return []
    records = []
    live = {job.run_dir: job for job in (running or {}).values()}
    for path in sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), reverse=True):
        record = read_run(path)
        if path in live:
            record.status = live[path].status
        records.append(record)
    return records



def save_run(run_dir: Path, config: RunConfig, result, keep_student: bool = True) -> None:
    """Plan, metrics and (when any layer finished) the student, beside the run's config and events."""
    from .export import export_student

    write_json(run_dir / "plan.json", json.loads(result.plan.to_json()))
    write_json(run_dir / "metrics.json", result.metrics.to_dict())
    if keep_student and result.run.applied.ranks:  # a run stopped before its first layer has nothing to keep
        # A resumed run holds more finished layers than the student saved when it stopped: replace it (atomically).
        export_student(result.run.student, result.loaded.tokenizer, run_dir / STUDENT_DIR, overwrite=True,
                       record={"config": config.to_dict(), "metrics": result.metrics.to_dict()},
                       feature_extractor=result.loaded.feature_extractor)


def evaluate_and_record(result, config: RunConfig, run_dir: Path, on_event, stop: threading.Event | None,
                        teacher_ppl: float | None = None) -> None:
    """Evaluate a run whose student `save_run` already kept, then add the scores to its folder."""
    from .export import update_export_metrics
    from .pipeline import evaluate_run

    evaluate_run(result, config, on_event, stop, teacher_ppl)
    write_json(run_dir / "metrics.json", result.metrics.to_dict())
    if (run_dir / STUDENT_DIR / "lillama.json").exists():
        update_export_metrics(run_dir / STUDENT_DIR, result.metrics.to_dict())


def compression_work(config: RunConfig, loaded=None, plan=None, evaluate: bool = True,
                     teacher_ppl: float | None = None) -> Callable[[Job], object]:
    """The work of one compression job: distil, keep the student and metrics on disk, then evaluate."""
    from .pipeline import run_pipeline

    def work(job: Job):
        result = run_pipeline(config, loaded=loaded, plan=plan, on_event=job.record, stop=job.stop_event,
                              evaluate=False, checkpoint_dir=job.run_dir / LAYERS_DIR)
        save_run(job.run_dir, config, result)
        job.result = result  # the app can chat with the student even if its evaluation fails
        if evaluate:
            evaluate_and_record(result, config, job.run_dir, job.record, job.stop_event, teacher_ppl)
        return result

    return work


def resumable(run_dir: Path):
    """(config, plan) of a run that can be continued in its own folder."""
    from .pipeline import PLAN_FILE
    from .planning.ranks import RankPlan

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists() or not (run_dir / LAYERS_DIR / PLAN_FILE).exists():
        raise LillamaError(f"{run_dir} has no run config and plan to resume from")
    return RunConfig.load(run_dir / "config.json"), RankPlan.load(run_dir / LAYERS_DIR / PLAN_FILE)


def resume_work(run_dir: Path, loaded=None, evaluate: bool = True) -> tuple[RunConfig, Callable[[Job], object]]:
    """Continue an interrupted run in its own folder: finished layers are restored, not retrained."""
    config, plan = resumable(run_dir)
    return config, compression_work(config, loaded=loaded, plan=plan, evaluate=evaluate)


def sweep_work(base: RunConfig, reductions: list[float], runs_root: Path, loaded=None,
               teacher_ppl: float | None = None) -> Callable[[Job], object]:
    """Compress at each reduction in turn, each into a run folder of its own; the sweep's folder logs
    the sweep. A stop ends the current run within a step and skips the rest."""
    from .pipeline import run_pipeline

    def work(job: Job):
        results = []
        ppl = teacher_ppl
        for i, reduction in enumerate(reductions, 1):
            if job.stop_event.is_set():
                break
            config = RunConfig.from_dict(base.to_dict())
            config.plan.reduction, config.plan.rank = reduction, None
            config.validate()
            run_dir = new_run_dir(runs_root, config)
            config.save(run_dir / "config.json")
            write_status(run_dir, JobStatus.RUNNING, sweep=job.id)
            job.record(Phase(name="sweep",
                             detail=f"run {i}/{len(reductions)}: {reduction:.0%} fewer parameters -> {run_dir.name}"))

            def on_event(event, run_dir=run_dir):
                job.record(event)
                append_event(run_dir, event)

            try:
                result = run_pipeline(config, loaded=loaded, on_event=on_event, stop=job.stop_event, evaluate=False)
                save_run(run_dir, config, result)
                evaluate_and_record(result, config, run_dir, on_event, job.stop_event, ppl)
            except LillamaError as exc:
                if isinstance(exc, ModelForwardError):
                    keep_traceback(exc, run_dir)
                status = JobStatus.STOPPED if isinstance(exc, RunStopped) else JobStatus.FAILED
                write_status(run_dir, status, message=str(exc), sweep=job.id)
                raise
            ppl = result.metrics.teacher_ppl if result.metrics.teacher_ppl is not None else ppl
            write_status(run_dir, result.run.status, sweep=job.id)
            results.append((run_dir, result))
        return results

    return work
