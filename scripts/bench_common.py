"""Shared by the benchmark scripts: device options, CUDA sync, the per-sample DataLoader baseline, torch.compile."""
import argparse

import torch

from mnistgen.utils import pick_device


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """--device, --threads and --seed, the same in every benchmark."""
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0 = torch's default); on a busy shared CPU 1 can be much faster than 2")
    parser.add_argument("--seed", type=int, default=0)


def device_from(args: argparse.Namespace) -> torch.device:
    if args.threads:
        torch.set_num_threads(args.threads)
    return pick_device(args.device)


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work: the benchmarks call it only at timing boundaries."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PerSampleMNIST(torch.utils.data.Dataset):
    """torchvision.datasets.MNIST-style: one uint8 image -> PIL image -> float tensor [1, 28, 28]."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        from PIL import Image
        from torchvision.transforms import functional as TF

        self.images, self.labels = images.numpy(), labels.numpy()
        self._image, self._to_tensor = Image, TF.to_tensor

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = self._image.fromarray(self.images[index])  # uint8 [28, 28] -> mode "L"
        return self._to_tensor(image), int(self.labels[index])


def compile_in_place(model: torch.nn.Module) -> list[str]:
    """torch.compile each direct submodule in place (nn.Module.compile), except a WGAN critic.

    The WGAN critic is differentiated twice (gradient penalty with create_graph=True), which
    compiled graphs do not support, so it always stays eager. Returns the compiled names.
    """
    names = []
    for name, child in model.named_children():
        if model.family == "wgan" and name == "critic":
            continue
        child.compile()
        names.append(name)
    return names
