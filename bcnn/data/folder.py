"""Class-per-folder data: root/train/<class>/*.jpg and root/test/<class>/*.jpg (val held out of train/)."""

from __future__ import annotations

import filecmp
import os
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS

from bcnn.data.dataset import _ImageDataset, check_dataset_folder, check_images, listed_twice, select_split
from bcnn.errors import UserError

HOLDS = "train/<class>/ and test/<class>/"
DELETE_ONE = "delete one of them"


def _class_folders(folder: Path) -> list[str]:
    if not folder.is_dir():
        state = "is not a folder" if folder.exists() else "does not exist"
        raise UserError(f"{folder} {state}; a folder dataset needs root/train/<class>/ and root/test/<class>/.")
    return sorted(entry.name for entry in folder.iterdir() if entry.is_dir())


def _list_images(folder: Path, classes: list[str]) -> list[tuple[str, int]]:
    return [(str(path), label) for label, name in enumerate(classes) for path in sorted((folder / name).iterdir())
            if path.is_file() and path.suffix.lower() in IMG_EXTENSIONS]


def _check_each_image_once(trainval: list[tuple[str, int]], test: list[tuple[str, int]]) -> None:
    """No image twice: one file reached by two paths (a link; check_images), nor a test image copied into train/
    under its own file name (same name and bytes, in any class). Files that only share a name are different images
    (many layouts number each folder from 1), and copies renamed are not looked for: that would read every image."""
    check_images({"train": [(path, "", "") for path, _ in trainval], "test": [(path, "", "") for path, _ in test]},
                 "train/ and test/", DELETE_ONE)
    by_name: dict[tuple[str, int], list[str]] = {}
    for path, _ in trainval:
        by_name.setdefault((os.path.basename(path), os.path.getsize(path)), []).append(path)
    for path, _ in test:
        for twin in by_name.get((os.path.basename(path), os.path.getsize(path)), []):
            if filecmp.cmp(twin, path, shallow=False):
                raise listed_twice("train", (twin, "", ""), "test", (path, "", ""), DELETE_ONE)


class FolderDataset(_ImageDataset):
    """Class-per-folder data: root/train/<class>/*.jpg and root/test/<class>/*.jpg; val is held out of train/."""

    ADD_TRAINING_IMAGES = "put images in each such class's train/<class>/ folder, or remove it from train/ and test/"
    FOLDER_HOLDS = HOLDS

    def __init__(self, root, split="train", val_fraction=0.0, split_seed=0, transform=None, target_transform=None):
        root = Path(root).absolute()
        check_dataset_folder(root, "Dataset", HOLDS, f"pass the folder holding {HOLDS}")
        classes, test_classes = _class_folders(root / "train"), _class_folders(root / "test")
        if not classes:
            raise UserError(f"{root / 'train'} has no class folders; put each class's images in train/<class>/.")
        if classes != test_classes:
            odd = sorted(set(classes) ^ set(test_classes))[0]
            raise UserError(f"train/ and test/ of {root} differ in class folders (e.g. {odd!r}); make them match.")
        trainval, test = _list_images(root / "train", classes), _list_images(root / "test", classes)
        _check_each_image_once(trainval, test)
        records = select_split(split, trainval, test, val_fraction, split_seed)
        super().__init__(root, split, classes, records, transform, target_transform)
