"""Oxford Flowers-102, Stanford Dogs and iNaturalist (2017, 2018, 2021, 2021's train_mini) beside the other readers
(tests/test_datasets.py runs its per-format checks on them too: classes by the images' own hue, the boxes against
where the object was drawn, damaged images, a file given as the folder). Here what is each format's own: Flowers'
lists read as torchvision reads them and its official val split; Dogs' boxes, several dogs united; iNaturalist's
test split being the official val set, 2018's category names, torchvision's folders; every broken table one
sentence and exit status 2 from the CLI; synth then verify; the downloads from local files; a stage-1 run on each
with loader workers, its test images unreadable."""

import hashlib
import json
import re
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from bcnn import train as train_cli
from bcnn.data import READERS, WRITERS
from bcnn.data.__main__ import main as data_cli_main
from bcnn.data.dataset import path_only
from bcnn.data.dogs import download_dogs
from bcnn.data.flowers import download_flowers
from bcnn.data.inat import download_inaturalist
from bcnn.errors import UserError
from helpers.runs import run_in_process

REPO = Path(__file__).resolve().parent.parent
FORMATS = ("flowers", "dogs", "inat2017", "inat2018", "inat2021", "inat2021_mini")
CLASSES, PER_CLASS = 3, 6


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    """Each format's synthetic dataset folder (3 classes x 6 images of 32 px): read them, never change them."""
    base = tmp_path_factory.mktemp("new_formats")
    return {name: WRITERS[name](base / name, CLASSES, PER_CLASS, seed=3, image_size=32) for name in FORMATS}


def writable(datasets, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(datasets[name], tmp_path / name / datasets[name].name))


def refused(root: Path, name: str) -> str:
    """`python -m bcnn.data verify` on root: exit status 2 and one line, no traceback; returns the sentence."""
    result = run_in_process(data_cli_main, "verify", "--root", root, "--format", name)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    message = result.stderr.removeprefix("error: ").rstrip("\n")
    assert result.stderr.startswith("error: ") and "\n" not in message and message.endswith("."), result.stderr
    return message


def by_file(dataset) -> dict[str, int]:
    return {Path(path).name: label for path, label in dataset.samples}


def edit_mat(path: Path, edit) -> None:
    tables = {key: value for key, value in scipy.io.loadmat(path).items() if not key.startswith("__")}
    edit(tables)
    scipy.io.savemat(path, tables)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


# --- Oxford Flowers-102 ------------------------------------------------------------------------------------------

def test_flowers_reads_the_lists_as_torchvision_does_with_its_official_val(datasets, monkeypatch):
    from torchvision.datasets import Flowers102
    root, reader = datasets["flowers"], READERS["flowers"]
    # torchvision md5-checks the release's own .mat files; with that check off it reads any copy, as a reference.
    monkeypatch.setattr(Flowers102, "_check_integrity", lambda self: True)
    for split in ("train", "val", "test"):
        reference = Flowers102(root.parent, split, loader=path_only)
        expected = {Path(path).name: label for path, label in zip(reference._image_files, reference._labels)}
        ours = reader(root, split, 0.1, split_seed=7) if split != "test" else reader(root, "test")
        assert by_file(ours) == expected and len(ours) == len(expected) == CLASSES * PER_CLASS // 3
        assert ours.classes == Flowers102.classes[:CLASSES]
    with_val = reader(root, "trainval", 0.1)
    assert by_file(with_val) == {**by_file(reader(root, "train", 0.5)), **by_file(reader(root, "val", 0.5))}
    assert by_file(reader(root, "train", 0.0)) == by_file(with_val)  # val_fraction 0: train on train + val
    with pytest.raises(UserError, match="no val split with val_fraction 0"):
        reader(root, "val", 0.0)


def set_label(tables, value):
    tables["labels"] = tables["labels"].astype(np.float64)
    tables["labels"][0, 0] = value


def list_first_train_image_as_test(tables):
    tables["tstid"][0, 0] = tables["trnid"][0, 0]


FLOWERS_BROKEN = {
    "labels missing": (lambda root: (root / "imagelabels.mat").unlink(),
                       r"imagelabels\.mat is missing; fetch the file again \(python -m bcnn\.data download --dataset "
                       r"flowers --root .*\)\.$"),
    "setid truncated": (lambda root: truncate(root / "setid.mat"),
                        r"cannot read .*setid\.mat as a MATLAB file \(.+\); fetch the file again"),
    "a table missing": (lambda root: edit_mat(root / "setid.mat", lambda tables: tables.pop("valid")),
                        r"setid\.mat has no 'valid' table, so it is not the dataset's own file; fetch"),
    "class past 102": (lambda root: edit_mat(root / "imagelabels.mat", lambda tables: set_label(tables, 103)),
                       r"imagelabels\.mat gives image 1 the class 103, but Oxford Flowers-102 has classes 1\.\.102"),
    "class not whole": (lambda root: edit_mat(root / "imagelabels.mat", lambda tables: set_label(tables, 2.5)),
                        r"gives image 1 the class 2\.5, but"),
    "image past the labels": (lambda root: edit_mat(root / "setid.mat", lambda t: t["trnid"].__setitem__((0, 0), 99)),
                              r"entry 1 of trnid in .*setid\.mat is image 99, but imagelabels\.mat labels images "
                              r"1\.\.18; fetch"),
    "image missing": (lambda root: (root / "jpg" / "image_00001.jpg").unlink(),
                      r"1 of 18 images listed in setid\.mat are missing, the first is .*jpg/image_00001\.jpg; fetch"),
    "test image trained on": (lambda root: edit_mat(root / "setid.mat", list_first_train_image_as_test),
                              r"image_\d{5}\.jpg is listed twice, as trnid entry 1 and tstid entry 1 of setid\.mat, so "
                              r"the test split would be trained on; fetch"),
    "no jpg folder": (lambda root: shutil.rmtree(root / "jpg"),
                      r"jpg is not a folder, so .* is not a complete flowers-102 folder; extract 102flowers\.tgz"),
}


@pytest.mark.parametrize("problem", FLOWERS_BROKEN)
def test_a_broken_flowers_folder_is_one_sentence(datasets, tmp_path, problem):
    change, message = FLOWERS_BROKEN[problem]
    root = writable(datasets, "flowers", tmp_path)
    change(root)
    assert re.search(message, refused(root, "flowers"))


# --- Stanford Dogs -----------------------------------------------------------------------------------------------

def xml_boxes(path: Path) -> list[tuple[float, ...]]:
    """Each <bndbox> of an annotation, read with a regex (not the reader's XML parser)."""
    text = path.read_text()
    return [tuple(float(re.search(rf"<{tag}>([^<]+)</{tag}>", box)[1]) for tag in ("xmin", "ymin", "xmax", "ymax"))
            for box in re.findall(r"<bndbox>(.*?)</bndbox>", text, flags=re.S)]


def test_dogs_unite_the_boxes_of_several_dogs_and_crop_to_them(datasets, tmp_path):
    root = writable(datasets, "dogs", tmp_path)
    dataset = READERS["dogs"](root, "trainval", crop_to_bbox=True)
    several = [index for index, (path, _) in enumerate(dataset.samples)
               if len(xml_boxes(root / "Annotation" / Path(path).parent.name / Path(path).stem)) > 1]
    assert len(several) == CLASSES  # the writer's first image of each breed
    for index in several:
        path = Path(dataset.samples[index][0])
        boxes = xml_boxes(root / "Annotation" / path.parent.name / path.stem)
        left, top = min(box[0] for box in boxes), min(box[1] for box in boxes)
        right, bottom = max(box[2] for box in boxes), max(box[3] for box in boxes)
        # 1-based, corners inclusive -> (x, y, w, h) from 0; the first box alone is narrower than the union
        assert dataset.bboxes[index] == (left - 1, top - 1, right - left + 1, bottom - top + 1)
        assert boxes[0][2] - boxes[0][0] + 1 < dataset.bboxes[index][2]
        assert dataset.load_image(index).size == (right - left + 1, bottom - top + 1)
        assert dataset.box_sources[index].startswith("the union of the 2 boxes in ")
    assert dataset.classes == [f"Synthetic breed {k + 1}" for k in range(CLASSES)]
    for name in ("train_list.mat", "test_list.mat", "file_list.mat"):  # lists.tar extracted into a lists/ folder
        (root / "lists").mkdir(exist_ok=True)
        (root / name).rename(root / "lists" / name)
    assert READERS["dogs"](root, "trainval").samples == dataset.samples


def first_box(root: Path, index: int = 1) -> Path:
    """The annotation of a train image with one dog (the writer's image 1 of a breed has two)."""
    entry = scipy.io.loadmat(root / "train_list.mat")["annotation_list"][index, 0][0]
    return root / "Annotation" / entry


def set_box(path: Path, box: tuple) -> str:
    """Give the annotation at path one dog with the (x, y, w, h) box, 1-based corners as the release writes them;
    returns the words naming it."""
    x, y, w, h = box
    corners = (x + 1, y + 1, x + w, y + h)
    text = path.read_text()
    for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), corners):
        text = re.sub(rf"<{tag}>[^<]*</{tag}>", f"<{tag}>{value}</{tag}>", text)
    path.write_text(text)
    return f"the box of object 1 in {path} (xmin ymin xmax ymax: {' '.join(f'{v:g}' for v in corners)})"


NOT_BOXES = {  # (x, y, w, h) -> what the refusal says of it
    "negative width": ((10, 10, -5, 20), "has a negative width, so it encloses nothing"),
    "zero height": ((10, 10, 20, 0), "has zero height, so it encloses nothing"),
    "nan": ((float("nan"), 10, 20, 20), "has a value that is not a finite number"),
    "left of the image": ((-40, 10, 30, 20), "lies wholly left of its image"),
}


@pytest.mark.parametrize("problem", NOT_BOXES)
def test_a_dog_box_that_is_not_a_box_is_one_sentence_naming_its_file(datasets, tmp_path, problem):
    box, says = NOT_BOXES[problem]
    root = writable(datasets, "dogs", tmp_path)
    expected = f"{set_box(first_box(root), box)} {says}; fix the file or re-extract annotation.tar."
    assert refused(root, "dogs") == expected
    with pytest.raises(UserError) as error:  # training reads the same annotations, cropping to boxes or not
        READERS["dogs"](root, "train")
    assert str(error.value) == expected


def test_a_dog_box_past_the_edge_is_clipped_and_one_outside_refused_where_the_image_is_opened(datasets, tmp_path):
    root = writable(datasets, "dogs", tmp_path)
    annotation = first_box(root)
    image_path = root / "Images" / f"{annotation.relative_to(root / 'Annotation')}.jpg"
    with Image.open(image_path) as image:
        width, height = image.size

    def sample(crop_to_bbox: bool):
        dataset = READERS["dogs"](root, "trainval", crop_to_bbox=crop_to_bbox)
        return dataset, [path for path, _ in dataset.samples].index(str(image_path))

    set_box(annotation, (width - 10, 5, 30, 20))  # 20 px past the right edge, as real annotations do
    data_cli_main(["verify", "--root", str(root), "--format", "dogs"])
    dataset, index = sample(crop_to_bbox=True)
    assert dataset.load_image(index).size == (10, 20)
    described = set_box(annotation, (5, height, 30, 20))
    expected = (f"{described} lies wholly below its image, which is {height} px high ({image_path}); fix the file or "
                "re-extract annotation.tar.")
    assert refused(root, "dogs") == expected
    dataset, index = sample(crop_to_bbox=True)
    with pytest.raises(UserError) as error:  # never the whole image in the box's place
        dataset[index]
    assert str(error.value) == expected
    dataset, index = sample(crop_to_bbox=False)  # a training that does not use the boxes is not stopped
    assert dataset.load_image(index).size == (width, height)


def set_list_entry(root: Path, name: str, table: str, index: int, value) -> None:
    def edit(tables):
        if table == "labels":
            tables[table][index, 0] = value
        else:
            tables[table][index, 0] = np.array([value])
    edit_mat(root / name, edit)


def entry(root: Path, name: str, table: str, index: int):
    return scipy.io.loadmat(root / name)[table][index, 0].ravel()[0]


def relabel_breed(root: Path, old: int, new: int) -> None:
    for name in ("train_list.mat", "test_list.mat"):
        edit_mat(root / name, lambda tables: tables["labels"].__setitem__(tables["labels"] == old, new))


def list_train_image_as_test(root: Path) -> None:
    for table in ("file_list", "annotation_list"):
        set_list_entry(root, "test_list.mat", table, 0, entry(root, "train_list.mat", table, 0))


def rewrite(path: Path, old: str, new: str) -> None:
    path.write_text(path.read_text().replace(old, new))


DOGS_BROKEN = {
    "train list missing": (lambda root: (root / "train_list.mat").unlink(),
                           r"train_list\.mat is missing; fix the file or re-extract lists\.tar\.$"),
    "test list truncated": (lambda root: truncate(root / "test_list.mat"),
                            r"cannot read .*test_list\.mat as a MATLAB file \(.+\); fix the file or re-extract"),
    "lists of different lengths": (lambda root: edit_mat(root / "train_list.mat", lambda t: t.update(
        labels=t["labels"][:-1])), r"train_list\.mat has 9 file_list, 9 annotation_list and 8 labels entries"),
    "label 0": (lambda root: set_list_entry(root, "train_list.mat", "labels", 0, 0),
                r"entry 1 of .*train_list\.mat gives n\d+-Synthetic_breed_1/n\d+_\d+\.jpg the label 0, which is not a "
                r"class number"),
    "label of another breed": (lambda root: set_list_entry(root, "train_list.mat", "labels", 3, 1),
                               r"entry 4 of .*train_list\.mat gives .*breed_2/n\d+_\d+\.jpg label 1, as entry 1 of "
                               r"train_list\.mat gives .*breed_1/n\d+_\d+\.jpg, of another breed folder; a label is "
                               r"one breed folder; fix"),
    "two labels in a breed": (lambda root: set_list_entry(root, "train_list.mat", "labels", 0, 2),
                              r"entry 2 of .*train_list\.mat gives .*breed_1/n\d+_\d+\.jpg label 1, and entry 1 of "
                              r"train_list\.mat gives .*breed_1/n\d+_\d+\.jpg, of the same breed folder, label 2; a "
                              r"breed folder is one label; fix"),
    "a label past the folders": (lambda root: relabel_breed(root, 3, 4),
                                 r"the lists name 3 breed folders but use label 4 \(labels run 1\.\.3, one per "
                                 r"folder\)"),
    "another image's annotation": (lambda root: set_list_entry(root, "train_list.mat", "annotation_list", 0,
                                                               entry(root, "train_list.mat", "annotation_list", 1)),
                                   r"entry 1 of .*train_list\.mat pairs .*\.jpg with the annotation .*, another "
                                   r"image's"),
    "annotation missing": (lambda root: first_box(root).unlink(),
                           r"the annotation .*Annotation/n\d+-Synthetic_breed_1/n\d+_\d+ is missing; fix the file or "
                           r"re-extract annotation\.tar\.$"),
    "annotation not XML": (lambda root: first_box(root).write_text("<annotation><object>"),
                           r"cannot read the annotation .* as XML \(.+\); fix the file or re-extract annotation\.tar"),
    "no dog": (lambda root: rewrite(first_box(root), "object>", "objekt>"),
               r"the annotation .* has no <object>, so its image has no box"),
    "box without numbers": (lambda root: rewrite(first_box(root), "<xmin>", "<xmin>about "),
                            r"object 1 of the annotation .* has no <bndbox> of numbers xmin, ymin, xmax, ymax"),
    "no Annotation folder": (lambda root: shutil.rmtree(root / "Annotation"),
                             r"Annotation is not a folder, so .* is not a complete Stanford Dogs folder; extract "
                             r"annotation\.tar there\.$"),
    "image missing": (lambda root: next((root / "Images").rglob("*.jpg")).unlink(),
                      r"1 of 18 images listed in the lists are missing, the first is .*\.jpg; re-extract images\.tar"),
    "test image trained on": (list_train_image_as_test,
                              r"Images/.*\.jpg is listed twice, as entry 1 of train_list\.mat and entry 1 of "
                              r"test_list\.mat, so the test split would be trained on"),
}


@pytest.mark.parametrize("problem", DOGS_BROKEN)
def test_a_broken_dogs_folder_is_one_sentence(datasets, tmp_path, problem):
    change, message = DOGS_BROKEN[problem]
    root = writable(datasets, "dogs", tmp_path)
    change(root)
    assert re.search(message, refused(root, "dogs"))


# --- iNaturalist -------------------------------------------------------------------------------------------------

ANNOTATIONS = {"inat2017": ("train2017.json", "val2017.json"), "inat2018": ("train2018.json", "val2018.json"),
               "inat2021": ("train.json", "val.json"), "inat2021_mini": ("train_mini.json", "val.json")}


def listed(root: Path, name: str) -> dict[str, int]:
    """An annotation file's {image file name: category id}, read here with json alone."""
    content = json.loads((root / name).read_text())
    category = {note["image_id"]: note["category_id"] for note in content["annotations"]}
    return {Path(image["file_name"]).name: category[image["id"]] for image in content["images"]}


@pytest.mark.parametrize("name", ANNOTATIONS)
def test_inat_tests_on_the_official_val_set_and_holds_val_out_of_train(datasets, name, capsys):
    root, reader = datasets[name], READERS[name]
    train_file, val_file = ANNOTATIONS[name]
    assert by_file(reader(root, "test")) == listed(root, val_file)  # category ids 0..K-1 are the labels
    assert by_file(reader(root, "trainval")) == listed(root, train_file)
    train, val = by_file(reader(root, "train", 0.25, 1)), by_file(reader(root, "val", 0.25, 1))
    assert not train.keys() & val.keys() and {**train, **val} == listed(root, train_file)
    assert sorted(val.values()) == list(range(CLASSES))  # stratified: one of each class's four
    data_cli_main(["verify", "--root", str(root), "--format", name])
    assert capsys.readouterr().out.rstrip().endswith(
        "test 6; test is the official val set (iNaturalist's test labels are not public), val a hold-out of the "
        "official train set")


def test_inat2018_names_its_classes_from_categories_json(datasets, tmp_path):
    root = writable(datasets, "inat2018", tmp_path)
    assert READERS["inat2018"](root, "test").classes == ["Synthgenus1 species1", "Synthgenus1 species2",
                                                         "Synthgenus2 species3"]
    (root / "categories.json").unlink()  # the competition's files alone: the obfuscated names
    assert READERS["inat2018"](root, "test").classes == ["0", "1", "2"]


def test_inat_reads_torchvision_folders(datasets, tmp_path):
    root = writable(datasets, "inat2021", tmp_path)
    expected = {split: READERS["inat2021"](root, split) for split in ("trainval", "test")}
    (root / "train").rename(root / "2021_train")
    (root / "val").rename(root / "2021_valid")
    with_json = {split: READERS["inat2021"](root, split) for split in expected}  # the JSON files' paths, renamed
    for name in ("train.json", "val.json"):
        (root / name).unlink()
    folders = {split: READERS["inat2021"](root, split) for split in expected}  # torchvision's layout alone
    for split, dataset in expected.items():
        for other in (with_json[split], folders[split]):
            assert other.classes == dataset.classes
            assert sorted(map(str, other.samples)) == sorted(
                str((path.replace("/train/", "/2021_train/").replace("/val/", "/2021_valid/"), label))
                for path, label in dataset.samples)
    mini = writable(datasets, "inat2017", tmp_path)  # 2017: the JSON files with torchvision's 2017/ folder
    expected = by_file(READERS["inat2017"](mini, "trainval"))
    (mini / "train_val_images").rename(mini / "2017")
    assert by_file(READERS["inat2017"](mini, "trainval")) == expected
    stray = root / "2021_valid" / "00003_Plantae_Odd"
    stray.mkdir()
    assert re.search(r"2021_train/ and 2021_valid/ of .* differ in category folders \(e\.g\. '00003_Plantae_Odd'\); "
                     r"make them match\.$", refused(root, "inat2021"))
    (root / "2021_train" / stray.name).mkdir()  # now in both, misnamed
    assert re.search(r"00003_Plantae_Odd is not named as iNaturalist 2021's category folders are \(<id>_<kingdom>_",
                     refused(root, "inat2021"))


def edit_json(path: Path, edit) -> None:
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content))


def val_image_in_train(root: Path) -> None:
    val = json.loads((root / "val.json").read_text())
    edit_json(root / "train.json", lambda content: content["images"][0].update(file_name=val["images"][0]["file_name"]))


def second_annotation(content) -> None:
    content["annotations"].append(dict(content["annotations"][0], id=999, category_id=1))


INAT_BROKEN = {
    "val.json missing": (lambda root: (root / "val.json").unlink(),
                         r"val\.json is missing, so .* is not a complete iNaturalist 2021 folder \(nor torchvision's "
                         r"2021_train/ and 2021_valid/\); check the path or fetch the dataset with `python -m "
                         r"bcnn\.data download --dataset inat2021 --root .*`\.$"),
    "train.json truncated": (lambda root: truncate(root / "train.json"),
                             r"cannot read .*train\.json as JSON \(.+ at line 1\); re-extract train\.json\.tar\.gz\.$"),
    "not an annotation file": (lambda root: (root / "train.json").write_text('{"annotations": []}'),
                               r"train\.json has no 'images' list, so it is not an iNaturalist annotation file"),
    "unknown category": (lambda root: edit_json(root / "val.json", lambda c: c["annotations"][0].update(
        category_id=99)), r"image id \d+ \(val/.*\.jpg\) of .*val\.json has category_id 99, which is not one of the "
                          r"3 categories of the train file; re-extract val\.json\.tar\.gz\.$"),
    "no annotation": (lambda root: edit_json(root / "train.json", lambda c: c["annotations"].pop(0)),
                      r"image id 1 \(train/.*\.jpg\) of .*train\.json has no annotation, so no class"),
    "two annotations": (lambda root: edit_json(root / "train.json", second_annotation),
                        r"image id 1 has 2 annotations in .*train\.json \(categories 0, 1\), and bcnn trains one "
                        r"label per image"),
    "image id twice": (lambda root: edit_json(root / "train.json", lambda c: c["images"][1].update(id=1)),
                       r"image id 1 appears twice in .*train\.json's images"),
    "entry without a file": (lambda root: edit_json(root / "train.json", lambda c: c["images"][2].pop("file_name")),
                             r"entry 3 of .*train\.json's 'images' list has no id and file_name"),
    "image missing": (lambda root: next((root / "val").rglob("*.jpg")).unlink(),
                      r"1 of 18 images listed in train\.json and val\.json are missing, the first is .*\.jpg; "
                      r"re-extract train\.tar\.gz and val\.tar\.gz, or fix the annotation file\.$"),
    "val image in train": (val_image_in_train,
                           r"val/.*\.jpg \(the same file as .*\) is listed twice|val/.*\.jpg is listed twice, as image "
                           r"id 1 of train\.json and image id \d+ of val\.json, so the test split would be trained on"),
}


@pytest.mark.parametrize("problem", INAT_BROKEN)
def test_a_broken_inat_folder_is_one_sentence(datasets, tmp_path, problem):
    change, message = INAT_BROKEN[problem]
    root = writable(datasets, "inat2021", tmp_path)
    change(root)
    assert re.search(message, refused(root, "inat2021"))


# --- Every new format: synth, verify, download, train ------------------------------------------------------------

def content_of(folder: Path) -> dict:
    """Every file's bytes, but a .mat file's tables (scipy writes the time into its header)."""
    def read(path):
        if path.suffix != ".mat":
            return path.read_bytes()
        return {key: repr(value) for key, value in scipy.io.loadmat(path).items() if not key.startswith("__")}
    return {path.relative_to(folder): read(path) for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("name", FORMATS)
def test_synth_writes_the_same_dataset_from_the_same_seed_and_verify_reads_it(name, tmp_path, capsys):
    for copy in ("a", "b"):
        data_cli_main(["synth", "--format", name, "--root", str(tmp_path / copy), "--classes", "2", "--per-class", "3",
                       "--image-size", "16", "--seed", "5"])
    folder = next((tmp_path / "a").iterdir())
    assert content_of(folder) == content_of(tmp_path / "b" / folder.name)
    assert "wrote " in capsys.readouterr().out
    data_cli_main(["verify", "--root", str(folder), "--format", name])
    assert re.match(rf"{re.escape(str(folder))}: 2 classes; images: trainval \d+, train \d+, val \d+",
                    capsys.readouterr().out)


def serve(tmp_path: Path, files: dict[str, Path | bytes], archives: dict[str, tuple[Path, str]]) -> Path:
    """A folder standing in for the dataset's server: files copied (or written) as they are, and archives made
    from folders or files (name -> (what, its name in the archive)), a .zip or a .tar(.gz) by the name."""
    server = tmp_path / "server"
    server.mkdir()
    for name, source in files.items():
        (server / name).write_bytes(source if isinstance(source, bytes) else source.read_bytes())
    for name, (source, arcname) in archives.items():
        if name.endswith(".zip"):
            with zipfile.ZipFile(server / name, "w") as zipped:
                for path in [source] if source.is_file() else sorted(source.rglob("*")):
                    zipped.write(path, arcname if source.is_file() else f"{arcname}/{path.relative_to(source)}")
        else:
            with tarfile.open(server / name, "w:gz" if name.endswith("gz") else "w") as tar:
                tar.add(source, arcname=arcname)
    return server


def md5s(server: Path) -> dict[str, str]:
    return {path.name: hashlib.md5(path.read_bytes()).hexdigest() for path in server.iterdir()}


def test_flowers_downloads_checks_md5s_and_extracts(datasets, tmp_path, capsys):
    source = datasets["flowers"]
    server = serve(tmp_path, {"imagelabels.mat": source / "imagelabels.mat", "setid.mat": source / "setid.mat"},
                   {"102flowers.tgz": (source / "jpg", "jpg")})
    url = f"{server.as_uri()}/"
    with pytest.raises(UserError, match=r"102flowers\.tgz has the wrong md5 \(expected 0+\); delete it and run"):
        download_flowers(str(tmp_path / "bad"), url, {**md5s(server), "102flowers.tgz": "0" * 32})
    folder = download_flowers(str(tmp_path / "data"), url, md5s(server))
    assert folder == tmp_path / "data" / "flowers-102"
    assert "extracted and verified: " in capsys.readouterr().out
    assert download_flowers(str(tmp_path / "data"), "file:///nowhere/", md5s(server)) == folder
    assert "already present, nothing to do" in capsys.readouterr().out


def test_dogs_download_without_md5_verifies_what_it_extracted(datasets, tmp_path, capsys):
    source = datasets["dogs"]
    lists = tmp_path / "lists"
    lists.mkdir()
    for name in ("train_list.mat", "test_list.mat", "file_list.mat"):
        shutil.copy(source / name, lists / name)
    server = serve(tmp_path, {}, {"images.tar": (source / "Images", "Images"),
                                  "annotation.tar": (source / "Annotation", "Annotation"), "lists.tar": (lists, ".")})
    folder = download_dogs(str(tmp_path / "data"), f"{server.as_uri()}/")
    assert folder == tmp_path / "data" / "stanford_dogs"
    assert "extracted and verified: " in capsys.readouterr().out
    # A download cut short: with no md5 to catch it, the verify does (here tarfile takes the cut for the archive's
    # end and extracts what is there; a cut inside a member is refused by the extraction itself).
    truncate(server / "images.tar")
    with pytest.raises(UserError, match=r"of 18 images listed in the lists are missing, the first is .*; re-extract "
                                        r"images\.tar, or fix the list\.$"):
        download_dogs(str(tmp_path / "again"), f"{server.as_uri()}/")
    (tmp_path / "again" / "images.tar").write_bytes((tmp_path / "again" / "images.tar").read_bytes()[:5000])
    with pytest.raises(UserError, match=r"cannot extract .*images\.tar \(.+\); delete it and run the download "
                                        r"again\.$"):
        download_dogs(str(tmp_path / "again"), f"{server.as_uri()}/")


def test_inat_downloads_tar_and_zip_archives(datasets, tmp_path, capsys):
    source = datasets["inat2017"]
    year = serve(tmp_path, {}, {"train_val_images.tar.gz": (source / "train_val_images", "train_val_images")})
    with zipfile.ZipFile(year / "train_val2017.zip", "w") as zipped:
        for name in ("train2017.json", "val2017.json"):
            zipped.write(source / name, name)
    server = tmp_path / "site"  # the competitions' files are under <year>/
    server.mkdir()
    year.rename(server / "2017")
    with pytest.raises(UserError, match=r"train_val_images\.tar\.gz has the wrong md5 \(expected 7c784ea5"):
        download_inaturalist("inat2017", str(tmp_path / "official"), f"{server.as_uri()}/")
    md5 = md5s(server / "2017")["train_val_images.tar.gz"]
    folder = download_inaturalist("inat2017", str(tmp_path / "data"), f"{server.as_uri()}/",
                                  {"train_val_images.tar.gz": md5})
    assert folder == tmp_path / "data" / "inat2017"
    assert capsys.readouterr().out.rstrip().endswith("val a hold-out of the official train set")
    assert by_file(READERS["inat2017"](folder, "test")) == by_file(READERS["inat2017"](source, "test"))


TINY = ["--device=cpu", "--data.resize=40", "--data.crop=32", "--data.val_fraction=0.34", "--data.num_workers=2",
        "--model.backbone_weights=none", "--train.batch_size=4", "--train.eval_batch_size=8", "--train.log_every=0",
        "--train.precision=fp32", "--train.epochs=1", "--train.heatmap_images=0", "--train.projector=false"]


@pytest.mark.parametrize("name, extra", [("flowers", []), ("dogs", ["--data.crop_to_bbox=true"]),
                                         ("inat2021_mini", [])])
def test_stage_1_trains_on_each_with_loader_workers_never_reading_test(datasets, tmp_path, name, extra):
    root = writable(datasets, name, tmp_path)
    for path, _ in READERS[name](root, "test").samples:  # any read of a test image while training now fails
        Path(path).write_bytes(b"not an image")
    result = train_cli.main(["--config", str(REPO / "experiments" / f"{name}_vgg16_stage1.yaml"),
                             f"--data-root={root}", f"--run-dir={tmp_path / 'run'}", *TINY, *extra])
    # (train, val) images: Flowers' official splits; a third of each class's train images held out of the others
    assert (result["train_images"], result["val_count"]) == {"flowers": (6, 6), "dogs": (6, 3),
                                                              "inat2021_mini": (9, 3)}[name]
    log = (tmp_path / "run" / "train.log").read_text()
    assert ("(the official)" in log) == (name == "flowers")
