"""Where a run keeps its cached activations (each block's inputs and outputs for every calibration token):
on the accelerator when they fit comfortably, else in host memory, else in memory-mapped files on disk.

Disk-backed tensors are ordinary CPU tensors whose pages live in a file (`torch.from_file`, shared), so
every piece of the engine uses them unchanged and the operating system pages them in and out. The file is
unlinked as soon as it is mapped: nothing is left behind, even if the process is killed.

For a run on a GPU, host-memory activations are page-locked (pinned) when they take a modest share of the host's
memory, so the batches copied to the GPU with `non_blocking=True` are real asynchronous DMA transfers instead of
a staging copy through a pageable buffer.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import torch

ACCELERATOR_SHARE = 0.4  # of the accelerator's free memory; the rest is for the blocks being trained
HOST_SHARE = 0.5  # of the host's available memory
PINNED_SHARE = 0.25  # of the host's available memory: page-locked pages cannot be swapped out or reclaimed


def available_host_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None (unknown: assume it fits)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class ActivationStore:
    def __init__(self, kind: str, device: torch.device, folder: Path | None = None, pinned: bool = False):
        self.kind, self.folder = kind, folder
        self.device = device if kind == "accelerator" else torch.device("cpu")
        self.pinned = pinned and kind == "host"

    @classmethod
    def choose(cls, preference: str, device: torch.device, bytes_needed: int, folder: Path) -> ActivationStore:
        """`preference` as DistillConfig.activations; "auto" takes the fastest place with room for `bytes_needed`.
        Host memory is pinned for a CUDA run when `bytes_needed` is within PINNED_SHARE of the available memory."""
        available = available_host_bytes()
        if preference == "auto":
            if device.type == "cuda" and bytes_needed < ACCELERATOR_SHARE * torch.cuda.mem_get_info(device)[0]:
                preference = "accelerator"
            else:
                preference = "disk" if available is not None and bytes_needed > HOST_SHARE * available else "host"
        if preference == "accelerator" and device.type == "cpu":  # the host is the accelerator
            preference = "host"
        pinned = device.type == "cuda" and available is not None and bytes_needed <= PINNED_SHARE * available
        return cls(preference, device, folder, pinned)

    def describe(self) -> str:
        host = "in pinned host memory" if self.pinned else "in host memory"
        return {"accelerator": f"on {self.device}", "host": host,
                "disk": f"in memory-mapped files under {self.folder}"}[self.kind]

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if self.kind != "disk":
            return torch.empty(shape, dtype=dtype, device=self.device, pin_memory=self.pinned)
        self.folder.mkdir(parents=True, exist_ok=True)
        handle, path = tempfile.mkstemp(prefix="activations-", dir=self.folder)
        os.close(handle)
        try:
            return torch.from_file(path, shared=True, size=math.prod(shape), dtype=dtype).view(shape)
        finally:
            os.unlink(path)  # the mapping keeps the pages; the name is not needed

    def empty_like(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.empty(tuple(tensor.shape), tensor.dtype)

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        out = self.empty_like(tensor)
        out.copy_(tensor)
        return out

    def cat(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        """The pieces joined along the first dimension, written straight into this storage."""
        out = self.empty((sum(p.shape[0] for p in pieces), *pieces[0].shape[1:]), pieces[0].dtype)
        position = 0
        for piece in pieces:
            out[position: position + piece.shape[0]] = piece.to(out.device)
            position += piece.shape[0]
        return out
