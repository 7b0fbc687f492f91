"""FGVC-Aircraft 2013b: torchvision's FGVCAircraft reads the lists, we check them and the images, cut off the
20-px copyright banner, download the archive, and write a synthetic copy in its exact layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.datasets import FGVCAircraft

from bcnn.data.dataset import (_ImageDataset, check_images, check_synthetic_sizes, check_torchvision_folder,
                               describe_splits, path_only, read_utf8, select_split, synthetic_image)
from bcnn.data.download import download_dataset, fetch_advice, make_folder
from bcnn.errors import UserError
from bcnn.paths import not_a_file

AIRCRAFT_URL = "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz"
AIRCRAFT_MD5 = "d4acdd33327262359767eeaa97a4f732"
AIRCRAFT_FOLDER = "fgvc-aircraft-2013b"  # the archive's top folder; torchvision only reads it under this name
BANNER = 20  # every image ends in a 20-px copyright strip; the B-CNN protocol (and the dataset's readme) drop it
LEVELS = {"variant": "variants.txt", "family": "families.txt", "manufacturer": "manufacturers.txt"}
HOLDS = "data/ (its images/ and lists)"
REEXTRACT = f"re-extract {AIRCRAFT_FOLDER}.tar.gz"


def _where(path: Path, matches) -> str:
    """"line N of <path>" for the first line of a list whose fields, split as torchvision splits them, match."""
    lines = read_utf8(path, f"fix the file or {REEXTRACT}").splitlines()
    number = next((number for number, line in enumerate(lines, 1) if matches(line.strip().split(" ", 1))), None)
    return f"{path}" if number is None else f"line {number} of {path}"


def _official_split(root: Path, split: str, level: str) -> tuple[list[tuple[str, int]], list[str]]:
    list_path = root / "data" / f"images_{level}_{split}.txt"
    try:
        listed = FGVCAircraft(root.parent, split, annotation_level=level, loader=path_only)
    except TypeError:  # a torchvision whose datasets take no loader=
        raise UserError("data.format=aircraft reads the lists with torchvision's FGVCAircraft(loader=...), which "
                        "this torchvision lacks; upgrade it (pip install -U torchvision).") from None
    except KeyError as error:  # a label the level's class list does not have
        label = error.args[0]
        where = _where(list_path, lambda fields: len(fields) == 2 and fields[1] == label)
        raise UserError(f"{where} names the {level} {label!r}, which is not in {LEVELS[level]}; fix the file or "
                        f"{REEXTRACT}.") from None
    except ValueError:  # a line without "<image> <label>"
        where = _where(list_path, lambda fields: len(fields) != 2)
        raise UserError(f"{where} is not an image name and a label; fix the file or {REEXTRACT}.") from None
    return [listed[index] for index in range(len(listed))], listed.classes


def _check_class_list(path: Path, level: str) -> None:
    """torchvision takes every line of the class list as a class, as it stands: a blank line would be a class
    named '' and a name given twice two classes, one of them never labelled (the model would keep an output for
    it); either is one sentence naming the line."""
    first_line: dict[str, int] = {}
    for number, line in enumerate(read_utf8(path, f"fix the file or {REEXTRACT}").splitlines(), 1):
        name = line.strip()
        if not name:
            raise UserError(f"line {number} of {path} is blank, which would be a {level} without a name; delete the "
                            f"line or {REEXTRACT}.")
        if name in first_line:
            raise UserError(f"line {number} of {path} names the {level} {name!r} again (line {first_line[name]} "
                            f"does); delete one of them or {REEXTRACT}.")
        first_line[name] = number


def read_aircraft(root: Path, level: str = "variant") -> tuple[list[str], list, list, list]:
    """Check an fgvc-aircraft-2013b folder; return (class names, official train, val, test), records (path, label)."""
    if level not in LEVELS:
        raise UserError(f"unknown data.annotation_level {level!r}; use {', '.join(LEVELS)}.")
    check_torchvision_folder(root, "FGVC-Aircraft", AIRCRAFT_FOLDER, "data", HOLDS, "FGVCAircraft",
                             fetch_advice(root, AIRCRAFT_FOLDER, "aircraft"))
    needed = [LEVELS[level]] + [f"images_{level}_{split}.txt" for split in ("train", "val", "test")]
    for name in needed:
        kind = not_a_file(root / "data" / name)
        if kind:
            raise UserError(f"{root / 'data' / name} is {kind}, so {root} is not a complete {AIRCRAFT_FOLDER} "
                            f"folder; {REEXTRACT}.")
        read_utf8(root / "data" / name, f"fix the file or {REEXTRACT}")  # torchvision would misreport it
    _check_class_list(root / "data" / LEVELS[level], level)
    splits = {split: _official_split(root, split, level) for split in ("train", "val", "test")}
    # torchvision keeps each list's order, one image per line (it refuses a blank line), so line numbers are exact.
    check_images({split: [(path, f"data/images_{level}_{split}.txt", f"line {number}")
                          for number, (path, _) in enumerate(splits[split][0], 1)] for split in splits},
                 f"the {level} lists", f"fix the file or {REEXTRACT}")
    return splits["test"][1], splits["train"][0], splits["val"][0], splits["test"][0]


class FGVCAircraftDataset(_ImageDataset):
    """FGVC-Aircraft at one annotation level (variant: 100 classes, the B-CNN protocol), its banner cut off.

    It has its own val split: data.val_fraction > 0 trains on the official train split and validates on the
    official val split; 0 trains on both (trainval), with no val.
    """

    ADD_TRAINING_IMAGES = f"fix the train list or {REEXTRACT}: every class needs images there"
    FOLDER_HOLDS = HOLDS
    OFFICIAL_VAL = True
    OPTIONS = ("annotation_level",)
    bottom_crop = BANNER

    def __init__(self, root, split="train", val_fraction=0.0, split_seed=0, annotation_level="variant",
                 transform=None, target_transform=None):
        root = Path(root).absolute()
        classes, train, val, test = read_aircraft(root, annotation_level)
        records = select_split(split, train, test, val_fraction, split_seed, official_val=val)
        super().__init__(root, split, classes, records, transform, target_transform)
        self.annotation_level = annotation_level


def download_aircraft(root: str, url: str = AIRCRAFT_URL, md5: str = AIRCRAFT_MD5) -> Path:
    """Fetch, md5-check, safely extract and verify FGVC-Aircraft into root/fgvc-aircraft-2013b; no-op once it
    verifies."""
    return download_dataset(root, AIRCRAFT_FOLDER, f"{AIRCRAFT_FOLDER}.tar.gz", url, md5, "data/variants.txt",
                            lambda folder: describe_splits(FGVCAircraftDataset, folder, 0.1))


def _banner(rng: np.random.Generator, width: int) -> Image.Image:
    """A white strip with dark 'text' specks, like the dataset's credit line: learnable, so it must go."""
    strip = np.full((BANNER, width, 3), 255, dtype=np.uint8)
    specks = rng.random((BANNER, width)) < 0.15
    strip[specks] = 0
    return Image.fromarray(strip)


def write_synthetic_aircraft(root, classes: int = 5, per_class: int = 12, seed: int = 0,
                             image_size: int = 96) -> Path:
    """Write a mini FGVC-Aircraft in the exact fgvc-aircraft-2013b layout (a 20-px banner under every image),
    deterministically from seed; returns the fgvc-aircraft-2013b folder under root.

    Each class (variant) gets a family of its own pair and a manufacturer of its own three, like the real
    hierarchy; per class, images go to train, val and test in turn (about a third each, at least one each).
    """
    check_synthetic_sizes("FGVC-Aircraft", classes, per_class, image_size)
    dataset_dir, rng = Path(root) / AIRCRAFT_FOLDER, np.random.default_rng(seed)
    data = dataset_dir / "data"
    make_folder(data / "images")
    names = {"variant": [f"Synthetic-{k + 1}00" for k in range(classes)],
             "family": [f"Synthetic-{k // 2 + 1}" for k in range(classes)],
             "manufacturer": [f"Maker {k // 3 + 1}" for k in range(classes)]}
    lists = {(level, split): [] for level in LEVELS for split in ("train", "val", "test")}
    boxes, image_number = [], 1000000
    for label in range(classes):
        for index in range(per_class):
            image_number += int(rng.integers(1, 50))  # real names are 7-digit numbers with gaps
            photo, (x, y, w, h) = synthetic_image(rng, label / classes, np.pi * label / classes, image_size)
            framed = Image.new("RGB", (photo.width, photo.height + BANNER))
            framed.paste(photo)
            framed.paste(_banner(rng, photo.width), (0, photo.height))
            framed.save(data / "images" / f"{image_number}.jpg", quality=92)
            split = ("train", "val", "test")[index % 3]
            for level in LEVELS:
                lists[level, split].append(f"{image_number} {names[level][label]}")
            boxes.append(f"{image_number} {x + 1} {y + 1} {x + w} {y + h}")  # 1-based, corners inclusive
    for level, file_name in LEVELS.items():
        (data / file_name).write_text("".join(f"{name}\n" for name in dict.fromkeys(names[level])))
        for split in ("train", "val", "test"):
            (data / f"images_{level}_{split}.txt").write_text("".join(f"{line}\n" for line in lists[level, split]))
        trainval = lists[level, "train"] + lists[level, "val"]
        (data / f"images_{level}_trainval.txt").write_text("".join(f"{line}\n" for line in trainval))
    for split in ("train", "val", "trainval", "test"):
        ids = [line.split()[0] for line in (lists["variant", "train"] + lists["variant", "val"] if split == "trainval"
                                            else lists["variant", split])]
        (data / f"images_{split}.txt").write_text("".join(f"{image_id}\n" for image_id in ids))
    (data / "images_box.txt").write_text("".join(f"{line}\n" for line in boxes))
    return dataset_dir
