import shutil
import zipfile

import pytest

from components import evaluate


def test_the_download_zip_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    export = tmp_path / "student"
    export.mkdir()
    (export / "model.safetensors").write_bytes(b"w" * 1000)
    archive = evaluate.zip_atomically(export)
    assert archive == str(tmp_path / "student.zip")
    assert zipfile.ZipFile(archive).namelist() == ["student/", "student/model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student", "student.zip"]

    (tmp_path / "student.zip").unlink()
    real = shutil.make_archive

    def disk_full(base_name, *args, **kwargs):
        real(base_name, *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(evaluate.shutil, "make_archive", disk_full)
    with pytest.raises(OSError):
        evaluate.zip_atomically(export)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]  # no half-written archive left to serve
