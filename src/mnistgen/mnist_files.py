"""The four official MNIST files: fetch them, check their MD5, parse their IDX bytes (the prepare stage only).

The source is torchvision's list of official mirrors (its download and checksum utilities fetch and check the
files), or the folder / URL prefix named by the MNIST_MIRROR environment variable (for a machine without
internet: a folder holding the four files). Only the prepare stage imports this module, and so torchvision.
"""

from __future__ import annotations

import atexit
import gzip
import os
import shutil
import socket
import struct
import tempfile
import urllib.error
import zlib
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets import MNIST
from torchvision.datasets.utils import calculate_md5, download_url

from .data import Split
from .utils import StageError

MNIST_FILES = dict(MNIST.resources)  # file name -> MD5: torchvision's own list
OFFICIAL_MIRRORS = tuple(MNIST.mirrors)
IDX_UBYTE = 0x08


def sources() -> list[str]:
    """Where to look for the files, in order: MNIST_MIRROR if set, else the official mirrors."""
    mirror = os.environ.get("MNIST_MIRROR", "").strip()
    return [mirror] if mirror else list(OFFICIAL_MIRRORS)


def fetch(name: str, source: str, timeout: float = 30.0) -> Path:
    """The path of file `name` in a folder, or downloaded from a URL prefix (torchvision's download_url)
    into a private temporary folder that lives as long as this process."""
    if "://" not in source:
        path = Path(source) / name
        if not path.is_file():
            raise StageError(f"{path}: cannot read MNIST file (no such file)")
        return path
    url = source.rstrip("/") + "/" + name
    folder = Path(tempfile.mkdtemp(prefix="mnistgen-mnist-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)  # download_url sets none: a silent mirror would hang the stage
    try:
        download_url(url, folder, name)
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        raise StageError(f"{url}: mirror unreachable ({getattr(err, 'reason', err)})") from err
    finally:
        socket.setdefaulttimeout(previous)
    return folder / name


def fetch_verified(name: str) -> bytes:
    """File `name` from the first source that has it, after checking its MD5 (torchvision's calculate_md5)."""
    errors = []
    for source in sources():
        try:
            path = fetch(name, source)
        except StageError as err:
            errors.append(str(err))
            continue
        md5 = calculate_md5(path)
        if md5 != MNIST_FILES[name]:
            raise StageError(f"{source.rstrip('/')}/{name}: MD5 {md5} does not match the official {MNIST_FILES[name]}")
        return path.read_bytes()
    raise StageError("; ".join(errors))


def parse_idx(data: bytes, name: str, expect_ndim: int) -> np.ndarray:
    """Parse a (gzipped) IDX file of unsigned bytes; every inconsistency names the file."""
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as err:
            raise StageError(f"{name}: corrupt or truncated gzip data ({err})") from err
    if len(data) < 4:
        raise StageError(f"{name}: too short for an IDX header ({len(data)} bytes)")
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != IDX_UBYTE or ndim != expect_ndim:
        magic = struct.unpack(">I", data[:4])[0]
        raise StageError(
            f"{name}: wrong IDX magic number 0x{magic:08x} (expected 0x{0x800 + expect_ndim:08x}: "
            f"unsigned bytes, {expect_ndim} dimension{'s' if expect_ndim > 1 else ''})"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise StageError(f"{name}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise StageError(f"{name}: IDX header says {dims} = {expected} bytes of data, file has {len(data) - header}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_pair(images_name: str, labels_name: str, reader=fetch_verified) -> Split:
    images = parse_idx(reader(images_name), images_name, expect_ndim=3)
    labels = parse_idx(reader(labels_name), labels_name, expect_ndim=1)
    if images.shape[0] != labels.shape[0]:
        raise StageError(f"{images_name} has {images.shape[0]} images but {labels_name} has {labels.shape[0]} labels")
    if images.shape[1:] != (28, 28):
        raise StageError(f"{images_name}: images are {images.shape[1:]}, expected 28x28")
    if labels.max(initial=0) > 9:
        raise StageError(f"{labels_name}: label {labels.max()} outside 0..9")
    return Split(torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)))
