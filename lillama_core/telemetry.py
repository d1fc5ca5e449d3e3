"""Device memory, throughput and ETA. NVML gives the whole device's use; torch gives our own peaks."""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass

import torch


@dataclass
class MemorySample:
    used_bytes: int | None
    total_bytes: int | None
    peak_allocated_bytes: int | None
    peak_reserved_bytes: int | None


class MemoryMonitor:
    """Reads device memory; on CPU reports the process's peak resident memory instead."""

    def __init__(self, device: torch.device):
        self.device = device
        self._handle = None
        if device.type == "cuda":
            try:
                import pynvml

                pynvml.nvmlInit()
                index = device.index if device.index is not None else torch.cuda.current_device()
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                self._nvml = pynvml
            except Exception:  # NVML missing or not permitted: torch's own numbers still work
                self._handle = None

    def sample(self) -> MemorySample:
        if self.device.type != "cuda":
            return MemorySample(None, None, peak_rss_bytes(), None)
        used = total = None
        if self._handle is not None:
            info = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
            used, total = int(info.used), int(info.total)
        else:
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free
        return MemorySample(used, total, torch.cuda.max_memory_allocated(self.device),
                            torch.cuda.max_memory_reserved(self.device))

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Throughput:
    """Tokens per second as an exponential moving average over steps, robust to one slow step."""

    def __init__(self, smoothing: float = 0.2):
        self.smoothing = smoothing
        self.rate = 0.0
        self._last = None

    def update(self, tokens: int) -> float:
        now = time.perf_counter()
        if self._last is not None:
            instant = tokens / max(now - self._last, 1e-9)
            self.rate = instant if self.rate == 0 else (1 - self.smoothing) * self.rate + self.smoothing * instant
        self._last = now
        return self.rate

    def pause(self) -> None:
        """Forget the last mark so time spent outside steps (evaluation, layer set-up) is not counted."""
        self._last = None


def eta_seconds(elapsed: float, done: int, total: int) -> float:
    if done <= 0:
        return float("nan")
    return elapsed / done * max(total - done, 0)
