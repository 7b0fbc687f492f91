"""NABirds: CUB-like text files keyed by UUIDs, a class hierarchy (hierarchy.txt) whose leaves are the classes
images are labelled with (555 in the release), boxes; the reader (ours: torchvision has none) and a synthetic
writer in its exact layout. NABirds is downloaded by hand, after accepting Cornell's terms."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np

from bcnn.data.cub import box_check, read_id_table, split_by_flag
from bcnn.data.dataset import (_BoxedDataset, check_dataset_folder, check_synthetic_sizes, describe_splits,
                               synthetic_image)
from bcnn.data.download import make_folder, placed_by_hand
from bcnn.errors import UserError
from bcnn.paths import not_a_file

NABIRDS_FOLDER = "nabirds"
HOLDS = "images.txt and images/"


def get_nabirds(folder: Path) -> str:
    """How to put NABirds into folder: the one the user named, not a default."""
    lands = "" if folder.name == NABIRDS_FOLDER else f", which makes {folder.parent / NABIRDS_FOLDER}"
    return (f"NABirds has no direct download: accept the terms at https://dl.allaboutbirds.org/nabirds and extract "
            f"nabirds.tar.gz into {folder.parent}{lands}")
REEXTRACT = "re-extract nabirds.tar.gz (delete the folder first) or fix the file"


def _one(parts: list[str]) -> str:
    if len(parts) != 1:
        raise ValueError
    return parts[0]


def _name(parts: list[str]) -> str:
    if not parts:
        raise ValueError
    return " ".join(parts)  # class names have spaces: "Red-tailed Hawk (Dark morph)"


def _box(parts: list[str]) -> tuple[float, float, float, float]:
    if len(parts) != 4:
        raise ValueError
    return tuple(float(value) for value in parts)


NABIRDS_TABLES = {  # file -> (how to parse the fields after the id, the id's type)
    "images.txt": (_one, str),
    "image_class_labels.txt": (lambda parts: int(_one(parts)), str),
    "train_test_split.txt": (lambda parts: {"1": True, "0": False}[_one(parts)], str),
    "bounding_boxes.txt": (_box, str),
    "classes.txt": (_name, int),
    "hierarchy.txt": (lambda parts: int(_one(parts)), int),  # child class id -> parent class id
}


def _ancestors(class_id: int, parents: dict[int, int], names: dict[int, str]) -> list[str]:
    """Names from class_id's parent up to the root; a cycle in hierarchy.txt is a damaged file."""
    chain, seen = [], {class_id}
    while class_id in parents:
        class_id = parents[class_id]
        if class_id in seen:
            raise UserError(f"hierarchy.txt has a cycle through class {class_id}; {REEXTRACT}.")
        seen.add(class_id)
        chain.append(names.get(class_id, str(class_id)))
    return chain


def read_nabirds(root: Path) -> tuple[list[str], list[list[str]], list, list]:
    """Check a nabirds folder; return (leaf class names, their ancestors' names, official train, test); records
    are (path, label, bbox, the words naming the bbox's line), labels 0..K-1 over the leaf classes images use, in
    class-id order."""
    check_dataset_folder(root, "NABirds", HOLDS, get_nabirds(root), NABIRDS_FOLDER, "images.txt")
    kind = not_a_file(root / "images.txt")
    if kind:
        raise UserError(f"{root / 'images.txt'} is {kind}, so {root} is not a NABirds folder; {get_nabirds(root)}.")
    checks = {"bounding_boxes.txt": box_check(REEXTRACT)}
    tables = {name: read_id_table(root, name, parse, REEXTRACT, key, checks.get(name))
              for name, (parse, key) in NABIRDS_TABLES.items()}
    image_ids = set(tables["images.txt"])
    for name in ("image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt"):
        ids = set(tables[name])
        if ids != image_ids:
            first = min(ids ^ image_ids)
            raise UserError(f"{name} lists {len(ids)} image ids but images.txt lists {len(image_ids)} (id {first} "
                            f"is only in {name if first in ids else 'images.txt'}); {REEXTRACT}.")
    names, parents = tables["classes.txt"], tables["hierarchy.txt"]
    used = sorted(set(tables["image_class_labels.txt"].values()))
    inner = set(parents.values())
    for class_id in used:
        if class_id not in names:
            raise UserError(f"image_class_labels.txt uses class id {class_id}, not in classes.txt; {REEXTRACT}.")
        if class_id in inner:
            raise UserError(f"image_class_labels.txt labels images with class {class_id} ({names[class_id]}), "
                            f"which hierarchy.txt says is not a leaf; {REEXTRACT}.")
    label_of = {class_id: label for label, class_id in enumerate(used)}
    records = {image_id: (str(root / "images" / rel_path), label_of[tables["image_class_labels.txt"][image_id]],
                          *tables["bounding_boxes.txt"][image_id])
               for image_id, rel_path in sorted(tables["images.txt"].items())}
    trainval, test = split_by_flag(records, tables["train_test_split.txt"], REEXTRACT)
    ancestors = [_ancestors(class_id, parents, names) for class_id in used]
    return [names[class_id] for class_id in used], ancestors, trainval, test


class NABirdsDataset(_BoxedDataset):
    """NABirds over its leaf classes; `ancestors[label]` names the class's coarser groups, nearest first."""

    ADD_TRAINING_IMAGES = "mark images of every class 1 (train) in train_test_split.txt, or re-extract nabirds.tar.gz"
    FIX_BOX = REEXTRACT
    FOLDER_HOLDS = HOLDS

    def read(self, root: Path) -> tuple[list[str], list, list]:
        classes, self.ancestors, trainval, test = read_nabirds(root)
        return classes, trainval, test


def download_nabirds(root: str) -> Path:
    """No download without accepting Cornell's terms: verify a copy placed by hand in root/nabirds, or say how."""
    return placed_by_hand(root, NABIRDS_FOLDER, get_nabirds,
                          lambda folder: describe_splits(NABirdsDataset, folder, 0.1))


def write_synthetic_nabirds(root, classes: int = 5, per_class: int = 12, seed: int = 0,
                            image_size: int = 96) -> Path:
    """Write a mini NABirds in its exact layout (UUID ids, images/<4-digit class id>/<uuid hex>.jpg, a hierarchy
    whose inner nodes label no image), deterministically from seed; returns the nabirds folder under root."""
    check_synthetic_sizes("NABirds", classes, per_class, image_size)
    dataset_dir, rng = Path(root) / NABIRDS_FOLDER, np.random.default_rng(seed)
    make_folder(dataset_dir / "images")
    # Like the release: 0 is the root, then groups, then the leaves; ids are not contiguous over the leaves.
    groups = {1 + k // 2: f"Synthetic group {k // 2 + 1}" for k in range(classes)}
    leaf_ids = [100 + 3 * k for k in range(classes)]
    class_lines = ["0 Birds"] + [f"{gid} {name}" for gid, name in groups.items()]
    class_lines += [f"{cid} Synthetic bird {k + 1} (adult)" for k, cid in enumerate(leaf_ids)]
    hierarchy = [f"{gid} 0" for gid in groups] + [f"{cid} {1 + k // 2}" for k, cid in enumerate(leaf_ids)]
    lines = {name: [] for name in ("images.txt", "image_class_labels.txt", "train_test_split.txt",
                                   "bounding_boxes.txt", "sizes.txt", "photographers.txt")}
    for label, class_id in enumerate(leaf_ids):
        folder = f"{class_id:04d}"
        make_folder(dataset_dir / "images" / folder)
        for index in range(per_class):
            image_id = uuid.UUID(bytes=rng.bytes(16), version=4)
            image, (x, y, w, h) = synthetic_image(rng, label / classes, np.pi * label / classes, image_size)
            rel_path = f"{folder}/{image_id.hex}.jpg"
            image.save(dataset_dir / "images" / rel_path, quality=92)
            lines["images.txt"].append(f"{image_id} {rel_path}")
            lines["image_class_labels.txt"].append(f"{image_id} {class_id}")
            lines["train_test_split.txt"].append(f"{image_id} {int(index % 2 == 0)}")
            lines["bounding_boxes.txt"].append(f"{image_id} {x} {y} {w} {h}")
            lines["sizes.txt"].append(f"{image_id} {image.width} {image.height}")
            lines["photographers.txt"].append(f"{image_id} Synthetic Photographer")
    lines["classes.txt"], lines["hierarchy.txt"] = class_lines, hierarchy
    for name, content in lines.items():
        (dataset_dir / name).write_text("".join(f"{line}\n" for line in content), encoding="utf-8")
    return dataset_dir
