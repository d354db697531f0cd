"""Shared by the benchmark scripts: the per-sample DataLoader baseline and the torch.compile option."""
import torch


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
