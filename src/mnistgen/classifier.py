"""The evaluators: small MNIST classifiers whose penultimate layer is a feature space for FID_cls,
KID_cls and precision/recall, and whose softmax gives IS_cls and class coverage.

Two architectures give two feature spaces (a metric that flips between them is not a finding):
`strided` (the first evaluator: strided convs) and `maxpool` (the second: convs at full
resolution, each followed by 2x2 max-pooling, a different seed).
"""

from __future__ import annotations

import torch
from torch import nn

FEATURE_DIM = 128


class Classifier(nn.Module):
    def __init__(self, width: int = 32, arch: str = "strided"):
        super().__init__()
        self.arch, self.width = arch, width

        def block(cin, cout, kernel):
            if arch == "strided":  # strided convs: as accurate as max-pooling here, 3x faster on a CPU
                return nn.Sequential(nn.Conv2d(cin, cout, kernel, 2, kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
            if arch == "maxpool":
                return nn.Sequential(
                    nn.Conv2d(cin, cout, kernel, 1, kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)
                )
            raise ValueError(f"unknown evaluator arch {arch!r} (strided | maxpool)")

        self.body = nn.Sequential(
            block(1, width, 5),  # 28 -> 14
            block(width, 2 * width, 3),  # 14 -> 7
            nn.Flatten(),
            nn.Linear(2 * width * 49, FEATURE_DIM, bias=False),
            nn.BatchNorm1d(FEATURE_DIM),
            nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    @torch.no_grad()
    def features_and_probs(self, images: torch.Tensor, batch_size: int = 1000):
        """Penultimate features [N, 128] and class probabilities [N, 10] of images in [0, 1], in batches."""
        feats, probs = [], []
        for i in range(0, len(images), batch_size):
            f = self.body(images[i : i + batch_size]).float()
            feats.append(f)
            probs.append(torch.softmax(self.head(f), dim=1))
        return torch.cat(feats), torch.cat(probs)


def load_classifier(path, arch: str, width: int, device="cpu") -> Classifier:
    """A trained evaluator from its state_dict file."""
    model = Classifier(width, arch)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.to(device).eval()
