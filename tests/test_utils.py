"""Atomic writes leave ordinary files (whole or absent, readable as the umask allows); `auto` picks the device."""

import os
import stat

import pytest
import torch

from mnistgen.utils import (
    StageError,
    atomic_dir,
    atomic_torch_save,
    atomic_write,
    atomic_write_text,
    evaluation_device,
    pick_device,
    write_json,
)


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


@pytest.mark.parametrize(
    ("cuda", "mps", "expected"),
    [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu"), (True, False, "cuda")],
)
def test_auto_prefers_cuda_then_mps_then_the_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert pick_device("auto").type == expected
    # measurements need float64, which MPS lacks: a Mac measures on its CPU, CUDA measures where it trains
    assert evaluation_device().type == ("cpu" if expected == "mps" else expected)


@pytest.mark.parametrize("name", ["cuda", "mps"])
def test_a_named_device_that_is_not_there_is_one_clear_error(monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(StageError, match=f"train.device is '{name}' but {name.upper()} is not available"):
        pick_device(name)
    assert pick_device("cpu").type == "cpu"
