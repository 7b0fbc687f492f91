"""Data: a reader per on-disk format (cub.py, folder.py), the dataset and splits they share (dataset.py), the
recipe's transforms, loaders, download, and a synthetic writer per format; `python -m bcnn.data` is the CLI.

Splits: `trainval` is the official train split, `val` a stratified seeded hold-out of it (data.val_fraction,
data.split_seed), `train` the rest, `test` the official test split, which training never reads.

    python -m bcnn.data download --root data                  # -> data/CUB_200_2011, md5-checked, verified
    python -m bcnn.data synth --root demo/mini_cub --classes 5 --per-class 12 --seed 0
    python -m bcnn.data verify --root data/CUB_200_2011       # per-split counts and number of classes

    train_set = build_dataset(cfg.data, "train")
    loader = build_loader(train_set, batch_size=64, train=True, num_workers=4, seed=0, rank=0, world_size=1)
    loader.sampler.set_epoch(epoch, skip)  # before each training epoch; skip > 0 only when resuming mid-epoch
"""

from __future__ import annotations

from bcnn.config import DataConfig
from bcnn.data.cub import CUB200, download_cub, write_synthetic_cub
from bcnn.data.dataset import REPLACE_IMAGE, SPLITS, _ImageDataset, clean_class_name, describe_splits, load_rgb
from bcnn.data.folder import FolderDataset
from bcnn.data.loader import build_loader, default_num_workers
from bcnn.data.transforms import IMAGENET_MEAN, IMAGENET_NORMALISATION, IMAGENET_STD, build_transforms
from bcnn.errors import UserError

# data.format -> the reader of that layout: Dataset(root, split, val_fraction, split_seed, transform=...)
READERS = {"cub": CUB200, "folder": FolderDataset}

__all__ = ["CUB200", "FolderDataset", "IMAGENET_MEAN", "IMAGENET_NORMALISATION", "IMAGENET_STD", "READERS",
           "REPLACE_IMAGE", "SPLITS", "build_dataset", "build_loader", "build_transforms", "clean_class_name",
           "default_num_workers", "describe", "download_cub", "load_rgb", "write_synthetic_cub"]


def build_dataset(cfg: DataConfig, split: str, train_transform: bool | None = None,
                  normalisation=IMAGENET_NORMALISATION) -> _ImageDataset:
    """The split of cfg.root in cfg.format, with train augmentation for train/trainval unless told otherwise;
    dataset.normalisation is the (mean, std) its tensors were normalised with."""
    train = split in ("train", "trainval") if train_transform is None else train_transform
    transform = build_transforms(cfg, train, normalisation)
    if cfg.format not in READERS:
        raise UserError(f"unknown data.format {cfg.format!r}; use {' or '.join(READERS)}.")
    if cfg.crop_to_bbox and not READERS[cfg.format].HAS_BOXES:
        boxed = " or ".join(name for name, reader in READERS.items() if reader.HAS_BOXES)
        raise UserError(f"data.crop_to_bbox needs bounding boxes, which only data.format={boxed} has; set it to "
                        "false.")
    options = {"crop_to_bbox": cfg.crop_to_bbox} if READERS[cfg.format].HAS_BOXES else {}
    dataset = READERS[cfg.format](cfg.root, split, cfg.val_fraction, cfg.split_seed, transform=transform, **options)
    dataset.normalisation = normalisation
    return dataset


def describe(root, data_format: str = "cub", val_fraction: float = 0.0, split_seed: int = 0) -> str:
    """One line: the dataset at root in data_format, its classes and per-split image counts (reading checks it)."""
    return describe_splits(READERS[data_format], root, val_fraction, split_seed)
