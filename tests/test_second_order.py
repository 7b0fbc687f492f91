"""Why bilinear pooling exists: it sees how feature channels co-occur, which an average of the features cannot.

The images of the two classes differ only in second-order statistics. At every pixel, channels a and b are
drawn positively correlated in class 0 and negatively correlated in class 1; a third channel is independent
noise. Each image is centred and then shifted by a random per-channel offset drawn the same way for both
classes, so the per-channel means and variances of the two classes are the same (the test checks it) and an
image's channel averages carry no information about its class. The same frozen backbone (a fixed random 1x1
convolution, linear, so it keeps the class means equal) feeds two models that differ in one config value,
model.pooling, and are trained alike:

- bilinear: X Xᵀ / (H W) contains the a-b cross term, whose sign is the class -> near 100 %;
- avg: global average pooling -> Linear, the usual first-order head: it sees only the channel averages -> chance.
"""

import copy

import pytest
import torch
from torch import nn

from bcnn.config import ModelConfig
from bcnn.models import BilinearCNN
from bcnn.models.pooling import build_pooling

IMAGE_SIZE = 16
CORRELATION = 0.8  # +0.8 in class 0, -0.8 in class 1
OFFSET_STD = 0.3
BACKBONE_CHANNELS = 4


def make_images(num_images: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, 16, 16) images, half of each class, whose classes differ only in the a-b correlation."""
    labels = torch.arange(num_images) % 2
    correlation = torch.where(labels == 0, CORRELATION, -CORRELATION).view(-1, 1, 1)  # (N, 1, 1)
    noise = torch.randn(num_images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    channel_a = noise[:, 0]
    channel_b = correlation * noise[:, 0] + (1 - correlation**2).sqrt() * noise[:, 1]  # unit variance, either class
    images = torch.stack([channel_a, channel_b, noise[:, 2]], dim=1)  # (N, 3, H, W)
    images = images - images.mean(dim=(2, 3), keepdim=True)
    offsets = OFFSET_STD * torch.randn(num_images, 3, 1, 1, generator=generator)  # independent of the class
    return images + offsets, labels


def train(model: BilinearCNN, images: torch.Tensor, labels: torch.Tensor, steps: int = 300) -> BilinearCNN:
    """Stage 1 of the recipe: the classifier alone, SGD at lr 1 with momentum."""
    optimizer = torch.optim.SGD(model.param_groups(backbone_lr=0.0, classifier_lr=1.0), momentum=0.9)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    return model


def accuracy(model: BilinearCNN, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(images).argmax(dim=1) == labels).float().mean().item()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bilinear_head_separates_classes_that_differ_only_in_correlation(seed):
    generator = torch.Generator().manual_seed(seed)
    train_images, train_labels = make_images(400, generator)
    test_images, test_labels = make_images(200, generator)

    # First-order statistics match across the classes; the a-b cross moment is what differs.
    class0 = train_images[train_labels == 0].transpose(0, 1).reshape(3, -1)  # (3, N/2*H*W)
    class1 = train_images[train_labels == 1].transpose(0, 1).reshape(3, -1)
    # Sample moments of 200 x 256 pixel values per class, correlated within an image: the means and variances
    # match to a few hundredths; 0.1 and 0.15 are far below the 1.0 by which the cross moments differ.
    assert torch.allclose(class0.mean(dim=1), class1.mean(dim=1), atol=0.1)
    assert torch.allclose(class0.var(dim=1), class1.var(dim=1), atol=0.15)
    assert (class0[0] * class0[1]).mean() > 0.5 and (class1[0] * class1[1]).mean() < -0.5

    torch.manual_seed(seed)
    backbone = nn.Conv2d(3, BACKBONE_CHANNELS, kernel_size=1, bias=False)  # (N, 3, 16, 16) -> (N, 4, 16, 16)
    accuracies = {}
    for pooling in ("bilinear", "avg"):
        head = build_pooling(ModelConfig(pooling=pooling), channels=BACKBONE_CHANNELS)
        model = BilinearCNN(copy.deepcopy(backbone), head, num_classes=2).freeze_backbone()
        accuracies[pooling] = accuracy(train(model, train_images, train_labels), test_images, test_labels)
    bilinear_accuracy, average_accuracy = accuracies["bilinear"], accuracies["avg"]
    # Measured over 20 seeds: bilinear >= 0.99, average pooling <= 0.565 (chance is 0.5 and stays below 0.65
    # with 200 test images but for a 4-sigma event).
    assert bilinear_accuracy > 0.9, f"bilinear head: {bilinear_accuracy:.3f} held-out accuracy"
    assert average_accuracy < 0.65, f"average-pooling head: {average_accuracy:.3f} held-out accuracy"
