"""One compression at a time per accelerator, across processes: the app, `lillama compress` and scripts
all take the same lock file, so a second run is refused instead of running the card out of memory.
CPUs are not locked: two CPU runs only share the cores.

The lock is filelock's (flock on Unix, msvcrt on Windows): the system drops it when its holder dies, so a
crashed run never leaves the device locked. The holder's name sits in a file beside it, because a lock file
is opened (and on Windows locked) by the lock itself and cannot be read by those it refuses."""

from __future__ import annotations

import os
from contextlib import suppress
from pathlib import Path

from filelock import FileLock, Timeout

from ..errors import JobBusyError
from .paths import lillama_home


class DeviceLock:
    def __init__(self, device: str, root: Path | None = None):
        self.device = device
        self.path = Path(root or lillama_home() / "locks") / f"{device.replace(':', '-')}.lock"
        self.holder_path = self.path.with_suffix(".holder")
        self._lock: FileLock | None = None

    @property
    def needed(self) -> bool:
        return not self.device.startswith("cpu")

    def acquire(self, holder: str) -> DeviceLock:
        """Take the lock without waiting, or raise JobBusyError naming who holds it; a no-op on the CPU."""
        if not self.needed:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Not thread-local: the app takes the lock in a request thread and the job's own thread releases it
        # (a thread-local FileLock ignores a release from another thread; only garbage collection would free it).
        lock = FileLock(self.path, thread_local=False)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise JobBusyError(f"{self.device} is busy with {self._holder()}; wait for it to finish or stop "
                               "it") from None
        self.holder_path.write_text(f"{holder} (pid {os.getpid()})", encoding="utf-8")
        self._lock = lock
        return self

    def _holder(self) -> str:
        try:
            return self.holder_path.read_text(encoding="utf-8").strip() or "another process"
        except OSError:  # between a holder's release and the next one's note
            return "another process"

    def release(self) -> None:
        if self._lock is not None:
            # The note goes before the lock: once the lock is free, the note belongs to the next holder.
            with suppress(OSError):
                self.holder_path.unlink()
            self._lock.release()
            self._lock = None

    def __enter__(self) -> DeviceLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
