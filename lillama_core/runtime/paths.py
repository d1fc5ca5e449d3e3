"""Where the engine keeps and finds files: its home folder ($LILLAMA_HOME) and the assets shipped
with the project."""

from __future__ import annotations

import os
from pathlib import Path


def lillama_home() -> Path:
    return Path(os.environ.get("LILLAMA_HOME", Path.home() / ".cache" / "lillama-studio"))


ASSETS = Path(os.environ.get("LILLAMA_ASSETS", Path(__file__).resolve().parents[2] / "assets"))
