"""Where cached activations live, and that a run spilled to disk gives the same student."""

import torch
from tiny import tiny_llama, tiny_sequences

from lillama_core.compress import storage
from lillama_core.compress.loop import Compressor
from lillama_core.compress.storage import ActivationStore
from lillama_core.config import DistillConfig, PlanConfig
from lillama_core.data.calibration import CalibrationData
from lillama_core.events import Phase
from lillama_core.planning.planner import make_plan

CPU = torch.device("cpu")


def test_auto_keeps_activations_in_memory_until_they_would_crowd_it(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "available_host_bytes", lambda: 10_000)
    assert ActivationStore.choose("auto", CPU, 4_000, tmp_path).kind == "host"
    assert ActivationStore.choose("auto", CPU, 6_000, tmp_path).kind == "disk"
    assert ActivationStore.choose("accelerator", CPU, 6_000, tmp_path).kind == "host"  # a CPU run's memory is the host
    assert ActivationStore.choose("disk", CPU, 1, tmp_path).kind == "disk"
    monkeypatch.setattr(storage, "available_host_bytes", lambda: None)  # unknown: assume it fits
    assert ActivationStore.choose("auto", CPU, 10**15, tmp_path).kind == "host"


def test_host_activations_are_pinned_only_for_a_gpu_run_and_within_their_share(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "available_host_bytes", lambda: 10_000)
    cuda = torch.device("cuda")
    assert ActivationStore.choose("host", cuda, 2_000, tmp_path).pinned
    assert not ActivationStore.choose("host", cuda, 3_000, tmp_path).pinned  # over a quarter of the free memory
    assert not ActivationStore.choose("host", CPU, 2_000, tmp_path).pinned  # nothing to copy to
    assert not ActivationStore.choose("disk", cuda, 2_000, tmp_path).pinned
    monkeypatch.setattr(storage, "available_host_bytes", lambda: None)
    assert not ActivationStore.choose("host", cuda, 2_000, tmp_path).pinned
    assert not ActivationStore("host", CPU).empty((2, 3), torch.float32).is_pinned()


def test_disk_tensors_are_file_backed_and_leave_no_file(tmp_path):
    store = ActivationStore("disk", CPU, tmp_path)
    joined = store.cat([torch.ones(2, 3), torch.zeros(1, 3)])
    assert joined.untyped_storage().filename and joined.tolist() == [[1, 1, 1], [1, 1, 1], [0, 0, 0]]
    copy = store.copy(joined)
    copy[0] = 5
    assert joined[0, 0] == 1 and copy[0, 0] == 5 and copy.untyped_storage().filename
    assert list(tmp_path.iterdir()) == []  # unlinked once mapped


def test_a_run_with_activations_on_disk_gives_the_same_student(tmp_path, monkeypatch):
    monkeypatch.setenv("LILLAMA_HOME", str(tmp_path))
    allocated, real_empty = [], ActivationStore.empty
    monkeypatch.setattr(ActivationStore, "empty",
                        lambda self, shape, dtype: allocated.append(self.kind) or real_empty(self, shape, dtype))
    calibration = CalibrationData(tiny_sequences(12, 32), "random", 0)
    students, places = [], []
    for where in ("host", "disk"):
        loaded = tiny_llama(layers=3)
        plan = make_plan(loaded, PlanConfig(strategy="uniform", rank=8, reduction=None))

        def on_event(event):
            if isinstance(event, Phase) and event.name == "capture":
                places.append(event.detail)

        students.append(Compressor(loaded, calibration, plan, DistillConfig(activations=where), batch_size=4,
                                   on_event=on_event).run().student)
    assert "in host memory" in places[0] and f"memory-mapped files under {tmp_path / 'activations'}" in places[1]
    # the first block's inputs, then each layer's teacher outputs and student inputs, on disk
    assert allocated.count("disk") == allocated.count("host") >= 1 + 3 + 1
    ids = tiny_sequences(2, 16, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(students[1](input_ids=ids).logits, students[0](input_ids=ids).logits)
