"""Stanford Dogs: the reader (ours: torchvision has none) of its train/test lists and per-image boxes, the
download, and a synthetic writer in its exact layout.

The layout, as the release's three archives extract (lists.tar puts its .mat files at the top, not in a folder; a
lists/ folder holding them is read too):
    Images/n02085620-Chihuahua/n02085620_10074.jpg ...         images.tar: 20,580 images, a folder per breed
    Annotation/n02085620-Chihuahua/n02085620_10074 ...         annotation.tar: PASCAL-VOC-style XML, no extension
    train_list.mat, test_list.mat (and file_list.mat)          lists.tar: file_list, annotation_list, labels (1..120)

An annotation holds one <object> per dog, each with a <bndbox> (xmin ymin xmax ymax: 1-based, corners inclusive,
as PASCAL VOC's). An image of several dogs gets the union of their boxes, so that data.crop_to_bbox keeps every
dog of the labelled breed in view. Class names are the breed folders' names without the WordNet id, underscores
made spaces: "n02085782-Japanese_spaniel" -> "Japanese spaniel".

The release publishes no md5: the download checks what it extracted instead, by reading every list, annotation and
image as `python -m bcnn.data verify` does.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import scipy.io

from bcnn.data.dataset import (_BoxedDataset, check_box, check_dataset_folder, check_images, check_synthetic_sizes,
                               describe_splits, read_mat, synthetic_image, whole_numbers)
from bcnn.data.download import fetch_advice, make_folder
from bcnn.data.flowers import Part, download_parts
from bcnn.errors import UserError
from bcnn.paths import not_a_file

DOGS_FOLDER = "stanford_dogs"
DOGS_URL = "http://vision.stanford.edu/aditya86/ImageNetDogs/"
DOGS_ARCHIVES = {"images.tar": "Images", "annotation.tar": "Annotation", "lists.tar": "train_list.mat"}
LISTS = {"train": "train_list.mat", "test": "test_list.mat"}
LIST_TABLES = ("file_list", "annotation_list", "labels")
HOLDS = "Images/, Annotation/ and train_list.mat, test_list.mat"
FIX_LIST = "fix the file or re-extract lists.tar"
FIX_BOX = "fix the file or re-extract annotation.tar"


def breed_name(folder: str) -> str:
    """'n02085782-Japanese_spaniel' -> 'Japanese spaniel'."""
    return re.sub(r"^n\d+-", "", folder).replace("_", " ")


def _lists_folder(root: Path) -> Path:
    """Where the .mat lists are: root, as lists.tar extracts them, or a lists/ folder in it."""
    if not (root / LISTS["train"]).exists() and (root / "lists" / LISTS["train"]).exists():
        return root / "lists"
    return root


def _read_list(path: Path) -> list[tuple[str, str, float]]:
    """A train_list.mat or test_list.mat: (image path under Images/, annotation path under Annotation/, label as
    the file gives it) per entry, in the file's order."""
    files, annotations, labels = read_mat(path, LIST_TABLES, FIX_LIST)
    if not len(files) == len(annotations) == len(labels):
        raise UserError(f"{path} has {len(files)} file_list, {len(annotations)} annotation_list and {len(labels)} "
                        f"labels entries, which must be as many; {FIX_LIST}.")
    entries = []
    for number, (file, annotation, label) in enumerate(zip(files, annotations, labels), 1):
        if not (isinstance(file, str) and isinstance(annotation, str) and file.count("/") == 1):
            raise UserError(f"entry {number} of {path} is not a <breed folder>/<image> path and an annotation; "
                            f"{FIX_LIST}.")
        if annotation + os.path.splitext(file)[1] != file:  # n02085620-Chihuahua/n02085620_10074(.jpg)
            raise UserError(f"entry {number} of {path} pairs {file} with the annotation {annotation}, another "
                            f"image's; {FIX_LIST}.")
        entries.append((file, annotation, label))
    return entries


def _classes(lists: dict[str, tuple[Path, list]]) -> tuple[list[str], dict[str, list[int]]]:
    """Breed names in label order from the lists, and each list's labels 0..K-1: a label is one breed folder and a
    folder one label, K the number of folders the lists name."""
    by_label, by_folder, labelled = {}, {}, {}  # the first entry giving each: (folder or label, file, where)
    for split, (path, entries) in lists.items():
        numbers, bad, shown = whole_numbers([label for *_, label in entries], 1, np.inf)
        if bad is not None:
            raise UserError(f"entry {bad + 1} of {path} gives {entries[bad][0]} the label {shown}, which is not a "
                            f"class number (1, 2, ...); {FIX_LIST}.")
        for number, ((file, _, _), label) in enumerate(zip(entries, numbers.tolist()), 1):
            folder, where = file.split("/")[0], f"entry {number} of {path.name}"
            known_folder, other, other_where = by_label.setdefault(label, (folder, file, where))
            if known_folder != folder:
                raise UserError(f"entry {number} of {path} gives {file} label {label}, as {other_where} gives {other}, "
                                f"of another breed folder; a label is one breed folder; {FIX_LIST}.")
            known_label, other, other_where = by_folder.setdefault(folder, (label, file, where))
            if known_label != label:
                raise UserError(f"entry {number} of {path} gives {file} label {label}, and {other_where} gives "
                                f"{other}, of the same breed folder, label {known_label}; a breed folder is one label; "
                                f"{FIX_LIST}.")
        labelled[split] = [label - 1 for label in numbers.tolist()]
    count = len(by_folder)
    if max(by_label) > count:
        raise UserError(f"the lists name {count} breed folders but use label {max(by_label)} (labels run 1..{count}, "
                        f"one per folder); {FIX_LIST}.")
    return [breed_name(by_label[label][0]) for label in range(1, count + 1)], labelled


def read_box(path: Path) -> tuple[tuple[float, float, float, float], str]:
    """An annotation file's (x, y, w, h) box from 0, each <object>'s <bndbox> checked (check_box); several are
    united. Returns it with the words that name it, for a sentence about it later (box_in_image)."""
    kind = not_a_file(path)
    if kind:
        raise UserError(f"the annotation {path} is {kind}; {FIX_BOX}.")
    try:
        tree = ElementTree.fromstring(path.read_bytes())
    except ElementTree.ParseError as error:
        raise UserError(f"cannot read the annotation {path} as XML ({error}); {FIX_BOX}.") from None
    except OSError as error:
        raise UserError(f"cannot read {path} ({error.strerror or error}); give your user read access to it "
                        f"(chmod a+r), or {FIX_BOX}.") from None
    corners = []
    for number, dog in enumerate(tree.iter("object"), 1):
        try:
            xmin, ymin, xmax, ymax = (float(dog.find(f"bndbox/{tag}").text) for tag in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, TypeError, ValueError):  # a missing tag, an empty one, or not a number
            raise UserError(f"object {number} of the annotation {path} has no <bndbox> of numbers xmin, ymin, xmax, "
                            f"ymax; {FIX_BOX}.") from None
        described = f"the box of object {number} in {path} (xmin ymin xmax ymax: {xmin:g} {ymin:g} {xmax:g} {ymax:g})"
        check_box((xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1), described, FIX_BOX)
        corners.append((xmin, ymin, xmax, ymax))
    if not corners:
        raise UserError(f"the annotation {path} has no <object>, so its image has no box; {FIX_BOX}.")
    xmin, ymin = min(c[0] for c in corners), min(c[1] for c in corners)
    xmax, ymax = max(c[2] for c in corners), max(c[3] for c in corners)
    values = f"(xmin ymin xmax ymax: {xmin:g} {ymin:g} {xmax:g} {ymax:g})"
    described = described if len(corners) == 1 else f"the union of the {len(corners)} boxes in {path} {values}"
    return (xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1), described


def read_dogs(root: Path) -> tuple[list[str], list, list]:
    """Check a Stanford Dogs folder; return (breed names, official train, test), records (path, label, bbox, the
    words naming the bbox's annotation)."""
    check_dataset_folder(root, "Stanford Dogs", HOLDS, fetch_advice(root, DOGS_FOLDER, "dogs"), DOGS_FOLDER,
                         LISTS["train"])
    folder = _lists_folder(root)
    lists = {split: (folder / name, _read_list(folder / name)) for split, name in LISTS.items()}
    for archive in ("images.tar", "annotation.tar"):
        if not (root / DOGS_ARCHIVES[archive]).is_dir():
            raise UserError(f"{root / DOGS_ARCHIVES[archive]} is not a folder, so {root} is not a complete Stanford "
                            f"Dogs folder; extract {archive} there.")
    classes, labels = _classes(lists)
    listed_in = {split: os.path.relpath(path, root) for split, (path, _) in lists.items()}
    check_images({split: [(os.path.join(root, "Images", file), listed_in[split], f"entry {number}")
                          for number, (file, _, _) in enumerate(entries, 1)] for split, (_, entries) in lists.items()},
                 "the lists", "re-extract images.tar, or fix the list")
    splits = {split: [(os.path.join(root, "Images", file), label, *read_box(root / "Annotation" / annotation))
                      for (file, annotation, _), label in zip(entries, labels[split])]
              for split, (_, entries) in lists.items()}
    return classes, splits["train"], splits["test"]


class StanfordDogsDataset(_BoxedDataset):
    """Stanford Dogs (120 breeds) with its boxes (an image of several dogs: their union); val is a stratified
    hold-out of the official train split (100 images a breed), test the official test split."""

    ADD_TRAINING_IMAGES = "list images of every breed in train_list.mat, or re-extract lists.tar"
    FIX_BOX = FIX_BOX
    FOLDER_HOLDS = HOLDS
    read = staticmethod(read_dogs)


def download_dogs(root: str, url: str = DOGS_URL) -> Path:
    """Fetch, safely extract and verify Stanford Dogs' three archives into root/stanford_dogs; a no-op once it
    verifies. url: the folder holding them. No md5 is published: verify reads every list, box and image."""
    parts = [Part(name, url + name, None, extracts) for name, extracts in DOGS_ARCHIVES.items()]
    return download_parts(root, DOGS_FOLDER, parts, lambda folder: describe_splits(StanfordDogsDataset, folder, 0.1))


def _annotation_xml(folder: str, name: str, width: int, height: int, boxes: list[tuple[int, int, int, int]]) -> str:
    """An annotation file as the release writes them (ImageNet's PASCAL-VOC-style XML), one <object> per box."""
    breed = breed_name(folder).replace(" ", "_")
    objects = "".join(
        f"\t<object>\n\t\t<name>{breed}</name>\n\t\t<pose>Unspecified</pose>\n\t\t<truncated>0</truncated>\n"
        f"\t\t<difficult>0</difficult>\n\t\t<bndbox>\n\t\t\t<xmin>{x1}</xmin>\n\t\t\t<ymin>{y1}</ymin>\n"
        f"\t\t\t<xmax>{x2}</xmax>\n\t\t\t<ymax>{y2}</ymax>\n\t\t</bndbox>\n\t</object>\n" for x1, y1, x2, y2 in boxes)
    return (f"<annotation>\n\t<folder>{folder.split('-')[0][1:]}</folder>\n\t<filename>{name}</filename>\n"
            f"\t<source>\n\t\t<database>ImageNet database</database>\n\t</source>\n\t<size>\n\t\t<width>{width}"
            f"</width>\n\t\t<height>{height}</height>\n\t\t<depth>3</depth>\n\t</size>\n\t<segment>0</segment>\n"
            f"{objects}</annotation>")


def _list_tables(rows: list[tuple[str, str, int]]) -> dict[str, np.ndarray]:
    """A list file's tables in the release's types: N x 1 cells of strings, N x 1 doubles."""
    files, annotations = np.empty((len(rows), 1), dtype=object), np.empty((len(rows), 1), dtype=object)
    for index, (file, annotation, _) in enumerate(rows):
        files[index, 0], annotations[index, 0] = np.array([file]), np.array([annotation])
    labels = np.array([[float(label)] for *_, label in rows], dtype=np.float64)
    return {"file_list": files, "annotation_list": annotations, "labels": labels}


def write_synthetic_dogs(root, classes: int = 5, per_class: int = 12, seed: int = 0, image_size: int = 96) -> Path:
    """Write a mini Stanford Dogs in its exact layout (Images/<wnid>-<breed>/<wnid>_<n>.jpg, an XML annotation per
    image, the three .mat lists), deterministically from seed; returns the stanford_dogs folder under root. Per
    breed, every other image is train; each breed's first image has two dogs, side by side, whose boxes together
    are the drawn object's."""
    check_synthetic_sizes("Stanford Dogs", classes, per_class, image_size)
    dataset_dir, rng = Path(root) / DOGS_FOLDER, np.random.default_rng(seed)
    rows = {"train": [], "test": []}
    for label in range(classes):
        wnid = f"n{2085620 + 1117 * label:08d}"
        folder = f"{wnid}-Synthetic_breed_{label + 1}"
        for name in ("Images", "Annotation"):
            make_folder(dataset_dir / name / folder)
        number = 0
        for index in range(per_class):
            number += int(rng.integers(1, 400))  # the release's numbers have gaps
            stem = f"{wnid}_{number}"
            image, (x, y, w, h) = synthetic_image(rng, label / classes, np.pi * label / classes, image_size)
            image.save(dataset_dir / "Images" / folder / f"{stem}.jpg", quality=92)
            boxes = [(x + 1, y + 1, x + w, y + h)]  # 1-based, corners inclusive
            if index == 0:  # two dogs: the left 60% and the right 60% of the object
                boxes = [(x + 1, y + 1, x + (w * 3) // 5, y + h), (x + 1 + (w * 2) // 5, y + 1, x + w, y + h)]
            xml = _annotation_xml(folder, stem, image.width, image.height, boxes)
            (dataset_dir / "Annotation" / folder / stem).write_text(xml, encoding="utf-8")
            rows["train" if index % 2 == 0 else "test"].append((f"{folder}/{stem}.jpg", f"{folder}/{stem}", label + 1))
    scipy.io.savemat(dataset_dir / "train_list.mat", _list_tables(rows["train"]))
    scipy.io.savemat(dataset_dir / "test_list.mat", _list_tables(rows["test"]))
    scipy.io.savemat(dataset_dir / "file_list.mat", _list_tables(rows["train"] + rows["test"]))
    return dataset_dir
