"""Oxford Flowers-102: the reader (imagelabels.mat and setid.mat, checked), its official train / val / test
splits, the download, a synthetic writer in its exact layout, and the download of a dataset that comes in several
files (download_parts; Stanford Dogs and iNaturalist use it too).

torchvision's Flowers102 md5-checks the two .mat files before reading them, so it reads the release's own files
and no other copy (a synthetic one, or one with a list fixed by hand): the reader reads them as it does (scipy,
squeeze_me) and takes its 102 class names. The layout, torchvision's:
    flowers-102/jpg/image_00001.jpg ..., flowers-102/imagelabels.mat, flowers-102/setid.mat
"""

from __future__ import annotations

import gzip
import os
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import scipy.io
from torchvision.datasets import Flowers102

from bcnn.data.dataset import (_ImageDataset, check_dataset_folder, check_images, check_synthetic_sizes,
                               describe_splits, read_mat, select_split, synthetic_image, whole_numbers)
from bcnn.data.download import check_room, fetch, fetch_advice, make_folder, md5_of, safe_extract
from bcnn.errors import UserError

FLOWERS_FOLDER = "flowers-102"  # torchvision's name for it; ours reads it under any name
# The release's files on the VGG page, with the md5s torchvision checks.
FLOWERS_URL = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"
FLOWERS_MD5 = {"102flowers.tgz": "52808999861908f626f3c1f4e79d11fa",
               "imagelabels.mat": "e0620be6f572b9609742df49c70aed4d", "setid.mat": "a5357ecc9cb78c4bef273ce3793fc85c"}
SPLIT_TABLES = {"train": "trnid", "val": "valid", "test": "tstid"}  # setid.mat's image-id lists, 1-based
CLASS_NAMES = Flowers102.classes  # the 102 names, in label order (torchvision's list)
HOLDS = "jpg/, imagelabels.mat and setid.mat"


def refetch(root: Path) -> str:
    return f"fetch the file again (python -m bcnn.data download --dataset flowers --root {root.parent})"


def read_flowers(root: Path) -> tuple[list[str], list, list, list]:
    """Check a flowers-102 folder; return (class names, official train, val, test), records (path, label)."""
    check_dataset_folder(root, "Oxford Flowers-102", HOLDS, fetch_advice(root, FLOWERS_FOLDER, "flowers"),
                         FLOWERS_FOLDER, "setid.mat")
    fix = refetch(root)
    [given] = read_mat(root / "imagelabels.mat", ("labels",), fix)
    id_lists = read_mat(root / "setid.mat", tuple(SPLIT_TABLES.values()), fix)
    if not (root / "jpg").is_dir():
        raise UserError(f"{root / 'jpg'} is not a folder, so {root} is not a complete {FLOWERS_FOLDER} folder; "
                        f"extract 102flowers.tgz there.")
    labels, bad, shown = whole_numbers(given, 1, len(CLASS_NAMES))
    if bad is not None:
        raise UserError(f"{root / 'imagelabels.mat'} gives image {bad + 1} the class {shown}, but Oxford Flowers-102 "
                        f"has classes 1..{len(CLASS_NAMES)}; {fix}.")
    splits = {}
    for (split, table), listed in zip(SPLIT_TABLES.items(), id_lists):
        ids, bad, shown = whole_numbers(listed, 1, len(labels))
        if bad is not None:
            raise UserError(f"entry {bad + 1} of {table} in {root / 'setid.mat'} is image {shown}, but "
                            f"imagelabels.mat labels images 1..{len(labels)}; {fix}.")
        splits[split] = [(os.path.join(root, "jpg", f"image_{image_id:05d}.jpg"), int(labels[image_id - 1]) - 1)
                         for image_id in ids]
    # An image in two lists (or twice in one) is the same path, so the same file: check_images names both entries.
    check_images({split: [(path, "setid.mat", f"{SPLIT_TABLES[split]} entry {number}")
                          for number, (path, _) in enumerate(records, 1)] for split, records in splits.items()},
                 "setid.mat", fix)
    return CLASS_NAMES[:int(labels.max())], splits["train"], splits["val"], splits["test"]


class FlowersDataset(_ImageDataset):
    """Oxford Flowers-102 (102 classes, torchvision's names). It has its own val split, as FGVC-Aircraft:
    data.val_fraction > 0 trains on the official train split (10 images a class) and validates on the official val
    split (10 a class); 0 trains on both (trainval), with no val. test is the official test split (6,149)."""

    ADD_TRAINING_IMAGES = "list images of every class in setid.mat's trnid, or fetch setid.mat again"
    FOLDER_HOLDS = HOLDS
    OFFICIAL_VAL = True

    def __init__(self, root, split="train", val_fraction=0.0, split_seed=0, transform=None, target_transform=None):
        root = Path(root).absolute()
        classes, train, val, test = read_flowers(root)
        records = select_split(split, train, test, val_fraction, split_seed, official_val=val)
        super().__init__(root, split, classes, records, transform, target_transform)


class Part(NamedTuple):
    """One file of a dataset that comes in several: its name, its URL, its md5 (None where the source publishes
    none: the reader's verify then checks what it holds), and the path in the dataset folder that it extracts to
    (None: a plain file, fetched into the dataset folder and kept as it is)."""

    file: str
    url: str
    md5: str | None
    extracts: str | None


def _check_md5(path: Path, md5: str | None) -> None:
    if md5 and md5_of(path) != md5:
        raise UserError(f"{path} has the wrong md5 (expected {md5}); delete it and run the download again.")


def extract(archive: Path, into: Path) -> None:
    """A .tar(.gz) through download.safe_extract, a .zip through zipfile, which keeps every member inside `into`
    itself (it drops leading slashes and `..`); a damaged or truncated archive is one sentence."""
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zipped:
                zipped.extractall(into)
        else:
            safe_extract(archive, into)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise UserError(f"cannot extract {archive} ({error}); delete it and run the download again.") from None


def download_parts(root, folder: str, parts: list[Part], verify: Callable[[Path], str]) -> Path:
    """Fetch, md5-check (where the source gives an md5), safely extract and verify each part into root/folder; a
    no-op once it verifies. Archives are kept in root beside the folder, as download_dataset keeps its one; an
    archive whose extracted path is there is not fetched again, unless the folder fails to verify."""
    root = Path(root)
    dataset_dir = root / folder
    check_room(dataset_dir)  # before a large download, not at its extraction
    placed = [dataset_dir / (part.extracts or part.file) for part in parts]
    again = False
    if all(path.exists() for path in placed):
        try:
            print(f"already present, nothing to do: {verify(dataset_dir)}")
            return dataset_dir
        except UserError as error:
            print(f"{dataset_dir} is incomplete ({error}); extracting again")
            again = True
    make_folder(dataset_dir)
    for part, path in zip(parts, placed):
        if part.extracts is None:  # small files: checked every time
            if not path.is_file():
                fetch(part.url, path)
            _check_md5(path, part.md5)
        elif again or not path.exists():
            archive = root / part.file
            if not archive.is_file():
                fetch(part.url, archive)
            _check_md5(archive, part.md5)
            extract(archive, dataset_dir)
    print(f"extracted and verified: {verify(dataset_dir)}")
    return dataset_dir


def download_flowers(root: str, url: str = FLOWERS_URL, md5: dict[str, str] = FLOWERS_MD5) -> Path:
    """Fetch, md5-check, safely extract and verify Oxford Flowers-102 into root/flowers-102 (102flowers.tgz, whose
    jpg/ goes there, and the two .mat files); no-op once it verifies. url: the folder holding the three files."""
    parts = [Part(name, url + name, md5[name], "jpg" if name.endswith(".tgz") else None) for name in md5]
    return download_parts(root, FLOWERS_FOLDER, parts, lambda folder: describe_splits(FlowersDataset, folder, 0.1))


def write_synthetic_flowers(root, classes: int = 5, per_class: int = 12, seed: int = 0, image_size: int = 96) -> Path:
    """Write a mini Oxford Flowers-102 in its exact layout (jpg/image_NNNNN.jpg numbered in a shuffled order,
    imagelabels.mat and setid.mat with the release's tables and integer types), deterministically from seed;
    returns the flowers-102 folder under root. Per class, images go to trnid, valid and tstid in turn."""
    check_synthetic_sizes("Oxford Flowers-102", classes, per_class, image_size)
    if classes > len(CLASS_NAMES):
        raise UserError(f"--classes must be at most {len(CLASS_NAMES)} for a synthetic Oxford Flowers-102 (the "
                        f"class names are the real ones), got {classes}.")
    dataset_dir, rng = Path(root) / FLOWERS_FOLDER, np.random.default_rng(seed)
    make_folder(dataset_dir / "jpg")
    numbers = rng.permutation(classes * per_class) + 1  # the release's numbering does not follow the classes
    labels = np.zeros(classes * per_class, dtype=np.uint8)
    lists = {table: [] for table in SPLIT_TABLES.values()}
    for label in range(classes):
        for index in range(per_class):
            image_id = int(numbers[label * per_class + index])
            image, _ = synthetic_image(rng, label / classes, np.pi * label / classes, image_size)
            image.save(dataset_dir / "jpg" / f"image_{image_id:05d}.jpg", quality=92)
            labels[image_id - 1] = label + 1
            lists[("trnid", "valid", "tstid")[index % 3]].append(image_id)
    scipy.io.savemat(dataset_dir / "imagelabels.mat", {"labels": labels[None, :]})  # 1 x N, as the release's
    scipy.io.savemat(dataset_dir / "setid.mat", {table: np.array([ids], dtype=np.uint16) for table, ids in
                                                 lists.items()})
    return dataset_dir
