"""Figures: the grid PNG has torchvision's make_grid layout, without importing torchvision in any stage."""

import subprocess
import sys

import pytest
import torch
from PIL import Image
from torchvision.utils import make_grid

from mnistgen import figures


@pytest.mark.parametrize(("count", "nrow"), [(16, 4), (10, 3), (100, 10), (7, 8)])
def test_the_grid_is_laid_out_as_torchvision_lays_it_out(count, nrow):
    images = torch.rand(count, 1, 28, 28, generator=torch.Generator().manual_seed(count))
    assert torch.equal(figures.grid(images, nrow), make_grid(images, nrow=nrow, padding=2, pad_value=1.0)[0])


def test_a_saved_grid_is_a_grey_png_of_the_images(tmp_path):
    images = torch.zeros(6, 1, 28, 28)
    images[1] = 1.0
    path = figures.save_grid(images, tmp_path / "grid.png", nrow=3)
    png = Image.open(path)
    assert (png.mode, png.size) == ("L", (3 * 30 + 2, 2 * 30 + 2))
    pixels = torch.tensor(list(png.getdata()), dtype=torch.uint8).view(62, 92)
    assert pixels[2:30, 2:30].eq(0).all() and pixels[2:30, 32:60].eq(255).all()  # a black image, then a white one
    assert pixels[0].eq(255).all()  # the white border


def test_no_stage_but_prepare_imports_torchvision():
    """torchvision pulls in torch._dynamo: 1.7 s of start-up in every stage process that imports it."""
    stages = ["validate", "reference", "train", "evaluate", "report", "promote"]
    code = "import sys; " + "; ".join(f"import mnistgen.stages.{s}" for s in stages)
    code += "; print(sorted({m.split('.')[0] for m in sys.modules} & {'torchvision', 'sklearn'}))"
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert shown.stdout.strip() == "[]"
