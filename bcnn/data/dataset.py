"""What every dataset shares: records (path, label, box) -> an image dataset with ImageFolder's attributes, RGB
loading with one-sentence errors, the splits (val held out of the official train split, seeded and stratified),
and the synthetic image the format writers draw."""

from __future__ import annotations

import colorsys
import contextlib
import math
import os
import random
import re
import stat
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import scipy.io
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from bcnn.data.transforms import IMAGENET_NORMALISATION
from bcnn.errors import UserError
from bcnn.paths import file_kind, not_a_file

SPLITS = ("train", "val", "trainval", "test")
REPLACE_IMAGE = "replace it with a readable image, or re-extract the dataset's archive"


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


def check_image_file(path: str) -> None:
    """Before an image file is opened: it is a regular file, or the sentence of load_rgb says what it is instead
    (a folder, a named pipe, whose open() would wait for a writer forever) or why it cannot be reached."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        raise _unreadable(path, (error.strerror or str(error)).lower()) from None
    if not stat.S_ISREG(mode):
        raise _unreadable(path, f"it is {file_kind(mode)}, not an image file")


def _open_rgb(path: str, draft: bool = False) -> tuple[Image.Image, tuple[int, int]]:
    """load_rgb's work without its warning filter: (8-bit RGB image, the file's (width, height)). draft: decode a
    JPEG at 1/8 scale (libjpeg's DCT scaling), which still reads and entropy-decodes every byte of it, so a truncated
    or damaged file is refused as by the full decode, in about half the time; for checking, never for training."""
    check_image_file(path)
    try:
        with Image.open(path) as image:
            size = image.size
            if draft:
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))  # a no-op but for JPEGs
            image = _to_rgb(image, path)  # decodes now, so a truncated file fails here and not mid-transform
    except Image.DecompressionBombError as error:  # raised by Image.open, before anything is decoded
        pixels = int(re.search(r"\d+", str(error))[0])  # Pillow's message starts "Image size (N pixels)"
        limit = 2 * Image.MAX_IMAGE_PIXELS
        raise _unreadable(path, f"it has {pixels / 1e6:.1f} megapixels, over the {limit / 1e6:.1f}-megapixel limit "
                                "Pillow sets against decompression bombs (downscale it)") from None
    except (OSError, ValueError) as error:  # also unreadable, truncated (LOAD_TRUNCATED_IMAGES stays off)
        # Pillow raises ValueError for some malformed files, e.g. a PGM whose maxval or pixel is out of range.
        reason = "not an image" if isinstance(error, UnidentifiedImageError) else getattr(error, "strerror", None)
        raise _unreadable(path, (reason or str(error)).lower()) from None
    return image, size


def load_rgb(path: str) -> Image.Image:
    """Open any PIL mode (CUB has grayscale and CMYK JPEGs) as 8-bit RGB (a dataset cuts it to its region).

    16-bit images are scaled by their range; 32-bit integer and float images are refused, as are images over
    Pillow's decompression-bomb limit, twice Image.MAX_IMAGE_PIXELS, and paths that are not files (a folder, a
    named pipe).
    """
    with warnings.catch_warnings():
        # Between 1x and 2x the limit Pillow opens the image and warns: a large photo, not an attack, and a
        # warning per image in every loader worker would bury the log.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return _open_rgb(path)[0]


def path_only(path: str) -> str:
    """A torchvision dataset's loader= hook that decodes nothing: its items are then its (path, label) pairs."""
    return path


def check_box(box: tuple[float, float, float, float], described: str, fix: str) -> tuple[float, float, float, float]:
    """An (x, y, w, h) box as a reader reads it, refused unless it encloses some of its image: finite, of positive
    width and height, not wholly left of or above the image (box_in_image checks the other two sides, which need
    the image's size). described: "the box on line 4 of <file> (x y width height: ...)", as the file writes it.
    Returns the box."""
    x, y, w, h = box
    if not all(math.isfinite(value) for value in box):
        problem = "has a value that is not a finite number"
    elif w <= 0 or h <= 0:
        side, value = ("width", w) if w <= 0 else ("height", h)
        problem = f"has {'zero' if value == 0 else 'a negative'} {side}, so it encloses nothing"
    elif x + w <= 0 or y + h <= 0:
        problem = f"lies wholly {'left of' if x + w <= 0 else 'above'} its image"
    else:
        return box
    raise UserError(f"{described} {problem}; {fix}.")


def box_pixels(width: int, height: int, box: tuple[float, float, float, float]) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) pixels of an (x, y, w, h) box in a width x height image: boxes are floats and
    some poke past the border, so they are clipped; None when no part of the box is in the image."""
    x, y, w, h = box
    left, top = max(0, math.floor(x)), max(0, math.floor(y))
    right, bottom = min(width, math.ceil(x + w)), min(height, math.ceil(y + h))
    return (left, top, right, bottom) if right > left and bottom > top else None


def check_synthetic_sizes(title: str, classes: int, per_class: int, image_size: int, least_classes: int = 1) -> None:
    """A synthetic writer's sizes, each refused by its synth option when too small (per class: one train, one val
    hold-out, one test image; 16 px: the smallest image its shapes are drawn in)."""
    for option, value, least in (("--classes", classes, least_classes), ("--per-class", per_class, 3),
                                 ("--image-size", image_size, 16)):
        if value < least:
            raise UserError(f"{option} must be at least {least} for a synthetic {title}, got {value}.")


def refuse_a_file(root, option: str, holds: str) -> None:
    """A dataset folder given as a file (or a named pipe, ...): one sentence naming the option (or "the dataset
    folder") that gave it."""
    try:
        mode = os.stat(root).st_mode
    except OSError:
        return  # missing: the reader says so, with where to get the dataset
    if not stat.S_ISDIR(mode):
        raise UserError(f"{option} {root} is {file_kind(mode)}, not a folder; pass the dataset's folder, the one "
                        f"holding {holds}.")


def check_dataset_folder(root: Path, title: str, holds: str, get: str, folder: str | None = None,
                         marker: str | None = None) -> None:
    """Before a reader reads root: it is a folder, and not the folder above the dataset's own folder (named
    `folder`, holding `marker`). get: how to get the dataset into root."""
    refuse_a_file(root, "the dataset folder", holds)
    if not root.is_dir():
        raise UserError(f"{title} folder {root} does not exist; {get}.")
    if folder and not (root / marker).exists() and (root / folder / marker).exists():
        raise UserError(f"{root} holds the dataset one level down; use {root / folder}.")


def check_torchvision_folder(root: Path, title: str, folder: str, marker: str, holds: str, reader: str,
                             get: str) -> None:
    """Before torchvision's `reader` reads a dataset, which it finds only under its archive's folder name: root
    is the dataset's folder (check_dataset_folder) and has that name. marker: a path inside the dataset folder."""
    check_dataset_folder(root, title, holds, get, folder, marker)
    if root.name != folder:
        raise UserError(f"torchvision's {reader} reads the dataset only from a folder named {folder}, and {root} is "
                        f"named {root.name!r}; rename it.")


def read_utf8(path: Path, fix: str) -> str:
    """A dataset's text file as text; a byte that is not UTF-8 is reported by its line, a file that cannot be read
    (no read permission, an I/O error) by the system's reason, a leading byte-order mark as such."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UserError(f"cannot read {path} ({error.strerror or error}); give your user read access to it "
                        f"(chmod a+r), or {fix}.") from None
    if data.startswith(b"\xef\xbb\xbf"):  # torchvision, which reads some of the lists, would take it for text
        raise UserError(f"{path} starts with a byte-order mark (as some Windows editors save UTF-8), which would be "
                        f"read as part of its first line; save it without the mark, or {fix}.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        number = data.count(b"\n", 0, error.start) + 1
        raise UserError(f"line {number} of {path} is not UTF-8 text, the encoding bcnn reads; {fix}.") from None


# An image as a reader lists it: (path, the file that lists it, relative to the dataset folder, and the entry there,
# e.g. "line 4" or "id 17 (train)"); a layout without list files (folder) leaves both empty.
Listed = tuple[str, str, str]


def listed_twice(split: str, first: Listed, other_split: str, second: Listed, fix: str) -> UserError:
    """The sentence for one image listed twice (or two paths to one file): where, what it would do, the fix."""
    (path, listed_in, entry), (other_path, other_listed_in, other_entry) = first, second
    if split != other_split:  # splits come in order train, val, test: the later one would be trained on
        harm = f"the {other_split} split would be trained on"
    else:
        harm = {"test": "bcnn.eval would score it twice", "val": "val accuracy would count it twice"}.get(
            split, "training would see it twice as often")
    if not listed_in:
        return UserError(f"{path} and {other_path} are the same image, so {harm}; {fix}.")
    where = (f"{entry} and {other_entry} of {listed_in}" if listed_in == other_listed_in
             else f"{entry} of {listed_in} and {other_entry} of {other_listed_in}")
    what = path if path == other_path else f"{path} (the same file as {other_path})"
    return UserError(f"{what} is listed twice, as {where}, so {harm}; {fix}.")


def check_images(splits: dict[str, list[Listed]], listed_in: str, fix: str) -> None:
    """Every image of a dataset's official splits (name -> its listed images, train before val before test) is on
    disk and counted once: never twice in a split (scored or trained on twice), never in two (the test or val split
    trained on). Sameness is the file's (device, inode), so a symlink or hard link to a listed image is caught too;
    one stat per image, which checking that the image exists costs anyway."""
    seen: dict = {}
    missing, odd, first_twice, count = [], None, None, 0
    for split, images in splits.items():
        for listed in images:
            count += 1
            try:
                status = os.stat(listed[0])
            except OSError:
                missing.append(listed[0])
                continue
            if not stat.S_ISREG(status.st_mode):  # a folder, a named pipe (which training would wait on forever)
                odd = odd or (listed, file_kind(status.st_mode))
                continue
            # Some filesystems (FAT, a few network ones) report inode 0 for every file: fall back to the path.
            key = (status.st_dev, status.st_ino) if status.st_ino else os.path.normpath(listed[0])
            if key in seen and first_twice is None:
                first_twice = (*seen[key], split, listed)
            seen.setdefault(key, (split, listed))
    if missing:
        raise UserError(f"{len(missing)} of {count} images listed in {listed_in} are missing, the first is "
                        f"{missing[0]}; {fix}.")
    if odd:
        (path, file, entry), kind = odd
        where = f"{entry} of {file}" if file else listed_in
        raise UserError(f"{path}, listed as {where}, is {kind}, not an image file; {fix}.")
    if first_twice:
        raise listed_twice(*first_twice, fix)


def stratified_holdout(targets: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split indices into (keep, holdout): per class, round(fraction * n) held out, rounding half up.

    A class of n >= 2 images gives at least 1 and at most n - 1 when fraction > 0, so every class is in both
    parts. Classes are drawn in label order from numpy's default_rng(seed): the same seed, the same split.
    """
    rng = np.random.default_rng(seed)
    targets = np.asarray(targets)
    # Each class's members in index order from one stable sort (a scan of every label per class would cost
    # classes x images: 16 s for iNaturalist 2021's 2.7 M images of 10,000 classes, against 1 s).
    by_class = np.argsort(targets, kind="stable")
    _, sizes = np.unique(targets, return_counts=True)
    held = np.zeros(len(targets), dtype=bool)
    for members in np.split(by_class, np.cumsum(sizes)[:-1]):
        n = len(members)
        count = min(max(math.floor(fraction * n + 0.5), 1), n - 1) if fraction > 0 and n >= 2 else 0
        held[rng.permutation(members)[:count]] = True
    return np.flatnonzero(~held).tolist(), np.flatnonzero(held).tolist()


def select_split(split: str, trainval: list, test: list, val_fraction: float, split_seed: int,
                 official_val: list | None = None) -> list:
    """Pick one split's records, (path, label, ...) tuples, from the official train and test records.

    Without official_val, val is a stratified hold-out of the official train split. With it (FGVC-Aircraft's own
    val split), val_fraction > 0 means train = the official train and val = the official val; 0 trains on both.
    """
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}.")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}; fix data.val_fraction.")
    if split_seed < 0:  # numpy's generators take no negative seed
        raise UserError(f"split_seed must be at least 0, got {split_seed}; fix data.split_seed.")
    if split == "test":
        return test
    if official_val is not None:
        trainval, official_train = trainval + official_val, trainval
    if split == "trainval" or (split == "train" and val_fraction == 0):
        return trainval
    if val_fraction == 0:
        raise UserError("there is no val split with val_fraction 0; set data.val_fraction > 0 (e.g. 0.1).")
    if official_val is not None:
        return official_val if split == "val" else official_train
    keep, holdout = stratified_holdout([record[1] for record in trainval], val_fraction, split_seed)
    return [trainval[i] for i in (holdout if split == "val" else keep)]


@contextlib.contextmanager
def seeded_augmentation(seed: int | None):
    """Every global generator a transform may draw from seeded from `seed` (TrainSampler's augment_seed) for this
    sample only, then given back to the caller as it was; nothing is touched when seed is None.

    torchvision's transforms draw from torch's CPU generator; timm's policies (RandAugment, AutoAugment, AugMix) from
    Python's random and numpy's global generator, and its RandomErasing from random and torch. Python's and numpy's
    are both Mersenne Twisters that an int seeds the same way: one seed for both would give them one stream, so
    SeedSequence derives a seed of each from augment_seed, unrelated to each other and to it. torch keeps
    augment_seed itself, so the augmentations of runs without timm's are what they were."""
    if seed is None:
        yield
        return
    words = np.random.SeedSequence(seed).generate_state(4)  # four unrelated 32-bit words
    python_state, numpy_state = random.getstate(), np.random.get_state()
    # Not torch.manual_seed, which would also reseed (and lose) the CUDA RNG.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        random.seed(int(words[0]) << 32 | int(words[1]))
        np.random.seed(words[2:])
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class _ImageDataset(Dataset):
    """What CUB200 and FolderDataset share: ImageFolder-style attributes and RGB loading."""

    ADD_TRAINING_IMAGES = ""  # what to do about a class without training images, in the layout's own terms
    FOLDER_HOLDS = ""  # what the dataset's folder (data.root) holds, for a root given as a file
    HAS_BOXES = False  # whether the format has bounding boxes (its reader then takes crop_to_bbox)
    OFFICIAL_VAL = False  # whether the format has its own val split (then data.val_fraction > 0 selects it)
    OPTIONS: tuple[str, ...] = ()  # the DataConfig fields its constructor takes besides the split's
    bottom_crop = 0  # pixel rows cut off the bottom of every image (FGVC-Aircraft's copyright banner)
    normalisation = IMAGENET_NORMALISATION  # the (mean, std) of its transform; build_dataset sets the backbone's

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

    def region(self, index: int, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of sample index's decoded width x height file that the model sees: the banner
        (if any) cut off the bottom, then the box when cropping to boxes. The CPU and the GPU decode paths share it."""
        if height <= self.bottom_crop:
            raise _unreadable(self.samples[index][0], f"it is {height} px high, no more than the {self.bottom_crop}-px "
                                                      "banner this format cuts off its bottom")
        height -= self.bottom_crop
        return (0, 0, width, height) if self._box(index) is None else self.box_in_image(index, width, height)

    def check_image(self, index: int) -> tuple[int, int]:
        """Refuse sample index as training would, without keeping its pixels (a JPEG is decoded at 1/8 scale, which
        refuses the same files: _open_rgb); returns the file's (width, height). For `python -m bcnn.data verify`."""
        width, height = _open_rgb(self.samples[index][0], draft=True)[1]
        self.region(index, width, height)
        return width, height

    def load_image(self, index: int) -> Image.Image:
        """Sample index as 8-bit RGB, cut to its region (banner off, box when asked)."""
        image = load_rgb(self.samples[index][0])
        region = self.region(index, image.width, image.height)
        return image if region == (0, 0, image.width, image.height) else image.crop(region)

    def __getitem__(self, item: int | tuple[int, int]):
        """item: an index, or (index, augment_seed) from TrainSampler, which fixes the random augmentation."""
        index, seed = item if isinstance(item, tuple) else (item, None)
        image, target = self.load_image(index), self.targets[index]
        if self.transform is not None:
            with seeded_augmentation(seed):
                image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target


class _BoxedDataset(_ImageDataset):
    """A format whose records carry an (x, y, w, h) box per image: `bboxes` per sample, and crop_to_bbox crops
    every image to its box. A subclass reads its layout: read(root) -> (class names, official train, test)."""

    HAS_BOXES = True
    OPTIONS = ("crop_to_bbox",)
    FIX_BOX = ""  # what to do about a box that misses its image, in the format's own terms

    def __init__(self, root, split="train", val_fraction=0.0, split_seed=0, crop_to_bbox=False,
                 transform=None, target_transform=None):
        root = Path(root).absolute()
        classes, trainval, test = self.read(root)
        records = select_split(split, trainval, test, val_fraction, split_seed)
        super().__init__(root, split, classes, records, transform, target_transform)
        self.bboxes = [box for _, _, box, _ in records]
        self.box_sources = [described for *_, described in records]  # for the sentence about a box: check_box's
        self.crop_to_bbox = crop_to_bbox

    def read(self, root: Path) -> tuple[list[str], list, list]:
        raise NotImplementedError

    def _box(self, index: int):
        return self.bboxes[index] if self.crop_to_bbox else None

    def box_in_image(self, index: int, width: int, height: int) -> tuple[int, int, int, int]:
        """box_pixels of sample index's box in its width x height image; a box with no part in the image (the
        readers refused those left of or above it) is refused, naming the line or annotation that gave it."""
        pixels = box_pixels(width, height, self.bboxes[index])
        if pixels is None:
            side = (f"right of its image, which is {width} px wide" if self.bboxes[index][0] >= width else
                    f"below its image, which is {height} px high")
            raise UserError(f"{self.box_sources[index]} lies wholly {side} ({self.samples[index][0]}); "
                            f"{self.FIX_BOX}.")
        return pixels

    def check_image(self, index: int) -> tuple[int, int]:
        """_ImageDataset.check_image, and the box is in the image whether or not training crops to it (the
        pointing game of bcnn.eval reads it too)."""
        width, height = super().check_image(index)
        self.box_in_image(index, width, height - self.bottom_crop)
        return width, height


def describe_splits(dataset_class, root, val_fraction: float = 0.0, split_seed: int = 0) -> str:
    """One line for `python -m bcnn.data verify` and the download: classes and per-split image counts."""
    splits = ("trainval", "train", "val", "test") if val_fraction > 0 else ("trainval", "test")
    sets = {split: dataset_class(root, split, val_fraction, split_seed) for split in splits}
    check_every_image([sets["trainval"], sets["test"]])
    official = " (the official val split)" if dataset_class.OFFICIAL_VAL else ""
    counts = ", ".join(f"{split} {len(dataset)}{official if split == 'val' else ''}" for split, dataset in sets.items())
    return f"{sets['test'].root}: {len(sets['test'].classes)} classes; images: {counts}"


def check_every_image(datasets: list[_ImageDataset]) -> None:
    """Each image of datasets refused or passed as training would (check_image), in threads: Pillow decodes with
    the GIL released. One image's problem is its own sentence; with more, the count is added to the first's."""
    jobs = [(dataset, index) for dataset in datasets for index in range(len(dataset))]

    def problem(job) -> UserError | None:
        try:
            job[0].check_image(job[1])
        except UserError as error:
            return error
        return None

    # Filters set here, in the main thread, hold for the pool's threads; load_rgb's own catch_warnings would
    # race between them (it saves and restores the process's one filter list).
    with warnings.catch_warnings(), ThreadPoolExecutor() as pool:
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        errors = [error for error in pool.map(problem, jobs) if error is not None]
    if len(errors) == 1:
        raise errors[0]
    if errors:
        first = str(errors[0])
        raise UserError(f"{first[:-1]} ({len(errors) - 1} more of the {len(jobs)} images fail too).")


def clean_class_name(folder_name: str) -> str:
    """'001.Black_footed_Albatross' -> 'Black footed Albatross'."""
    return re.sub(r"^\d+\.", "", folder_name).replace("_", " ")


def synthetic_image(rng: np.random.Generator, hue: float, angle: float, size: int):
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


def read_mat(path: Path, keys: tuple[str, ...], fix: str) -> list[np.ndarray]:
    """The named tables of a MATLAB .mat file, each as a 1-d array (scipy's loadmat with squeeze_me, as torchvision
    reads them, so that a cell of strings is an array of str; a table of one entry stays an array). A missing or
    damaged file, or one without a table, is one sentence ending in fix."""
    kind = not_a_file(path)
    if kind:
        raise UserError(f"{path} is {kind}; {fix}.")
    try:
        tables = scipy.io.loadmat(path, squeeze_me=True)
    except Exception as error:  # scipy raises MatReadError, ValueError, TypeError, ... on a damaged file
        raise UserError(f"cannot read {path} as a MATLAB file ({error}); {fix}.") from None
    missing = next((key for key in keys if key not in tables), None)
    if missing:
        raise UserError(f"{path} has no {missing!r} table, so it is not the dataset's own file; {fix}.")
    return [np.atleast_1d(tables[key]) for key in keys]


def whole_numbers(values, low: int, high: int) -> tuple[np.ndarray, int | None, str]:
    """A table's entries as integers, the index of the first that is not a whole number in [low, high] (None when
    all are) and that entry as the file gives it, for a sentence; an entry that is no number at all counts as such.
    For labels and ids read from .mat files, where int() would make 2.5 class 2 silently."""
    values = np.ravel(values)
    try:
        numbers = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):  # a damaged table: strings or empty cells among the numbers
        numbers = np.array([_number_or_nan(value) for value in values], dtype=np.float64)
    good = (numbers >= low) & (numbers <= high) & (numbers == np.round(numbers))  # NaN fails every comparison
    bad = np.flatnonzero(~good)
    if not len(bad):
        return numbers.astype(np.int64), None, ""
    first = int(bad[0])
    shown = f"{numbers[first]:g}" if not math.isnan(numbers[first]) else repr(str(values[first]))
    return np.where(good, numbers, 0).astype(np.int64), first, shown


def _number_or_nan(value) -> float:
    try:
        return float(np.asarray(value).item())
    except (TypeError, ValueError):
        return math.nan
