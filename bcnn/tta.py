"""Test-time augmentation for `python -m bcnn.eval --tta ...`: the views of each eval image, and their average.

    none        the recipe's eval view: Resize(data.resize) -> CenterCrop(data.crop)
    flip        that view and its mirror (bcnn.engine.evaluate mirrors the batch itself)
    five_crop   torchvision's FiveCrop of the resized image: its four corners and its centre, at data.crop
    ten_crop    torchvision's TenCrop: the five crops and their mirrors
    multiscale  the centre crop at data.crop of the image resized to data.resize x 1, 1.15 and 1.3: the object at
                three sizes, from the recipe's view to a 1.3x closer one, every view at the input size the model
                was trained on (a crop never has to be upscaled to fit)

Every view goes through the eval transform's steps (a resize, a crop, ToTensor, Normalize with the checkpoint's
mean and std), so each is a view the model could be shown at eval time. An image's class scores are the mean of
its views' logits, not of their probabilities, as flip has always done. Where data.resize equals data.crop (the
B-CNN recipe's 448/448) the resized image is data.crop on its shorter side, so the five crops only slide along the
longer side and two pairs of corners coincide.

The multi-view choices give each item as a (V, 3, crop, crop) stack, so a batch is (B, V, 3, crop, crop): the
views stay inside their image, and a sharded (torchrun) evaluation still counts every image once.

    transform = view_transform(cfg.data, "ten_crop", normalisation)   # PIL image -> (10, 3, crop, crop)
    logits = average_view_logits(model(images.flatten(0, 1)), views=images.shape[1])   # (B, classes)
"""

from __future__ import annotations

import torch
from torchvision import transforms as T

from bcnn.config import DataConfig

TTA_CHOICES = ("none", "flip", "five_crop", "ten_crop", "multiscale")
MULTISCALE_FACTORS = (1.0, 1.15, 1.3)  # of data.resize; 1.0 is the recipe's own eval view
VIEWS = {"five_crop": 5, "ten_crop": 10, "multiscale": len(MULTISCALE_FACTORS)}  # the views the loader makes


def is_multi_view(tta: str) -> bool:
    """Whether the loader makes several views of each image (flip's mirror is made on the batch instead)."""
    return tta in VIEWS


def images_per_batch(batch_size: int, tta: str) -> int:
    """The images a batch of `batch_size` views holds: one forward then sees about as many crops as without TTA
    (memory), and at least one image (its V views) when batch_size < V."""
    return max(1, batch_size // VIEWS[tta])


class StackedViews:
    """A PIL image -> (V, 3, H, W): the views `crops` cuts from it, each through ToTensor and Normalize.
    A class, not a lambda, so loader workers started by spawn can unpickle it."""

    def __init__(self, crops, normalisation):
        self.crops = crops
        self.to_tensor = T.Compose([T.ToTensor(), T.Normalize(*normalisation)])

    def __call__(self, image) -> torch.Tensor:
        return torch.stack([self.to_tensor(view) for view in self.crops(image)])


class CentreCropsAtScales:
    """A PIL image -> its centre crops at `crop` after resizing its shorter side to each of `sizes`."""

    def __init__(self, sizes: list[int], crop: int):
        self.views = [T.Compose([T.Resize(size), T.CenterCrop(crop)]) for size in sizes]

    def __call__(self, image) -> list:
        return [view(image) for view in self.views]


def view_transform(cfg: DataConfig, tta: str, normalisation) -> StackedViews:
    """The transform of a multi-view tta choice: a PIL image -> its (VIEWS[tta], 3, crop, crop) normalised views."""
    if tta == "five_crop":
        crops = T.Compose([T.Resize(cfg.resize), T.FiveCrop(cfg.crop)])
    elif tta == "ten_crop":
        crops = T.Compose([T.Resize(cfg.resize), T.TenCrop(cfg.crop)])
    elif tta == "multiscale":
        crops = CentreCropsAtScales([round(cfg.resize * factor) for factor in MULTISCALE_FACTORS], cfg.crop)
    else:
        raise ValueError(f"tta {tta!r} makes no views in the loader; the multi-view choices are {', '.join(VIEWS)}")
    return StackedViews(crops, normalisation)


def average_view_logits(logits: torch.Tensor, views: int) -> torch.Tensor:
    """(B*V, classes) logits of B images' V views each, an image's views together -> (B, classes), their mean."""
    return logits.view(-1, views, logits.shape[1]).mean(dim=1)
