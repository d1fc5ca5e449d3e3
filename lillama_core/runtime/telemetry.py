"""Device memory, throughput and ETA. NVML gives the whole device's use; torch gives our own peaks; psutil
gives host memory on every platform (the `resource` module exists on Unix only)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import psutil
import torch


@dataclass
class MemorySample:
    used_bytes: int | None
    total_bytes: int | None
    peak_allocated_bytes: int | None
    peak_reserved_bytes: int | None
    rss_bytes: int | None = None  # CPU runs: this process's resident memory now


def rss_bytes() -> int:
    """This process's resident memory now, in bytes."""
    return psutil.Process().memory_info().rss


class MemoryMonitor:
    """Reads device memory. On CPU it reports the process's resident memory now (`rss_bytes`) and, as
    `peak_allocated_bytes`, the highest of its readings since reset_peak(): the run's peak as sampled, not
    the process's lifetime high-water mark, which an earlier, bigger run in the same server would hold."""

    def __init__(self, device: torch.device):
        self.device = device
        self._handle = None
        self._rss_peak = 0
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
            rss = rss_bytes()
            self._rss_peak = max(self._rss_peak, rss)
            return MemorySample(None, None, self._rss_peak, None, rss)
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
        self._rss_peak = 0


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
