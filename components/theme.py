"""Theme, CSS and header for the app."""

from __future__ import annotations

import html
from pathlib import Path

import gradio as gr

from lillama_core.runtime.paths import ASSETS

CSS_PATH = ASSETS / "ui" / "studio.css"
LOGO_PATH = ASSETS / "ui" / "logo.svg"


def theme() -> gr.themes.Base:
    return gr.themes.Soft(primary_hue="violet", secondary_hue="sky", neutral_hue="slate",
                          radius_size="lg", text_size="md")


def css() -> str:
    return CSS_PATH.read_text()


def header_html(chips: list[tuple[str, bool]]) -> str:
    """The title bar: logo, name and status chips (model, device, plan, run)."""
    logo = Path(LOGO_PATH).read_text()
    chip_html = "".join(f"<span class='chip{' live' if live else ''}'>{html.escape(text)}</span>"
                        for text, live in chips)
    return f"<div id='studio-header'>{logo}<span class='title'>Lillama Studio</span>" \
           f"<span class='meta'>{chip_html}</span></div>"
