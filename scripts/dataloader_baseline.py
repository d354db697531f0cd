"""The baseline the benchmarks compare against: a torchvision-style per-sample MNIST Dataset."""
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
