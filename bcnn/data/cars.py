"""Stanford Cars: torchvision's StanfordCars reads the devkit's .mat annotations (paths, labels, class names); we
read the bounding boxes it drops from the same files, check everything, and write a synthetic copy in its layout.

There is no working official download: Stanford took the files down. torchvision's layout, which we read:
    stanford_cars/devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_train/*.jpg,
    stanford_cars/cars_test/*.jpg, cars_test_annos_withlabels.mat
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import numpy as np
import scipy.io
from torchvision.datasets import StanfordCars

from bcnn.data.dataset import (_BoxedDataset, check_box, check_images, check_synthetic_sizes,
                               check_torchvision_folder, describe_splits, path_only, synthetic_image)
from bcnn.data.download import make_folder, placed_by_hand
from bcnn.errors import UserError
from bcnn.paths import not_a_file

CARS_FOLDER = "stanford_cars"  # torchvision only reads the dataset under this folder name
CARS_FILES = {"train": ("devkit/cars_train_annos.mat", "cars_train"),
              "test": ("cars_test_annos_withlabels.mat", "cars_test")}
HOLDS = "devkit/, cars_train/, cars_test/ and cars_test_annos_withlabels.mat"
REFETCH = "fetch that file again from your copy of the original release"
CORRECT_BOX = f"correct it or {REFETCH}"


def get_cars(folder: Path) -> str:
    """How to put Stanford Cars into folder, which does not exist: the folder the user named (under the name
    torchvision needs), not a default."""
    place = "there" if folder.name == CARS_FOLDER else f"into {folder.parent / CARS_FOLDER}"
    return f"there is no official download: copy {HOLDS} {place} from the original release"


def _load_mat(path: Path, key: str):
    try:
        return scipy.io.loadmat(path, squeeze_me=True)[key]
    except KeyError:
        raise UserError(f"{path} has no {key!r} table, so it is not the devkit's file; {REFETCH}.") from None
    except Exception as error:  # scipy raises MatReadError, ValueError, TypeError, ... on a damaged file
        raise UserError(f"cannot read {path} as a MATLAB file ({error}); {REFETCH}.") from None


def _boxes(mat_path: Path) -> list[tuple[tuple[float, float, float, float], str]]:
    """Per annotation, in the file's order: ((x, y, w, h) from the devkit's 1-based, corner-inclusive (x1, y1, x2,
    y2), checked by check_box; the words naming the annotation, for a sentence about its box later)."""
    boxes = []
    for number, row in enumerate(np.atleast_1d(_load_mat(mat_path, "annotations")), 1):
        try:
            x1, y1, x2, y2 = (float(row[field]) for field in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"))
            fname = str(row["fname"])
        except (ValueError, TypeError, IndexError):
            raise UserError(f"{mat_path} has an annotation without bbox_x1..bbox_y2 and fname; {REFETCH}.") from None
        described = (f"the box of annotation {number} of {mat_path} ({fname}; bbox_x1 y1 x2 y2: "
                     f"{x1:g} {y1:g} {x2:g} {y2:g})")
        boxes.append((check_box((x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1), described, CORRECT_BOX), described))
    return boxes


def _official_split(root: Path, split: str, num_classes: int) -> list[tuple[str, int, tuple]]:
    mat_name = CARS_FILES[split][0]
    boxes = _boxes(root / mat_name)  # first: a damaged file is then one sentence, whatever torchvision would raise
    if "loader" not in inspect.signature(StanfordCars).parameters:
        raise UserError("data.format=cars reads the devkit with torchvision's StanfordCars(loader=...), which this "
                        "torchvision lacks; upgrade it (pip install -U torchvision).")
    try:
        listed = StanfordCars(root.parent, split, loader=path_only)
        pairs = [listed[index] for index in range(len(listed))]
    except (ValueError, IndexError, KeyError, TypeError) as error:  # TypeError: e.g. a table of one annotation
        raise UserError(f"cannot read the annotations in {root / mat_name} ({error!r}); {REFETCH}.") from None
    records = []
    # torchvision lists the annotations in the file's order, as _boxes does: matched by position, not by fname,
    # which a file may give twice (check_images then says so) or with a folder in it.
    for (path, label), box in zip(pairs, boxes, strict=True):
        try:
            number = float(label) + 1  # the file's own, 1-based
        except (TypeError, ValueError):  # an empty class field
            number = math.nan
        if not (number.is_integer() and 1 <= number <= num_classes):  # int() would make 2.5 class 2 silently
            raise UserError(f"{root / mat_name} gives {Path(path).name} class {number:g}, but cars_meta.mat has "
                            f"classes 1..{num_classes}; {REFETCH}.")
        records.append((path, int(number) - 1, *box))
    return records


def read_cars(root: Path) -> tuple[list[str], list, list]:
    """Check a stanford_cars folder; return (class names, official train, test), records (path, label, bbox, the
    words naming the bbox's annotation)."""
    check_torchvision_folder(root, "Stanford Cars", CARS_FOLDER, "devkit", HOLDS, "StanfordCars", get_cars(root))
    for relative in ("devkit/cars_meta.mat", *(name for files in CARS_FILES.values() for name in files)):
        path, folder = root / relative, not relative.endswith(".mat")
        kind = not_a_file(path)  # None for a file
        if folder:
            kind = None if kind == "a folder" else kind if kind == "missing" else f"{kind or 'a file'}, not a folder"
        if kind:
            raise UserError(f"{path} is {kind}; restore it from your copy of the original Stanford Cars release.")
    classes = [str(name) for name in np.atleast_1d(_load_mat(root / "devkit" / "cars_meta.mat", "class_names"))]
    splits = {split: _official_split(root, split, len(classes)) for split in CARS_FILES}
    # torchvision lists the annotations in the file's order, so entry numbers point into the .mat file.
    check_images({split: [(path, CARS_FILES[split][0], f"annotation {number}")
                          for number, (path, *_) in enumerate(records, 1)] for split, records in splits.items()},
                 "the annotation files", REFETCH)
    return classes, splits["train"], splits["test"]


class StanfordCarsDataset(_BoxedDataset):
    """Stanford Cars (196 classes) with its boxes; val is a stratified hold-out of the official train split."""

    ADD_TRAINING_IMAGES = f"{REFETCH}: every class needs images in cars_train_annos.mat"
    FIX_BOX = CORRECT_BOX
    FOLDER_HOLDS = HOLDS
    read = staticmethod(read_cars)


def download_cars(root: str) -> Path:
    """No download: verify a copy placed by hand in root/stanford_cars, or say where to put one."""
    return placed_by_hand(root, CARS_FOLDER, get_cars, lambda folder: describe_splits(StanfordCarsDataset, folder, 0.1))


def _annotations(rows: list[tuple[int, int, int, int, int, str]], with_class: bool = True) -> np.ndarray:
    """A 1xN MATLAB struct array with the devkit's fields and integer types."""
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"] + (["class"] if with_class else []) + ["fname"]
    table = np.zeros((1, len(rows)), dtype=[(field, object) for field in fields])
    for column, (x1, y1, x2, y2, label, fname) in enumerate(rows):
        values = [np.array([[v]], dtype=np.uint16) for v in (x1, y1, x2, y2)]
        values += [np.array([[label]], dtype=np.uint8)] if with_class else []
        table[0, column] = tuple(values + [np.array([fname])])
    return table


def write_synthetic_cars(root, classes: int = 5, per_class: int = 12, seed: int = 0, image_size: int = 96) -> Path:
    """Write a mini Stanford Cars in torchvision's stanford_cars layout, .mat files included, deterministically
    from seed; returns the stanford_cars folder under root. About half of each class is train, as in the real set;
    train and test images are numbered 00001.jpg.. separately, and image 1 of train is grayscale."""
    # torchvision's StanfordCars cannot read a .mat table of one entry (scipy squeezes it to a scalar).
    check_synthetic_sizes("Stanford Cars", classes, per_class, image_size, least_classes=2)
    dataset_dir, rng = Path(root) / CARS_FOLDER, np.random.default_rng(seed)
    for folder in ("devkit", "cars_train", "cars_test"):
        make_folder(dataset_dir / folder)
    rows = {"train": [], "test": []}
    for label in range(classes):
        for index in range(per_class):
            split = "train" if index % 2 == 0 else "test"
            fname = f"{len(rows[split]) + 1:05d}.jpg"
            image, (x, y, w, h) = synthetic_image(rng, label / classes, np.pi * label / classes, image_size)
            mode = "L" if split == "train" and not rows["train"] else "RGB"
            image.convert(mode).save(dataset_dir / CARS_FILES[split][1] / fname, quality=92)
            rows[split].append((x + 1, y + 1, x + w, y + h, label + 1, fname))
    names = np.array([[f"Synthetic Car {k + 1} 2012" for k in range(classes)]], dtype=object)
    scipy.io.savemat(dataset_dir / "devkit" / "cars_meta.mat", {"class_names": names})
    scipy.io.savemat(dataset_dir / "devkit" / "cars_train_annos.mat", {"annotations": _annotations(rows["train"])})
    scipy.io.savemat(dataset_dir / "devkit" / "cars_test_annos.mat",
                     {"annotations": _annotations(rows["test"], with_class=False)})
    scipy.io.savemat(dataset_dir / "cars_test_annos_withlabels.mat", {"annotations": _annotations(rows["test"])})
    return dataset_dir
