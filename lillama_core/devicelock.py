"""One compression at a time per accelerator, across processes: the app, `lillama compress` and scripts
all take the same advisory lock file, so a second run is refused instead of running the card out of
memory. CPUs are not locked: two CPU runs only share the cores."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .errors import JobBusyError
from .models import lillama_home


class DeviceLock:
    def __init__(self, device: str, root: Path | None = None):
        self.device = device
        self.path = Path(root or lillama_home() / "locks") / f"{device.replace(':', '-')}.lock"
        self._handle = None

    @property
    def needed(self) -> bool:
        return not self.device.startswith("cpu")

    def acquire(self, holder: str) -> "DeviceLock":
        """Take the lock or raise JobBusyError naming who holds it; a no-op on the CPU."""
        if not self.needed:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise JobBusyError(f"{self.device} is busy with {owner}; wait for it to finish or stop it") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{holder} (pid {os.getpid()})")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)  # the lock, not the file: unlinking would race a new holder
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "DeviceLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
