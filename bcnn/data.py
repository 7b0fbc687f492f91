"""Data: CUB-200-2011 and class-per-folder datasets, transforms, loaders, download and a synthetic mini-CUB.

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

import argparse
import colorsys
import hashlib
import math
import os
import random
import re
import tarfile
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.datasets.folder import IMG_EXTENSIONS

from bcnn.config import DataConfig
from bcnn.errors import UserError, exit_on_user_error
from bcnn.sampling import ShardSampler, TrainSampler

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_NORMALISATION = (IMAGENET_MEAN, IMAGENET_STD)  # what torchvision's ImageNet weights expect
SPLITS = ("train", "val", "trainval", "test")
CUB_URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1"
CUB_MD5 = "97eceeb196236b17998738112f37df78"
GET_CUB = "run `make data` or pass --data-root /path/to/CUB_200_2011 (the folder holding images.txt)"
REEXTRACT = "re-extract CUB_200_2011.tgz (delete the folder and run `make data`) or fix the file"
REPLACE_IMAGE = ("replace it with a readable image (for CUB, re-extract CUB_200_2011.tgz: delete the folder "
                 "and run `make data`)")


def _unreadable(path: str, reason: str) -> UserError:
    # bcnn.predict cuts this sentence back to `reason`: keep its shape.
    return UserError(f"cannot read image {path}: {reason}; {REPLACE_IMAGE}.")


def _to_rgb(image: Image.Image, path: str) -> Image.Image:
    """8-bit RGB; convert("RGB") alone clips 16-bit values at 255 (nearly all white) and 0-1 floats to black."""
    if image.mode.startswith("I;16") or (image.mode == "I" and image.format in ("PNG", "PPM")):
        # 16-bit grayscale: I;16 (PNG, TIFF), or I in older Pillow's PNG and in PGM, whose maxvals Pillow
        # stretches to 65535. A 12-bit TIFF opens as I;16 too, with 0-4095: its BitsPerSample says so. (Pillow
        # itself opens 16-bit colour as 8-bit RGB or RGBA.)
        bits = image.tag_v2.get(258, (16,))[0] if image.format == "TIFF" else 16
        top = 2**bits - 1
        pixels = np.asarray(image).astype(np.uint32)
        return Image.fromarray(((pixels * 255 + top // 2) // top).astype(np.uint8)).convert("RGB")
    if image.mode in ("I", "F"):
        # 32-bit integers and floats come without a range (0-1? 0-255? 0-65535?): any guess is wrong for some.
        kind = "integer" if image.mode == "I" else "floating-point"
        raise _unreadable(path, f"it has 32-bit {kind} pixels (PIL mode {image.mode}), which have no fixed range "
                                "to map to 8-bit colour (save it as an 8-bit image)")
    return image.convert("RGB")


def load_rgb(path: str, box: tuple[float, float, float, float] | None = None) -> Image.Image:
    """Open any PIL mode (CUB has grayscale and CMYK JPEGs) as 8-bit RGB, optionally cropped to (x, y, w, h).

    16-bit images are scaled by their range; 32-bit integer and float images are refused, as are images over
    Pillow's decompression-bomb limit, twice Image.MAX_IMAGE_PIXELS.
    """
    try:
        with warnings.catch_warnings():
            # Between 1x and 2x the limit Pillow opens the image and warns: a large photo, not an attack, and a
            # warning per image in every loader worker would bury the log.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image = _to_rgb(image, path)  # decodes now, so a truncated file fails here and not mid-transform
    except Image.DecompressionBombError as error:  # raised by Image.open, before anything is decoded
        pixels = int(re.search(r"\d+", str(error))[0])  # Pillow's message starts "Image size (N pixels)"
        limit = 2 * Image.MAX_IMAGE_PIXELS
        raise _unreadable(path, f"it has {pixels / 1e6:.1f} megapixels, over the {limit / 1e6:.1f}-megapixel limit "
                                "Pillow sets against decompression bombs (downscale it)") from None
    except (OSError, ValueError) as error:  # also missing, unreadable, truncated (LOAD_TRUNCATED_IMAGES stays off)
        # Pillow raises ValueError for some malformed files, e.g. a PGM whose maxval or pixel is out of range.
        reason = "not an image" if isinstance(error, UnidentifiedImageError) else getattr(error, "strerror", None)
        raise _unreadable(path, (reason or str(error)).lower()) from None
    if box is None:
        return image
    x, y, w, h = box
    # Boxes are floats and a few poke past the border: clamp, and keep the whole image if nothing is left.
    left, top = max(0, math.floor(x)), max(0, math.floor(y))
    right, bottom = min(image.width, math.ceil(x + w)), min(image.height, math.ceil(y + h))
    return image.crop((left, top, right, bottom)) if right > left and bottom > top else image


def stratified_holdout(targets: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split indices into (keep, holdout): per class, round(fraction * n) held out, rounding half up.

    A class of n >= 2 images gives at least 1 and at most n - 1 when fraction > 0, so every class is in both
    parts. Classes are drawn in label order from numpy's default_rng(seed): the same seed, the same split.
    """
    rng = np.random.default_rng(seed)
    targets = np.asarray(targets)
    holdout: list[int] = []
    for label in np.unique(targets):
        members = np.flatnonzero(targets == label)
        n = len(members)
        count = min(max(math.floor(fraction * n + 0.5), 1), n - 1) if fraction > 0 and n >= 2 else 0
        holdout.extend(int(i) for i in rng.permutation(members)[:count])
    held = set(holdout)
    return [i for i in range(len(targets)) if i not in held], sorted(holdout)


def select_split(split: str, trainval: list, test: list, val_fraction: float, split_seed: int) -> list:
    """Pick one split's records, (path, label, ...) tuples, from the official train and test records."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}.")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}; fix data.val_fraction.")
    if split == "test":
        return test
    if split == "trainval" or (split == "train" and val_fraction == 0):
        return trainval
    if val_fraction == 0:
        raise UserError("there is no val split with val_fraction 0; set data.val_fraction > 0 (e.g. 0.1).")
    keep, holdout = stratified_holdout([record[1] for record in trainval], val_fraction, split_seed)
    return [trainval[i] for i in (holdout if split == "val" else keep)]


class _ImageDataset(Dataset):
    """What CUB200 and FolderDataset share: ImageFolder-style attributes and RGB loading."""

    ADD_TRAINING_IMAGES = ""  # what to do about a class without training images, in the layout's own terms

    def __init__(self, root, split, classes, records, transform, target_transform):
        if not records:
            raise UserError(f"the {split} split of {root} has no images; check the dataset or data.val_fraction.")
        if split in ("train", "trainval"):
            # The model would still get an output for such a class and never learn it. The val hold-out keeps at
            # least one image of every class in train, so only the official split can cause this.
            labels = {record[1] for record in records}
            untrained = [name for label, name in enumerate(classes) if label not in labels]
            if untrained:
                names = ", ".join(repr(name) for name in untrained[:3])
                names += f" and {len(untrained) - 3} more" if len(untrained) > 3 else ""
                which = f"class {names}" if len(untrained) == 1 else f"{len(untrained)} classes ({names})"
                raise UserError(f"the {split} split of {root} has no images of {which}, which the model could "
                                f"never learn; {self.ADD_TRAINING_IMAGES}.")
        self.root, self.split = str(root), split
        self.classes = classes
        self.class_to_idx = {name: label for label, name in enumerate(classes)}
        self.samples = [(path, label) for path, label, *_ in records]
        self.targets = [label for _, label in self.samples]
        self.transform, self.target_transform = transform, target_transform

    def __len__(self) -> int:
        return len(self.samples)

    def _box(self, index: int):
        return None

    def __getitem__(self, item: int | tuple[int, int]):
        """item: an index, or (index, augment_seed) from TrainSampler, which fixes the random augmentation."""
        index, seed = item if isinstance(item, tuple) else (item, None)
        path, target = self.samples[index]
        image = load_rgb(path, self._box(index))
        if self.transform is not None:
            # torchvision's transforms draw from torch's global CPU RNG: seed it for this sample only, then give
            # the caller its state back. Not torch.manual_seed, which would also reseed (and lose) the CUDA RNG.
            with torch.random.fork_rng(devices=[], enabled=seed is not None):
                if seed is not None:
                    torch.default_generator.manual_seed(seed)
                image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target


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


def _read_table(root: Path, name: str) -> dict:
    """`<id> <fields>` lines -> {id: parsed fields}; a line that does not parse is reported by number."""
    path, table = root / name, {}
    if not path.is_file():
        raise UserError(f"{path} is missing, so {root} is not a complete CUB_200_2011 folder; {GET_CUB}.")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        number = data.count(b"\n", 0, error.start) + 1
        raise UserError(f"line {number} of {path} is not UTF-8 text; {REEXTRACT}, saving it as UTF-8.") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            key, *parts = line.split()
            key, value = int(key), CUB_TABLES[name](parts)
        except (ValueError, KeyError):
            raise UserError(f"line {number} of {path} is malformed ({line.strip()!r}); {REEXTRACT}.") from None
        if key in table:
            raise UserError(f"id {key} appears twice in {path} (line {number}); {REEXTRACT}.")
        table[key] = value
    return table


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


def clean_class_name(folder_name: str) -> str:
    """'001.Black_footed_Albatross' -> 'Black footed Albatross'."""
    return re.sub(r"^\d+\.", "", folder_name).replace("_", " ")


def read_cub(root: Path) -> tuple[list[str], list, list]:
    """Validate a CUB_200_2011 folder; return (class names, official train, test), records (path, label, bbox)."""
    if not root.is_dir():
        raise UserError(f"CUB-200-2011 folder {root} does not exist; {GET_CUB}.")
    if not (root / "images.txt").exists() and (root / "CUB_200_2011" / "images.txt").exists():
        raise UserError(f"{root} holds the dataset one level down; pass --data-root {root / 'CUB_200_2011'}.")
    tables = {name: _read_table(root, name) for name in CUB_TABLES}
    if not (root / "images").is_dir():
        raise UserError(f"{root / 'images'} does not exist; {GET_CUB}.")
    _check_tables(root, tables)
    records = {
        image_id: (str(root / "images" / rel_path), tables["image_class_labels.txt"][image_id] - 1,
                   tables["bounding_boxes.txt"][image_id])
        for image_id, rel_path in sorted(tables["images.txt"].items())
    }
    missing = [path for path, *_ in records.values() if not os.path.isfile(path)]
    if missing:
        raise UserError(
            f"{len(missing)} of {len(records)} images listed in images.txt are missing, the first is "
            f"{missing[0]}; {REEXTRACT}."
        )
    is_train = tables["train_test_split.txt"]
    trainval = [record for image_id, record in records.items() if is_train[image_id]]
    test = [record for image_id, record in records.items() if not is_train[image_id]]
    return [clean_class_name(name) for _, name in sorted(tables["classes.txt"].items())], trainval, test


class CUB200(_ImageDataset):
    """CUB-200-2011 read from its text files; labels are class_id - 1; `bboxes` are (x, y, w, h) per sample."""

    ADD_TRAINING_IMAGES = f"{REEXTRACT}: every class needs images marked 1 (train) in train_test_split.txt"

    def __init__(self, root, split="train", val_fraction=0.0, split_seed=0, crop_to_bbox=False,
                 transform=None, target_transform=None):
        root = Path(root).absolute()
        classes, trainval, test = read_cub(root)
        records = select_split(split, trainval, test, val_fraction, split_seed)
        super().__init__(root, split, classes, records, transform, target_transform)
        self.bboxes = [box for _, _, box in records]
        self.crop_to_bbox = crop_to_bbox

    def _box(self, index: int):
        return self.bboxes[index] if self.crop_to_bbox else None


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


def build_transforms(cfg: DataConfig, train: bool, normalisation=IMAGENET_NORMALISATION) -> T.Compose:
    """The recipe: train Resize -> flip -> RandomCrop, eval Resize -> CenterCrop; both ToTensor -> Normalize with
    the (mean, std) the backbone's weights expect (bcnn.models.input_normalisation)."""
    to_tensor = [T.ToTensor(), T.Normalize(*normalisation)]
    if not train:
        return T.Compose([T.Resize(cfg.resize), T.CenterCrop(cfg.crop), *to_tensor])
    if cfg.random_resized_crop:
        steps = [T.RandomResizedCrop(cfg.crop, scale=(cfg.rrc_min_scale, 1.0))]
    else:
        steps = [T.Resize(cfg.resize)]
    if cfg.hflip:
        steps.append(T.RandomHorizontalFlip())
    if cfg.rotation > 0:
        steps.append(T.RandomRotation(cfg.rotation))  # before the crop, so fewer of its black corners remain
    if not cfg.random_resized_crop:
        steps.append(T.RandomCrop(cfg.crop))
    if cfg.color_jitter > 0:
        steps.append(T.ColorJitter(brightness=cfg.color_jitter, contrast=cfg.color_jitter,
                                   saturation=cfg.color_jitter))
    return T.Compose(steps + to_tensor)


def build_dataset(cfg: DataConfig, split: str, train_transform: bool | None = None,
                  normalisation=IMAGENET_NORMALISATION) -> _ImageDataset:
    """The split of cfg.root in cfg.format, with train augmentation for train/trainval unless told otherwise;
    dataset.normalisation is the (mean, std) its tensors were normalised with."""
    train = split in ("train", "trainval") if train_transform is None else train_transform
    transform = build_transforms(cfg, train, normalisation)
    if cfg.format == "cub":
        dataset = CUB200(cfg.root, split, cfg.val_fraction, cfg.split_seed, cfg.crop_to_bbox, transform)
    elif cfg.format != "folder":
        raise UserError(f"unknown data.format {cfg.format!r}; use cub or folder.")
    elif cfg.crop_to_bbox:
        raise UserError("data.crop_to_bbox needs bounding boxes, which only data.format=cub has; set it to false.")
    else:
        dataset = FolderDataset(cfg.root, split, cfg.val_fraction, cfg.split_seed, transform)
    dataset.normalisation = normalisation
    return dataset


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; numpy and random augmentations follow it.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def default_num_workers() -> int:
    """Loader workers per training process: the cores this process may use, shared with the other processes
    torchrun started on this machine, minus one for the training loop itself; at most 8, past which the
    workers' memory grows faster than their use (`python -m bcnn.bench` shows whether the loader keeps up)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(0, min(8, cores // processes_here - 1))


def build_loader(dataset: Dataset, batch_size: int, train: bool, num_workers: int, seed: int, rank: int = 0,
                 world_size: int = 1, pin_memory: bool = False) -> DataLoader:
    """This rank's loader. Train: TrainSampler, eval: ShardSampler (in order, each image on exactly one rank).

    For training call loader.sampler.set_epoch(epoch, skip) before each epoch: order and augmentations are then
    a function of (seed, epoch, sample index) alone, the same for any world_size, num_workers or resume point,
    and the dataset must accept the (index, augment_seed) items the sampler yields, as _ImageDataset does.
    num_workers=-1 picks default_num_workers(); workers persist across epochs and each keeps 4 batches ready.
    pin_memory: for batches bound for a GPU (the copy then overlaps the step); a CPU run on a GPU machine
    leaves it off, since pinning starts CUDA in the process for nothing.
    """
    if num_workers < 0:
        num_workers = default_num_workers()
    if train:
        sampler = TrainSampler(dataset, rank, world_size, seed)
    else:
        sampler = ShardSampler(len(dataset), rank, world_size)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=False, num_workers=num_workers,
                      pin_memory=pin_memory, persistent_workers=num_workers > 0,
                      prefetch_factor=4 if num_workers > 0 else None, worker_init_fn=_seed_worker,
                      generator=generator)


def _describe(root, data_format: str = "cub", val_fraction: float = 0.0, split_seed: int = 0) -> str:
    dataset_class = CUB200 if data_format == "cub" else FolderDataset
    splits = ("trainval", "train", "val", "test") if val_fraction > 0 else ("trainval", "test")
    sets = {split: dataset_class(root, split, val_fraction, split_seed) for split in splits}
    counts = ", ".join(f"{split} {len(dataset)}" for split, dataset in sets.items())
    return f"{sets['test'].root}: {len(sets['test'].classes)} classes; images: {counts}"


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(url: str, target: Path) -> None:
    """Download to target.part, then rename: an interrupted download never looks like a finished one."""
    part = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as out:
            total, done = int(response.headers.get("Content-Length") or 0), 0
            for chunk in iter(lambda: response.read(1 << 20), b""):
                out.write(chunk)
                done += len(chunk)
                print(f"\rdownloading {target.name}: {done >> 20} / {total >> 20} MiB", end="", flush=True)
        print()
    except OSError as error:  # URLError is an OSError
        part.unlink(missing_ok=True)
        raise UserError(
            f"could not download {url} ({getattr(error, 'reason', error)}); download it by hand, place it at "
            f"{target} and rerun."
        ) from None
    os.replace(part, target)


def _within(base: str, path: str) -> bool:
    return os.path.commonpath([base, os.path.normpath(path)]) == base


def _safe_extract(tarball: Path, root: Path) -> None:
    """Check every member before writing anything: no absolute paths, no `..`, no links leading out of root."""
    base = os.path.abspath(root)
    with tarfile.open(tarball) as tar:
        members = tar.getmembers()
        for member in members:
            target = os.path.join(base, member.name)
            safe = not os.path.isabs(member.name) and _within(base, target)
            if member.issym():
                safe = safe and _within(base, os.path.join(os.path.dirname(target), member.linkname))
            if member.islnk():
                safe = safe and _within(base, os.path.join(base, member.linkname))
            if not safe:
                raise UserError(f"{tarball} holds an unsafe member {member.name!r}; delete it and download again.")
        # Python's own "data" filter (3.11.4+) also drops device files and odd permissions.
        tar.extractall(base, members=members, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file in the way (FileExistsError, NotADirectoryError), no permission, ...
        in_the_way = isinstance(error, (FileExistsError, NotADirectoryError))
        reason = "a file is in the way" if in_the_way else (error.strerror or str(error)).lower()
        raise UserError(f"cannot make the folder {folder}: {reason}; pass --root a folder path (it is made if "
                        "missing).") from None


def download_cub(root: str, url: str = CUB_URL, md5: str = CUB_MD5) -> Path:
    """Fetch, md5-check, safely extract and verify CUB-200-2011 into root/CUB_200_2011; no-op once it verifies."""
    root = Path(root)
    dataset_dir, tarball = root / "CUB_200_2011", root / "CUB_200_2011.tgz"
    if (dataset_dir / "images.txt").is_file():
        try:
            print(f"already present, nothing to do: {_describe(dataset_dir)}")
            return dataset_dir
        except UserError as error:
            print(f"{dataset_dir} is incomplete ({error}); extracting again")
    _make_folder(root)  # a --root that cannot be a folder fails now, not after a 1.1 GB download
    if not tarball.is_file():
        _fetch(url, tarball)
    if _md5(tarball) != md5:
        raise UserError(f"{tarball} has the wrong md5 (expected {md5}); delete it and run the download again.")
    _safe_extract(tarball, root)
    print(f"extracted and verified: {_describe(dataset_dir)}")
    return dataset_dir


def _synthetic_image(rng: np.random.Generator, hue: float, angle: float, size: int):
    """A striped ellipse (class = hue + stripe angle, both jittered) on a noisy background; returns image, bbox."""
    width, height = int(size * rng.uniform(0.85, 1.25)), int(size * rng.uniform(0.85, 1.15))
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    shade = rng.uniform(0.25, 0.75) + rng.normal(0, 0.08, (height, width, 1))
    background = shade + rng.normal(0, 0.04, (height, width, 3))
    box_w, box_h = int(width * rng.uniform(0.45, 0.75)), int(height * rng.uniform(0.45, 0.75))
    x0, y0 = int(rng.integers(0, width - box_w + 1)), int(rng.integers(0, height - box_h + 1))
    inside = ((cols - x0 - box_w / 2) / (box_w / 2)) ** 2 + ((rows - y0 - box_h / 2) / (box_h / 2)) ** 2 <= 1
    angle += rng.normal(0, 0.08)
    period = size / 12 * rng.uniform(0.8, 1.2)
    stripes = np.cos(2 * np.pi * (cols * np.cos(angle) + rows * np.sin(angle)) / period) > 0
    hue = (hue + rng.normal(0, 0.02)) % 1.0
    light = colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 0.9), rng.uniform(0.75, 1.0))
    dark = colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 0.9), rng.uniform(0.3, 0.45))
    pixels = np.where(inside[..., None], np.where(stripes[..., None], light, dark), background)
    image = Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8))
    return image, (x0, y0, box_w, box_h)


def write_synthetic_cub(root, classes: int = 5, per_class: int = 12, seed: int = 0, image_size: int = 96) -> Path:
    """Write a mini-CUB in the exact CUB_200_2011 layout, deterministically from seed; returns root.

    Class k has its own hue and its own stripe angle (both jittered per image), on backgrounds and at positions
    and sizes drawn independently of the class: learnable in a few CPU epochs, even by the demo's random VGG16.
    Image 1 is saved as grayscale and image per_class + 2 (or 2) as CMYK, as happens in CUB.
    """
    if classes < 1 or per_class < 3 or image_size < 16:
        raise UserError("a synthetic CUB needs classes >= 1, per-class >= 3 and image-size >= 16; raise them.")
    root, rng = Path(root), np.random.default_rng(seed)
    _make_folder(root)
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
            image, (x, y, w, h) = _synthetic_image(rng, label / classes, np.pi * label / classes, image_size)
            rel_path = f"{folder}/Synthetic_Class_{label + 1}_{index + 1:04d}.jpg"
            image.convert(special_modes.get(image_id, "RGB")).save(root / "images" / rel_path, quality=92)
            lines["images.txt"].append(f"{image_id} {rel_path}")
            lines["image_class_labels.txt"].append(f"{image_id} {label + 1}")
            lines["train_test_split.txt"].append(f"{image_id} {is_train[index]}")
            lines["bounding_boxes.txt"].append(f"{image_id} {x:.1f} {y:.1f} {w:.1f} {h:.1f}")
    for name, content in lines.items():
        (root / name).write_text("\n".join(content) + "\n", encoding="utf-8")
    return root


def _synth(args: argparse.Namespace) -> None:
    path = write_synthetic_cub(args.root, args.classes, args.per_class, args.seed, args.image_size)
    print(f"wrote {_describe(path)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bcnn.data", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    download = commands.add_parser("download", help="download, check and extract CUB-200-2011 into ROOT")
    download.add_argument("--root", default="data", help="folder to hold CUB_200_2011/ and the tarball")
    download.set_defaults(run=lambda args: download_cub(args.root))
    synth = commands.add_parser("synth", help="write a small generated dataset in the CUB format")
    synth.add_argument("--root", required=True, help="dataset folder to write: images/ and the text files")
    synth.add_argument("--classes", type=int, default=5, help="number of classes")
    synth.add_argument("--per-class", type=int, default=12, help="images per class, about half of them train")
    synth.add_argument("--seed", type=int, default=0, help="same seed, same files")
    synth.add_argument("--image-size", type=int, default=96, help="typical image side in pixels")
    synth.set_defaults(run=_synth)
    verify = commands.add_parser("verify", help="check a dataset and print its per-split image counts")
    verify.add_argument("--root", required=True, help="the CUB_200_2011 folder, or the folder dataset's root")
    verify.add_argument("--format", choices=("cub", "folder"), default="cub", help="dataset layout")
    verify.add_argument("--val-fraction", type=float, default=0.1, help="share of each class held out as val")
    verify.add_argument("--split-seed", type=int, default=0, help="seed of the val hold-out")
    verify.set_defaults(run=lambda a: print(_describe(a.root, a.format, a.val_fraction, a.split_seed)))
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    exit_on_user_error(main)()
