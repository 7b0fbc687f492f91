"""Data: a reader per on-disk format (cub.py, aircraft.py, cars.py, nabirds.py, flowers.py, dogs.py, inat.py,
folder.py), the dataset and splits they share (dataset.py), the recipe's transforms, loaders, download, and a
synthetic writer per format; `python -m bcnn.data` is the CLI.

Splits: `trainval` is the official train split, `val` a stratified seeded hold-out of it (data.val_fraction,
data.split_seed), `train` the rest, `test` the official test split, which training never reads. A format with its
own val split (FGVC-Aircraft, Oxford Flowers-102) uses it instead: `train` and `val` are the official ones,
`trainval` both. iNaturalist has no public test labels: its `test` is the official val set.

    python -m bcnn.data download --root data                  # -> data/CUB_200_2011, md5-checked, verified
    python -m bcnn.data download --dataset aircraft --root data  # -> data/fgvc-aircraft-2013b
    python -m bcnn.data synth --root demo/mini_cub --classes 5 --per-class 12 --seed 0
    python -m bcnn.data synth --format cars --root demo       # -> demo/stanford_cars, the .mat files included
    python -m bcnn.data verify --root data/CUB_200_2011       # per-split counts and number of classes

    train_set = build_dataset(cfg.data, "train")
    loader = build_loader(train_set, batch_size=64, train=True, num_workers=4, seed=0, rank=0, world_size=1)
    loader.sampler.set_epoch(epoch, skip)  # before each training epoch; skip > 0 only when resuming mid-epoch
"""

from __future__ import annotations

from functools import partial

import torch

from bcnn.config import CPU_ONLY_AUGMENTATIONS, DataConfig
from bcnn.data.aircraft import AIRCRAFT_FOLDER, FGVCAircraftDataset, download_aircraft, write_synthetic_aircraft
from bcnn.data.cars import CARS_FOLDER, StanfordCarsDataset, download_cars, write_synthetic_cars
from bcnn.data.class_split import class_disjoint_split
from bcnn.data.cub import CUB200, download_cub, write_synthetic_cub
from bcnn.data.dataset import (REPLACE_IMAGE, SPLITS, _ImageDataset, clean_class_name, describe_splits, load_rgb,
                                refuse_a_file)
from bcnn.data.dogs import DOGS_FOLDER, StanfordDogsDataset, download_dogs, write_synthetic_dogs
from bcnn.data.flowers import FLOWERS_FOLDER, FlowersDataset, download_flowers, write_synthetic_flowers
from bcnn.data.folder import FolderDataset
from bcnn.data.gpu import DeviceDecodeLoader
from bcnn.data.inat import INAT_FOLDERS, INATURALIST, download_inaturalist, write_synthetic_inaturalist
from bcnn.data.nabirds import NABIRDS_FOLDER, NABirdsDataset, download_nabirds, write_synthetic_nabirds
from bcnn.data.loader import build_loader, default_num_workers
from bcnn.data.transforms import IMAGENET_MEAN, IMAGENET_NORMALISATION, IMAGENET_STD, build_transforms
from bcnn.errors import UserError

# data.format -> the reader of that layout: Dataset(root, split, val_fraction, split_seed, *OPTIONS, transform=...)
READERS = {"cub": CUB200, "aircraft": FGVCAircraftDataset, "cars": StanfordCarsDataset, "nabirds": NABirdsDataset,
           "flowers": FlowersDataset, "dogs": StanfordDogsDataset, **INATURALIST, "folder": FolderDataset}
# data.format -> a synthetic writer in that layout: (root, classes, per_class, seed, image_size) -> dataset folder
WRITERS = {"cub": write_synthetic_cub, "aircraft": write_synthetic_aircraft, "cars": write_synthetic_cars,
           "nabirds": write_synthetic_nabirds, "flowers": write_synthetic_flowers, "dogs": write_synthetic_dogs,
           **{name: partial(write_synthetic_inaturalist, name) for name in INATURALIST}}
# data.format -> download(root) into root / FOLDERS[format], or, for a dataset without one, the check of a copy placed
# there by hand
DOWNLOADS = {"cub": download_cub, "aircraft": download_aircraft, "cars": download_cars, "nabirds": download_nabirds,
             "flowers": download_flowers, "dogs": download_dogs,
             **{name: partial(download_inaturalist, name) for name in INATURALIST}}
# data.format -> the name of the dataset's own folder, as its archive extracts (the folder --data-root takes)
FOLDERS = {"cub": "CUB_200_2011", "aircraft": AIRCRAFT_FOLDER, "cars": CARS_FOLDER, "nabirds": NABIRDS_FOLDER,
           "flowers": FLOWERS_FOLDER, "dogs": DOGS_FOLDER, **INAT_FOLDERS}

__all__ = ["CUB200", "DOWNLOADS", "FGVCAircraftDataset", "FOLDERS", "FlowersDataset", "FolderDataset",
           "IMAGENET_MEAN", "IMAGENET_NORMALISATION", "IMAGENET_STD", "INATURALIST", "NABirdsDataset", "READERS",
           "REPLACE_IMAGE", "SPLITS", "StanfordCarsDataset", "StanfordDogsDataset", "WRITERS", "build_dataset",
           "build_image_loader", "build_loader", "build_transforms",
           "clean_class_name", "default_num_workers", "describe", "download_cub", "load_rgb",
           "write_synthetic_cub"]


def build_dataset(cfg: DataConfig, split: str, train_transform: bool | None = None,
                  normalisation=IMAGENET_NORMALISATION) -> _ImageDataset:
    """The split of cfg.root in cfg.format, with train augmentation for train/trainval unless told otherwise;
    dataset.normalisation is the (mean, std) its tensors were normalised with."""
    train = split in ("train", "trainval") if train_transform is None else train_transform
    transform = build_transforms(cfg, train, normalisation)
    reader = READERS.get(cfg.format)
    if reader is None:
        raise UserError(f"unknown data.format {cfg.format!r}; use {', '.join(READERS)}.")
    if cfg.crop_to_bbox and not reader.HAS_BOXES:
        boxed = " or ".join(name for name, other in READERS.items() if other.HAS_BOXES)
        raise UserError(f"data.crop_to_bbox needs bounding boxes, which only data.format={boxed} has; set it to "
                        "false.")
    refuse_a_file(cfg.root, "--data-root (data.root)", reader.FOLDER_HOLDS)
    options = {name: getattr(cfg, name) for name in reader.OPTIONS}
    if cfg.class_split == "retrieval":  # classes halved, whatever the official split (bcnn/data/class_split.py)
        dataset = class_disjoint_split(lambda official: reader(cfg.root, official, 0.0, cfg.split_seed,
                                                               transform=transform, **options),
                                       split, cfg.val_fraction, cfg.split_seed)
    else:
        dataset = reader(cfg.root, split, cfg.val_fraction, cfg.split_seed, transform=transform, **options)
    dataset.normalisation = normalisation
    return dataset


def describe(root, data_format: str = "cub", val_fraction: float = 0.0, split_seed: int = 0) -> str:
    """One line: the dataset at root in data_format, its classes and per-split image counts (reading checks it),
    and what its splits are where the names alone would mislead (iNaturalist's test is its official val set)."""
    reader = READERS[data_format]
    return describe_splits(reader, root, val_fraction, split_seed) + getattr(reader, "SPLITS_NOTE", "")


def decode_on_device(cfg: DataConfig, device) -> bool:
    """Whether data.decode puts decoding and augmentation on the training device (bcnn/data/gpu.py)."""
    if cfg.decode == "auto":
        return torch.device(device).type == "cuda" and not any(getattr(cfg, name) for name in CPU_ONLY_AUGMENTATIONS)
    return cfg.decode == "gpu"


def build_image_loader(cfg: DataConfig, dataset: _ImageDataset, batch_size: int, train: bool, seed: int, device,
                       rank: int = 0, world_size: int = 1, num_workers: int | None = None):
    """This rank's loader of dataset's images for steps on `device`, decoded where data.decode says: by PIL in
    the loader workers (a DataLoader), or in batches on the device (a DeviceDecodeLoader, the same face)."""
    device = torch.device(device)
    workers = cfg.num_workers if num_workers is None else num_workers
    if decode_on_device(cfg, device):
        return DeviceDecodeLoader(dataset, cfg, batch_size, train, workers, seed, device, rank, world_size)
    return build_loader(dataset, batch_size, train, workers, seed, rank, world_size, pin_memory=device.type == "cuda")
