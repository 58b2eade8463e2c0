"""The elastic-sgd task: a CNN with BatchNorm and dropout on the 8x8 digits as images.

The 1,797 digits ship inside scikit-learn (no download). Pixels (0..16) are scaled to
[0, 1] and shaped ``(1, 8, 8)``; the split into training and test images is a permutation
drawn from the job's seed (``test_fraction`` of the images held out), so every process of
a job sees the same split. The digits are 1,797 x 64 bytes of ``uint8`` pixels: each
process keeps them whole (115 KB) and a worker reads only its shard's indices.

The network (``channels`` = c, ``hidden`` = h): conv 3x3 (1 -> c) + BatchNorm + ReLU,
conv 3x3 (c -> 2c) + BatchNorm + ReLU, max-pool 2 (8x8 -> 4x4), dropout, linear
(2c x 16 -> h) + ReLU, dropout, linear (h -> 10). At the defaults (c 16, h 64):
160 + 32 + 4,640 + 64 + 32,832 + 650 = 38,378 parameters, and the two BatchNorm layers'
running means, variances and batch counts as buffers.

Loss: mean cross-entropy; metric: ``accuracy``.
"""

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import Dataset

from actors.tasks.base import Task, TaskContext

N_CLASSES = 10
# load_digits' pixels are counts of 0..16 set pixels in 4x4 blocks of the original scans
PIXEL_MAX = 16.0


class DigitsParams(BaseModel):
    """The task's settings (``task.params`` in a job spec)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    channels: int = Field(default=16, ge=1, le=512)
    hidden: int = Field(default=64, ge=1, le=4096)
    dropout: float = Field(default=0.25, ge=0.0, lt=1.0)
    test_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)


class DigitImages(Dataset[tuple[Tensor, Tensor]]):
    """Digits as ``(image (1, 8, 8) float32 in [0, 1], label int64)`` pairs.

    Args:
        pixels: ``(n, 64)`` uint8 pixel counts.
        labels: ``(n,)`` int labels.
    """

    def __init__(self, pixels: np.ndarray, labels: np.ndarray) -> None:
        self.pixels = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.uint8))
        self.labels = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        image = self.pixels[i].reshape(1, 8, 8).float() / PIXEL_MAX
        return image, self.labels[i]


def split_digits(seed: int, test_fraction: float) -> tuple[DigitImages, DigitImages]:
    """The training and test images of the seed's split (disjoint, covering all 1,797)."""
    bunch = load_digits()
    pixels = np.asarray(bunch.data, dtype=np.uint8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    perm = np.random.default_rng(seed).permutation(len(labels))
    n_test = max(1, round(test_fraction * len(labels)))
    test, train = perm[:n_test], perm[n_test:]
    return DigitImages(pixels[train], labels[train]), DigitImages(pixels[test], labels[test])


class DigitsCNN(nn.Module):
    """See the module docstring."""

    def __init__(self, channels: int, hidden: int, dropout: float) -> None:
        super().__init__()
        c = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1),
            nn.BatchNorm2d(c),
            nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, padding=1),
            nn.BatchNorm2d(2 * c),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
        )
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Flatten(),
            nn.Linear(2 * c * 4 * 4, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, N_CLASSES),
        )

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.classifier(self.features(x))
        return out


class DigitsTask(Task):
    """A CNN-BN on the digits (see the module docstring).

    Args:
        params: the validated task params.
    """

    def __init__(self, params: DigitsParams) -> None:
        self.params = params

    def build_model(self) -> nn.Module:
        p = self.params
        return DigitsCNN(p.channels, p.hidden, p.dropout)

    def train_data(self, ctx: TaskContext) -> DigitImages:
        return split_digits(ctx.seed, self.params.test_fraction)[0]

    def eval_data(self, ctx: TaskContext) -> DigitImages:
        return split_digits(ctx.seed, self.params.test_fraction)[1]

    def loss(self, model: nn.Module, batch: list[Tensor]) -> Tensor:
        images, labels = batch
        return F.cross_entropy(model(images).float(), labels)

    @torch.no_grad()
    def metrics(self, model: nn.Module, batch: list[Tensor]) -> dict[str, float]:
        images, labels = batch
        accuracy = (model(images).argmax(-1) == labels).float().mean()
        return {"accuracy": float(accuracy)}


def build(params: DigitsParams) -> DigitsTask:
    """The job's entrypoint (``cnn_digits.task:build``)."""
    return DigitsTask(params)
