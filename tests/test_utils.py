"""Atomic writes leave ordinary files: whole or absent, and readable as the umask allows (not mkstemp's 0600)."""

import os
import stat

import pytest
import torch

from mnistgen.utils import atomic_dir, atomic_torch_save, atomic_write, atomic_write_text, write_json


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_written_files_and_folders_are_world_readable(tmp_path, umask_022):
    atomic_write_text(tmp_path / "report.md", "# report\n")
    write_json(tmp_path / "metrics.json", {"fid_cls": 1.0})
    atomic_torch_save({"w": torch.zeros(2)}, tmp_path / "weights.pt")
    with atomic_dir(tmp_path / "outputs") as folder:
        (folder / "inside.txt").write_text("x")
    for name in ("report.md", "metrics.json", "weights.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
    assert stat.S_IMODE((tmp_path / "outputs").stat().st_mode) == 0o755


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"old": 1})

    def fail(path):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, fail)
    assert target.read_text() == '{\n  "old": 1\n}\n' and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
