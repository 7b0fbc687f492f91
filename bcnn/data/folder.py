"""Class-per-folder data: root/train/<class>/*.jpg and root/test/<class>/*.jpg (val held out of train/)."""

from __future__ import annotations

from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS

from bcnn.data.dataset import _ImageDataset, select_split
from bcnn.errors import UserError

def _class_folders(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise UserError(
            f"{folder} does not exist; a folder dataset needs root/train/<class>/ and root/test/<class>/."
        )
    return sorted(entry.name for entry in folder.iterdir() if entry.is_dir())


def _list_images(folder: Path, classes: list[str]) -> list[tuple[str, int]]:
    return [(str(path), label) for label, name in enumerate(classes) for path in sorted((folder / name).iterdir())
            if path.is_file() and path.suffix.lower() in IMG_EXTENSIONS]


class FolderDataset(_ImageDataset):
    """Class-per-folder data: root/train/<class>/*.jpg and root/test/<class>/*.jpg; val is held out of train/."""

    ADD_TRAINING_IMAGES = "put images in each such class's train/<class>/ folder, or remove it from train/ and test/"

    def __init__(self, root, split="train", val_fraction=0.0, split_seed=0, transform=None, target_transform=None):
        root = Path(root).absolute()
        classes, test_classes = _class_folders(root / "train"), _class_folders(root / "test")
        if not classes:
            raise UserError(f"{root / 'train'} has no class folders; put each class's images in train/<class>/.")
        if classes != test_classes:
            odd = sorted(set(classes) ^ set(test_classes))[0]
            raise UserError(f"train/ and test/ of {root} differ in class folders (e.g. {odd!r}); make them match.")
        trainval, test = _list_images(root / "train", classes), _list_images(root / "test", classes)
        records = select_split(split, trainval, test, val_fraction, split_seed)
        super().__init__(root, split, classes, records, transform, target_transform)
