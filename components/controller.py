"""The app's handlers, as named methods on one controller over the Studio (as LlamaBoard's Runner holds
run_eval / set_abort / monitor): the panels' build() functions only lay out components and adapt gradio
inputs to the settings dataclasses below, so the handlers can be called and tested without a browser."""

from __future__ import annotations

import queue
import shlex
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import gradio as gr

from lillama_core.chat import SamplingConfig, stream_chat
from lillama_core.cli import compress_command
from lillama_core.config import RunConfig
from lillama_core.errors import ConfigError
from lillama_core.metrics.generation import generation_quality
from lillama_core.metrics.zeroshot import score_pair, score_tasks, task_list
from lillama_core.modeling.quantize import MODES, quantize_weights
from lillama_core.planning.strategies import strategy_named
from lillama_core.runtime.graphs import GraphDecoder

from . import chat, evaluate, ranks
from .charts import accuracy_chart, comparison_chart
from .common import friendly, plot
from .settings import AccuracySettings, ChatFrame, ChatSettings, EvalSettings, PresetSettings
from .studio import Studio

RECIPE_FILE = "recipe.yaml"
PLAN_FILE = "plan.json"  # a hand-edited plan, written beside the recipe; the command line names it
OUT_PLACEHOLDER = "OUT_FOLDER"


def _no_progress(fraction: float, desc: str = "") -> None:
    pass


class Controller:
    """Chat, evaluation and rank presets for every browser tab, over one Studio."""

    def __init__(self, studio: Studio):
        self.studio = studio
        self._chat_stops: dict[str, threading.Event] = {}  # per browser session
        self._graphs: dict[str, GraphDecoder] = {}  # per side; kept between turns: compiled once per shape
        self._graphs_lock = threading.Lock()

    # ---- chat ----

    def respond(self, message: str, teacher_msgs: list[dict], student_msgs: list[dict],
                settings: ChatSettings) -> Iterator[ChatFrame]:
        """Stream the teacher's and the student's answers to `message`, side by side.

        Args:
            message: the user's prompt; a blank one yields nothing.
            teacher_msgs, student_msgs: each side's conversation so far (chatbot messages).
            settings: sampling shared by both models, the session that may stop them, and whether they decode
                through compiled static-cache steps (the first answer of each shape shows WARM_UP_NOTE).

        Returns:
            An iterator of frames; closing it early (the browser went away) stops both decodings.

        Raises:
            gradio.Error: the teacher cannot be loaded, or it is a speech model.
        """
        if not (message or "").strip():
            return
        studio = self.studio
        try:
            loaded = studio.ensure_loaded()
        except Exception as exc:
            raise gr.Error(friendly(exc)) from None
        if not loaded.task.chats:
            raise gr.Error("this is a speech model: it transcribes audio rather than chats. Use 'transcribe audio "
                           "with both' below, or step 5 (perplexity and word error rate on held-out clips)")
        student = studio.current_student()
        stop = self._chat_stops[settings.session] = threading.Event()
        sides = {"teacher": (loaded.model, loaded.tokenizer, chat.plain_history(teacher_msgs))}
        if student:
            sides["student"] = (student.model, student.tokenizer, chat.plain_history(student_msgs))
        sides = {side: (*args, self._graph_decoder(side, args[0]) if settings.graphs else None)
                 for side, args in sides.items()}
        updates = self._produce(message, settings.sampling, sides, stop)
        try:
            yield from self._frames(message, teacher_msgs, student_msgs, student is not None, len(sides), updates)
        finally:
            # also when the browser goes away mid-answer and gradio closes the generator: no orphan decoding
            stop.set()
            if self._chat_stops.get(settings.session) is stop:
                self._chat_stops.pop(settings.session)

    def _graph_decoder(self, side: str, model) -> GraphDecoder:
        """The side's compiled decoder, kept between turns; a new model (another student) gets a new one."""
        with self._graphs_lock:
            decoder = self._graphs.get(side)
            if decoder is None or decoder.model is not model:
                decoder = self._graphs[side] = GraphDecoder(model)
            return decoder

    @staticmethod
    def _produce(message: str, sampling: SamplingConfig, sides: dict, stop: threading.Event) -> queue.Queue:
        """Start one decoding thread per side; each puts (side, update, None), (side, None, error) and
        finally (side, None, "done") on the returned queue."""
        updates: queue.Queue = queue.Queue()

        def produce(side, model, tokenizer, history, graphs):
            try:
                for update in stream_chat(model, tokenizer, message, sampling, history, stop, graphs):
                    updates.put((side, update, None))
            except Exception as exc:  # shown in that model's pane; the other keeps going
                updates.put((side, None, friendly(exc)))
            updates.put((side, None, "done"))

        for side, args in sides.items():
            threading.Thread(target=produce, args=(side, *args), daemon=True).start()
        return updates

    @staticmethod
    def _frames(message, teacher_msgs, student_msgs, has_student: bool, running: int,
                updates: queue.Queue) -> Iterator[ChatFrame]:
        teacher_msgs = teacher_msgs + [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        student_msgs = student_msgs + [{"role": "user", "content": message},
                                       {"role": "assistant", "content": "" if has_student else chat.NO_STUDENT}]
        latest = {"teacher": None, "student": None}

        def frame(done: bool = False) -> ChatFrame:
            return ChatFrame(teacher_msgs, student_msgs, chat.speed_line(latest["teacher"]),
                             chat.speed_line(latest["student"]), done)

        yield frame()
        while running:
            side, update, note = updates.get()
            msgs = teacher_msgs if side == "teacher" else student_msgs
            if note == "done":
                running -= 1
            elif note:
                msgs[-1]["content"] = f"⚠ {note}"
            else:
                latest[side] = update
                msgs[-1]["content"] = update.text
            if updates.empty():  # coalesce bursts so the browser gets one update per batch of tokens
                yield frame()
        yield frame(done=True)

    def stop_chat(self, session: str) -> None:
        """End the answer streaming to this browser session, if any; other tabs' answers go on."""
        stop = self._chat_stops.get(session)
        if stop is not None:
            stop.set()

    # ---- evaluation ----

    def evaluate(self, settings: EvalSettings, progress: Callable = _no_progress):
        """Teacher vs student (and their integer-weight copies) on held-out text or speech clips.

        Args:
            settings: what to score; kept as the studio's evaluation settings.
            progress: called as progress(fraction, desc=...) before each model.

        Returns:
            (the comparison table as a DataFrame, its chart for gr.Plot).

        Raises:
            LillamaError: a path outside the allowed folders, unreadable held-out data, a model that fails.
        """
        studio = self.studio
        loaded = studio.ensure_loaded()
        studio.eval = replace(studio.eval, text=studio.confine(settings.text) or "default", tokens=int(settings.tokens),
                              seq_len=int(settings.seq_len), audio=studio.confine(settings.audio or "") or "synthetic")
        task = loaded.task
        progress(0, desc="preparing the held-out data")
        config = RunConfig(calibration=studio.calibration, eval=studio.eval)
        held_out, batch = task.held_out(loaded, config), task.eval_batch_size(config)
        batches = (1, 16) if settings.batch16 else (1,)
        key = (studio.model_config.name, studio.eval.text, studio.eval.tokens, studio.eval.seq_len)
        models = self._models_to_score(settings.quantized)
        rows = []
        for i, (label, model, tok) in enumerate(models):
            progress(i / len(models), desc=label)
            rows.append(evaluate.measure(model, tok, task, held_out, label, batch, batches))
            base, _, mode = label.partition(" ")
            if mode:  # integer weights are buffers, not nn.Parameters: the count is the float model's
                rows[-1]["parameters"] = next(r["parameters"] for r in rows if r["model"] == base)
        studio.teacher_ppl[key] = rows[0]["perplexity"]
        return evaluate.table(rows), plot(comparison_chart(rows))

    def accuracy(self, settings: AccuracySettings, progress: Callable = _no_progress):
        """Zero-shot accuracy (lm-eval) of teacher and student, with generation quality when asked.

        Args:
            settings: the tasks, documents per task, instructions for generation quality, and whether later
                distillations score the same tasks.
            progress: called as progress(fraction, desc=...) while scoring.

        Returns:
            (the retention summary as Markdown, the accuracy table, its chart for gr.Plot, the generation table
            update).

        Raises:
            ConfigError: a speech model, or unknown tasks.
        """
        studio = self.studio
        loaded = studio.ensure_loaded()
        if not loaded.task.chats:
            raise ConfigError("zero-shot accuracy scores text models; use the word error rate above for speech")
        chosen = task_list(list(settings.tasks))
        limit = settings.limit or None
        studio.eval = replace(studio.eval, tasks=chosen if settings.every_run else [], limit=limit)
        student = studio.current_student()

        def report(what: str, share: float) -> None:
            progress(share, desc=what)

        if student is None:
            gr.Warning("no student yet: scoring the teacher alone")
            scores = score_tasks(loaded.model, loaded.tokenizer, chosen, limit, on_progress=report)
            zero_shot = {"teacher": [s.to_dict() for s in scores]}
        else:
            record = score_pair(loaded.model, student.model, loaded.tokenizer, chosen, limit, on_progress=report)
            zero_shot = record["zero_shot"]
            evaluate.keep_in_run(student.run_dir, record)
        shown = gr.update(visible=False)
        if settings.prompts:
            models = {"teacher": (loaded.model, loaded.tokenizer)}
            if student is not None:
                models["student"] = (student.model, student.tokenizer)
            quality = {}
            for name, (model, tok) in models.items():
                progress(1.0, desc=f"{name}: greedy answers to {settings.prompts} instructions")
                quality[name] = generation_quality(model, tok, settings.prompts)
            shown = gr.update(value=evaluate.generation_table(quality), visible=True)
        return (evaluate.accuracy_summary(zero_shot), evaluate.accuracy_table(zero_shot),
                plot(accuracy_chart(zero_shot)), shown)

    def _models_to_score(self, quantized: bool) -> list[tuple]:
        loaded = self.studio.loaded
        models = [("teacher", loaded.model, loaded.tokenizer)]
        student = self.studio.current_student()
        if student is None:
            gr.Warning("no student yet: showing the teacher alone")
        else:
            models.append(("student", student.model, student.tokenizer))
        if quantized:
            models += [(f"{label} {mode}", quantize_weights(model, mode), tok)
                       for label, model, tok in models for mode in MODES]
        return models

    # ---- ranks ----

    def apply_preset(self, settings: PresetSettings):
        """Make the plan a preset asks for and make it the studio's plan.

        Args:
            settings: the preset inputs.

        Returns:
            (the totals as HTML, the parameters-per-layer chart for gr.Plot) of the new plan.

        Raises:
            LillamaError: invalid settings, or a model or calibration set that cannot be loaded; the
                previous plan is kept.
        """
        config = settings.plan_config()
        notice = strategy_named(config.strategy).measuring(config)
        if notice and self.studio.loaded is not None:
            gr.Info(notice)
        self.studio.apply_preset(config)
        return ranks.totals_html(self.studio), ranks.chart(self.studio)

    # ---- recipes ----

    def save_recipe(self, folder: Path | None = None) -> list[Path]:
        """Write the current settings as a YAML recipe, and the plan beside it where it was edited by hand.

        Args:
            folder: where to write; a new temporary folder when None (a browser download).
        Returns:
            [recipe.yaml] or [recipe.yaml, plan.json].
        Raises:
            ConfigError: the current settings are invalid.
        """
        folder = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="lillama-recipe-"))
        recipe = folder / RECIPE_FILE
        self.studio.run_config().save(recipe)
        plan = self.studio.hand_made_plan()
        if plan is None:
            return [recipe]
        plan.save(folder / PLAN_FILE)
        return [recipe, folder / PLAN_FILE]

    def cli_command(self) -> str:
        """The `lillama compress` line that reproduces the current settings, with comments on what to fill in.

        Returns:
            Shell text: comment lines, then the command.
        Raises:
            ConfigError: the current settings are invalid, or one has no command-line form.
        """
        plan = PLAN_FILE if self.studio.hand_made_plan() is not None else None
        words = compress_command(self.studio.run_config(), OUT_PLACEHOLDER, plan)
        notes = [f"# {OUT_PLACEHOLDER}: the folder the student is exported to"]
        if plan:
            notes.append(f"# {PLAN_FILE}: the plan, edited by hand or loaded from a file; 'Save recipe' writes it "
                         "beside the recipe")
        return "\n".join([*notes, shlex.join(words)])

    def load_recipe(self, path: str | Path) -> str:
        """Make a recipe file's settings the studio's (every step's forms show them when opened).

        Args:
            path: a .yaml/.yml recipe, or JSON such as a run folder's config.json.
        Returns:
            A one-line note for a toast.
        Raises:
            ConfigError: an unreadable or invalid recipe, or one this app may not run; nothing changes.
        """
        config = RunConfig.load(path)
        unloads = self.studio.loaded is not None and config.model != self.studio.model_config
        self.studio.apply_recipe(config)
        note = f"recipe loaded: {config.model.name}, {config.plan.strategy} plan"
        return note + (" (the model loads when a step needs it)" if unloads else "")

    def load_run_recipe(self, name: str) -> str:
        """Load the recipe a run in the runs folder was made with (its config.json), as load_recipe does.

        Args:
            name: the run folder's name.
        Returns:
            A one-line note for a toast.
        Raises:
            LillamaError: no run picked, a name outside the runs folder, or a run without a readable recipe.
        """
        if not name:
            raise ConfigError("pick a run first")
        return self.load_recipe(self.studio.jobs.run_folder(name) / "config.json")
