"""FGVC-Aircraft, Stanford Cars and NABirds beside CUB: each reader on data its synthetic writer made in the real
layout (Cars' .mat files included), checked against the images' own content and the official list files; the
official val split of Aircraft; the 20-px banner; one-sentence errors; `make data DATASET=`; and each dataset's
recipe trained (both stages) and evaluated through the same commands, its test images unreadable during training.
"""

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np

import pytest
import scipy.io
from PIL import Image

from bcnn import eval as eval_cli
from bcnn import train as train_cli
from bcnn.config import CHOICES, load_config
from bcnn.data import DOWNLOADS, FOLDERS, READERS, WRITERS, build_dataset
from bcnn.data.__main__ import main as data_cli_main
from bcnn.data.aircraft import BANNER, download_aircraft
from bcnn.errors import UserError

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = REPO / "experiments"
CLASSES, PER_CLASS = 3, 6
NEW_FORMATS = ("aircraft", "cars", "nabirds")


@pytest.fixture(scope="session")
def datasets(tmp_path_factory) -> dict[str, Path]:
    """Each format's synthetic dataset folder (3 classes x 6 images): read them, never change them."""
    base = tmp_path_factory.mktemp("formats")
    return {name: writer(base / name, CLASSES, PER_CLASS, seed=3, image_size=48) if name != "cub" else
            writer(base / name / "CUB_200_2011", CLASSES, PER_CLASS, seed=3, image_size=48)
            for name, writer in WRITERS.items()}


def writable(datasets, name: str, tmp_path: Path) -> Path:
    """A private copy of one format's dataset, under the folder name its reader requires."""
    return Path(shutil.copytree(datasets[name], tmp_path / datasets[name].name))


def stripe_hue(image: Image.Image) -> float | None:
    """Mean hue (on the circle: red is near 0 and 1) of the saturated pixels, the synthetic object's, which is
    class k's k / CLASSES (jittered); None for a grayscale image (the writers save one such, as in CUB)."""
    hsv = np.array(image.convert("HSV"), dtype=np.float32) / 255
    saturated = (hsv[..., 1] > 0.45) & (hsv[..., 2] > 0.25)
    if saturated.sum() < 20:
        return None
    return float(np.angle(np.exp(2j * np.pi * hsv[..., 0][saturated]).mean()) / (2 * np.pi) % 1.0)


def saturated_box(image: Image.Image) -> tuple[int, int, int, int]:
    """(x, y, w, h) of the saturated pixels: where the writer drew the object, inscribed in its box."""
    hsv = np.array(image.convert("HSV"), dtype=np.float32) / 255
    rows, cols = np.nonzero((hsv[..., 1] > 0.45) & (hsv[..., 2] > 0.25))
    return cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1


@pytest.mark.parametrize("name", list(WRITERS))
def test_each_reader_gives_the_images_their_own_class_and_box(datasets, name):
    trainval, test = (READERS[name](datasets[name], split) for split in ("trainval", "test"))
    assert len(trainval.classes) == CLASSES and trainval.classes == test.classes
    assert len(trainval) + len(test) == CLASSES * PER_CLASS
    assert not {path for path, _ in trainval.samples} & {path for path, _ in test.samples}
    grayscale = 0
    for dataset in (trainval, test):
        for index, (path, label) in enumerate(dataset.samples):
            image = dataset.load_image(index)
            hue = stripe_hue(image)
            if hue is None:
                grayscale += 1
                continue
            # Hue distance on the circle, against the writer's class hues 0, 1/3, 2/3 (jitter sd 0.02).
            distance = abs((hue - label / CLASSES + 0.5) % 1.0 - 0.5)
            assert distance < 0.08, f"{path} has the hue of another class than its label {label}"
            if READERS[name].HAS_BOXES:
                # The box read from the annotation files against where the object really is. 2 px: JPEG's 2x2
                # chroma subsampling smears the colour edge by up to a pixel each side.
                assert np.allclose(saturated_box(image), dataset.bboxes[index], atol=2), path
    assert grayscale <= 1


def test_aircraft_cuts_the_banner_off_every_image(datasets):
    dataset = READERS["aircraft"](datasets["aircraft"], "test")
    for index, (path, _) in enumerate(dataset.samples):
        with Image.open(path) as photo:
            whole = np.array(photo.convert("RGB"))
        loaded = np.array(dataset.load_image(index))
        assert loaded.shape[0] == whole.shape[0] - BANNER
        assert np.array_equal(loaded, whole[:-BANNER]), "the image must be the file's top, unchanged"
        assert (whole[-BANNER:] > 200).mean() > 0.5, "the writer's banner is mostly white"


def official_list(root: Path, split: str) -> dict[str, str]:
    """images_variant_<split>.txt as {image name: variant}, read without torchvision."""
    lines = (root / "data" / f"images_variant_{split}.txt").read_text().splitlines()
    return dict(line.split(" ", 1) for line in lines)


def by_name(dataset) -> dict[str, str]:
    return {Path(path).stem: dataset.classes[label] for path, label in dataset.samples}


def test_aircraft_uses_its_official_val_split(datasets):
    root = datasets["aircraft"]
    for fraction in (0.1, 0.5):  # any fraction: the split is the official one, whatever split_seed says
        assert by_name(READERS["aircraft"](root, "train", fraction, split_seed=7)) == official_list(root, "train")
        assert by_name(READERS["aircraft"](root, "val", fraction)) == official_list(root, "val")
    assert by_name(READERS["aircraft"](root, "test", 0.1)) == official_list(root, "test")
    # val_fraction 0: train on train + val (the official trainval list), with no val split.
    assert by_name(READERS["aircraft"](root, "train", 0.0)) == official_list(root, "trainval")
    with pytest.raises(UserError, match="no val split with val_fraction 0"):
        READERS["aircraft"](root, "val", 0.0)
    families = READERS["aircraft"](root, "trainval", annotation_level="family")
    assert families.classes == ["Synthetic-1", "Synthetic-2"]  # variants 1 and 2 share a family, as in the data


def test_nabirds_labels_the_leaves_and_names_their_ancestors(datasets):
    dataset = READERS["nabirds"](datasets["nabirds"], "trainval")
    classes = dict(line.split(" ", 1) for line in (datasets["nabirds"] / "classes.txt").read_text().splitlines())
    leaves = sorted({int(line.split()[1]) for line in
                     (datasets["nabirds"] / "image_class_labels.txt").read_text().splitlines()})
    assert dataset.classes == [classes[str(leaf)] for leaf in leaves]
    assert dataset.ancestors[0] == ["Synthetic group 1", "Birds"]


def append(path: Path, text: str, encoding: str = "utf-8") -> None:
    with path.open("a", encoding=encoding) as file:
        file.write(text)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def edit_mat(path: Path, key: str, edit) -> None:
    table = scipy.io.loadmat(path)
    scipy.io.savemat(path, {key: edit(table[key])})


def set_field(table, field: str, value):
    """A devkit annotation table whose first annotation has `field` = value (a number as a float, which the devkit's
    are not)."""
    table[0, 0][field] = np.array([value]) if isinstance(value, str) else np.array([[value]], dtype=np.float64)
    return table


BROKEN = {  # format -> problem -> (change to the dataset folder, returning the root to read; the message)
    "aircraft": {
        "one level down": (lambda root: root.parent, r"holds the dataset one level down; use .*2013b\.$"),
        "renamed": (lambda root: root.rename(root.with_name("aircraft")),
                    r"only from a folder named fgvc-aircraft-2013b, .* is named 'aircraft'; rename it"),
        "unknown variant": (lambda root: (root / "data" / "variants.txt").write_text("Synthetic-100\n") and root,
                            r"line \d+ of .*images_variant_\w+\.txt names the variant 'Synthetic-200', which is not "
                            r"in variants\.txt; fix the file or re-extract"),
        "line without a label": (lambda root: append(root / "data" / "images_variant_val.txt", "0000123\n") or root,
                                 r"line 7 of .*images_variant_val\.txt is not an image name and a label; fix the "
                                 r"file or re-extract"),
        "missing list": (lambda root: (root / "data" / "images_variant_val.txt").unlink() or root,
                         r"images_variant_val\.txt is missing, so .* is not a complete fgvc-aircraft-2013b folder"),
        "missing image": (lambda root: next((root / "data" / "images").iterdir()).unlink() or root,
                          r"1 of 18 images listed in the variant lists are missing, the first is"),
        "not UTF-8": (lambda root: append(root / "data" / "images_variant_val.txt", "1 Mésange\n", "latin-1") or root,
                      r"line 7 of .*images_variant_val\.txt is not UTF-8 text, the encoding bcnn reads; fix the file"),
        "byte-order mark": (lambda root: (root / "data" / "variants.txt").write_text("\ufeff" + (
            root / "data" / "variants.txt").read_text()) and root, r"variants\.txt starts with a byte-order mark"),
        # torchvision would make a class '' of the blank line, and two classes of the name given twice
        "blank class line": (lambda root: append(root / "data" / "variants.txt", "\n") or root,
                             r"line 4 of .*variants\.txt is blank, which would be a variant without a name; delete the "
                             r"line or re-extract fgvc-aircraft-2013b\.tar\.gz\.$"),
        "class named twice": (lambda root: append(root / "data" / "variants.txt", "Synthetic-100\n") or root,
                              r"line 4 of .*variants\.txt names the variant 'Synthetic-100' again \(line 1 does\); "
                              r"delete one of them or re-extract"),
        "list is a named pipe": (lambda root: os.unlink(root / "data" / "images_variant_test.txt") or os.mkfifo(
            root / "data" / "images_variant_test.txt") or root,
                                 r"images_variant_test\.txt is a named pipe, so .* is not a complete "
                                 r"fgvc-aircraft-2013b folder"),
    },
    "cars": {
        "no test labels": (lambda root: (root / "cars_test_annos_withlabels.mat").unlink() or root,
                           r"cars_test_annos_withlabels\.mat is missing; restore it from your copy of the original "
                           r"Stanford Cars release\.$"),
        **{f"truncated {name}": (lambda root, name=name: truncate(root / name) or root,
                                 rf"cannot read .*{name} as a MATLAB file \(.+\); fetch that file again")
           for name in ("devkit/cars_meta.mat", "devkit/cars_train_annos.mat", "cars_test_annos_withlabels.mat")},
        "class past the list": (lambda root: edit_mat(root / "devkit" / "cars_meta.mat", "class_names",
                                                      lambda names: names[:, :2]) or root,
                                r"gives \d+\.jpg class 3, but cars_meta\.mat has classes 1\.\.2"),
        "one annotation": (lambda root: edit_mat(root / "devkit" / "cars_train_annos.mat", "annotations",
                                                 lambda table: table[:, :1]) or root,
                           r"cannot read the annotations in .*cars_train_annos\.mat \(TypeError\(.+\)\); fetch that "
                           r"file again"),
        "class not whole": (lambda root: edit_mat(root / "cars_test_annos_withlabels.mat", "annotations",
                                                  lambda table: set_field(table, "class", 1.5)) or root,
                            r"gives 00001\.jpg class 1\.5, but cars_meta\.mat has classes 1\.\.3; fetch that file"),
        "damaged .mat": (lambda root: (root / "devkit" / "cars_meta.mat").write_bytes(b"MATLAB? no") and root,
                         r"cannot read .*cars_meta\.mat as a MATLAB file"),
        "folder for a .mat": (lambda root: (root / "cars_test_annos_withlabels.mat").unlink() or (
            root / "cars_test_annos_withlabels.mat").mkdir() or root,
                              r"cars_test_annos_withlabels\.mat is a folder; restore it from your copy"),
        "file for a folder": (lambda root: shutil.rmtree(root / "cars_test") or (root / "cars_test").write_text("x")
                              and root, r"cars_test is a file, not a folder; restore it from your copy"),
    },
    "nabirds": {
        "inner class labelled": (lambda root: append(root / "hierarchy.txt", "7 100\n") or root,
                                 r"labels images with class 100 \(Synthetic bird 1 \(adult\)\), which hierarchy\.txt "
                                 r"says is not a leaf"),
        "uuid missing": (lambda root: (root / "bounding_boxes.txt").write_text(
            "".join((root / "bounding_boxes.txt").read_text().splitlines(keepends=True)[1:])) and root,
                         r"bounding_boxes\.txt lists 17 image ids but images\.txt lists 18"),
    },
}


BOXED = [name for name in READERS if READERS[name].HAS_BOXES and name != "dogs"]  # dogs: its own test file
FIX_BOX = {"cub": "fix the file or re-extract CUB_200_2011.tgz",
           "nabirds": "re-extract nabirds.tar.gz (delete the folder first) or fix the file",
           "cars": "correct it or fetch that file again from your copy of the original release"}


def first_image(root: Path, name: str) -> Path:
    """The image of the first line of the format's box file (annotation 1 of cars_train_annos.mat)."""
    if name == "cars":
        return root / "cars_train" / "00001.jpg"
    return root / "images" / (root / "images.txt").read_text().splitlines()[0].split()[1]


def set_first_box(root: Path, name: str, box: tuple) -> str:
    """Give first_image the (x, y, w, h) box, written in the format's own way; returns the words that name it."""
    x, y, w, h = box
    if name == "cars":  # 1-based corners, both inclusive
        corners = (x + 1, y + 1, x + w, y + h)

        mat = root / "devkit" / "cars_train_annos.mat"
        for field, value in zip(("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"), corners):
            edit_mat(mat, "annotations", lambda table: set_field(table, field, value))
        return f"the box of annotation 1 of {mat} (00001.jpg; bbox_x1 y1 x2 y2: {' '.join(f'{v:g}' for v in corners)})"
    lines = (root / "bounding_boxes.txt").read_text().splitlines()
    lines[0] = " ".join([lines[0].split()[0], *(str(value) for value in box)])
    (root / "bounding_boxes.txt").write_text("".join(f"{line}\n" for line in lines))
    return f"the box on line 1 of {root / 'bounding_boxes.txt'} (x y width height: {' '.join(f'{v:g}' for v in box)})"


NOT_BOXES = {  # (x, y, w, h) -> what the refusal says of it
    "negative width": ((10, 10, -5, 20), "has a negative width, so it encloses nothing"),
    "zero height": ((10, 10, 20, 0), "has zero height, so it encloses nothing"),
    "nan": ((float("nan"), 10, 20, 20), "has a value that is not a finite number"),
    "inf": ((10, 10, float("inf"), 20), "has a value that is not a finite number"),
    "left of the image": ((-40, 10, 30, 20), "lies wholly left of its image"),
    "above the image": ((10, -40, 20, 30), "lies wholly above its image"),
}


@pytest.mark.parametrize("name, problem", [(name, problem) for name in BOXED for problem in NOT_BOXES])
def test_a_box_that_is_not_a_box_is_one_sentence_naming_its_line(datasets, tmp_path, name, problem):
    box, says = NOT_BOXES[problem]
    root = writable(datasets, name, tmp_path)
    expected = f"{set_first_box(root, name, box)} {says}; {FIX_BOX[name]}."
    with pytest.raises(UserError) as error:
        data_cli_main(["verify", "--root", str(root), "--format", name])
    assert str(error.value) == expected
    with pytest.raises(UserError) as error:  # training reads the same tables, cropping to boxes or not
        READERS[name](root, "train", crop_to_bbox=True)
    assert str(error.value) == expected


@pytest.mark.parametrize("name", BOXED)
def test_a_box_past_the_edge_is_clipped_and_one_outside_its_image_refused_where_the_image_is_opened(datasets,
                                                                                                  tmp_path, name):
    root = writable(datasets, name, tmp_path)
    path = first_image(root, name)
    with Image.open(path) as image:
        width, height = image.size

    def first_sample(crop_to_bbox: bool):
        for split in ("trainval", "test"):
            dataset = READERS[name](root, split, crop_to_bbox=crop_to_bbox)
            for index, (sample_path, _) in enumerate(dataset.samples):
                if sample_path == str(path):
                    return dataset, index

    set_first_box(root, name, (width - 10, 5, 30, 20))  # 20 px past the right edge, as real annotations do
    data_cli_main(["verify", "--root", str(root), "--format", name])
    dataset, index = first_sample(crop_to_bbox=True)
    assert dataset.load_image(index).size == (10, 20)
    for box, side in (((width + 2, 5, 30, 20), f"right of its image, which is {width} px wide"),
                      ((5, height, 30, 20), f"below its image, which is {height} px high")):
        expected = f"{set_first_box(root, name, box)} lies wholly {side} ({path}); {FIX_BOX[name]}."
        with pytest.raises(UserError) as error:
            data_cli_main(["verify", "--root", str(root), "--format", name])
        assert str(error.value) == expected
        dataset, index = first_sample(crop_to_bbox=True)
        with pytest.raises(UserError) as error:  # never the whole image in the box's place
            dataset[index]
        assert str(error.value) == expected
        dataset, index = first_sample(crop_to_bbox=False)  # a training that does not use the box is not stopped
        assert dataset.load_image(index).size == (width, height)


def spoil_image(path: Path, damage: str) -> None:
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        truncate(path)
    else:  # no higher than FGVC-Aircraft's banner, which every image loses
        Image.new("RGB", (40, BANNER)).save(path, format="JPEG")


@pytest.mark.parametrize("name, damage", [(name, damage) for name in WRITERS for damage in ("empty", "truncated")]
                         + [("aircraft", "banner only")])
def test_verify_refuses_an_image_training_would_refuse_in_its_words(datasets, tmp_path, name, damage):
    root = writable(datasets, name, tmp_path)
    dataset = READERS[name](root, "test")
    path = Path(dataset.samples[-1][0])
    spoil_image(path, damage)
    with pytest.raises(UserError) as training:
        dataset.load_image(len(dataset) - 1)
    with pytest.raises(UserError) as verify:
        data_cli_main(["verify", "--root", str(root), "--format", name])
    assert str(verify.value) == str(training.value)
    reason = {"empty": "not an image", "truncated": "image file is truncated",
              "banner only": f"it is {BANNER} px high, no more than the {BANNER}-px banner"}[damage]
    assert str(verify.value).startswith(f"cannot read image {path}: {reason}")


TINY = ["--device=cpu", "--data.resize=40", "--data.crop=32", "--data.val_fraction=0.34", "--data.num_workers=0",
        "--model.backbone_weights=none", "--train.batch_size=4", "--train.eval_batch_size=8", "--train.log_every=0",
        "--train.precision=fp32", "--train.epochs=1"]


def list_again(root: Path, source: str, target: str) -> None:
    """CUB's or NABirds' images.txt lists its first `source` image ("train" or "test") again, in place of its last
    `target` image."""
    flags = dict(line.split() for line in (root / "train_test_split.txt").read_text().splitlines())
    paths = dict(line.split() for line in (root / "images.txt").read_text().splitlines())
    ids = {split: [i for i in paths if flags[i] == ("1" if split == "train" else "0")] for split in ("train", "test")}
    paths[ids[target][-1]] = paths[ids[source][0]]
    (root / "images.txt").write_text("".join(f"{image_id} {path}\n" for image_id, path in paths.items()))


def list_line_again(root: Path, source: str, target: str) -> None:
    """FGVC-Aircraft's `source` list's first line appended to its `target` list."""
    first = (root / "data" / f"images_variant_{source}.txt").read_text().splitlines()[0]
    append(root / "data" / f"images_variant_{target}.txt", f"{first}\n")


def same_fname(table):
    table[0, 1]["fname"] = table[0, 0]["fname"]
    return table


def link_train_to_test(root: Path) -> None:
    (root / "cars_train" / "00001.jpg").unlink()
    (root / "cars_train" / "00001.jpg").symlink_to(root / "cars_test" / "00001.jpg")


EVAL_TWICE, TRAINED_ON = "so bcnn.eval would score it twice; ", "so the test split would be trained on; "
TWICE = {  # format -> case -> (change to the dataset folder, the message); "test and train" cases also refuse training
    "cub": {
        "test twice": (lambda root: list_again(root, "test", "test"),
                       rf"is listed twice, as id \d+ \(test\) and id \d+ \(test\) of images\.txt, {EVAL_TWICE}fix the "
                       "file or re-extract CUB_200_2011.tgz"),
        "test and train": (lambda root: list_again(root, "test", "train"),
                           rf"is listed twice, as id \d+ \(train\) and id \d+ \(test\) of images\.txt, {TRAINED_ON}"),
    },
    "nabirds": {
        "test twice": (lambda root: list_again(root, "test", "test"),
                       rf"as id [\w-]+ \(test\) and id [\w-]+ \(test\) of images\.txt, {EVAL_TWICE}re-extract"),
        "test and train": (lambda root: list_again(root, "test", "train"),
                           rf"as id [\w-]+ \(train\) and id [\w-]+ \(test\) of images\.txt, {TRAINED_ON}"),
    },
    "aircraft": {
        "test twice": (lambda root: list_line_again(root, "test", "test"),
                       r"\d+\.jpg is listed twice, as line 1 and line 7 of data/images_variant_test\.txt, "
                       rf"{EVAL_TWICE}"),
        "test and train": (lambda root: list_line_again(root, "test", "train"),
                           r"as line 7 of data/images_variant_train\.txt and line 1 of data/images_variant_test\.txt, "
                           rf"{TRAINED_ON}"),
        "val and train": (lambda root: list_line_again(root, "val", "train"),
                          r"as line 7 of data/images_variant_train\.txt and line 1 of data/images_variant_val\.txt, so "
                          r"the val split would be trained on; fix the file or re-extract"),
    },
    "cars": {
        "test twice": (lambda root: edit_mat(root / "cars_test_annos_withlabels.mat", "annotations", same_fname),
                       r"cars_test/00001\.jpg is listed twice, as annotation 1 and annotation 2 of "
                       rf"cars_test_annos_withlabels\.mat, {EVAL_TWICE}fetch that file again"),
        "train names a test file": (
            lambda root: edit_mat(root / "devkit" / "cars_train_annos.mat", "annotations",
                                  lambda table: set_field(table, "fname", "../cars_test/00001.jpg")),
            r"cars_train/\.\./cars_test/00001\.jpg \(the same file as .*cars_test/00001\.jpg\) is listed twice, as "
            rf"annotation 1 of devkit/cars_train_annos\.mat and annotation 1 of cars_test_annos_withlabels\.mat, "
            rf"{TRAINED_ON}"),
        "test and train": (link_train_to_test,
                           r"cars_train/00001\.jpg \(the same file as .*cars_test/00001\.jpg\) is listed twice, as "
                           r"annotation 1 of devkit/cars_train_annos\.mat and annotation 1 of "
                           rf"cars_test_annos_withlabels\.mat, {TRAINED_ON}"),
    },
}


@pytest.mark.parametrize("name,case", [(name, case) for name in TWICE for case in TWICE[name]])
def test_every_image_is_counted_once_and_the_test_split_never_trained_on(datasets, tmp_path, name, case):
    change, message = TWICE[name][case]
    root = writable(datasets, name, tmp_path)
    change(root)
    with pytest.raises(UserError, match=message) as error:
        data_cli_main(["verify", "--root", str(root), "--format", name])
    assert "\n" not in str(error.value) and str(error.value).endswith(".")
    if case == "test and train":
        with pytest.raises(UserError, match=message):
            train_cli.main(["--config", str(EXPERIMENTS / f"{name}_vgg16_stage1.yaml"), f"--data-root={root}",
                            f"--run-dir={tmp_path / 'run'}", *TINY])


@pytest.mark.parametrize("name,problem", [(name, problem) for name in BROKEN for problem in BROKEN[name]])
def test_a_broken_dataset_is_one_clear_sentence(datasets, tmp_path, name, problem):
    change, message = BROKEN[name][problem]
    root = change(writable(datasets, name, tmp_path))
    with pytest.raises(UserError, match=message) as error:
        data_cli_main(["verify", "--root", str(root), "--format", name])
    assert "\n" not in str(error.value) and str(error.value).endswith(".")


@pytest.mark.parametrize("name, table", [("cub", "images.txt"), ("nabirds", "classes.txt"),
                                         ("aircraft", "data/images_variant_train.txt")])
def test_a_table_that_cannot_be_read_is_one_sentence(datasets, tmp_path, monkeypatch, name, table):
    # The suite runs as root on CI, which reads files whatever their mode; so the read itself is made to fail as
    # it does for a user without permission (chmod 000), with the same PermissionError.
    root = writable(datasets, name, tmp_path)
    unreadable, read_bytes = root / table, Path.read_bytes

    def refuse(path):
        if path == unreadable:
            raise PermissionError(13, "Permission denied", str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(UserError, match=rf"cannot read .*{re.escape(table)} \(Permission denied\); give your user "
                                        r"read access to it \(chmod a\+r\), or "):
        data_cli_main(["verify", "--root", str(root), "--format", name])


@pytest.mark.parametrize("name", READERS)
def test_a_file_given_as_the_dataset_folder_is_refused_naming_the_option(tmp_path, name):
    file = tmp_path / "images.txt"
    file.write_text("1 a.jpg\n")
    holds = READERS[name].FOLDER_HOLDS
    with pytest.raises(UserError) as error:
        data_cli_main(["verify", "--root", str(file), "--format", name])
    assert str(error.value) == (f"--root {file} is a file, not a folder; pass the dataset's folder, the one holding "
                                f"{holds}.")
    config = EXPERIMENTS / f"{name if name in DOWNLOADS else 'cub'}_vgg16_stage1.yaml"
    with pytest.raises(UserError) as error:
        train_cli.main(["--config", str(config), f"--data-root={file}", f"--data.format={name}",
                        f"--run-dir={tmp_path / 'run'}", *TINY])
    assert str(error.value) == (f"--data-root (data.root) {file} is a file, not a folder; pass the dataset's "
                                f"folder, the one holding {holds}.")


def test_advice_names_the_folder_given_never_a_default(tmp_path):
    """Where to get (or put) a dataset is said for the folder the user gave, in a short sentence."""
    elsewhere = tmp_path / "elsewhere"
    for name, folder in FOLDERS.items():
        for root in (elsewhere / folder, elsewhere / "renamed"):
            with pytest.raises(UserError) as error:
                data_cli_main(["verify", "--root", str(root), "--format", name])
            message = str(error.value)
            assert str(elsewhere) in message and "data/" not in message.replace(str(tmp_path), ""), message
            assert len(message.replace(str(elsewhere), "")) < 200, message
    with pytest.raises(UserError, match=rf"; check the path or fetch the dataset with `python -m bcnn\.data download "
                                        rf"--dataset aircraft --root {elsewhere}`, which makes {elsewhere}/fgvc"):
        data_cli_main(["verify", "--root", str(elsewhere / "renamed"), "--format", "aircraft"])
    for name in ("cars", "nabirds"):
        with pytest.raises(UserError) as error:
            data_cli_main(["download", "--dataset", name, "--root", str(elsewhere)])
        assert str(error.value).startswith(f"{elsewhere / FOLDERS[name]} does not exist; ")
        assert "data/" not in str(error.value).replace(str(tmp_path), "")
    cars = WRITERS["cars"](elsewhere, 2, 3, image_size=32)
    (cars / "devkit" / "cars_meta.mat").unlink()
    with pytest.raises(UserError) as error:
        data_cli_main(["verify", "--root", str(cars), "--format", "cars"])
    assert str(error.value) == (f"{cars / 'devkit' / 'cars_meta.mat'} is missing; restore it from your copy of the "
                                "original Stanford Cars release.")


def test_every_format_is_a_config_choice_and_the_aircraft_level_only_applies_to_aircraft():
    assert set(CHOICES["data", "format"]) == set(READERS)
    with pytest.raises(UserError, match="data.annotation_level applies to data.format=aircraft only"):
        load_config(EXPERIMENTS / "cub_vgg16_stage1.yaml", ["--data.annotation_level=family"])


def test_download_says_where_to_get_a_dataset_without_one_and_verifies_a_copy_placed_by_hand(datasets, tmp_path,
                                                                                             capsys):
    for name in ("cars", "nabirds"):
        with pytest.raises(UserError, match="no (official|direct) download"):
            data_cli_main(["download", "--dataset", name, "--root", str(tmp_path)])
        writable(datasets, name, tmp_path)
        data_cli_main(["download", "--dataset", name, "--root", str(tmp_path)])
        assert f"no download needed, verified: {tmp_path / FOLDERS[name]}: 3 classes" in capsys.readouterr().out


def test_aircraft_downloads_checks_md5_and_extracts(datasets, tmp_path, capsys):
    archive = tmp_path / "server" / "fgvc-aircraft-2013b.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(datasets["aircraft"], arcname="fgvc-aircraft-2013b")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    with pytest.raises(UserError, match="wrong md5"):
        download_aircraft(str(tmp_path / "bad"), url=archive.as_uri(), md5="0" * 32)
    folder = download_aircraft(str(tmp_path / "data"), url=archive.as_uri(), md5=md5)
    assert folder == tmp_path / "data" / "fgvc-aircraft-2013b"
    assert "extracted and verified" in capsys.readouterr().out
    assert download_aircraft(str(tmp_path / "data"), url="file:///nowhere", md5="0" * 32) == folder
    assert "already present, nothing to do" in capsys.readouterr().out


def test_make_data_and_the_recipes_follow_dataset():
    def make(*args):
        result = subprocess.run(["make", "-s", *args, "PY=echo"], cwd=REPO, capture_output=True, text=True)
        return result.returncode, result.stdout.strip() + result.stderr.strip()

    assert make("data", "DATASET=aircraft") == (0, "-m bcnn.data download --dataset aircraft --root data")
    assert make("data", "DATASET=cars", "DATA=/x/stanford_cars") == (
        0, "-m bcnn.data verify --format cars --root /x/stanford_cars")
    assert make("stage2", "DATASET=nabirds") == (
        0, "-m bcnn.train --config experiments/nabirds_vgg16_stage2.yaml --data-root data/nabirds --device auto")
    code, output = make("data", "DATASET=birds")
    assert code != 0 and "DATASET=birds has no default folder" in output
    for name in DOWNLOADS:
        assert (EXPERIMENTS / f"{name}_vgg16_stage1.yaml").is_file() and load_config(
            EXPERIMENTS / f"{name}_vgg16_stage1.yaml").data.format == name
        assert make("data", f"DATASET={name}") == (0, f"-m bcnn.data download --dataset {name} --root data")
        assert f"--data-root data/{FOLDERS[name]} " in make("stage1", f"DATASET={name}")[1]  # the folder it extracts



@pytest.mark.parametrize("target, variables", [
    ("data", {"DATA": "/tmp/my data/CUB_200_2011"}),
    ("data", {"DATA_DIR": "/tmp/my data", "DATASET": "aircraft"}),
    ("stage1", {"DATA": "/tmp/my data/CUB"}),
    ("stage2", {"DATA": "/tmp/Jo's data/CUB", "SEEDS": "2"}),
    ("train", {"CONFIG": "/tmp/my configs/cub.yaml", "DATA": "/tmp/two  spaces"}),
    ("eval", {"CHECKPOINT": "/tmp/my runs/best.pt", "DATA": "/tmp/my data/CUB"}),
    ("eval", {"DATA": "/tmp/my data/CUB", "SEEDS": "1"}),
])
def test_make_passes_each_path_to_the_command_as_one_argument(target, variables):
    result = subprocess.run(["make", "-n", target, *(f"{name}={value}" for name, value in variables.items()),
                             "PY=python3"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # What the shell runs: a recipe's continued lines joined, then split into words as sh splits them.
    commands = [shlex.split(line) for line in result.stdout.replace("\\\n", "").splitlines()]
    commands = [words for words in commands if "-m" in words]
    option = {"DATA": "--root" if target == "data" else "--data-root", "DATA_DIR": "--root", "CONFIG": "--config",
              "CHECKPOINT": "--checkpoint"}
    assert len(commands) == 1, result.stdout  # a SEEDS=N loop is one command line too
    for words in commands:
        for name, value in variables.items():
            if name in option:
                assert words[words.index(option[name]) + 1] == value, words


@pytest.mark.parametrize("name", NEW_FORMATS)
def test_each_dataset_recipe_trains_both_stages_and_evaluates_without_reading_test(datasets, tmp_path, name):
    root = writable(datasets, name, tmp_path)
    test_files = {path: Path(path).read_bytes() for path, _ in READERS[name](root, "test").samples}
    for path in test_files:  # any read of a test image while training now fails
        Path(path).write_bytes(b"not an image")
    for stage in (1, 2):
        init = [f"--train.init_from={tmp_path / 'stage1' / 'best.pt'}"] if stage == 2 else []
        train_cli.main(["--config", str(EXPERIMENTS / f"{name}_vgg16_stage{stage}.yaml"), f"--data-root={root}",
                        f"--run-dir={tmp_path / f'stage{stage}'}", *TINY, *init])
    log = (tmp_path / "stage2" / "train.log").read_text()
    assert ("val images" in log) and (("(the official)" in log) == (name == "aircraft"))
    for path, data in test_files.items():
        Path(path).write_bytes(data)
    evaluate = ["--checkpoint", str(tmp_path / "stage2" / "best.pt"), "--split", "test", "--device", "cpu",
                "--no-figures"]
    result = eval_cli.main(evaluate)
    assert result["count"] == len(test_files)
    with pytest.raises(UserError, match=r"--data-root \(data\.root\) .*best\.pt is a file, not a folder; pass the "
                                        r"dataset's folder"):
        eval_cli.main([*evaluate, "--data-root", str(tmp_path / "stage2" / "best.pt")])
    cfg = load_config(EXPERIMENTS / f"{name}_vgg16_stage1.yaml", [f"--data.root={root}"])
    assert len(build_dataset(cfg.data, "test")) == len(test_files)
    TWICE[name]["test twice"][0](root)
    with pytest.raises(UserError, match=EVAL_TWICE):
        eval_cli.main(evaluate)
