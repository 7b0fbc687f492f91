"""What indexing iNaturalist costs per image: a generated tree in the iNaturalist 2021 layout (empty placeholder
files named as the real ones, JSON files with every field the real ones have), indexed by bcnn's reader as
training does, each part timed; then the per-image figure and its extrapolation to 2021's 2,686,843 train and
100,000 val images. The val hold-out (stratified_holdout) is timed apart, on labels alone, at the real size: its
cost grows with images x classes, so it does not extrapolate per image. Nothing is decoded.

    .venv/bin/python tests/helpers/inat_index_cost.py --images 100000 --classes 1000   # data/README.md's figure
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bcnn.data.dataset import check_images, stratified_holdout  # noqa: E402
from bcnn.data.inat import INaturalist2021, LAYOUTS, _categories, _load_json, _split  # noqa: E402

REAL_TRAIN, REAL_VAL, REAL_CLASSES = 2_686_843, 100_000, 10_000


def write_tree(root: Path, images: int, classes: int, val_per_class: int) -> int:
    """train/ and val/ with `images` train and classes x val_per_class val placeholders; returns the files made."""
    rng = np.random.default_rng(0)
    categories, folders = [], []
    for label in range(classes):
        taxonomy = ["Plantae", "Tracheophyta", "Magnoliopsida", f"Order{label % 50}", f"Family{label % 300}",
                    f"Genus{label // 2}", f"epithet{label}"]
        folders.append("_".join([f"{label:05d}", *taxonomy]))
        categories.append({"id": label, "name": f"Genus{label // 2} epithet{label}", "common_name": "Common name",
                           "supercategory": "Plants", **dict(zip(("kingdom", "phylum", "class", "order", "family",
                                                                  "genus", "specific_epithet"), taxonomy)),
                           "image_dir_name": folders[-1]})
    made = 0
    for which, count in (("train", images), ("val", classes * val_per_class)):
        labels = np.arange(count) % classes
        entries, notes = [], []
        for folder in folders:
            (root / which / folder).mkdir(parents=True)
        for index, label in enumerate(labels.tolist()):
            file_name = f"{which}/{folders[label]}/{uuid.UUID(bytes=rng.bytes(16), version=4)}.jpg"
            (root / file_name).touch()
            entries.append({"id": made + 1, "width": 500, "height": 375, "file_name": file_name, "license": 1,
                            "rights_holder": "A. Photographer", "date": "2017-06-09 16:31:47+00:00",
                            "latitude": 43.08, "longitude": -79.07, "location_uncertainty": 35})
            notes.append({"id": made + 1, "image_id": made + 1, "category_id": label})
            made += 1
        content = {"info": {"year": 2021}, "images": entries, "categories": categories, "annotations": notes,
                   "licenses": [{"id": 1, "name": "CC BY-NC 4.0", "url": ""}]}
        (root / f"{which}.json").write_text(json.dumps(content))
    return made


def timed(work):
    start = time.perf_counter()
    result = work()
    return result, time.perf_counter() - start


def index(root: Path) -> None:
    """Index the tree at root as training does, each part timed, in a process of its own (its peak memory is the
    reader's, not the generator's)."""
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GB (Linux): torch and bcnn loaded
    files = sum(len(json.loads((root / name).read_text())["images"]) for name in ("train.json", "val.json"))
    layout = LAYOUTS["inat2021"]
    train, parse = timed(lambda: _load_json(root / "train.json", "-"))
    val, parse_val = timed(lambda: _load_json(root / "val.json", "-"))
    (classes, label_of), _ = timed(lambda: _categories(layout, root, train, "-"))
    (records, ids), join = timed(lambda: _split(root, "train.json", train, label_of, {}, "-"))
    (val_records, val_ids), join_val = timed(lambda: _split(root, "val.json", val, label_of, {}, "-"))
    _, stats = timed(lambda: check_images(
        {"train": [(path, "train.json", f"image id {i}") for (path, _), i in zip(records, ids)],
         "test": [(path, "val.json", f"image id {i}") for (path, _), i in zip(val_records, val_ids)]}, "-", "-"))
    parts = {"JSON parse": parse + parse_val, "records (lookups, path joins)": join + join_val,
             "check_images (one stat each, listed once)": stats}
    for name, value in parts.items():
        print(f"  {name:44s} {value:6.2f} s  {value / files * 1e6:5.2f} us/image")
    for split, fraction in (("trainval", 0.0), ("test", 0.0), ("train", 0.1)):
        dataset, seconds = timed(lambda: INaturalist2021(root, split, fraction))
        per_image = seconds / files
        print(f"INaturalist2021(split={split!r}, val_fraction={fraction}): {len(dataset):,} images, "
              f"{seconds:.2f} s for {files:,} listed, {per_image * 1e6:.1f} us/image -> "
              f"{per_image * (REAL_TRAIN + REAL_VAL):.0f} s for 2021's {REAL_TRAIN + REAL_VAL:,}")
    added = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 - baseline
    print(f"peak memory added by indexing: {added:.2f} GB over the {baseline:.2f} GB of the interpreter with bcnn, "
          f"{added * 2**30 / files / 1e3:.1f} kB/image -> {added * (REAL_TRAIN + REAL_VAL) / files:.0f} GB for 2021")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=100_000, help="train images in the generated tree")
    parser.add_argument("--classes", type=int, default=1_000, help="classes (species folders)")
    parser.add_argument("--val-per-class", type=int, default=10, help="val images per class, as in 2021")
    parser.add_argument("--dir", default=None, help="where to make the tree (a temporary folder, deleted after)")
    parser.add_argument("--index", default=None, help=argparse.SUPPRESS)  # the child process: index this tree
    args = parser.parse_args()
    if args.index:
        index(Path(args.index))
        return
    base = Path(tempfile.mkdtemp(prefix="inat_index_", dir=args.dir))
    try:
        root = base / "inat2021"
        files, seconds = timed(lambda: write_tree(root, args.images, args.classes, args.val_per_class))
        print(f"generated {files:,} placeholder images in {seconds:.1f} s under {root}")
        subprocess.run([sys.executable, __file__, "--index", str(root)], check=True)
    finally:
        shutil.rmtree(base)
    labels = (np.arange(REAL_TRAIN) % REAL_CLASSES).tolist()
    _, seconds = timed(lambda: stratified_holdout(labels, 0.1, 0))
    print(f"stratified_holdout of {REAL_TRAIN:,} labels in {REAL_CLASSES:,} classes (the train/val hold-out at 2021's "
          f"size): {seconds:.1f} s")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
