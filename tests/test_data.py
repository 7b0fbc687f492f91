"""bcnn.data on generated mini-CUBs: splits, labels, RGB loading, errors, transforms, CLI, download, loaders.

Expectations come from re-reading the CUB text files here, not from bcnn.data.
"""

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from bcnn.config import DataConfig
from bcnn.data import (
    CUB200, IMAGENET_MEAN, IMAGENET_STD, FolderDataset, build_dataset, build_loader, build_transforms,
    download_cub, write_synthetic_cub,
)
from bcnn.errors import UserError

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


def edit_line(root: Path, name: str, line_number: int, text: str | None) -> Path:
    """Replace (or, with None, delete) one 1-based line of a CUB text file; returns root."""
    lines = (root / name).read_text().splitlines()
    if text is None:
        del lines[line_number - 1]
    else:
        lines[line_number - 1] = text
    (root / name).write_text("\n".join(lines) + "\n")
    return root


def delete_first_image(root: Path) -> Path:
    (root / "images" / read_table(root, "images.txt")[1][0]).unlink()
    return root


CORRUPTIONS = {  # problem: (corrupt the copy and return the root to open, what the error must say)
    "missing root": (lambda root: shutil.rmtree(root) or root, r"CUB-200-2011 folder .* does not exist; run `make"),
    "parent folder passed": (lambda root: root.parent, r"one level down; pass --data-root .*CUB_200_2011"),
    "missing images.txt": (lambda root: (root / "images.txt").unlink() or root, r"images\.txt is missing"),
    "missing images folder": (lambda root: shutil.rmtree(root / "images") or root, r"images does not exist"),
    "missing image file": (delete_first_image, r"1 of 60 images listed in images\.txt are missing, the first is .*_0001"),
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


def test_folder_dataset_rejects_mismatched_classes(mini_folder):
    (mini_folder / "test" / "Synthetic_Class_5").rename(mini_folder / "test" / "Other")
    with pytest.raises(UserError, match="differ in class folders"):
        FolderDataset(mini_folder, "train")
    shutil.rmtree(mini_folder / "test")
    with pytest.raises(UserError, match=r"test does not exist"):
        FolderDataset(mini_folder, "train")


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
    return subprocess.run([sys.executable, "-m", "bcnn.data", *args], capture_output=True, text=True, timeout=120)


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


def test_cli_reports_a_broken_root_without_traceback(tmp_path):
    result = run_cli("verify", "--root", str(tmp_path / "nowhere"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr + result.stdout


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
        loader = build_loader(Indices(), batch_size=8, train=train, num_workers=0, seed=seed)
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


def test_train_cli_reports_an_image_broken_in_a_worker_in_one_line(writable_cub, tmp_path):
    path = CUB200(writable_cub, "trainval").samples[0][0]  # train or val: one epoch reads both
    truncate(Path(path))
    result = subprocess.run(
        [sys.executable, "-m", "bcnn.train", "--config", "experiments/demo_stage1.yaml", f"--data-root={writable_cub}",
         "--device=cpu", f"--run-dir={tmp_path / 'run'}", "--data.crop=32", "--data.resize=40", "--train.epochs=1",
         "--data.num_workers=2"],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert path in result.stderr and "image file is truncated" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize("cores, processes, expected", [(16, 4, 3), (64, 1, 8), (1, 1, 0), (16, 8, 1)])
def test_default_loader_workers_share_the_cores_between_processes(monkeypatch, cores, processes, expected):
    from bcnn import data
    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))
    assert data.default_num_workers() == expected
