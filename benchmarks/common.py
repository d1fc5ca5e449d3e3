"""Shared plumbing: environment facts, JSON records, a peak-memory sampler."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import torch

from lillama_core.runtime.telemetry import rss_bytes

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(os.environ.get("LILLAMA_BENCH_RESULTS", ROOT / "benchmarks" / "results"))
DOCS_DIR = ROOT / "docs"


# ---- environment ----


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


_ENV: dict | None = None


def environment(device: torch.device) -> dict:
    """Versions and hardware, attached to every record."""
    global _ENV
    if _ENV is None:
        import transformers

        _ENV = {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu": cpu_name(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "git_commit": git_commit(),
        }
    env = dict(_ENV)
    env["device"] = str(device)
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


# ---- records ----


def write_record(suite: str, record: dict, results_dir: Path | None = None) -> Path:
    """Append one record to `<results>/<suite>.jsonl` (one line per run, flushed at once)."""
    folder = Path(results_dir or RESULTS_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    record = {"id": uuid.uuid4().hex[:12], "suite": suite, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
              **record}
    path = folder / f"{suite}.jsonl"
    line = json.dumps(record, default=_json_default)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return path


def _json_default(value):
    if isinstance(value, (torch.device, torch.dtype)):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and value != value:
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_records(results_dir: Path | None = None) -> list[dict]:
    """Every record of every suite; torn lines (a killed run) are skipped."""
    folder = Path(results_dir or RESULTS_DIR)
    records = []
    for path in sorted(folder.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return records


# ---- memory ----


def host_memory_bytes() -> dict[str, int]:
    """This process's resident memory split into anonymous (its own allocations) and file-backed pages
    (memory-mapped checkpoints: read on first touch, reclaimable). Linux only; empty elsewhere."""
    try:
        status = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    fields = {"RssAnon": "anon", "RssFile": "file"}
    return {fields[k]: int(v.split()[0]) * 1024 for k, _, v in (line.partition(":") for line in status)
            if k in fields}


def maxrss_bytes() -> int:
    """This process's lifetime peak resident memory: ru_maxrss on Unix, the peak working set on Windows."""
    try:
        import resource
    except ImportError:  # Windows has no `resource`; psutil reads the same high-water mark there
        return psutil.Process().memory_info().peak_wset
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class PeakMemory:
    """Peak memory over a `with` block. On CPU, resident memory is sampled every 20 ms (ru_maxrss
    is a process-lifetime high-water mark, useless once a bigger run has happened); on CUDA,
    torch's own allocator peak is used. `start_bytes` is the level when the block began. With `host`,
    the same sampler also records this process's anonymous and file-backed host memory
    (`host_start`, `host_peak`: see host_memory_bytes), on any device."""

    def __init__(self, device: torch.device, interval: float = 0.02, host: bool = False):
        self.device, self.interval, self.host = device, interval, host
        self.start_bytes = self.peak_bytes = 0
        self.host_start: dict[str, int] = {}
        self.host_peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
        else:
            self.start_bytes = self.peak_bytes = rss_bytes()
        if self.host:
            self.host_start = host_memory_bytes()
        if self.device.type != "cuda" or self.host:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            if self.device.type != "cuda":
                self.peak_bytes = max(self.peak_bytes, rss_bytes())
            if self.host:
                for key, value in host_memory_bytes().items():
                    self.host_peak[key] = max(self.host_peak.get(key, 0), value)
            self._stop.wait(self.interval)

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak_bytes = max(self.peak_bytes, rss_bytes())

    def as_dict(self, prefix: str) -> dict:
        kind = "cuda_allocated" if self.device.type == "cuda" else "rss"
        return {f"{prefix}_peak_{kind}_bytes": self.peak_bytes,
                f"{prefix}_start_{kind}_bytes": self.start_bytes,
                f"{prefix}_peak_delta_bytes": self.peak_bytes - self.start_bytes}
