"""bcnn.data on generated mini-CUBs: splits, labels, RGB loading, errors, transforms, CLI, download, loaders.

Expectations come from re-reading the CUB text files here, not from bcnn.data.
"""

import hashlib
import io
import os
import shutil
import struct
import subprocess
import tarfile
import threading
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bcnn import train as train_cli
from bcnn.config import DataConfig
from bcnn.data import (
    CUB200, IMAGENET_MEAN, IMAGENET_STD, REPLACE_IMAGE, FolderDataset, build_dataset, build_loader,
    build_transforms, download_cub, load_rgb, write_synthetic_cub,
)
from bcnn.data.__main__ import main as data_cli_main
from bcnn.data.gpu import EncodedFiles
from bcnn.errors import UserError
from helpers.runs import STAGE1, run_in_process

SPLITS = ("train", "val", "trainval", "test")


def read_table(root: Path, name: str) -> dict[int, list[str]]:
    lines = (root / name).read_text().splitlines()
    return {int(line.split()[0]): line.split()[1:] for line in lines if line.strip()}


def official_splits(root: Path) -> dict[str, dict[str, int]]:
    """{"trainval" | "test": {absolute image path: 0-based label}} straight from the text files."""
    paths, labels = read_table(root, "images.txt"), read_table(root, "image_class_labels.txt")
    is_train = read_table(root, "train_test_split.txt")
    splits = {"trainval": {}, "test": {}}
    for image_id, (rel_path,) in paths.items():
        split = "trainval" if is_train[image_id] == ["1"] else "test"
        splits[split][str(root.absolute() / "images" / rel_path)] = int(labels[image_id][0]) - 1
    return splits


def expected_holdout(n: int, fraction: float) -> int:
    return min(max(int(fraction * n + 0.5), 1), n - 1)


def as_dict(dataset) -> dict[str, int]:
    return dict(dataset.samples)


@pytest.mark.parametrize("fraction", [0.05, 0.25, 0.5])
def test_splits_partition_the_official_split_with_a_stratified_val(mini_cub, fraction):
    official = official_splits(mini_cub)
    sets = {split: as_dict(CUB200(mini_cub, split, val_fraction=fraction, split_seed=0)) for split in SPLITS}
    assert sets["trainval"] == official["trainval"] and sets["test"] == official["test"]
    assert len(sets["trainval"]) + len(sets["test"]) == len(read_table(mini_cub, "images.txt"))
    train, val = set(sets["train"]), set(sets["val"])
    assert not train & val and not val & set(sets["test"])
    assert train | val == set(sets["trainval"])
    for label in range(5):
        n_class = sum(1 for lab in official["trainval"].values() if lab == label)
        n_val = sum(1 for lab in sets["val"].values() if lab == label)
        assert n_val == expected_holdout(n_class, fraction)


def test_val_split_is_fixed_by_split_seed(mini_cub):
    first = CUB200(mini_cub, "val", val_fraction=0.3, split_seed=0).samples
    again = CUB200(mini_cub, "val", val_fraction=0.3, split_seed=0).samples
    other = CUB200(mini_cub, "val", val_fraction=0.3, split_seed=1).samples
    assert first == again and first != other


def test_val_fraction_zero_trains_on_everything_and_has_no_val(mini_cub):
    assert CUB200(mini_cub, "train").samples == CUB200(mini_cub, "trainval").samples
    with pytest.raises(UserError, match="no val split with val_fraction 0"):
        CUB200(mini_cub, "val", val_fraction=0.0)
    with pytest.raises(UserError, match="unknown split 'validation'"):
        CUB200(mini_cub, "validation")


def test_labels_are_zero_based_and_class_names_clean(mini_cub):
    dataset = CUB200(mini_cub, "trainval", val_fraction=0.2)
    folders = [fields[0] for _, fields in sorted(read_table(mini_cub, "classes.txt").items())]
    assert dataset.classes == [folder.split(".", 1)[1].replace("_", " ") for folder in folders]
    assert dataset.classes[0] == "Synthetic Class 1"
    assert all(dataset.class_to_idx[name] == label for label, name in enumerate(dataset.classes))
    official = official_splits(mini_cub)["trainval"]
    for (path, label), target in zip(dataset.samples, dataset.targets):
        assert os.path.isabs(path) and os.path.isfile(path)
        assert label == target == official[path]
        assert Path(path).parent.name == folders[label]
    assert len(dataset.bboxes) == len(dataset.samples)


def test_every_item_is_an_rgb_tensor_including_grayscale_and_cmyk(mini_cub):
    modes = {str(path.absolute()): Image.open(path).mode for path in (mini_cub / "images").rglob("*.jpg")}
    odd = {mode: path for path, mode in modes.items() if mode != "RGB"}
    assert {"L", "CMYK"} <= set(odd)
    cfg = DataConfig(root=str(mini_cub), resize=36, crop=32, val_fraction=0.0)
    seen = set()
    for split in ("trainval", "test"):
        dataset = build_dataset(cfg, split)
        for index, (path, _) in enumerate(dataset.samples):
            image, target = dataset[index]
            assert image.shape == (3, 32, 32) and image.dtype == torch.float32
            assert target == dataset.targets[index]
            seen.add(path)
    assert set(odd.values()) <= seen


def test_bbox_crop_gives_the_box(mini_cub):
    boxes = {key: [float(v) for v in fields] for key, fields in read_table(mini_cub, "bounding_boxes.txt").items()}
    images = read_table(mini_cub, "images.txt").items()
    ids = {str(mini_cub.absolute() / "images" / fields[0]): key for key, fields in images}
    cropped = CUB200(mini_cub, "test", crop_to_bbox=True)
    whole = CUB200(mini_cub, "test")
    for index, (path, _) in enumerate(cropped.samples):
        x, y, w, h = boxes[ids[path]]
        assert cropped.bboxes[index] == (x, y, w, h)
        assert cropped[index][0].size == (w, h)
        assert cropped[index][0].size != whole[index][0].size


def test_bbox_past_the_border_is_clamped(writable_cub):
    lines = (writable_cub / "bounding_boxes.txt").read_text().splitlines()
    lines[0] = "1 -10.0 -5.0 10000.0 10000.0"
    (writable_cub / "bounding_boxes.txt").write_text("\n".join(lines) + "\n")
    split = "trainval" if read_table(writable_cub, "train_test_split.txt")[1] == ["1"] else "test"
    dataset = CUB200(writable_cub, split, crop_to_bbox=True)
    index = next(i for i, (path, _) in enumerate(dataset.samples) if path.endswith("_0001.jpg"))
    assert dataset[index][0].size == Image.open(dataset.samples[index][0]).size


def edit_line(root: Path, name: str, line_number: int, text: str | None, encoding: str = "utf-8") -> Path:
    """Replace (or, with None, delete) one 1-based line of a CUB text file, saved in encoding; returns root."""
    lines = (root / name).read_text(encoding="utf-8").splitlines()
    if text is None:
        del lines[line_number - 1]
    else:
        lines[line_number - 1] = text
    (root / name).write_text("\n".join(lines) + "\n", encoding=encoding)
    return root


def with_byte_order_mark(path: Path) -> None:
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # as Notepad saves UTF-8


def named_pipe_instead(path: Path) -> None:
    """path replaced by a named pipe (a FIFO), whose opening for reading would wait for a writer forever."""
    path.unlink()
    os.mkfifo(path)


def delete_first_image(root: Path) -> Path:
    (root / "images" / read_table(root, "images.txt")[1][0]).unlink()
    return root


CORRUPTIONS = {  # problem: (corrupt the copy and return the root to open, what the error must say)
    "missing root": (lambda root: shutil.rmtree(root) or root,
                     r"CUB-200-2011 folder .* does not exist; check the path or fetch the dataset with "
                     r"`python -m bcnn.data download --root .*`\.$"),
    "parent folder passed": (lambda root: root.parent, r"one level down; use .*CUB_200_2011\.$"),
    "missing images.txt": (lambda root: (root / "images.txt").unlink() or root, r"images\.txt is missing"),
    "missing images folder": (lambda root: shutil.rmtree(root / "images") or root, r"images is not a folder"),
    "missing image file": (delete_first_image,
                           r"1 of 60 images listed in images\.txt are missing, the first is .*_0001"),
    "ids disagree": (lambda root: edit_line(root, "image_class_labels.txt", 7, "99 2"),
                     r"image_class_labels\.txt lists 60 image ids but images\.txt lists 60 \(id 7 is only in images"),
    "counts do not add up": (lambda root: edit_line(root, "train_test_split.txt", 60, None),
                             r"train_test_split\.txt lists 59 image ids but images\.txt lists 60"),
    "malformed line": (lambda root: edit_line(root, "bounding_boxes.txt", 3, "3 1.0 2.0"),
                       r"line 3 of .*bounding_boxes\.txt is malformed"),
    "bad split flag": (lambda root: edit_line(root, "train_test_split.txt", 2, "2 7"),
                       r"line 2 of .*train_test_split\.txt is malformed"),
    "duplicate id": (lambda root: edit_line(root, "images.txt", 2, "1 x.jpg"), r"id 1 appears twice .*\(line 2\)"),
    "unknown class": (lambda root: edit_line(root, "image_class_labels.txt", 1, "1 9"), r"class id 9, not in classes"),
    "byte-order mark": (lambda root: with_byte_order_mark(root / "images.txt") or root,
                        r"images\.txt starts with a byte-order mark \(as some Windows editors save UTF-8\), which "
                        r"would be read as part of its first line; save it without the mark, or fix the file"),
    "table is a named pipe": (lambda root: named_pipe_instead(root / "bounding_boxes.txt") or root,
                              r"bounding_boxes\.txt is a named pipe, so .* is not a complete dataset folder; fix the "
                              r"file or re-extract CUB_200_2011\.tgz\.$"),
    "not UTF-8": (lambda root: edit_line(root, "classes.txt", 3, "3 003.Mésange_charbonnière", encoding="latin-1"),
                  r"line 3 of .*classes\.txt is not UTF-8 text, the encoding bcnn reads; fix the file or re-extract "
                  r"CUB_200_2011\.tgz\.$"),
}


@pytest.mark.parametrize("problem", CORRUPTIONS)
def test_a_broken_dataset_is_one_clear_sentence(writable_cub, problem):
    corrupt, message = CORRUPTIONS[problem]
    root = corrupt(writable_cub)
    with pytest.raises(UserError, match=message) as error:
        CUB200(root, "train")
    assert "\n" not in str(error.value) and str(error.value).endswith(".")


@pytest.fixture
def mini_folder(mini_cub, tmp_path) -> Path:
    """The mini-CUB as root/{train,test}/<class>/*.jpg, class folders named without the NNN. prefix."""
    root = tmp_path / "folder"
    for split, samples in official_splits(mini_cub).items():
        for path in samples:
            target = root / ("train" if split == "trainval" else "test") / Path(path).parent.name[4:]
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
    return root


def test_folder_dataset_splits_like_cub(mini_cub, mini_folder):
    official = official_splits(mini_cub)
    sets = {split: FolderDataset(mini_folder, split, val_fraction=0.25, split_seed=3) for split in SPLITS}
    assert sets["test"].classes == [f"Synthetic_Class_{k}" for k in range(1, 6)]
    assert all(sets["test"].class_to_idx[name] == k for k, name in enumerate(sets["test"].classes))
    assert len(sets["trainval"]) == len(official["trainval"]) and len(sets["test"]) == len(official["test"])
    names = {split: [Path(path).name for path, _ in dataset.samples] for split, dataset in sets.items()}
    assert sorted(names["train"] + names["val"]) == sorted(names["trainval"])
    cub_val = CUB200(mini_cub, "val", val_fraction=0.25, split_seed=3)
    assert names["val"] == [Path(path).name for path, _ in cub_val.samples]
    assert sets["val"].targets == cub_val.targets
    for path, label in sets["trainval"].samples:
        assert Path(path).parent.name == sets["trainval"].classes[label]


def split_class(root: Path, class_id: int, flag: str) -> Path:
    """Mark every image of one class (1-based id) train ("1") or test ("0") in train_test_split.txt; returns root."""
    labels = read_table(root, "image_class_labels.txt")
    lines = [f"{image_id} {flag if labels[image_id] == [str(class_id)] else fields[0]}"
             for image_id, fields in read_table(root, "train_test_split.txt").items()]
    (root / "train_test_split.txt").write_text("\n".join(lines) + "\n")
    return root


def test_a_class_without_training_images_is_refused_for_training_only(writable_cub, tmp_path):
    split_class(writable_cub, 3, "0")
    split_class(writable_cub, 4, "1")  # no test image: evaluation leaves the class out of the mean, as it should
    for split in ("train", "trainval"):
        with pytest.raises(UserError) as error:
            CUB200(writable_cub, split, val_fraction=0.25)
        assert str(error.value) == (
            f"the {split} split of {writable_cub} has no images of class 'Synthetic Class 3', which the model could "
            "never learn; mark images of every class 1 (train) in train_test_split.txt, or re-extract "
            "CUB_200_2011.tgz.")
    assert 2 in CUB200(writable_cub, "test").targets and 2 not in CUB200(writable_cub, "val", 0.25).targets
    assert 3 not in CUB200(writable_cub, "test").targets
    result = run_train(writable_cub, tmp_path / "run")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "'Synthetic Class 3'" in result.stderr and "Traceback" not in result.stderr + result.stdout
    for class_id in (1, 2, 5):
        split_class(writable_cub, class_id, "0")
    with pytest.raises(UserError, match=r"no images of 4 classes \('Synthetic Class 1', 'Synthetic Class 2', "
                                        r"'Synthetic Class 3' and 1 more\), "):
        CUB200(writable_cub, "trainval")


def test_a_folder_class_without_training_images_is_refused(mini_folder):
    for image in (mini_folder / "train" / "Synthetic_Class_2").iterdir():
        image.unlink()
    (mini_folder / "train" / "Synthetic_Class_2" / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match=r"the train split of .*folder has no images of class 'Synthetic_Class_2', "
                                        r".*put images in each such class's train/<class>/ folder"):
        FolderDataset(mini_folder, "train", val_fraction=0.25)
    assert len(FolderDataset(mini_folder, "test").classes) == 5


def test_folder_dataset_rejects_mismatched_classes(mini_folder):
    (mini_folder / "test" / "Synthetic_Class_5").rename(mini_folder / "test" / "Other")
    with pytest.raises(UserError, match="differ in class folders"):
        FolderDataset(mini_folder, "train")
    shutil.rmtree(mini_folder / "test")
    with pytest.raises(UserError, match=r"test does not exist"):
        FolderDataset(mini_folder, "train")


def test_a_folder_image_in_both_train_and_test_is_refused(mini_folder):
    """The same image twice: a copy under its own name (any class), or a link under any name. A file that only
    shares a name with a train image is another image: many layouts number every folder from 1."""
    def verify():
        data_cli_main(["verify", "--root", str(mini_folder), "--format", "folder"])

    train_image = next((mini_folder / "train" / "Synthetic_Class_1").iterdir())
    namesake = mini_folder / "test" / "Synthetic_Class_2" / train_image.name
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(namesake)
    verify()
    shutil.copy(train_image, namesake)
    with pytest.raises(UserError) as error:
        verify()
    assert str(error.value) == (f"{train_image} and {namesake} are the same image, so the test split would be "
                                "trained on; delete one of them.")
    namesake.unlink()
    link = mini_folder / "test" / "Synthetic_Class_1" / "renamed.jpg"
    link.symlink_to(train_image)
    with pytest.raises(UserError, match=f"{link.name} are the same image, so the test split would be trained on"):
        verify()


def test_build_dataset_picks_the_format(mini_cub, mini_folder):
    assert isinstance(build_dataset(DataConfig(root=str(mini_cub)), "val"), CUB200)
    assert isinstance(build_dataset(DataConfig(root=str(mini_folder), format="folder"), "test"), FolderDataset)
    with pytest.raises(UserError, match="unknown split"):
        build_dataset(DataConfig(root=str(mini_cub)), "dev")


def test_transforms_follow_the_recipe():
    cfg = DataConfig(resize=40, crop=32)
    train = [type(t).__name__ for t in build_transforms(cfg, train=True).transforms]
    evaluation = [type(t).__name__ for t in build_transforms(cfg, train=False).transforms]
    assert train == ["Resize", "RandomHorizontalFlip", "RandomCrop", "ToTensor", "Normalize"]
    assert evaluation == ["Resize", "CenterCrop", "ToTensor", "Normalize"]


@pytest.mark.parametrize("train", [True, False])
def test_transforms_shape_and_imagenet_normalisation(train):
    colour = (200, 100, 50)
    image = Image.new("RGB", (57, 45), colour)
    tensor = build_transforms(DataConfig(resize=40, crop=32), train)(image)
    assert tensor.shape == (3, 32, 32)
    expected = torch.tensor([(c / 255 - m) / s for c, m, s in zip(colour, IMAGENET_MEAN, IMAGENET_STD)])
    # A uniform image stays uniform through resize and crop; ToTensor's /255 and Normalize's subtract and divide
    # round 3 times in float32, on values up to 2.7: at most 3 * 2.7 * 2^-24 = 5e-7 from the float64 value.
    assert torch.allclose(tensor, expected.view(3, 1, 1).expand(3, 32, 32), rtol=0, atol=1e-6)


def test_optional_augmentations_keep_the_shape():
    cfg = DataConfig(resize=40, crop=32, random_resized_crop=True, rotation=10.0, color_jitter=0.2)
    names = [type(t).__name__ for t in build_transforms(cfg, train=True).transforms]
    assert names[0] == "RandomResizedCrop" and "RandomRotation" in names and "ColorJitter" in names
    assert build_transforms(cfg, True)(Image.new("RGB", (90, 70), (1, 2, 3))).shape == (3, 32, 32)


def test_synthetic_cub_is_deterministic(tmp_path):
    def contents(root):
        return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    first = contents(write_synthetic_cub(tmp_path / "a", classes=2, per_class=3, seed=4, image_size=32))
    assert first == contents(write_synthetic_cub(tmp_path / "b", classes=2, per_class=3, seed=4, image_size=32))
    assert first != contents(write_synthetic_cub(tmp_path / "c", classes=2, per_class=3, seed=5, image_size=32))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """python -m bcnn.data ARGS, in this process (what the command says and returns is what the tests check)."""
    return run_in_process(data_cli_main, *args)


def test_cli_synth_writes_a_dataset_that_verify_accepts(tmp_path):
    root = tmp_path / "synth"
    made = run_cli("synth", "--root", str(root), "--classes", "3", "--per-class", "5", "--seed", "1",
                   "--image-size", "40")
    assert made.returncode == 0, made.stderr
    flags = [fields[0] for fields in read_table(root, "train_test_split.txt").values()]
    checked = run_cli("verify", "--root", str(root), "--val-fraction", "0.2")
    assert checked.returncode == 0, checked.stderr
    assert "3 classes" in checked.stdout
    assert f"trainval {flags.count('1')}," in checked.stdout and f"test {flags.count('0')}" in checked.stdout


@pytest.mark.parametrize("data_format, option, value, least", [
    ("cub", "--classes", "0", 1), ("aircraft", "--per-class", "2", 3), ("nabirds", "--image-size", "8", 16),
    ("cars", "--classes", "1", 2),
])
def test_synth_names_the_size_option_that_is_too_small(tmp_path, data_format, option, value, least):
    with pytest.raises(UserError) as error:
        data_cli_main(["synth", "--format", data_format, "--root", str(tmp_path / "new"), option, value])
    assert str(error.value).startswith(f"{option} must be at least {least} for a synthetic ")
    assert str(error.value).endswith(f", got {value}.")


def test_cli_reports_a_broken_root_without_traceback(tmp_path):
    result = run_cli("verify", "--root", str(tmp_path / "nowhere"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize("command, in_the_way, message", [
    ("download", ".", "{file} is a file, so {file}/CUB_200_2011 cannot be made; pass another --root or move it away."),
    ("download", "CUB_200_2011", "{file} is a file, where a folder belongs; pass another --root or move it away."),
    ("synth", ".", "{file} is a file, where a folder belongs; pass another --root or move it away."),
    ("verify", ".", "--root {file} is a file, not a folder; pass the dataset's folder, the one holding images.txt and "
                    "images/."),
])
def test_cli_refuses_a_file_where_a_folder_belongs(tmp_path, monkeypatch, command, in_the_way, message):
    root = tmp_path / "notes"
    file = root / in_the_way if in_the_way != "." else root
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text("a file, not a folder")
    # A proxy nobody listens on: were the root checked after the fetch, this test would fail without going online.
    # (In this process: the CLI's one-line printing of a UserError is test_cli_reports_a_broken_root's.)
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    with pytest.raises(UserError) as error:
        data_cli_main([command, "--root", str(root)])
    assert str(error.value) == message.format(file=file)
    assert file.read_text() == "a file, not a folder"


def make_tarball(path: Path, dataset: Path, extra: list[tuple[tarfile.TarInfo, bytes]] = ()) -> str:
    """Pack dataset as CUB_200_2011/ (plus extra members) into path; returns its md5."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(dataset, arcname="CUB_200_2011")
        for info, data in extra:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_download_extracts_verifies_and_then_does_nothing(mini_cub, tmp_path, capsys):
    source = tmp_path / "server" / "CUB_200_2011.tgz"
    md5 = make_tarball(source, mini_cub)
    root = tmp_path / "data"
    dataset_dir = download_cub(str(root), url=source.as_uri(), md5=md5)
    assert dataset_dir == root / "CUB_200_2011"
    assert as_dict(CUB200(dataset_dir, "test")) == official_splits(dataset_dir)["test"]
    assert sorted(p.name for p in root.iterdir()) == ["CUB_200_2011", "CUB_200_2011.tgz"]
    assert "test 30" in capsys.readouterr().out
    source.unlink()  # a second call must not need the server, nor even the md5
    assert download_cub(str(root), url=source.as_uri(), md5="0" * 32) == dataset_dir
    assert "already present" in capsys.readouterr().out


def test_download_uses_a_tarball_placed_by_hand(mini_cub, tmp_path):
    root = tmp_path / "data"
    md5 = make_tarball(root / "CUB_200_2011.tgz", mini_cub)
    assert len(CUB200(download_cub(str(root), url=(tmp_path / "none").as_uri(), md5=md5), "trainval")) == 30


def test_download_rejects_a_wrong_md5(mini_cub, tmp_path):
    source = tmp_path / "server" / "CUB_200_2011.tgz"
    make_tarball(source, mini_cub)
    with pytest.raises(UserError, match="wrong md5 .*delete it"):
        download_cub(str(tmp_path / "data"), url=source.as_uri(), md5="0" * 32)
    assert not (tmp_path / "data" / "CUB_200_2011").exists()


def test_download_without_network_says_how_to_do_it_by_hand(tmp_path):
    root = tmp_path / "data"
    with pytest.raises(UserError, match=r"download it by hand, place it at .*CUB_200_2011\.tgz and rerun"):
        download_cub(str(root), url=(tmp_path / "unreachable.tgz").as_uri())
    assert list(root.iterdir()) == []


def symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


@pytest.mark.parametrize("member", [
    tarfile.TarInfo("../evil.txt"),
    tarfile.TarInfo("CUB_200_2011/../../evil.txt"),
    tarfile.TarInfo("/tmp/bcnn_test_evil.txt"),
    symlink("CUB_200_2011/evil_link", "../../evil.txt"),
])
def test_download_refuses_unsafe_tarballs(mini_cub, tmp_path, member):
    source = tmp_path / "server" / "CUB_200_2011.tgz"
    md5 = make_tarball(source, mini_cub, [(member, b"" if member.issym() else b"pwned")])
    root = tmp_path / "deep" / "data"
    with pytest.raises(UserError, match="unsafe member"):
        download_cub(str(root), url=source.as_uri(), md5=md5)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "deep" / "evil.txt").exists()
    assert not Path("/tmp/bcnn_test_evil.txt").exists()
    assert not (root / "CUB_200_2011").exists()


class Indices(torch.utils.data.Dataset):
    """A dataset of 30 items that are their own index, taking the (index, augment_seed) pairs of TrainSampler."""

    def __len__(self) -> int:
        return 30

    def __getitem__(self, item):
        return item[0] if isinstance(item, tuple) else item


def test_loader_order_repeats_with_the_seed_and_changes_with_the_epoch():
    def order(seed, train=True, epoch=0):
        loader = build_loader(Indices(), batch_size=8, train=train, num_workers=1, seed=seed)
        if train:
            loader.sampler.set_epoch(epoch)
        return torch.cat(list(loader)).tolist()
    assert order(0) == order(0) and sorted(order(0)) == list(range(30))
    assert order(0) != order(1)
    assert order(0, epoch=1) != order(0) and sorted(order(0, epoch=1)) == list(range(30))
    assert order(0, train=False) == list(range(30))


def test_loader_augmentations_repeat_with_the_seed_in_workers(mini_cub):
    dataset = build_dataset(DataConfig(root=str(mini_cub), resize=40, crop=24, val_fraction=0.0), "trainval")

    def first_batch(seed):
        return next(iter(build_loader(dataset, batch_size=8, train=True, num_workers=2, seed=seed)))

    (images, labels), (again, again_labels) = first_batch(5), first_batch(5)
    assert torch.equal(images, again) and torch.equal(labels, again_labels)
    assert not torch.equal(images, first_batch(6)[0])


def augmented(dataset, epoch=0, num_workers=0, rank=0, world_size=1) -> dict[int, torch.Tensor]:
    """{sample index: augmented image} for one training epoch of one rank, as build_loader delivers them."""
    loader = build_loader(dataset, batch_size=4, train=True, num_workers=num_workers, seed=3, rank=rank,
                          world_size=world_size)
    loader.sampler.set_epoch(epoch)
    indices = [index for index, _ in loader.sampler]
    return dict(zip(indices, torch.cat([images for images, _ in loader])))


def same_images(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[index], b[index]) for index in a)


def test_augmentations_depend_only_on_seed_epoch_and_sample(mini_cub):
    dataset = build_dataset(DataConfig(root=str(mini_cub), resize=40, crop=24, val_fraction=0.0), "trainval")
    one_process = augmented(dataset)
    assert len(one_process) == len(dataset) == 30  # even, so two ranks need no padding
    assert same_images(one_process, augmented(dataset, num_workers=2))
    rank0, rank1 = augmented(dataset, rank=0, world_size=2), augmented(dataset, rank=1, world_size=2, num_workers=2)
    assert not rank0.keys() & rank1.keys()
    assert same_images(one_process, {**rank0, **rank1})
    next_epoch = augmented(dataset, epoch=1)
    assert sum(not torch.equal(one_process[i], next_epoch[i]) for i in one_process) > len(dataset) // 2


def test_a_seeded_sample_leaves_the_global_rng_alone(mini_cub):
    dataset = build_dataset(DataConfig(root=str(mini_cub), resize=40, crop=24, val_fraction=0.0), "trainval")
    state = torch.get_rng_state()
    image, _ = dataset[(0, 123)]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(image, dataset[(0, 123)][0]) and not torch.equal(image, dataset[(0, 124)][0])


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


DAMAGES = {  # how an image breaks after the dataset listed it: (damage the file, what the error must say)
    "truncated jpeg": (truncate, r"image file is truncated"),
    "not an image": (lambda path: path.write_text("<html>404 Not Found</html>"), r"not an image"),
    "deleted": (lambda path: path.unlink(), r"no such file or directory"),
    "malformed": (lambda path: path.write_bytes(b"P5 4 4 70000\n" + bytes(32)), r"maxval must be greater than 0"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_an_unreadable_image_is_one_sentence_naming_it(writable_cub, damage):
    dataset = CUB200(writable_cub, "trainval")
    path = dataset.samples[0][0]
    spoil, reason = DAMAGES[damage]
    spoil(Path(path))
    with pytest.raises(UserError, match=reason) as error:
        dataset[0]
    message = str(error.value)
    assert f"cannot read image {path}: " in message and "replace it" in message
    assert "\n" not in message and message.endswith(".")


def save_float_image(path: Path) -> None:
    Image.fromarray(np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)).save(path, format="TIFF")


VERIFY_DAMAGES = {  # what training refuses and verify must refuse too: (damage the file, what the error must say)
    "empty file": (lambda path: path.write_bytes(b""), r"not an image"),
    "truncated jpeg": (truncate, r"image file is truncated"),
    "malformed": (DAMAGES["malformed"][0], r"maxval must be greater than 0"),
    "32-bit floats": (save_float_image, r"32-bit floating-point pixels"),
}


@pytest.mark.parametrize("damage", VERIFY_DAMAGES)
def test_verify_refuses_each_image_training_would_refuse_in_its_words(writable_cub, damage):
    dataset = CUB200(writable_cub, "test")
    path = dataset.samples[-1][0]
    spoil, reason = VERIFY_DAMAGES[damage]
    spoil(Path(path))
    with pytest.raises(UserError, match=reason) as training:
        dataset[len(dataset) - 1]
    with pytest.raises(UserError) as verify:
        data_cli_main(["verify", "--root", str(writable_cub)])
    assert str(verify.value) == str(training.value)
    assert path in str(verify.value) and "\n" not in str(verify.value)


def test_verify_counts_the_other_images_it_refuses(writable_cub):
    paths = [path for path, _ in CUB200(writable_cub, "trainval").samples[:3]]
    for path in paths:
        Path(path).write_bytes(b"")
    with pytest.raises(UserError) as error:
        data_cli_main(["verify", "--root", str(writable_cub)])
    assert str(error.value) == (f"cannot read image {paths[0]}: not an image; {REPLACE_IMAGE} (2 more of the 60 "
                                "images fail too).")


def load_within(seconds: float, load, *args):
    """load(*args) in a thread; fails the test if it has not returned (or raised) within `seconds`."""
    outcome = {}

    def run():
        try:
            outcome["value"] = load(*args)
        except BaseException as error:  # handed back to the test, in its thread
            outcome["error"] = error
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{load.__name__} is still waiting after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@pytest.mark.parametrize("kind", ["folder", "named pipe"])
def test_a_folder_or_named_pipe_where_an_image_goes_is_named_and_never_waited_on(writable_cub, tmp_path, kind):
    dataset = CUB200(writable_cub, "test")
    path = Path(dataset.samples[0][0])
    if kind == "folder":
        path.unlink()
        path.mkdir()
    else:
        named_pipe_instead(path)
    # training: the image went after the dataset was read (CPU decode, and the batched path's file reading)
    expected = f"cannot read image {path}: it is a {kind}, not an image file; {REPLACE_IMAGE}."
    for load in (dataset.load_image, EncodedFiles(dataset).__getitem__):
        with pytest.raises(UserError) as error:
            load_within(20, load, 0)
        assert str(error.value) == expected
    # verify, and any command reading the dataset, find it in the list
    image_id = next(i for i, fields in read_table(writable_cub, "images.txt").items() if path.name in fields[0])
    with pytest.raises(UserError) as error:
        load_within(20, data_cli_main, ["verify", "--root", str(writable_cub)])
    assert str(error.value) == (f"{path}, listed as id {image_id} (test) of images.txt, is a {kind}, not an image "
                                "file; fix the file or re-extract CUB_200_2011.tgz.")
    # a dataset folder that is a named pipe
    pipe = tmp_path / "CUB_pipe"
    os.mkfifo(pipe)
    with pytest.raises(UserError) as error:
        load_within(20, data_cli_main, ["verify", "--root", str(pipe)])
    assert str(error.value) == (f"--root {pipe} is a named pipe, not a folder; pass the dataset's folder, the one "
                                "holding images.txt and images/.")
    with pytest.raises(UserError, match=r"^--data-root \(data\.root\) .*CUB_pipe is a named pipe, not a folder; "):
        load_within(20, build_dataset, DataConfig(root=str(pipe)), "train")


@pytest.mark.parametrize("args, message", [
    (["--split-seed", "-1"], "--split-seed must be at least 0, got -1; pass 0 or a positive whole number."),
    (["--split-seed", "-20"], "--split-seed must be at least 0, got -20; pass 0 or a positive whole number."),
    (["--val-fraction", "1"], "--val-fraction must be in [0, 1), got 1.0; pass e.g. 0.1, or 0 for no val."),
    (["--val-fraction", "nan"], "--val-fraction must be in [0, 1), got nan; pass e.g. 0.1, or 0 for no val."),
], ids=["seed -1", "seed -20", "fraction 1", "fraction nan"])
def test_verify_refuses_a_split_option_out_of_range_in_one_sentence(mini_cub, args, message):
    with pytest.raises(UserError) as error:
        data_cli_main(["verify", "--root", str(mini_cub), *args])
    assert str(error.value) == message
    if args[0] == "--split-seed":  # the readers refuse it too, for any caller
        with pytest.raises(UserError, match=rf"^split_seed must be at least 0, got {args[1]}; fix data\.split_seed\.$"):
            CUB200(mini_cub, "val", val_fraction=0.2, split_seed=int(args[1]))


def run_train(data_root: Path, run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """One epoch of the demo's stage 1 on small crops, as a user runs it (in this process; its loader workers are
    processes of their own, as in a user's run)."""
    return run_in_process(train_cli.main, "--config", STAGE1, f"--data-root={data_root}", "--device=cpu",
                          f"--run-dir={run_dir}", "--data.crop=32", "--data.resize=40", "--train.epochs=1", *args)


def test_train_cli_reports_an_image_broken_in_a_worker_in_one_line(writable_cub, tmp_path):
    path = CUB200(writable_cub, "trainval").samples[0][0]  # train or val: one epoch reads both
    truncate(Path(path))
    result = run_train(writable_cub, tmp_path / "run", "--data.num_workers=2")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert path in result.stderr and "image file is truncated" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize("cores, processes, expected", [(16, 4, 3), (16, 1, 15), (64, 1, 16), (1, 1, 0), (16, 8, 1)])
def test_default_loader_workers_share_the_cores_between_processes(monkeypatch, cores, processes, expected):
    from bcnn.data import loader
    monkeypatch.setattr(loader.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))
    assert loader.default_num_workers() == expected


def test_an_image_over_the_decompression_bomb_limit_is_one_sentence_and_one_under_it_loads(monkeypatch, tmp_path):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200_000)  # Pillow warns past 0.2 megapixels, refuses past 0.4
    large, huge = tmp_path / "large.png", tmp_path / "huge.png"
    Image.new("RGB", (500, 500), (10, 20, 30)).save(large)
    Image.new("RGB", (800, 600), (10, 20, 30)).save(huge)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_rgb(str(large)).getpixel((499, 499)) == (10, 20, 30)
    assert not [warning for warning in caught if issubclass(warning.category, Image.DecompressionBombWarning)]
    with pytest.raises(UserError) as error:
        load_rgb(str(huge))
    # bcnn.predict recognises the sentence by its start and end
    assert str(error.value) == (f"cannot read image {huge}: it has 0.5 megapixels, over the 0.4-megapixel limit "
                                f"Pillow sets against decompression bombs (downscale it); {REPLACE_IMAGE}.")


def test_train_cli_reports_an_image_over_the_decompression_bomb_limit(writable_cub, tmp_path):
    path = CUB200(writable_cub, "trainval").samples[0][0]
    # 200 megapixels against Pillow's own limit of 179, in a small file: Pillow refuses it on opening, unread.
    Image.new("1", (20_000, 10_000)).save(path, format="PNG")
    result = run_train(writable_cub, tmp_path / "run", "--data.num_workers=2")
    assert result.returncode == 2, result.stderr
    assert result.stderr == (f"error: cannot read image {path}: it has 200.0 megapixels, over the 179.0-megapixel "
                             f"limit Pillow sets against decompression bombs (downscale it); {REPLACE_IMAGE}.\n")


def write_png16(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit RGB PNG from (H, W, 3) uint16 pixels, which Pillow cannot write."""
    height, width = pixels.shape[:2]
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)  # filter type 0 before each row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)  # 16 bits, colour type 2 (RGB)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def write_tiff12(path: Path, pixels: np.ndarray) -> None:
    """A 12-bit grayscale TIFF from (H, W) values below 4096, W even: two pixels in three bytes, high bits first."""
    height, width = pixels.shape
    pairs = pixels.reshape(-1, 2).astype(np.uint32)
    packed = pairs[:, 0] << 12 | pairs[:, 1]
    data = np.stack([packed >> 16, packed >> 8, packed], axis=1).astype(np.uint8).tobytes()  # keeps the low byte
    # width, height, bits per sample, no compression, black is 0, offset of the pixels, 1 sample, their length
    tags = [(256, width), (257, height), (258, 12), (259, 1), (262, 1), (273, 8 + 2 + 8 * 12 + 4), (277, 1),
            (279, len(data))]
    entries = b"".join(struct.pack("<HHII", tag, 4, 1, value) for tag, value in tags)  # type 4: one LONG each
    path.write_bytes(b"II*\0" + struct.pack("<IH", 8, len(tags)) + entries + bytes(4) + data)


def test_high_bit_depth_images_read_as_their_8_bit_version(tmp_path):
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16)  # every 8-bit level; x * 257 is x in 16 bits
    Image.fromarray(gray).save(tmp_path / "gray8.png")
    expected = np.asarray(load_rgb(str(tmp_path / "gray8.png")))
    assert np.array_equal(expected, np.repeat(gray[..., None], 3, axis=2))
    sixteen = Image.fromarray(gray.astype(np.uint16) * 257)
    for name in ("gray16.png", "gray16.tif", "gray16.pgm"):
        sixteen.save(tmp_path / name)
    Image.frombytes("I;16B", (16, 16), (gray.astype(">u2") * 257).tobytes()).save(tmp_path / "gray16be.tif")
    write_tiff12(tmp_path / "gray12.tif", (gray.astype(np.uint32) * 4095 + 127) // 255)
    modes = {}
    for name in ("gray16.png", "gray16.tif", "gray16.pgm", "gray16be.tif", "gray12.tif"):
        modes[name] = Image.open(tmp_path / name).mode
        assert np.array_equal(np.asarray(load_rgb(str(tmp_path / name))), expected), name
    # what Pillow gives (a 16-bit PGM opens as I), so that each of load_rgb's cases is tested
    assert modes == {"gray16.png": "I;16", "gray16.tif": "I;16", "gray16.pgm": "I", "gray16be.tif": "I;16B",
                     "gray12.tif": "I;16"}
    colour = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    write_png16(tmp_path / "colour16.png", colour.astype(np.uint16) * 257)
    for name in ("colour.png", "colour16.png"):
        assert np.array_equal(np.asarray(load_rgb(str(tmp_path / name))), colour), name


@pytest.mark.parametrize("pixels, described", [
    (np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16), "32-bit floating-point pixels (PIL mode F)"),
    (np.arange(256, dtype=np.int32).reshape(16, 16) * 65537, "32-bit integer pixels (PIL mode I)"),
])
def test_32_bit_images_without_a_range_are_refused_by_name(tmp_path, pixels, described):
    path = tmp_path / "scan.tif"
    Image.fromarray(pixels).save(path)
    with pytest.raises(UserError) as error:
        load_rgb(str(path))
    assert str(error.value) == (f"cannot read image {path}: it has {described}, which have no fixed range to map "
                                f"to 8-bit colour (save it as an 8-bit image); {REPLACE_IMAGE}.")
