"""The recipe's transforms: train Resize -> flip -> RandomCrop (or RandomResizedCrop, rotation, colour jitter),
eval Resize -> CenterCrop; both normalised with the mean and std the backbone's weights expect."""

from __future__ import annotations

from torchvision import transforms as T

from bcnn.config import DataConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_NORMALISATION = (IMAGENET_MEAN, IMAGENET_STD)  # what torchvision's ImageNet weights expect


def build_transforms(cfg: DataConfig, train: bool, normalisation=IMAGENET_NORMALISATION) -> T.Compose:
    """The recipe: train Resize -> flip -> RandomCrop, eval Resize -> CenterCrop; both ToTensor -> Normalize with
    the (mean, std) the backbone's weights expect (bcnn.models.input_normalisation)."""
    to_tensor = [T.ToTensor(), T.Normalize(*normalisation)]
    if not train:
        return T.Compose([T.Resize(cfg.resize), T.CenterCrop(cfg.crop), *to_tensor])
    if cfg.random_resized_crop:
        steps = [T.RandomResizedCrop(cfg.crop, scale=(cfg.rrc_min_scale, 1.0))]
    else:
        steps = [T.Resize(cfg.resize)]
    if cfg.hflip:
        steps.append(T.RandomHorizontalFlip())
    if cfg.rotation > 0:
        steps.append(T.RandomRotation(cfg.rotation))  # before the crop, so fewer of its black corners remain
    if not cfg.random_resized_crop:
        steps.append(T.RandomCrop(cfg.crop))
    if cfg.color_jitter > 0:
        steps.append(T.ColorJitter(brightness=cfg.color_jitter, contrast=cfg.color_jitter,
                                   saturation=cfg.color_jitter))
    return T.Compose(steps + to_tensor)
