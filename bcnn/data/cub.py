"""CUB-200-2011: the reader (its text files, checked), the download, and a synthetic writer in its exact layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bcnn.data.dataset import (_BoxedDataset, check_box, check_dataset_folder, check_images, check_synthetic_sizes,
                               clean_class_name, describe_splits, read_utf8, synthetic_image)
from bcnn.data.download import download_dataset, fetch_advice, make_folder
from bcnn.errors import UserError
from bcnn.paths import not_a_file

CUB_URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1"
CUB_MD5 = "97eceeb196236b17998738112f37df78"
CUB_FOLDER = "CUB_200_2011"
HOLDS = "images.txt and images/"
REEXTRACT = "fix the file or re-extract CUB_200_2011.tgz"


def _fields(parts: list[str], count: int) -> list[str]:
    if len(parts) != count:
        raise ValueError
    return parts


CUB_TABLES = {  # file -> how to parse the fields after the leading id
    "images.txt": lambda parts: _fields(parts, 1)[0],
    "image_class_labels.txt": lambda parts: int(_fields(parts, 1)[0]),
    "train_test_split.txt": lambda parts: {"1": True, "0": False}[_fields(parts, 1)[0]],
    "classes.txt": lambda parts: _fields(parts, 1)[0],
    "bounding_boxes.txt": lambda parts: tuple(float(v) for v in _fields(parts, 4)),
}


def read_id_table(root: Path, name: str, parse, complete: str, key=int, check=None) -> dict:
    """`<id> <fields>` lines of root/name -> {key(id): parse(fields)}, the text-file format of CUB and NABirds;
    a line that does not parse is reported by number. complete: what to do about a missing or damaged file.
    check(value, "line N of <path>"), if given, refuses a value that parses but is wrong, or returns what to keep."""
    path, table = root / name, {}
    kind = not_a_file(path)
    if kind:
        raise UserError(f"{path} is {kind}, so {root} is not a complete dataset folder; {complete}.")
    for number, line in enumerate(read_utf8(path, complete).splitlines(), 1):
        if not line.strip():
            continue
        try:
            identifier, *parts = line.split()
            identifier, value = key(identifier), parse(parts)
        except (ValueError, KeyError):
            raise UserError(f"line {number} of {path} is malformed ({line.strip()!r}); {complete}.") from None
        if identifier in table:
            raise UserError(f"id {identifier} appears twice in {path} (line {number}); {complete}.")
        table[identifier] = value if check is None else check(value, f"line {number} of {path}")
    return table


def box_check(fix: str):
    """read_id_table's check of a bounding_boxes.txt (CUB's and NABirds'): each (x, y, w, h) box checked
    (check_box) and kept with the words that name it, its line, for a sentence about it later (box_in_image)."""
    def check(box, where: str):
        described = f"the box on {where} (x y width height: {' '.join(f'{value:g}' for value in box)})"
        return check_box(box, described, fix), described
    return check


def split_by_flag(records: dict, is_train: dict, fix: str) -> tuple[list, list]:
    """Records {image id: (path, ...)} -> (official train, test) by train_test_split.txt's flags (CUB's and
    NABirds'), every image checked: on disk, listed once (check_images)."""
    ids = {split: [image_id for image_id in records if is_train[image_id] == (split == "train")]
           for split in ("train", "test")}
    check_images({split: [(records[i][0], "images.txt", f"id {i} ({split})") for i in split_ids]
                  for split, split_ids in ids.items()}, "images.txt", fix)
    return [records[i] for i in ids["train"]], [records[i] for i in ids["test"]]


def _check_tables(root: Path, tables: dict) -> None:
    """The text files must agree: the same image ids everywhere, class ids 1..K, labels among them."""
    image_ids = set(tables["images.txt"])
    for name in ("image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt"):
        ids = set(tables[name])
        if ids != image_ids:
            first = min(ids ^ image_ids)
            raise UserError(
                f"{name} lists {len(ids)} image ids but images.txt lists {len(image_ids)} "
                f"(id {first} is only in {name if first in ids else 'images.txt'}); {REEXTRACT}."
            )
    class_ids = sorted(tables["classes.txt"])
    if class_ids != list(range(1, len(class_ids) + 1)):
        raise UserError(f"class ids in {root / 'classes.txt'} must run 1..{len(class_ids)}; {REEXTRACT}.")
    unknown = sorted(set(tables["image_class_labels.txt"].values()) - set(class_ids))
    if unknown:
        raise UserError(f"image_class_labels.txt uses class id {unknown[0]}, not in classes.txt; {REEXTRACT}.")


def read_cub(root: Path) -> tuple[list[str], list, list]:
    """Validate a CUB_200_2011 folder; return (class names, official train, test), records (path, label, bbox, the
    words naming the bbox's line)."""
    get = fetch_advice(root, CUB_FOLDER, "cub")
    check_dataset_folder(root, "CUB-200-2011", HOLDS, get, CUB_FOLDER, "images.txt")
    kind = not_a_file(root / "images.txt")
    if kind:
        raise UserError(f"{root / 'images.txt'} is {kind}, so {root} is not a CUB_200_2011 folder; {get}.")
    checks = {"bounding_boxes.txt": box_check(REEXTRACT)}
    tables = {name: read_id_table(root, name, parse, REEXTRACT, check=checks.get(name))
              for name, parse in CUB_TABLES.items()}
    if not (root / "images").is_dir():
        raise UserError(f"{root / 'images'} is not a folder; {REEXTRACT}.")
    _check_tables(root, tables)
    records = {
        image_id: (str(root / "images" / rel_path), tables["image_class_labels.txt"][image_id] - 1,
                   *tables["bounding_boxes.txt"][image_id])
        for image_id, rel_path in sorted(tables["images.txt"].items())
    }
    trainval, test = split_by_flag(records, tables["train_test_split.txt"], REEXTRACT)
    return [clean_class_name(name) for _, name in sorted(tables["classes.txt"].items())], trainval, test


class CUB200(_BoxedDataset):
    """CUB-200-2011 read from its text files; labels are class_id - 1; `bboxes` are (x, y, w, h) per sample."""

    ADD_TRAINING_IMAGES = "mark images of every class 1 (train) in train_test_split.txt, or re-extract CUB_200_2011.tgz"
    FIX_BOX = REEXTRACT
    FOLDER_HOLDS = HOLDS
    read = staticmethod(read_cub)


def download_cub(root: str, url: str = CUB_URL, md5: str = CUB_MD5) -> Path:
    """Fetch, md5-check, safely extract and verify CUB-200-2011 into root/CUB_200_2011; no-op once it verifies."""
    return download_dataset(root, CUB_FOLDER, "CUB_200_2011.tgz", url, md5, "images.txt",
                            lambda folder: describe_splits(CUB200, folder))


def write_synthetic_cub(root, classes: int = 5, per_class: int = 12, seed: int = 0, image_size: int = 96) -> Path:
    """Write a mini-CUB in the exact CUB_200_2011 layout, deterministically from seed; returns root.

    Class k has its own hue and its own stripe angle (both jittered per image), on backgrounds and at positions
    and sizes drawn independently of the class: learnable in a few CPU epochs, even by the demo's random VGG16.
    Image 1 is saved as grayscale and image per_class + 2 (or 2) as CMYK, as happens in CUB.
    """
    check_synthetic_sizes("CUB", classes, per_class, image_size)
    root, rng = Path(root), np.random.default_rng(seed)
    make_folder(root)
    special_modes = {1: "L", (per_class + 2 if classes > 1 else 2): "CMYK"}
    lines = {name: [] for name in CUB_TABLES}
    image_id = 0
    for label in range(classes):
        folder = f"{label + 1:03d}.Synthetic_Class_{label + 1}"
        lines["classes.txt"].append(f"{label + 1} {folder}")
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
        n_train = min(per_class - 1, max(2, round(per_class / 2)))
        is_train = np.zeros(per_class, dtype=int)
        is_train[rng.permutation(per_class)[:n_train]] = 1
        for index in range(per_class):
            image_id += 1
            image, (x, y, w, h) = synthetic_image(rng, label / classes, np.pi * label / classes, image_size)
            rel_path = f"{folder}/Synthetic_Class_{label + 1}_{index + 1:04d}.jpg"
            image.convert(special_modes.get(image_id, "RGB")).save(root / "images" / rel_path, quality=92)
            lines["images.txt"].append(f"{image_id} {rel_path}")
            lines["image_class_labels.txt"].append(f"{image_id} {label + 1}")
            lines["train_test_split.txt"].append(f"{image_id} {is_train[index]}")
            lines["bounding_boxes.txt"].append(f"{image_id} {x:.1f} {y:.1f} {w:.1f} {h:.1f}")
    for name, content in lines.items():
        (root / name).write_text("\n".join(content) + "\n", encoding="utf-8")
    return root
