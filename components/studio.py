"""The app's server-side state: the loaded teacher, the settings, the rank plan, the current student
and the job manager. It lives for the life of the server, not of a browser tab, so a page that is
closed and reopened finds everything as it was, including a running job."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from lillama_core.config import (
    CalibrationConfig,
    DistillConfig,
    EvalConfig,
    HealConfig,
    ModelConfig,
    PlanConfig,
    RunConfig,
)
from lillama_core.data.calibration import CalibrationData
from lillama_core.errors import ConfigError, LillamaError, RankPlanError, RunStopped
from lillama_core.events import Event, Phase
from lillama_core.export import load_compressed, load_feature_extractor
from lillama_core.jobs import (
    STUDENT_DIR,
    Job,
    JobManager,
    compression_work,
    read_run,
    resumable,
    resume_work,
    sweep_work,
)
from lillama_core.modeling.loading import LoadedModel, describe, load_model
from lillama_core.pipeline import planning_calibration
from lillama_core.planning.history import RunPoint, fit_runs, run_points
from lillama_core.planning.planner import Measurements, make_plan, measure_for_plan, plan_from
from lillama_core.planning.predict import Damage, QualityFit, plan_damage
from lillama_core.planning.ranks import ModelShape, RankPlan, summarize

PROVISIONAL_STRATEGY = "uniform"  # needs no measurement: shown at once while a measured plan is being made
LOCAL_SUFFIXES = (".gguf", ".txt", ".jsonl", ".json", ".parquet", ".csv", ".safetensors", ".wav", ".flac")


def confined_path(text: str, roots: list[Path] | None) -> str:
    """`text` unchanged, unless it names a local file or folder outside every root (roots None: anywhere).
    Hub model ids and dataset ids are not local paths and pass; symbolic links are followed first."""
    text = text.strip()
    if roots is None or not text or text == "default":
        return text
    path = Path(text).expanduser()
    if not (path.exists() or text.startswith(("/", "~", ".")) or text.lower().endswith(LOCAL_SUFFIXES)):
        return text
    resolved = path.resolve()
    if not any(resolved.is_relative_to(root.resolve()) for root in roots):
        allowed = ", ".join(str(root) for root in roots)
        raise ConfigError(f"{text}: this app is reachable from other machines, so local paths must be inside "
                          f"{allowed} (upload the file instead)")
    return text


@dataclass
class Student:
    model: object
    tokenizer: object
    label: str
    run_dir: Path | None = None
    feature_extractor: object | None = None  # speech models' audio features, exported with the student


class Studio:
    def __init__(self, jobs: JobManager, exports_root: Path, model: ModelConfig | None = None,
                 allow_remote_code: bool = False, path_roots: list[Path] | None = None):
        self.jobs = jobs
        self.path_roots = path_roots  # None: typed paths may name any local file (an app on this machine only)
        self.exports_root = Path(exports_root)
        self.model_config = model or ModelConfig()
        self.allow_remote_code = allow_remote_code
        self.calibration = CalibrationConfig()
        self.plan_config = PlanConfig()
        self.distill = DistillConfig()
        self.eval = EvalConfig(tokens=8192)
        self.heal = HealConfig()
        self.seed = RunConfig.seed  # a loaded recipe's; the forms do not set it
        self.recipe_version = 0  # counts loaded recipes, so each tab's forms know when to re-read the settings
        self.loaded: LoadedModel | None = None
        self.shape: ModelShape | None = None
        self.plan: RankPlan | None = None
        self._preset_plan: RankPlan | None = None  # the plan the plan settings made; any other was made by hand
        self.student: Student | None = None
        self._student_job: str | None = None
        self._load_lock = threading.Lock()
        self._plan_lock = threading.RLock()  # guards plan and plan_config, held only briefly
        self._measure_lock = threading.Lock()  # one measurement on the teacher at a time (it can take minutes)
        self.provisional: RankPlan | None = None  # the stand-in shown while the measured plan is being made
        self.plan_progress = ""  # what the background measurement is doing, from the engine's Phase events
        self.plan_generation = 0  # bumped when the background replaces the plan, so open pages redraw
        self._planning: threading.Thread | None = None
        self._planning_stop = threading.Event()
        self.teacher_ppl: dict[tuple, float] = {}
        self.measurements = Measurements()  # the teacher's, for the Ranks step's diagnostics and prediction
        self.measured_groups: list[str] = []  # the module groups the sensitivity ladder was measured on
        self._fit: tuple[tuple, list[RunPoint], QualityFit | None] | None = None  # (what it was fitted on, ...)

    # ---- model ----

    def load(self, name: str, trust_remote_code: bool = False, offload: bool | None = None) -> LoadedModel:
        if trust_remote_code and not self.allow_remote_code:
            raise ConfigError("remote code is disabled; start the app with --allow-remote-code to enable it")
        offload = self.model_config.offload if offload is None else offload
        config = replace(self.model_config, name=self.confine(name), trust_remote_code=trust_remote_code,
                         offload=offload)
        with self._load_lock:
            self._planning_stop.set()  # a measurement of the previous model is of no use any more
            loaded = load_model(config)
            self.model_config, self.loaded = config, loaded
            self.shape = ModelShape.of(loaded.model)
            self.plan, self.provisional, self.student, self._student_job = None, None, None, None
            self.measurements, self._fit = Measurements(), None
        return loaded

    def confine(self, text: str) -> str:
        return confined_path(text, self.path_roots)

    def ensure_loaded(self) -> LoadedModel:
        if self.loaded is None:
            return self.load(self.model_config.name, self.model_config.trust_remote_code)
        return self.loaded

    def model_facts(self) -> dict:
        return describe(self.loaded) if self.loaded else {}

    # ---- plan ----

    def planning_calibration(self, plan_config: PlanConfig) -> CalibrationData | None:
        """What `plan_config` measures on, drawn as the CLI and compression runs draw it (so all of them find
        the same stored measurement); None when it measures nothing."""
        return planning_calibration(self.ensure_loaded(), RunConfig(calibration=self.calibration, plan=plan_config))

    def apply_preset(self, plan_config: PlanConfig) -> RankPlan:
        loaded = self.ensure_loaded()
        self._planning_stop.set()  # the user chose: a background measurement gives way (between two probes)
        with self._measure_lock:
            measured = measure_for_plan(loaded, plan_config, self.planning_calibration(plan_config),
                                        self.calibration.batch_size)
            plan = plan_from(loaded, plan_config, measured)
        self._keep_measurements(measured, plan_config)
        with self._plan_lock:
            self.plan_config, self.plan, self.provisional, self._preset_plan = plan_config, plan, None, plan
        return plan

    def current_plan(self) -> RankPlan:
        with self._plan_lock:
            if self.plan is None:
                self.apply_preset(self.plan_config)
            return self.plan

    def start_planning(self) -> threading.Thread | None:
        """Make sure a plan shows at once. Without one, a plan that measures nothing is made now; one that
        measures the teacher (sensitivity, whitened energy) is made in a background thread, with a
        provisional uniform plan at the same target shown until it replaces it. Measurements are cached
        (planning/cache.py), so on a relaunch the measured plan follows within seconds.

        Returns:
            The measuring thread, or None when nothing is measured in the background.

        Raises:
            LillamaError: the model cannot be loaded, or the settings give no plan.
        """
        loaded = self.ensure_loaded()
        with self._plan_lock:
            if self.plan is not None:
                return None
            config = self.plan_config
            if not config.uses_calibration:
                self.apply_preset(config)
                return None
            self.plan = self.provisional = make_plan(loaded, replace(config, strategy=PROVISIONAL_STRATEGY))
            self.plan_progress = "preparing calibration data"
            self._planning_stop = threading.Event()
            thread = self._planning = threading.Thread(target=self._measure_plan, name="measured-plan", daemon=True,
                                                       args=(loaded, config, self.provisional, self._planning_stop))
        thread.start()
        return thread

    def _measure_plan(self, loaded: LoadedModel, config: PlanConfig, provisional: RankPlan,
                      stop: threading.Event) -> None:
        plan = None
        try:
            with self._measure_lock:
                calibration = self.planning_calibration(config)
                self.plan_progress = "capturing the teacher's layer inputs"  # until the first layer's Phase event
                measured = measure_for_plan(loaded, config, calibration, self.calibration.batch_size,
                                            on_event=self._on_plan_event, stop=stop)
                plan = plan_from(loaded, config, measured)
            if loaded is self.loaded:  # not a model replaced while it was measured
                self._keep_measurements(measured, config)
        except RunStopped:
            pass
        except Exception as exc:  # no browser request to toast it to: the Ranks step shows it in one line
            self.plan_progress = f"could not measure: {exc if isinstance(exc, LillamaError) else repr(exc)}"
        with self._plan_lock:
            if plan is not None and self.plan is provisional:  # not replaced by the user's own choice meanwhile
                self.plan, self.provisional, self._preset_plan = plan, None, plan
                self.plan_generation += 1
            self._planning = None

    def _keep_measurements(self, measured: Measurements, config: PlanConfig) -> None:
        """Keep what a plan measured for the diagnostics; a plan that measured less (uniform after sensitivity)
        leaves the earlier measurements of the same model in place."""
        if measured.ladder:
            self.measurements = replace(self.measurements, ladder=measured.ladder, damage=measured.damage)
            self.measured_groups, self._fit = list(config.groups), None
        if measured.spectra:
            self.measurements = replace(self.measurements, spectra=measured.spectra)

    def plan_damage(self) -> Damage | None:
        """The current plan's predicted training-free damage; None before the sensitivity is measured."""
        if not self.measurements.ladder or self.shape is None:
            return None
        return plan_damage(self.shape, self.current_plan().ranks, self.measurements.ladder, self.measured_groups)

    def quality_fit(self) -> tuple[list[RunPoint], QualityFit | None]:
        """The finished runs of this model in the history, scored on its measurements, and the damage ->
        perplexity fit on them; refitted when a run finishes or the measurements change."""
        if not self.measurements.ladder or self.shape is None:
            return [], None
        root = self.jobs.runs_root
        metrics = sorted(root.glob("*/metrics.json")) if root.exists() else []
        seen = (id(self.measurements.ladder), self.model_config.name,
                tuple((path.parent.name, path.stat().st_mtime_ns) for path in metrics))
        if self._fit is None or self._fit[0] != seen:
            points = run_points(root, self.model_config.name, self.shape, self.measurements.ladder,
                                self.measured_groups)
            self._fit = (seen, points, fit_runs(points))
        return self._fit[1], self._fit[2]

    def _on_plan_event(self, event: Event) -> None:
        if isinstance(event, Phase):  # "layer 3/30: KL at keep ..." -> "measuring sensitivity: layer 3/30"
            self.plan_progress = f"measuring {event.name}: {event.detail.split(':')[0]}"

    def measuring(self) -> bool:
        """Whether a background measurement is running on the teacher."""
        thread = self._planning
        return thread is not None and thread.is_alive()

    def _require_no_measurement(self) -> None:
        # a run's hooks and forwards on the teacher would mix into the measurement's (and the reverse)
        if self.measuring():
            raise RankPlanError(f"the {self.plan_config.strategy} plan is still being measured "
                                f"({self.plan_progress}); start when it is shown, or apply another preset")

    def set_ranks(self, changes: dict[str, int | None]) -> RankPlan:
        """Edit the plan module by module; None keeps a module dense."""
        ranks = dict(self.current_plan().ranks)
        for name, rank in changes.items():
            if rank is None:
                ranks.pop(name, None)
            else:
                ranks[name] = int(rank)
        plan = RankPlan(ranks, "custom", None, self.plan.model_type)
        plan.notes = summarize(plan, self.shape).warnings  # validates before it replaces the plan
        self.plan = plan
        return plan

    def load_plan_json(self, text: str) -> RankPlan:
        plan = RankPlan.from_json(text)
        self.ensure_loaded()
        summarize(plan, self.shape)  # raises for a plan made for another model
        self.plan = plan
        return plan

    def summary(self):
        return summarize(self.current_plan(), self.shape)

    # ---- runs ----

    def run_config(self) -> RunConfig:
        return RunConfig(model=self.model_config, calibration=self.calibration, plan=self.plan_config,
                         distill=self.distill, eval=self.eval, heal=self.heal, seed=self.seed).validate()

    def apply_recipe(self, config: RunConfig) -> None:
        """Make a recipe's settings the studio's; each step's forms show them when it is next opened.

        The plan is made again from the recipe's plan settings. A recipe for another model (or the same one in
        another device, precision or revision) unloads the teacher: the next step that needs it loads the
        recipe's model.

        Args:
            config: the recipe, e.g. from RunConfig.load or a run folder's config.json.
        Raises:
            ConfigError: invalid settings, remote code this app does not allow, or a local path outside the
                allowed folders; the studio is left as it was.
        """
        config.validate()
        if config.model.trust_remote_code and not self.allow_remote_code:
            raise ConfigError("this recipe trusts remote code, which is disabled; start the app with "
                              "--allow-remote-code to use it")
        model = replace(config.model, name=self.confine(config.model.name))
        calibration = replace(config.calibration, source=self.confine(config.calibration.source))
        held_out = replace(config.eval, text=self.confine(config.eval.text), audio=self.confine(config.eval.audio))
        with self._plan_lock, self._load_lock:  # the order current_plan takes them in (a plan may load the model)
            if model != self.model_config:
                self.loaded, self.shape = None, None
            self.model_config, self.calibration, self.plan_config, self.plan = model, calibration, config.plan, None
            self.distill, self.eval, self.heal, self.seed = config.distill, held_out, config.heal, config.seed
            self.recipe_version += 1

    def hand_made_plan(self) -> RankPlan | None:
        """The plan when the plan settings alone do not reproduce it (ranks edited by hand, a plan JSON loaded)."""
        plan = self.plan
        return plan if plan is not None and plan is not self._preset_plan else None

    def start_distillation(self) -> Job:
        self._require_no_measurement()
        loaded = self.ensure_loaded()
        plan = self.current_plan()
        if not plan.ranks:
            raise RankPlanError("the plan compresses nothing; choose a preset or lower some ranks first")
        config = self.run_config()
        return self.jobs.submit("compression", config, compression_work(config, loaded=loaded, plan=plan,
                                                                        teacher_ppl=self._teacher_ppl(config)))

    def _teacher_ppl(self, config: RunConfig) -> float | None:
        return self.teacher_ppl.get((config.model.name, config.eval.text, config.eval.tokens, config.eval.seq_len))

    def start_sweep(self, reductions: list[float]) -> Job:
        if not reductions:
            raise ConfigError("choose at least one reduction level for the sweep")
        self._require_no_measurement()
        loaded = self.ensure_loaded()
        config = self.run_config()
        return self.jobs.submit("sweep", config, sweep_work(config, sorted(reductions), self.jobs.runs_root, loaded,
                                                            self._teacher_ppl(config)), label="sweep")

    def resume(self, run_dir: Path) -> Job:
        """Continue an interrupted run in its own folder, on the model it was started with."""
        self._require_no_measurement()
        config, _ = resumable(run_dir)
        if self.loaded is None or self.loaded.name != config.model.name:
            self.load(config.model.name, config.model.trust_remote_code)
        config, work = resume_work(run_dir, loaded=self.loaded)
        return self.jobs.submit("compression", config, work, run_dir=Path(run_dir))

    def current_student(self) -> Student | None:
        """The student of the newest finished run, unless one was chosen explicitly since."""
        job = self.jobs.latest()
        if job and not job.running and job.result and job.id != self._student_job and self.loaded is not None:
            self._student_job = job.id
            # a sweep leaves a list of (run folder, result); its last run is the newest student
            run_dir, result = job.result[-1] if isinstance(job.result, list) else (job.run_dir, job.result)
            if result.run.applied.ranks:
                self.student = Student(result.run.student, self.loaded.tokenizer,
                                       f"{run_dir.name} ({result.metrics.reduction:.1%} fewer)", run_dir,
                                       self.loaded.feature_extractor)
        return self.student

    def export_record(self, student: Student) -> dict:
        """What an export of `student` records, as `lillama compress` does: its run's config, metrics and plan."""
        if student.run_dir is None:
            return {}
        run = read_run(student.run_dir)
        plan = student.run_dir / "plan.json"
        return {"config": run.config.to_dict() if run.config else None, "metrics": run.metrics,
                "plan": json.loads(plan.read_text()) if plan.exists() else None, "run_dir": str(student.run_dir)}

    def load_student(self, run_dir: Path) -> Student:
        folder = Path(run_dir) / STUDENT_DIR
        device = self.loaded.device if self.loaded else "cpu"
        # A student of a teacher with its own code carries that code: it opens as the teacher did.
        model, tokenizer = load_compressed(folder, device, trust_remote_code=self.model_config.trust_remote_code)
        self.student = Student(model, tokenizer, Path(run_dir).name, Path(run_dir), load_feature_extractor(folder))
        latest = self.jobs.latest()
        self._student_job = latest.id if latest else None
        return self.student
