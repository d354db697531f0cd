"""Atomic writes leave ordinary files (whole or absent, readable as the umask allows); `auto` picks the device and
training's precision."""

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
    training_dtype,
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


@pytest.mark.parametrize(
    ("device", "amx", "expected"),
    [("cpu", True, torch.bfloat16), ("cpu", False, torch.float32), ("cuda", True, torch.float32), ("mps", True, torch.float32)],
)
def test_auto_precision_is_bf16_only_on_a_cpu_with_amx(monkeypatch, device, amx, expected):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": amx, "avx512_bf16": True})
    assert training_dtype(torch.device(device), "auto") == expected
    assert training_dtype(torch.device(device), "fp32") == torch.float32


def test_a_precision_the_device_cannot_run_is_one_clear_error():
    assert training_dtype(torch.device("cpu"), "bf16") == torch.bfloat16  # emulated where not native, but it runs
    with pytest.raises(StageError, match="precision is 'bf16', which autocast does not run on MPS"):
        training_dtype(torch.device("mps"), "bf16")
    with pytest.raises(StageError, match="precision is 'fp16'; it is one of auto, fp32, bf16"):
        training_dtype(torch.device("cpu"), "fp16")
