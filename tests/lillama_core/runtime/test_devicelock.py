import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from lillama_core.config import RunConfig
from lillama_core.errors import JobBusyError
from lillama_core.jobs import JobManager
from lillama_core.runtime.devicelock import DeviceLock


def test_one_holder_per_accelerator_and_none_on_the_cpu(tmp_path):
    first = DeviceLock("cuda:0", tmp_path).acquire("`lillama compress` into run-a")
    with pytest.raises(JobBusyError, match=r"cuda:0 is busy with `lillama compress` into run-a \(pid \d+\)"):
        DeviceLock("cuda:0", tmp_path).acquire("the app")
    DeviceLock("cuda:1", tmp_path).acquire("the app").release()  # another card is free
    first.release()
    DeviceLock("cuda:0", tmp_path).acquire("the app").release()
    with DeviceLock("cpu", tmp_path).acquire("a"), DeviceLock("cpu", tmp_path).acquire("b"):
        assert not (tmp_path / "cpu.lock").exists()  # CPUs are never locked


def test_two_processes_cannot_compress_on_one_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    config = RunConfig()
    config.model.device = "cuda"
    app = JobManager(tmp_path / "runs-a", tmp_path / "locks")
    script = JobManager(tmp_path / "runs-b", tmp_path / "locks")  # as in another process: its own manager
    release = threading.Event()
    job = app.submit("compression", config, lambda job: release.wait(30))
    with pytest.raises(JobBusyError, match="cuda:0 is busy with a compression started by the app"):
        script.submit("compression", config, lambda job: None)
    release.set()
    assert job.wait(30) and job.status == "completed"
    other = script.submit("compression", config, lambda job: None)
    assert other.wait(30) and other.status == "completed"


HOLD = ("import sys; from pathlib import Path; from lillama_core.runtime.devicelock import DeviceLock; "
        "lock = DeviceLock('cuda:0', Path(sys.argv[1])).acquire('a script'); print('held', flush=True); "
        "sys.stdin.read()")


def test_a_lock_held_by_another_process_is_refused_and_freed_when_it_dies(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=Path(__file__).resolve().parents[3],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(JobBusyError, match=rf"cuda:0 is busy with a script \(pid {holder.pid}\)"):
            DeviceLock("cuda:0", tmp_path).acquire("the app")
    finally:
        holder.kill()  # a crash: no release runs
        holder.wait(30)
    DeviceLock("cuda:0", tmp_path).acquire("the app").release()  # the system dropped the dead holder's lock

