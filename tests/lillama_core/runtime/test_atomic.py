import json
import os

import pytest

from lillama_core.runtime import atomic


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_a_file_is_replaced_whole_and_nothing_staged_is_left(tmp_path):
    target = tmp_path / "status.json"
    atomic.write_json(target, {"ppl": float("nan"), "when": tmp_path})
    assert json.loads(target.read_text()) == {"ppl": None, "when": str(tmp_path)}
    atomic.write_text(target, "new")
    assert target.read_text() == "new" and _names(tmp_path) == ["status.json"]


def test_a_failure_mid_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(OSError, match="disk full"), atomic.staged_file(target) as staged:
        staged.write_text("half of the new")
        raise OSError("disk full")
    assert target.read_text() == "old" and _names(tmp_path) == ["metrics.json"]


def test_the_staged_file_keeps_the_target_name(tmp_path):
    with atomic.staged_file(tmp_path / "student.zip") as staged:
        assert staged.name == "student.zip" and staged.parent.parent == tmp_path
        assert staged.parent.name.startswith(".")  # hidden from listings while it is written
        staged.write_bytes(b"zip")
    assert _names(tmp_path) == ["student.zip"]


def _build(folder, text):
    (folder / "weights").write_text(text)


def test_a_folder_appears_whole(tmp_path):
    with atomic.staged_folder(tmp_path / "export") as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".") and not any(staging.iterdir())
        _build(staging, "new")
        assert _names(tmp_path) == [staging.name]  # not visible under its name before the block ends
    assert (tmp_path / "export" / "weights").read_text() == "new" and _names(tmp_path) == ["export"]


def test_overwrite_replaces_a_folder_and_removes_the_old_one(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    _build(target, "old")
    (target / "stale").write_text("only in the old export")
    with atomic.staged_folder(target, overwrite=True) as staging:
        _build(staging, "new")
    assert _names(target) == ["weights"] and (target / "weights").read_text() == "new"
    assert _names(tmp_path) == ["export"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_failure_while_building_leaves_the_old_folder(tmp_path, overwrite):
    target = tmp_path / "export"
    target.mkdir()
    _build(target, "old")
    with pytest.raises(RuntimeError), atomic.staged_folder(target, overwrite=overwrite) as staging:
        _build(staging, "half")
        raise RuntimeError("interrupted")
    assert (target / "weights").read_text() == "old" and _names(tmp_path) == ["export"]


def test_without_overwrite_a_folder_another_writer_finished_first_is_kept(tmp_path):
    target = tmp_path / "cache"
    with pytest.raises(OSError), atomic.staged_folder(target) as staging:
        _build(staging, "mine")
        target.mkdir()
        _build(target, "theirs")
    assert (target / "weights").read_text() == "theirs" and _names(tmp_path) == ["cache"]


def test_a_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    target = tmp_path / "export"
    target.mkdir()
    _build(target, "old")
    real = os.replace

    def refuse_the_new_folder(src, dst):
        if ".partial-" in str(src) and not str(src).endswith(".old"):
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", refuse_the_new_folder)
    with pytest.raises(OSError, match="No space"), atomic.staged_folder(target, overwrite=True) as staging:
        _build(staging, "new")
    assert (target / "weights").read_text() == "old" and _names(tmp_path) == ["export"]
