"""Lillama Studio: the Gradio workbench. `python app.py` (or `make app`) serves it on 127.0.0.1:7860."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import gradio as gr  # noqa: E402

from components import chat, distill, evaluate, explore, model_data, ranks  # noqa: E402
from components.charts import run_progress  # noqa: E402
from components.controller import Controller  # noqa: E402
from components.studio import Studio  # noqa: E402
from components.theme import css, header_html, theme  # noqa: E402
from lillama_core.config import ModelConfig  # noqa: E402
from lillama_core.config_args import add_field_flag  # noqa: E402
from lillama_core.errors import LillamaError  # noqa: E402
from lillama_core.jobs import JobManager  # noqa: E402
from lillama_core.runtime.paths import lillama_home  # noqa: E402

LOOPBACK = ("127.0.0.1", "localhost", "::1")

STEPS = ["1 · Model & data", "2 · Ranks", "3 · Distill (live)", "4 · Chat", "5 · Evaluate & export", "6 · Explore"]


def header_chips(studio: Studio) -> list[tuple[str, bool]]:
    chips = [(f"model: {studio.loaded.name if studio.loaded else studio.model_config.name}", False)]
    device = str(studio.loaded.device) if studio.loaded else studio.model_config.device
    chips.append((("GPU " + device) if device.startswith("cuda") else "CPU", False))
    if studio.plan is not None and studio.shape is not None:
        chips.append((f"plan: {studio.summary().reduction:.1%} fewer params", False))
    job = studio.jobs.active()
    if job is not None:
        progress = run_progress(job.events)
        chips.append((f"{job.kind} running · {100 * progress['fraction']:.0f}%", True))
    elif studio.student is not None:
        chips.append((f"student: {studio.student.label}", False))
    return chips


def job_status(studio: Studio) -> dict:
    """The newest job in plain JSON, for scripts and tests driving the app through its API."""
    job = studio.jobs.latest()
    if job is None:
        return {"status": "idle"}
    progress = run_progress(job.events)
    return {"id": job.id, "kind": job.kind, "status": job.status, "message": job.message,
            "run_dir": str(job.run_dir), "fraction": progress["fraction"], "events": len(job.events),
            "student": studio.current_student().label if studio.current_student() else None}


def build_app(studio: Studio, uploads_root: Path) -> gr.Blocks:
    controller = Controller(studio)  # the handlers of chat, evaluation and presets; one per app
    with gr.Blocks(title="Lillama Studio") as demo:
        header = gr.HTML(header_html(header_chips(studio)))
        panels = {}
        with gr.Tabs() as tabs:
            builders = [
                ("model", lambda: model_data.build(studio, uploads_root)),
                ("ranks", lambda: ranks.build(controller)),
                ("distill", lambda: distill.build(controller)),
                ("chat", lambda: chat.build(controller)),
                ("evaluate", lambda: evaluate.build(controller)),
                ("explore", lambda: explore.build(controller)),
            ]
            tab_objects = {}
            for title, (key, builder) in zip(STEPS, builders, strict=True):
                with gr.Tab(title, id=key) as tab:
                    panels[key] = builder()
                tab_objects[key] = tab
        for key, tab in tab_objects.items():
            if "on_show" in panels[key]:
                fn, inputs, outputs = panels[key]["on_show"]
                tab.select(fn, inputs, outputs, show_progress="hidden", api_visibility="private")
        # the first step is shown without a select event: a page opened after a recipe was loaded shows it too
        demo.load(*panels["model"]["on_show"], api_visibility="private")
        header_timer = gr.Timer(1.0)
        header_timer.tick(lambda: header_html(header_chips(studio)), None, header, show_progress="hidden",
                          concurrency_limit=None, api_visibility="private")
        def status() -> dict:
            return job_status(studio)

        gr.api(status, api_name="status")
        # A reopened page lands on the live panel when a run is in progress: re-attaching is automatic.
        demo.load(lambda: gr.Tabs(selected="distill") if studio.jobs.active() else gr.skip(), None, tabs,
                  api_visibility="private")
    return demo


def auth_pair(text: str) -> tuple[str, str]:
    """USER:PASS as (user, password); the password may contain colons.

    Raises:
        argparse.ArgumentTypeError: no colon, or an empty user or password (argparse prints it as one line).
    """
    user, colon, password = text.partition(":")
    if not colon or not user.strip() or not password:
        raise argparse.ArgumentTypeError("expected USER:PASS with a non-empty user name and password")
    return user.strip(), password


def auth_file(path: str) -> list[tuple[str, str]]:
    """The logins of a file of user:pass lines.

    Raises:
        argparse.ArgumentTypeError: the file cannot be read, holds no login, or has a malformed line (named
            by its number, never echoed, since it may hold a password).
    """
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {exc.strerror or exc}") from None
    logins = []
    for number, line in enumerate(lines, 1):
        if line.strip() and not line.lstrip().startswith("#"):
            try:
                logins.append(auth_pair(line.rstrip("\r\n")))
            except argparse.ArgumentTypeError:
                raise argparse.ArgumentTypeError(f"{path}, line {number}: expected user:pass") from None
    if not logins:
        raise argparse.ArgumentTypeError(f"{path} holds no user:pass line")
    return logins


def exposure_warning(args: argparse.Namespace) -> str | None:
    """A loud warning when others can reach the app and no login is asked for; None otherwise."""
    if (not args.share and args.host in LOOPBACK) or args.auth or args.auth_file:
        return None
    where = "on a public gradio.live URL (--share)" if args.share else f"to other machines (--host {args.host})"
    bar = "!" * 100
    return (f"{bar}\nWARNING: this app is published {where} WITHOUT A PASSWORD: anyone who reaches it can run jobs "
            f"on this machine,\nuse its accelerator and read its exports. Add --auth USER:PASS or --auth-file FILE."
            f"\n{bar}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Lillama Studio")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true",
                        help="also open a public gradio.live link (anyone with it can use the app)")
    parser.add_argument("--auth", type=auth_pair, action="append", default=[], metavar="USER:PASS",
                        help="ask visitors for this user name and password (repeatable); use it with --share or "
                             "a --host other than this machine. The password shows in the process list: "
                             "--auth-file keeps it out")
    parser.add_argument("--auth-file", type=auth_file, default=[], metavar="FILE",
                        help="a file of user:pass lines, one login each (blank lines and # comments skipped)")
    add_field_flag(parser, "model.name", "--model", help="model loaded at start")
    add_field_flag(parser, "model.device", "--device")
    add_field_flag(parser, "model.offload", "--offload")
    parser.add_argument("--runs-dir", default=None, help=f"run folders (default {lillama_home() / 'runs'})")
    parser.add_argument("--exports-dir", default="exports", help="where exports are written")
    parser.add_argument("--allow-remote-code", action="store_true",
                        help="allow models that need code from their repository (off by default)")
    parser.add_argument("--data-dir", action="append", default=[],
                        help="a folder whose files typed paths may name when the app is reachable from other "
                             "machines (--share or a --host other than this machine); repeatable")
    parser.add_argument("--max-upload", default="512mb", help="largest file a browser may upload, e.g. 512mb")
    parser.add_argument("--no-preload", action="store_true", help="do not load the model before serving")
    add_field_flag(parser, "eval.tokens", "--eval-tokens", default=8192, help="held-out tokens scored after each run")
    return parser.parse_args(argv)


def path_roots(args: argparse.Namespace, uploads: Path) -> list[Path] | None:
    """Where typed paths may point. On this machine only: anywhere the user can read. Reachable from others:
    only uploads, exports and the --data-dir folders, so a visitor cannot read the host's files."""
    if not args.share and args.host in LOOPBACK:
        return None
    return [uploads, Path(args.exports_dir), *(Path(d) for d in args.data_dir)]


def main(argv=None) -> None:
    args = parse_args(argv)
    uploads = lillama_home() / "uploads"
    studio = Studio(JobManager(Path(args.runs_dir) if args.runs_dir else None), Path(args.exports_dir).resolve(),
                    ModelConfig(name=args.model, device=args.device, offload=args.offload),
                    allow_remote_code=args.allow_remote_code,
                    path_roots=path_roots(args, uploads))
    studio.eval = replace(studio.eval, tokens=args.eval_tokens, seq_len=min(studio.eval.seq_len, args.eval_tokens))
    if not args.no_preload:
        print(f"loading {args.model} …", flush=True)
        try:
            studio.load(args.model)
            # a provisional plan at once; the measured default plan replaces it when ready (cached across launches)
            studio.start_planning()
        except LillamaError as exc:
            print(f"could not load {args.model}: {exc}; pick another model in the app", file=sys.stderr)
    warning = exposure_warning(args)
    if warning:
        print(warning, file=sys.stderr)
    if studio.path_roots is not None:
        print("typed paths are limited to: " + ", ".join(str(p) for p in studio.path_roots), file=sys.stderr)
    demo = build_app(studio, uploads)
    demo.queue(default_concurrency_limit=4)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share,
                auth=(args.auth + args.auth_file) or None, theme=theme(), css=css(), ssr_mode=False,
                max_file_size=args.max_upload, allowed_paths=[str(studio.exports_root)], show_error=True)


if __name__ == "__main__":
    main()
