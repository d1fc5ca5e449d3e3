"""Per-layer checkpoints, so a run killed mid-way resumes from its last finished layer.

Each finished layer leaves `layer_NNN.safetensors` (the student block's weights) and then
`layer_NNN.json` (its ranks and report). The JSON is written last, through a rename, so a layer
counts as done only once both files are complete.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from ..events import LayerFinished
from ..modeling.shipped import apply_rank_map
from ..runtime.atomic import staged_file, write_text


class LayerCheckpoints:
    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def _paths(self, index: int) -> tuple[Path, Path]:
        stem = self.folder / f"layer_{index:03d}"
        return stem.with_suffix(".safetensors"), stem.with_suffix(".json")

    def save(self, index: int, block: nn.Module, ranks: dict[str, int], report: LayerFinished) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        weights, meta = self._paths(index)
        state = {k: v.detach().contiguous().cpu() for k, v in block.state_dict().items()}
        with staged_file(weights) as staged:
            save_file(state, str(staged))
        write_text(meta, json.dumps({"ranks": ranks, "report": asdict(report)}))

    def restore(self, index: int, teacher_block: nn.Module) -> tuple[nn.Module, dict[str, int], LayerFinished] | None:
        """The saved student block (built on a copy of the teacher block), its ranks and report."""
        weights, meta = self._paths(index)
        if not meta.exists():
            return None
        saved = json.loads(meta.read_text())
        block = apply_rank_map(copy.deepcopy(teacher_block), saved["ranks"])
        block.load_state_dict(load_file(str(weights)))
        return block, saved["ranks"], LayerFinished(**saved["report"])
