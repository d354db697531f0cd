"""IDX parsing, MD5 checks, mirrors and the prepare stage's handling of bad input."""

import gzip
import hashlib
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from mnistgen import data, mnist_files
from mnistgen.config import ParamsError, PrepareParams, load_section
from mnistgen.utils import StageError


def idx_bytes(array: np.ndarray, magic: int | None = None, dims=None) -> bytes:
    dims = array.shape if dims is None else dims
    magic = (0x800 + len(dims)) if magic is None else magic
    return struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims) + array.astype(np.uint8).tobytes()


def test_parses_valid_idx_plain_and_gzipped():
    images = np.arange(3 * 28 * 28, dtype=np.uint64).reshape(3, 28, 28) % 256
    raw = idx_bytes(images)
    for blob in (raw, gzip.compress(raw)):
        parsed = mnist_files.parse_idx(blob, "x.gz", expect_ndim=3)
        assert parsed.shape == (3, 28, 28)
        assert np.array_equal(parsed, images)


def test_truncated_gzip_names_the_file():
    blob = gzip.compress(idx_bytes(np.zeros((5, 28, 28))))
    with pytest.raises(StageError, match="train-images.gz: corrupt or truncated gzip"):
        mnist_files.parse_idx(blob[: len(blob) // 2], "train-images.gz", expect_ndim=3)


def test_truncated_data_is_a_size_mismatch():
    raw = idx_bytes(np.zeros((5, 28, 28)))
    with pytest.raises(StageError, match=r"imgs: IDX header says \(5, 28, 28\) = 3920 bytes of data, file has 3000"):
        mnist_files.parse_idx(raw[: 16 + 3000], "imgs", expect_ndim=3)


def test_wrong_magic_number():
    raw = idx_bytes(np.zeros(4), magic=0x00000901, dims=(4,))
    with pytest.raises(StageError, match="labels: wrong IDX magic number 0x00000901"):
        mnist_files.parse_idx(raw, "labels", expect_ndim=1)
    with pytest.raises(StageError, match="wrong IDX magic"):  # labels file where images were expected
        mnist_files.parse_idx(idx_bytes(np.zeros(4)), "images", expect_ndim=3)


def test_count_mismatch_between_images_and_labels(tmp_path):
    (tmp_path / "i.gz").write_bytes(gzip.compress(idx_bytes(np.zeros((4, 28, 28)))))
    (tmp_path / "l.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(3))))
    reader = lambda name: (tmp_path / name).read_bytes()
    with pytest.raises(StageError, match="i.gz has 4 images but l.gz has 3 labels"):
        mnist_files.read_pair("i.gz", "l.gz", reader=reader)


def test_label_out_of_range(tmp_path):
    (tmp_path / "i.gz").write_bytes(idx_bytes(np.zeros((2, 28, 28))))
    (tmp_path / "l.gz").write_bytes(idx_bytes(np.array([1, 11])))
    with pytest.raises(StageError, match="l.gz: label 11 outside 0..9"):
        mnist_files.read_pair("i.gz", "l.gz", reader=lambda n: (tmp_path / n).read_bytes())


def test_md5_mismatch_names_file(tmp_path, monkeypatch):
    name = "t10k-labels-idx1-ubyte.gz"
    (tmp_path / name).write_bytes(gzip.compress(idx_bytes(np.zeros(10))))
    monkeypatch.setenv("MNIST_MIRROR", str(tmp_path))
    with pytest.raises(StageError, match=f"{name}: MD5 .* does not match the official {mnist_files.MNIST_FILES[name]}"):
        mnist_files.fetch_verified(name)


def test_mirror_folder_and_missing_file(tmp_path, monkeypatch):
    name = "t10k-labels-idx1-ubyte.gz"
    blob = gzip.compress(idx_bytes(np.zeros(10)))
    (tmp_path / name).write_bytes(blob)
    monkeypatch.setenv("MNIST_MIRROR", str(tmp_path))
    monkeypatch.setitem(mnist_files.MNIST_FILES, name, hashlib.md5(blob).hexdigest())
    assert mnist_files.fetch_verified(name) == blob
    with pytest.raises(StageError, match="train-labels-idx1-ubyte.gz: cannot read MNIST file"):
        mnist_files.fetch_verified("train-labels-idx1-ubyte.gz")


def test_a_url_mirror_is_downloaded_and_checked(tmp_path, monkeypatch):
    """A mirror served over HTTP on loopback: the file arrives through torchvision's download_url, and a
    changed byte is refused by its MD5."""
    import functools
    import http.server
    import threading

    name = "t10k-labels-idx1-ubyte.gz"
    blob = gzip.compress(idx_bytes(np.arange(10) % 10))
    (tmp_path / name).write_bytes(blob)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("MNIST_MIRROR", f"http://127.0.0.1:{server.server_port}/")
        monkeypatch.setitem(mnist_files.MNIST_FILES, name, hashlib.md5(blob).hexdigest())
        assert mnist_files.fetch_verified(name) == blob
        (tmp_path / name).write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
        with pytest.raises(StageError, match=f"127.0.0.1:{server.server_port}/{name}: MD5 .* does not match"):
            mnist_files.fetch_verified(name)
    finally:
        server.shutdown()


def test_unreachable_url_mirror(monkeypatch):
    monkeypatch.setenv("MNIST_MIRROR", "http://127.0.0.1:9/mnist")
    with pytest.raises(StageError, match="http://127.0.0.1:9/mnist/t10k-labels-idx1-ubyte.gz: mirror unreachable"):
        mnist_files.fetch_verified("t10k-labels-idx1-ubyte.gz")


def test_splits_are_seeded_disjoint_and_limited():
    train = data.Split(
        torch.arange(100, dtype=torch.uint8).view(100, 1, 1).expand(100, 28, 28).contiguous(), torch.arange(100) % 10
    )
    test = data.Split(torch.zeros(50, 28, 28, dtype=torch.uint8), torch.arange(50) % 10)
    params = PrepareParams(val_size=10, split_seed=3, limit_train=60, limit_test=20)
    a, b = data.make_splits(train, test, params), data.make_splits(train, test, params)
    assert [len(a[s].labels) for s in data.SPLITS] == [50, 10, 20]
    assert torch.equal(a["val"].images, b["val"].images)
    ids = lambda s: set(a[s].images[:, 0, 0].tolist())
    assert not ids("train") & ids("val")
    with pytest.raises(StageError, match="prepare.val_size"):
        data.make_splits(train, test, PrepareParams(val_size=60, split_seed=0, limit_train=60, limit_test=0))


def test_params_key_of_wrong_type(tmp_path):
    (tmp_path / "params.yaml").write_text("prepare:\n  val_size: many\n")
    with pytest.raises(ParamsError, match="prepare.val_size: input should be a valid integer, got 'many'"):
        load_section(PrepareParams, "prepare", tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("prepare:\n  val_sise: 5\n")
    with pytest.raises(ParamsError, match="prepare.val_sise: unknown key"):
        load_section(PrepareParams, "prepare", tmp_path / "params.yaml")


def run_prepare(cwd, mirror):
    return subprocess.run(
        [sys.executable, "-m", "mnistgen.stages.prepare", "--out", "data/prepared"],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={"MNIST_MIRROR": str(mirror), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )


def test_prepare_stage_bad_input_leaves_nothing(tmp_path):
    """A corrupt mirror file: one line naming it, exit 1, no data/prepared at all."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    junk = b"\x1f\x8b not really gzip"
    for name in mnist_files.MNIST_FILES:
        (mirror / name).write_bytes(junk)
    (tmp_path / "params.yaml").write_text("prepare:\n  val_size: 10\n  split_seed: 0\n  limit_train: 0\n  limit_test: 0\n")
    result = run_prepare(tmp_path, mirror)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {mirror}/train-images-idx3-ubyte.gz: MD5 {hashlib.md5(junk).hexdigest()} "
        f"does not match the official {mnist_files.MNIST_FILES['train-images-idx3-ubyte.gz']}"
    ]
    assert not (tmp_path / "data" / "prepared").exists()


def test_prepare_stage_on_real_mnist_subset(tmp_path, mnist_mirror):
    (tmp_path / "params.yaml").write_text("prepare:\n  val_size: 100\n  split_seed: 0\n  limit_train: 600\n  limit_test: 200\n")
    result = run_prepare(tmp_path, mnist_mirror)
    assert result.returncode == 0, result.stderr
    with data.reading_test("validate"):  # the test checks what prepare wrote, as the validate stage reads it
        splits = {s: data.load_split(tmp_path / "data" / "prepared", s) for s in data.SPLITS}
    assert [len(splits[s].labels) for s in data.SPLITS] == [500, 100, 200]
    assert splits["train"].images.dtype == torch.uint8 and splits["train"].labels.dtype == torch.int64
    assert not list((tmp_path / "data").glob(".prepared.tmp-*"))
