"""iNaturalist 2017, 2018 and 2021 (and 2021's train_mini): the reader of the competitions' JSON annotations and of
torchvision's INaturalist folders, the download, and a synthetic writer in the competitions' exact layout.

iNaturalist publishes no test labels, so bcnn's `test` split is the official val set, and bcnn's `val` a
stratified, seeded hold-out of the official train set (data.val_fraction, data.split_seed); `trainval` is the
official train set. Each version is its own data.format:

    inat2017        train2017.json, val2017.json (train_val2017.zip); images train_val_images/<super>/<name>/*.jpg
    inat2018        train2018.json, val2018.json, categories.json (the species names, obfuscated in the other two);
                    images train_val2018/<super>/<category id>/*.jpg
    inat2021        train.json, val.json; images train/<category folder>/*.jpg, val/<category folder>/*.jpg
    inat2021_mini   the same with train_mini.json and train_mini/ (50 images a species) in place of train

The JSON files are COCO-like: images [{id, file_name}], annotations [{image_id, category_id}], categories [{id,
name}]; labels are the categories in id order, class names their `name`. torchvision's INaturalist downloads
rename the image folders (2017/, 2018/; 2021_train/, 2021_train_mini/, 2021_valid/): the reader finds the images
there when the competition's folder is absent. 2021's category folders (00000_Animalia_..._Lumbricus_terrestris)
name the species, so torchvision's 2021 folders are read without the JSON files too; 2017's and 2018's hold train
and val images together, so those two need the JSON files beside them.

Scale (2.7 M train images, 10,000 species in 2021): indexing is a JSON parse, a path join and one stat per image
(check_images: each image on disk, and listed once); no image is opened until it is loaded or verified.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS

from bcnn.data.dataset import (_ImageDataset, check_dataset_folder, check_images, check_synthetic_sizes,
                               describe_splits, select_split, synthetic_image)
from bcnn.data.download import fetch_advice, make_folder
from bcnn.data.flowers import Part, download_parts
from bcnn.errors import UserError
from bcnn.paths import not_a_file

INAT_URL = "https://ml-inat-competition-datasets.s3.amazonaws.com/"  # the competitions' files, <year>/<file>
# What `python -m bcnn.data verify` and a download print after the split counts.
SPLITS_NOTE = ("; test is the official val set (iNaturalist's test labels are not public), val a hold-out of the "
               "official train set")


@dataclass(frozen=True)
class Layout:
    """One version's files: its annotation files, image folders and archives (name -> (md5 or None where the
    competition publishes none, what it extracts to: annotation files or an image folder))."""

    title: str
    folder: str  # the folder the download makes (the archives extract into it)
    year: str
    train: str  # the train set's annotation file
    val: str  # the official val set's (bcnn's test split)
    images: tuple[str, str]  # the folders of the train and the val images, as the archives extract them
    renames: dict[str, str]  # an image folder the JSON files name -> torchvision's name for it
    archives: dict[str, tuple[str | None, tuple[str, ...]]]
    names: str = ""  # a file of the un-obfuscated category names (2018's categories.json)
    folders: tuple[str, str] | None = None  # torchvision's train and val folders, read without JSON files (2021)


# The md5s are the competitions' own (visipedia/inat_comp, <year>/README.md), which torchvision's INaturalist
# checks too for the image archives; the 2017 annotations and 2018's category names come without one.
LAYOUTS = {
    "inat2017": Layout("iNaturalist 2017", "inat2017", "2017", "train2017.json", "val2017.json",
                       ("train_val_images", "train_val_images"), {"train_val_images/": "2017/"},
                       {"train_val_images.tar.gz": ("7c784ea5e424efaec655bd392f87301f", ("train_val_images",)),
                        "train_val2017.zip": (None, ("train2017.json", "val2017.json"))}),
    "inat2018": Layout("iNaturalist 2018", "inat2018", "2018", "train2018.json", "val2018.json",
                       ("train_val2018", "train_val2018"), {"train_val2018/": "2018/"},
                       {"train_val2018.tar.gz": ("b1c6952ce38f31868cc50ea72d066cc3", ("train_val2018",)),
                        "train2018.json.tar.gz": ("bfa29d89d629cbf04d826a720c0a68b0", ("train2018.json",)),
                        "val2018.json.tar.gz": ("f2ed8bfe3e9901cdefceb4e53cd3775d", ("val2018.json",)),
                        "categories.json.tar.gz": (None, ("categories.json",))},
                       names="categories.json"),
    "inat2021": Layout("iNaturalist 2021", "inat2021", "2021", "train.json", "val.json",
                       ("train", "val"), {"train/": "2021_train/", "val/": "2021_valid/"},
                       {"train.tar.gz": ("e0526d53c7f7b2e3167b2b43bb2690ed", ("train",)),
                        "train.json.tar.gz": ("38a7bb733f7a09214d44293460ec0021", ("train.json",)),
                        "val.tar.gz": ("f6f6e0e242e3d4c9569ba56400938afc", ("val",)),
                        "val.json.tar.gz": ("4d761e0f6a86cc63e8f7afc91f6a8f0b", ("val.json",))},
                       folders=("2021_train", "2021_valid")),
    "inat2021_mini": Layout("iNaturalist 2021 (train_mini)", "inat2021", "2021", "train_mini.json", "val.json",
                            ("train_mini", "val"), {"train_mini/": "2021_train_mini/", "val/": "2021_valid/"},
                            {"train_mini.tar.gz": ("db6ed8330e634445efc8fec83ae81442", ("train_mini",)),
                             "train_mini.json.tar.gz": ("395a35be3651d86dc3b0d365b8ea5f92", ("train_mini.json",)),
                             "val.tar.gz": ("f6f6e0e242e3d4c9569ba56400938afc", ("val",)),
                             "val.json.tar.gz": ("4d761e0f6a86cc63e8f7afc91f6a8f0b", ("val.json",))},
                            folders=("2021_train_mini", "2021_valid")),
}


def _archive_of(layout: Layout, extracted: str) -> str:
    """The archive a file or folder of the layout comes from, for "re-extract <archive>"."""
    return next(archive for archive, (_, extracts) in layout.archives.items() if extracted in extracts)


def _holds(layout: Layout) -> str:
    return f"{layout.train}, {layout.val} and the image folders"


def _load_json(path: Path, fix: str, kind: type = dict):
    """A JSON file's content, which must be a `kind`; a missing, unreadable or damaged file is one sentence."""
    problem = not_a_file(path)
    if problem:
        raise UserError(f"{path} is {problem}; {fix}.")
    try:
        with open(path, "rb") as file:
            content = json.load(file)
    except json.JSONDecodeError as error:
        raise UserError(f"cannot read {path} as JSON ({error.msg} at line {error.lineno}); {fix}.") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text, the encoding of JSON files; {fix}.") from None
    except OSError as error:
        raise UserError(f"cannot read {path} ({error.strerror or error}); give your user read access to it "
                        f"(chmod a+r), or {fix}.") from None
    if not isinstance(content, kind):
        raise UserError(f"{path} holds a JSON {type(content).__name__}, not the {kind.__name__} of an iNaturalist "
                        f"annotation file; {fix}.")
    return content


def _lists(content: dict, path: Path, fix: str) -> dict[str, list]:
    for key in ("images", "annotations", "categories"):
        if not isinstance(content.get(key), list):
            raise UserError(f"{path} has no {key!r} list, so it is not an iNaturalist annotation file; {fix}.")
    return content


def _bad_entry(entries: list, key: str, fields: tuple[str, ...], path: Path, fix: str) -> UserError:
    """The sentence for the first entry of a list that lacks one of `fields` (or is not an object); the fast path
    (a dict comprehension) found that one does."""
    for number, entry in enumerate(entries, 1):
        if not isinstance(entry, dict) or any(name not in entry for name in fields) or not all(
                isinstance(entry[name], (int, str)) for name in fields):
            return UserError(f"entry {number} of {path}'s {key!r} list has no {' and '.join(fields)} (a number or a "
                             f"name each); {fix}.")
    return UserError(f"{path}'s {key!r} list is not a list of objects with {' and '.join(fields)}; {fix}.")


def _first_twice(values):
    seen = set()
    return next(value for value in values if value in seen or seen.add(value))


def _categories(layout: Layout, root: Path, content: dict, fix: str) -> tuple[list[str], dict]:
    """(class names in category-id order, category id -> label) from the train file's categories, the names from
    layout.names where that file is there (2018's un-obfuscated ones)."""
    path, categories = root / layout.train, content["categories"]
    try:
        names = {category["id"]: str(category["name"]) for category in categories}
    except (KeyError, TypeError):
        raise _bad_entry(categories, "categories", ("id", "name"), path, fix) from None
    if len(names) != len(categories):
        raise UserError(f"category id {_first_twice(category['id'] for category in categories)} appears twice in "
                        f"{path}; {fix}.")
    if not names:
        raise UserError(f"{path} has no categories, so no classes; {fix}.")
    if layout.names and (root / layout.names).exists():
        named, refetch = root / layout.names, f"re-extract {_archive_of(layout, layout.names)}"
        given = _load_json(named, refetch, list)
        try:
            names.update((category["id"], str(category["name"])) for category in given if category["id"] in names)
        except (KeyError, TypeError):
            raise _bad_entry(given, "categories", ("id", "name"), named, refetch) from None
    try:
        ordered = sorted(names)
    except TypeError:  # ids of mixed types
        raise UserError(f"the category ids of {path} are not all numbers; {fix}.") from None
    return [names[category] for category in ordered], {category: label for label, category in enumerate(ordered)}


def _split(root: Path, name: str, content: dict, label_of: dict, renames: dict[str, str],
           fix: str) -> tuple[list[tuple[str, int]], list]:
    """One annotation file's records (path, label) and image ids, in its images' order: each image one annotation,
    of a known category. The work per image is a few dict lookups and a path join (2021 lists 2.7 M images).
    renames: image folders the file names (with their slash) -> the folder the images are in instead."""
    path, images, annotations = root / name, content["images"], content["annotations"]
    try:
        files = {image["id"]: image["file_name"] for image in images}
    except (KeyError, TypeError):
        raise _bad_entry(images, "images", ("id", "file_name"), path, fix) from None
    try:
        categories = {note["image_id"]: note["category_id"] for note in annotations}
    except (KeyError, TypeError):
        raise _bad_entry(annotations, "annotations", ("image_id", "category_id"), path, fix) from None
    if len(files) != len(images):
        raise UserError(f"image id {_first_twice(image['id'] for image in images)} appears twice in {path}'s images; "
                        f"{fix}.")
    if len(categories) != len(annotations):
        twice = _first_twice(note["image_id"] for note in annotations)
        given = [str(note["category_id"]) for note in annotations if note["image_id"] == twice]
        raise UserError(f"image id {twice} has {len(given)} annotations in {path} (categories {', '.join(given)}), "
                        f"and bcnn trains one label per image; {fix}.")
    if categories.keys() != files.keys():
        unlabelled = next((image_id for image_id in files if image_id not in categories), None)
        if unlabelled is not None:
            raise UserError(f"image id {unlabelled} ({files[unlabelled]}) of {path} has no annotation, so no class; "
                            f"{fix}.")
        orphan = next(image_id for image_id in categories if image_id not in files)
        raise UserError(f"{path} annotates image id {orphan}, which its images list lacks; {fix}.")
    try:
        labels = [label_of.get(categories[image_id]) for image_id in files]
    except TypeError:  # a category_id that is a list or an object
        raise _bad_entry(annotations, "annotations", ("image_id", "category_id"), path, fix) from None
    if None in labels:
        image_id = list(files)[labels.index(None)]
        raise UserError(f"image id {image_id} ({files[image_id]}) of {path} has category_id {categories[image_id]}, "
                        f"which is not one of the {len(label_of)} categories of the train file; {fix}.")
    base = str(root)
    try:
        if renames:
            paths = [os.path.join(base, _renamed(file, renames)) for file in files.values()]
        else:
            paths = [os.path.join(base, file) for file in files.values()]
    except (TypeError, AttributeError):  # a file name that is a number
        raise _bad_entry(images, "images", ("id", "file_name"), path, fix) from None
    return list(zip(paths, labels)), list(files)


def _renamed(file: str, renames: dict[str, str]) -> str:
    slash = file.find("/") + 1
    return renames.get(file[:slash], file[:slash]) + file[slash:]


def _renames(root: Path, layout: Layout) -> dict[str, str]:
    """The image folders the JSON files name that are not on disk, where torchvision's name for them is."""
    return {folder: renamed for folder, renamed in layout.renames.items()
            if not (root / folder).is_dir() and (root / renamed).is_dir()}


def _species(folder: Path) -> str:
    """A 2021 category folder's species: '00000_Animalia_Annelida_Clitellata_Haplotaxida_Lumbricidae_Lumbricus_
    terrestris' -> 'Lumbricus terrestris', the name the JSON files give it."""
    pieces = folder.name.split("_")
    if len(pieces) < 8 or not pieces[0].isdigit():
        raise UserError(f"{folder} is not named as iNaturalist 2021's category folders are (<id>_<kingdom>_<phylum>_"
                        "<class>_<order>_<family>_<genus>_<species>); rename or remove it.")
    return " ".join(pieces[6:])


def _read_folders(root: Path, layout: Layout) -> tuple[list[str], list, list]:
    """torchvision's 2021 layout, without JSON files: the category folders of its train and val folders, which
    must be the same; labels in folder (= category id) order."""
    train_dir, val_dir = (root / name for name in layout.folders)
    names = {}
    for folder in (train_dir, val_dir):
        with os.scandir(folder) as entries:
            names[folder] = sorted(entry.name for entry in entries if entry.is_dir())
    if names[train_dir] != names[val_dir]:
        odd = sorted(set(names[train_dir]) ^ set(names[val_dir]))[0]
        raise UserError(f"{train_dir.name}/ and {val_dir.name}/ of {root} differ in category folders (e.g. {odd!r}); "
                        f"make them match.")
    if not names[train_dir]:
        raise UserError(f"{train_dir} has no category folders; re-extract {layout.title}'s train images there.")
    classes = [_species(train_dir / name) for name in names[train_dir]]
    splits = {}
    for split, folder in (("train", train_dir), ("test", val_dir)):
        splits[split] = [(os.path.join(folder, name, file), label) for label, name in enumerate(names[folder])
                         for file in sorted(os.listdir(folder / name)) if file.lower().endswith(IMG_EXTENSIONS)]
    check_images({split: [(path, "", "") for path, _ in records] for split, records in splits.items()},
                 f"{train_dir.name}/ and {val_dir.name}/", "delete one of them")
    return classes, splits["train"], splits["test"]


def read_inaturalist(root: Path, data_format: str) -> tuple[list[str], list, list]:
    """Check an iNaturalist folder of data_format's layout; return (class names, official train, official val),
    records (path, label)."""
    layout = LAYOUTS[data_format]
    get = fetch_advice(root, layout.folder, data_format)
    check_dataset_folder(root, layout.title, _holds(layout), get, layout.folder, layout.val)
    if layout.folders and not (root / layout.val).exists() and all((root / name).is_dir() for name in layout.folders):
        return _read_folders(root, layout)
    for name in (layout.train, layout.val):
        problem = not_a_file(root / name)
        if problem:
            folders = " and ".join(f"{folder}/" for folder in layout.folders or ())
            other = f" (nor torchvision's {folders})" if folders else ""
            raise UserError(f"{root / name} is {problem}, so {root} is not a complete {layout.title} folder{other}; "
                            f"{get}.")
    fixes = {name: f"re-extract {_archive_of(layout, name)}" for name in (layout.train, layout.val)}
    contents = {name: _lists(_load_json(root / name, fixes[name]), root / name, fixes[name])
                for name in (layout.train, layout.val)}
    classes, label_of = _categories(layout, root, contents[layout.train], fixes[layout.train])
    renames = _renames(root, layout)
    splits = {split: _split(root, name, contents[name], label_of, renames, fixes[name])
              for split, name in (("train", layout.train), ("test", layout.val))}
    listed_in = {"train": layout.train, "test": layout.val}
    images = " and ".join(dict.fromkeys(_archive_of(layout, folder) for folder in layout.images))
    check_images({split: [(path, listed_in[split], f"image id {image_id}") for (path, _), image_id in zip(*listed)]
                  for split, listed in splits.items()}, f"{layout.train} and {layout.val}",
                 f"re-extract {images}, or fix the annotation file")
    return classes, splits["train"][0], splits["test"][0]


class _INaturalistDataset(_ImageDataset):
    """An iNaturalist version (LAYOUTS[DATA_FORMAT]): test is the official val set (the competition's test labels
    are not public), val a stratified hold-out of the official train set, trainval that whole train set."""

    DATA_FORMAT = ""
    ADD_TRAINING_IMAGES = "every class needs images in the train annotation file; re-extract it"
    SPLITS_NOTE = SPLITS_NOTE

    def __init__(self, root, split="train", val_fraction=0.0, split_seed=0, transform=None, target_transform=None):
        root = Path(root).absolute()
        classes, train, official_val = read_inaturalist(root, self.DATA_FORMAT)
        records = select_split(split, train, official_val, val_fraction, split_seed)
        super().__init__(root, split, classes, records, transform, target_transform)


class INaturalist2017(_INaturalistDataset):
    DATA_FORMAT, FOLDER_HOLDS = "inat2017", _holds(LAYOUTS["inat2017"])


class INaturalist2018(_INaturalistDataset):
    DATA_FORMAT, FOLDER_HOLDS = "inat2018", _holds(LAYOUTS["inat2018"])


class INaturalist2021(_INaturalistDataset):
    DATA_FORMAT, FOLDER_HOLDS = "inat2021", _holds(LAYOUTS["inat2021"])


class INaturalist2021Mini(_INaturalistDataset):
    DATA_FORMAT, FOLDER_HOLDS = "inat2021_mini", _holds(LAYOUTS["inat2021_mini"])


INATURALIST = {"inat2017": INaturalist2017, "inat2018": INaturalist2018, "inat2021": INaturalist2021,
               "inat2021_mini": INaturalist2021Mini}
INAT_FOLDERS = {name: layout.folder for name, layout in LAYOUTS.items()}


def describe_inaturalist(dataset_class, folder: Path, val_fraction: float = 0.1) -> str:
    return describe_splits(dataset_class, folder, val_fraction) + SPLITS_NOTE


def download_inaturalist(data_format: str, root: str, url: str = INAT_URL,
                         md5: dict[str, str | None] | None = None) -> Path:
    """Fetch, md5-check, safely extract and verify one iNaturalist version's archives (LAYOUTS) into root/<its
    folder>; a no-op once it verifies. url: the folder holding <year>/<archive>; md5: archive -> md5, in place of the
    competition's (tests serve their own archives)."""
    layout = LAYOUTS[data_format]
    base = f"{url}{layout.year}/"
    parts = [Part(name, base + name, (md5 or {}).get(name, given), extracts[-1])
             for name, (given, extracts) in layout.archives.items()]
    return download_parts(root, layout.folder, parts,
                          lambda folder: describe_inaturalist(INATURALIST[data_format], folder))


def write_synthetic_inaturalist(data_format: str, root, classes: int = 5, per_class: int = 12, seed: int = 0,
                                image_size: int = 96) -> Path:
    """Write a mini iNaturalist of data_format's version in the competition's exact layout, what its download
    extracts (the JSON files with the real ones' fields, the image folders), deterministically from seed; returns
    its folder under root. Per class, every third image is val, the others train (train_mini for inat2021_mini)."""
    layout, rng = LAYOUTS[data_format], np.random.default_rng(seed)
    check_synthetic_sizes(layout.title, classes, per_class, image_size)
    dataset_dir = Path(root) / layout.folder
    make_folder(dataset_dir)
    categories, folders = [], []
    for label in range(classes):
        genus, epithet = f"Synthgenus{label // 2 + 1}", f"species{label + 1}"
        category = {"id": label, "name": f"{genus} {epithet}",
                    "supercategory": ("Plantae", "Insecta", "Aves")[label % 3]}
        if layout.year == "2021":
            taxonomy = [category["supercategory"], f"Phylum{label % 2}", f"Class{label % 2}", f"Order{label % 2}",
                        f"Family{label // 3}", genus, epithet]
            folder = "_".join([f"{label:05d}", *taxonomy])
            category.update(zip(("kingdom", "phylum", "class", "order", "family", "genus", "specific_epithet"),
                                taxonomy), common_name=f"Synthetic species {label + 1}", image_dir_name=folder)
        else:  # 2017 names the folders by species, 2018 by category id
            folder = f"{category['supercategory']}/{category['name'] if layout.year == '2017' else label}"
        categories.append(category)
        folders.append(folder)
    listed = {layout.train: [], layout.val: []}
    for label in range(classes):
        for index in range(per_class):
            image, _ = synthetic_image(rng, label / classes, np.pi * label / classes, image_size)
            split = 1 if index % 3 == 2 else 0  # train, val
            file_name = f"{layout.images[split]}/{folders[label]}/{rng.bytes(16).hex()}.jpg"
            make_folder((dataset_dir / file_name).parent)
            image.save(dataset_dir / file_name, quality=92)
            image_id = sum(len(entries) for entries in listed.values()) + 1
            listed[(layout.train, layout.val)[split]].append(
                ({"id": image_id, "width": image.width, "height": image.height, "file_name": file_name, "license": 1,
                  "rights_holder": "Synthetic"}, {"id": image_id, "image_id": image_id, "category_id": label}))
    # 2018's files give every category's names obfuscated; categories.json has the real ones.
    given = [dict(category, name=str(category["id"])) for category in categories] if layout.names else categories
    for file, entries in listed.items():
        content = {"info": {"year": int(layout.year), "description": f"synthetic {layout.title}"},
                   "images": [image for image, _ in entries], "annotations": [note for _, note in entries],
                   "categories": given, "licenses": [{"id": 1, "name": "Synthetic", "url": ""}]}
        (dataset_dir / file).write_text(json.dumps(content), encoding="utf-8")
    if layout.names:
        (dataset_dir / layout.names).write_text(json.dumps(categories), encoding="utf-8")
    return dataset_dir
