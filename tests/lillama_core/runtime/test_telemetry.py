import mmap
import subprocess
import sys
from pathlib import Path

import torch

from lillama_core.runtime.telemetry import MemoryMonitor, rss_bytes

ROOT = Path(__file__).resolve().parents[3]
MIB = 2**20


def test_cpu_memory_is_resident_now_with_the_runs_peak_since_reset():
    monitor = MemoryMonitor(torch.device("cpu"))
    monitor.reset_peak()
    before = monitor.sample()
    # A fresh anonymous mapping, written so every page is resident: a plain bytes object may reuse heap pages
    # an earlier test left resident, and then the resident size does not move.
    block = mmap.mmap(-1, 256 * MIB)
    block.write(b"\x01" * (256 * MIB))
    during = monitor.sample()
    block.close()  # unmapped: the pages leave at once
    after = monitor.sample()
    assert during.rss_bytes - before.rss_bytes > 200 * MIB
    assert during.rss_bytes - after.rss_bytes > 200 * MIB  # current memory falls again ...
    assert after.peak_allocated_bytes == during.rss_bytes  # ... the run's peak does not
    assert after.used_bytes is None  # no device numbers on a CPU
    monitor.reset_peak()  # a new run starts from what is resident now, not from the server's lifetime peak
    fresh = monitor.sample()
    assert fresh.peak_allocated_bytes == fresh.rss_bytes < during.rss_bytes
    assert abs(rss_bytes() - fresh.rss_bytes) < 64 * MIB


# Windows has neither `fcntl` nor `resource`. Every import statement in lillama_core's own modules is refused
# them (third-party libraries pick their platform's modules themselves: psutil reads `resource` on Linux only).
WITHOUT_UNIX_MODULES = """
import builtins, importlib, pkgutil, sys, tempfile
from pathlib import Path

real_import = builtins.__import__

def windows_like_import(name, globals=None, locals=None, fromlist=(), level=0):
    importer = (globals or {}).get("__name__", "")
    if level == 0 and name.split(".")[0] in ("fcntl", "resource") and importer.startswith("lillama_core"):
        raise ModuleNotFoundError(f"No module named {name!r} (imported by {importer})", name=name)
    return real_import(name, globals, locals, fromlist, level)

builtins.__import__ = windows_like_import
import lillama_core
for module in pkgutil.walk_packages(lillama_core.__path__, "lillama_core."):
    importlib.import_module(module.name)
import torch
from lillama_core.runtime.devicelock import DeviceLock
from lillama_core.errors import JobBusyError
from lillama_core.runtime.telemetry import MemoryMonitor
root = Path(tempfile.mkdtemp())
with DeviceLock("cuda:0", root).acquire("first"):
    try:
        DeviceLock("cuda:0", root).acquire("second")
        raise SystemExit("a second holder got the lock")
    except JobBusyError as exc:
        print(exc)
print(MemoryMonitor(torch.device("cpu")).sample().rss_bytes > 0)
"""


def test_the_engine_imports_and_runs_without_unix_only_modules():
    result = subprocess.run([sys.executable, "-c", WITHOUT_UNIX_MODULES], cwd=ROOT, capture_output=True, text=True,
                            check=False, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    busy, memory = result.stdout.strip().splitlines()[-2:]
    assert busy.startswith("cuda:0 is busy with first (pid ") and memory == "True"
