"""`python -m bcnn.predict`: a checkpoint alone (its dataset deleted) turns images into class probabilities.

The probabilities are checked against softmax(model(x)) computed here, with the eval transform written out by
hand, for a model whose weights the test itself saved.
"""

import json
import re
import runpy
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from bcnn import predict as predict_cli
from bcnn.checkpoint import save_checkpoint
from bcnn.config import config_to_dict, load_config
from bcnn.data import write_synthetic_cub
from bcnn.errors import UserError
from bcnn.models import build_model
from helpers.numerics import FORWARD_RTOL
from helpers.runs import run_in_process

REPO = Path(__file__).resolve().parent.parent
CLASSES = ["Black footed Albatross", "Laysan Albatross", "Sooty Albatross"]
PHOTOS = ("Gull.JPG", "albatross.jpg", "tern.png")  # one of class k each, sorted as a folder listing sorts them
PERCENT_LINE = re.compile(r"^ +(\d+\.\d\d)%  (.+)$")
# A held-out folder in a dataset's layout, in the order bcnn.predict walks it (sorted by path): (image, photo
# copied there, the class its folder names). The three spellings of a CUB folder name; photo k is class k, so
# some images sit in their own class's folder and some in another's; unsorted/deeper/ names no class.
TREE = (("001.Black_footed_Albatross/Gull.JPG", "Gull.JPG", CLASSES[0]),
        ("001.Black_footed_Albatross/tern.png", "tern.png", CLASSES[0]),
        ("Laysan_Albatross/albatross.jpg", "albatross.jpg", CLASSES[1]),
        ("Sooty Albatross/Gull.JPG", "Gull.JPG", CLASSES[2]),
        ("Sooty Albatross/tern.png", "tern.png", CLASSES[2]),
        ("unsorted/deeper/albatross.jpg", "albatross.jpg", None))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint as bcnn.train writes it, the model it holds, and a folder of photos; no dataset is left."""
    root = tmp_path_factory.mktemp("predict")
    cub = write_synthetic_cub(root / "cub", classes=3, per_class=6, seed=0)
    cfg = load_config(REPO / "experiments" / "demo_stage1.yaml",
                      ["--data.crop=32", "--data.resize=40", f"--data.root={cub}"])
    photos = root / "photos"
    (photos / "nested").mkdir(parents=True)
    images = cub / "images"
    shutil.copy(images / "001.Synthetic_Class_1" / "Synthetic_Class_1_0001.jpg", photos / "Gull.JPG")  # grayscale
    shutil.copy(images / "002.Synthetic_Class_2" / "Synthetic_Class_2_0002.jpg", photos / "albatross.jpg")  # CMYK
    Image.open(images / "003.Synthetic_Class_3" / "Synthetic_Class_3_0001.jpg").save(photos / "tern.png")
    shutil.copy(photos / "tern.png", photos / "nested" / "deep.png")  # a folder is not searched recursively
    (photos / "notes.txt").write_text("not an image, and without an image extension: skipped in a folder")

    torch.manual_seed(0)
    model = build_model(cfg.model, len(CLASSES), input_size=cfg.data.crop).eval()
    # A random head scores every image about alike. Make row k the (centred) bilinear features of photo k, so
    # photo k is class k and the probabilities are spread: their order, and any mix-up of classes, then shows.
    with torch.no_grad():
        features = torch.cat([model.embed(eval_transform(path)[None]) for path in (photos / name for name in PHOTOS)])
        model.classifier.weight.copy_(40 * (features - features.mean(dim=0)))
    checkpoint = root / "best.pt"
    save_checkpoint({"model": model.state_dict(), "config": config_to_dict(cfg), "classes": CLASSES, "epoch": 1,
                     "metrics": {}}, checkpoint)
    shutil.rmtree(cub)  # prediction must not need the dataset the checkpoint names
    assert not Path(cfg.data.root).exists()
    return {"checkpoint": str(checkpoint), "model": model, "photos": photos}


def eval_transform(path) -> torch.Tensor:
    """The config's eval transform written out: resize 40, centre crop 32, ImageNet normalisation; (3, 32, 32)."""
    transform = T.Compose([T.Resize(40), T.CenterCrop(32), T.ToTensor(),
                           T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    with Image.open(path) as image:
        return transform(image.convert("RGB"))


def reference_logits(model, path) -> torch.Tensor:
    with torch.no_grad():
        return model(eval_transform(path)[None])[0]


def reference_probabilities(model, path) -> torch.Tensor:
    return reference_logits(model, path).softmax(dim=0)


def probability_tolerance(model, path) -> float:
    """bcnn.predict runs the image in another batch than the reference: logits z equal to forward-pass rounding
    (|dz| <= FORWARD_RTOL |z|), and softmax moves p_i by p_i |dz_i - sum_j p_j dz_j| <= 2 max |dz|."""
    return 2 * FORWARD_RTOL * reference_logits(model, path).abs().max().item()


def photo_paths(trained) -> list[str]:
    return [str(trained["photos"] / name) for name in PHOTOS]


def run_cli(*args):
    """python -m bcnn.predict ARGS in this process: its output and exit status."""
    return run_in_process(predict_cli.main, *args)


def test_probabilities_are_the_softmax_of_the_model_on_the_eval_transform(trained, capsys):
    # batch size 2 over 3 images: one full batch and one partial
    results = predict_cli.main([*photo_paths(trained), "--checkpoint", trained["checkpoint"], "--topk", "3",
                                "--json", "--batch-size", "2", "--device", "cpu"])
    assert json.loads(capsys.readouterr().out) == results
    assert [result["image"] for result in results] == photo_paths(trained)
    for result in results:
        reference = reference_probabilities(trained["model"], result["image"])
        expected_order = reference.argsort(descending=True).tolist()
        predictions = result["predictions"]
        assert [p["index"] for p in predictions] == expected_order
        assert [p["class"] for p in predictions] == [CLASSES[i] for i in expected_order]
        tolerance = probability_tolerance(trained["model"], result["image"])
        assert [p["probability"] for p in predictions] == pytest.approx(reference[expected_order].tolist(),
                                                                         abs=tolerance)
        # a float32 softmax over 3 classes sums to 1 within a few roundings (2^-24 each)
        assert sum(p["probability"] for p in predictions) == pytest.approx(1.0, abs=1e-6)
    assert [result["predictions"][0]["class"] for result in results] == CLASSES  # photo k is class k


def test_human_output_lists_the_topk_classes_in_percent(trained, capsys):
    image = photo_paths(trained)[1]
    reference = reference_probabilities(trained["model"], image)
    for topk, shown in (("2", 2), ("10", len(CLASSES))):  # --topk is capped at the number of classes
        predict_cli.main([image, "--checkpoint", trained["checkpoint"], "--topk", topk, "--device", "cpu"])
        lines = capsys.readouterr().out.splitlines()
        assert lines[0] == image and len(lines) == 1 + shown
        parsed = [PERCENT_LINE.match(line).groups() for line in lines[1:]]
        percents = [float(percent) for percent, _ in parsed]
        expected = reference.sort(descending=True)
        assert [name for _, name in parsed] == [CLASSES[i] for i in expected.indices[:shown]]
        # printed with 2 decimals (0.005) of probabilities within probability_tolerance
        assert percents == pytest.approx((100 * expected.values[:shown]).tolist(),
                                         abs=0.005 + 100 * probability_tolerance(trained["model"], image))
        assert percents == sorted(percents, reverse=True)
        assert sum(percents) <= 100.02  # at most 3 printed values, each rounded by 0.005
    assert sum(percents) == pytest.approx(100, abs=0.02)


def test_a_folder_means_its_image_files_sorted_not_recursive(trained, capsys):
    results = predict_cli.main([str(trained["photos"]), "--checkpoint", trained["checkpoint"], "--json"])
    assert [result["image"] for result in results] == photo_paths(trained)  # no notes.txt, no nested/deep.png
    assert capsys.readouterr().err == ""


@pytest.fixture
def held_out(trained, tmp_path):
    """TREE written under tmp_path/held_out, which has no image at its top level; returns its path."""
    root = tmp_path / "held_out"
    for image, photo, _ in TREE:
        (root / image).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(trained["photos"] / photo, root / image)
    return root


def test_a_folder_of_class_folders_is_walked_and_each_image_shows_its_true_class(trained, held_out, capsys):
    predict_cli.main([str(held_out), "--checkpoint", trained["checkpoint"], "--device", "cpu"])
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"note: {held_out} has no image files at its top level; predicting the "
                                         f"{len(TREE)} in its subfolders"]
    lines = captured.out.splitlines()
    blocks = [lines[i:i + 1 + len(CLASSES)] for i in range(0, len(TREE) * (1 + len(CLASSES)), 1 + len(CLASSES))]
    correct = 0
    for block, (image, _, true_class) in zip(blocks, TREE, strict=True):
        path = str(held_out / image)
        assert block[0] == (path if true_class is None else f"{path}  (true: {true_class})")
        shown = [PERCENT_LINE.match(line).group(2) for line in block[1:]]
        assert sorted(name.removesuffix("  <- true") for name in shown) == sorted(CLASSES)  # --topk 5, 3 classes
        marked = [name.removesuffix("  <- true") for name in shown if name.endswith("  <- true")]
        assert marked == ([] if true_class is None else [true_class])
        reference = reference_probabilities(trained["model"], path)
        correct += true_class is not None and CLASSES[reference.argmax()] == true_class
    labelled = sum(true_class is not None for _, _, true_class in TREE)
    assert 0 < correct < labelled  # the count is tested on right and wrong predictions both
    assert lines[len(TREE) * (1 + len(CLASSES)):] == [
        f"top-1 on the {labelled} images whose folder names a class: {correct} ({100 * correct / labelled:.2f}%)"]


def test_json_gives_each_image_its_true_class_and_prints_no_top1_line(trained, held_out, capsys):
    results = predict_cli.main([str(held_out), "--checkpoint", trained["checkpoint"], "--json", "--topk", "1"])
    captured = capsys.readouterr()
    assert json.loads(captured.out) == results
    assert captured.err.startswith(f"note: {held_out} has no image files at its top level")
    assert [result["image"] for result in results] == [str(held_out / image) for image, _, _ in TREE]
    assert [result.get("true_class") for result in results] == [true_class for _, _, true_class in TREE]
    assert list(results[0]) == ["image", "true_class", "predictions"]


def test_a_class_folder_with_images_is_not_searched_further_and_names_their_true_class(trained, held_out, capsys):
    folder = held_out / "Laysan_Albatross"
    shutil.copytree(held_out / "Sooty Albatross", folder / "Sooty Albatross")
    results = predict_cli.main([str(folder), "--checkpoint", trained["checkpoint"], "--json"])
    assert [(result["image"], result["true_class"]) for result in results] == [
        (str(folder / "albatross.jpg"), "Laysan Albatross")]
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("classes, folder, expected", [
    (CLASSES, "001.Black_footed_Albatross", "Black footed Albatross"),  # CUB: classes.txt names, cleaned
    (CLASSES, "Black_footed_Albatross", "Black footed Albatross"),
    (CLASSES, "Laysan Albatross", "Laysan Albatross"),
    (CLASSES, "photos", None),
    (CLASSES, "black_footed_albatross", None),  # as the datasets read folder names: case counts
    (["001.Black_footed_Albatross", "002.Laysan_Albatross"], "001.Black_footed_Albatross",
     "001.Black_footed_Albatross"),  # a folder dataset: the folder names themselves
    (["001.Black_footed_Albatross", "002.Laysan_Albatross"], "Laysan Albatross", "002.Laysan_Albatross"),
    (["001.Tern", "002.Tern"], "Tern", None),  # two classes read "Tern": the folder names neither
    (["001.Tern", "002.Tern"], "002.Tern", "002.Tern"),
])
def test_a_folder_names_a_class_as_the_datasets_turn_folder_names_into_classes(classes, folder, expected):
    assert predict_cli.true_class_finder(classes)(f"birds/{folder}/0001.jpg") == expected


def test_a_relative_path_has_the_folder_it_lies_in(tmp_path, monkeypatch):
    (tmp_path / "Sooty_Albatross").mkdir()
    monkeypatch.chdir(tmp_path / "Sooty_Albatross")
    true_class = predict_cli.true_class_finder(CLASSES)
    assert true_class("a.jpg") == true_class("./a.jpg") == true_class("sub/../a.jpg") == "Sooty Albatross"
    assert true_class("sub/a.jpg") is None


def test_each_bad_input_gets_an_error_line_and_entry_and_the_rest_is_predicted(trained, tmp_path, capsys):
    missing, text_file = str(tmp_path / "missing.jpg"), tmp_path / "notes.txt"
    text_file.write_text("hello")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes((trained["photos"] / "albatross.jpg").read_bytes()[:300])  # a truncated JPEG
    empty, empty_tree = tmp_path / "empty", tmp_path / "empty_tree"
    empty.mkdir()
    (empty_tree / "001.Black_footed_Albatross").mkdir(parents=True)
    huge = tmp_path / "huge.png"  # 200 megapixels in a 20 kB file: over Pillow's decompression-bomb limit
    Image.new("1", (20_000, 10_000)).save(huge)
    good = photo_paths(trained)[2]
    inputs = [missing, str(text_file), good, str(corrupt), str(empty), str(empty_tree), str(huge)]

    results = predict_cli.main([*inputs, "--checkpoint", trained["checkpoint"], "--json"])
    captured = capsys.readouterr()
    assert json.loads(captured.out) == results
    assert [result["image"] for result in results] == inputs
    assert [("error" in result, "predictions" in result) for result in results] == (
        [(True, False)] * 2 + [(False, True)] + [(True, False)] * 4)
    errors = captured.err.splitlines()
    assert len(errors) == 6
    for line, bad in zip(errors, [missing, text_file, corrupt, empty, empty_tree, huge]):
        assert line.startswith(f"error: {bad}: ")
    assert "no such file" in errors[0] and "not an image" in errors[1] and "truncated" in errors[2]
    assert all("no image files" in line and "or its subfolders" in line for line in errors[3:5])
    assert "it has 200.0 megapixels, over the 179.0-megapixel limit" in errors[5]


def test_cli_exit_status_is_1_when_an_input_failed_and_good_images_are_printed(trained, tmp_path, monkeypatch,
                                                                                   capsys):
    missing, text_file = str(tmp_path / "missing.jpg"), tmp_path / "notes.txt"
    text_file.write_text("hello")
    good = photo_paths(trained)[0]
    # the exit status 1 is set by the module's __main__ block, which is what this checks: run as `python -m` runs it
    # (runpy), in this process (a new interpreter costs seconds of imports)
    monkeypatch.setattr(sys, "argv", ["bcnn.predict", missing, str(text_file), good, "--checkpoint",
                                      trained["checkpoint"]])
    with warnings.catch_warnings(), pytest.raises(SystemExit) as exited:
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: bcnn.predict is imported already (by this file)
        runpy.run_module("bcnn.predict", run_name="__main__", alter_sys=True)
    assert exited.value.code == 1
    output = capsys.readouterr()
    errors = output.err.splitlines()
    assert len(errors) == 2 and errors[0].startswith(f"error: {missing}: ")
    assert errors[1].startswith(f"error: {text_file}: ")
    lines = output.out.splitlines()
    assert lines[0] == good and len(lines) == 1 + len(CLASSES)  # default --topk 5, capped at 3 classes
    assert all(PERCENT_LINE.match(line) for line in lines[1:])


def test_cli_json_prints_only_json_and_exits_0_when_all_succeed(trained):
    result = run_cli(str(trained["photos"]), "--checkpoint", trained["checkpoint"], "--json", "--topk", "1")
    assert result.returncode == 0, result.stderr
    predictions = json.loads(result.stdout)
    assert [entry["image"] for entry in predictions] == photo_paths(trained)
    assert all(len(entry["predictions"]) == 1 for entry in predictions)


def test_cli_topk_0_is_a_user_error_in_one_line(trained):
    result = run_cli(photo_paths(trained)[0], "--checkpoint", trained["checkpoint"], "--topk", "0")
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["error: --topk must be at least 1, got 0."]
    assert result.stdout == ""


def test_no_readable_input_or_a_bad_checkpoint_is_a_user_error(trained, tmp_path, capsys):
    with pytest.raises(UserError, match="no input could be predicted"):
        predict_cli.main([str(tmp_path / "missing.jpg"), "--checkpoint", trained["checkpoint"], "--json"])
    # --json still prints its list: a script reading stdout learns each input's reason
    assert json.loads(capsys.readouterr().out) == [{"image": str(tmp_path / "missing.jpg"),
                                                    "error": "no such file or folder; check the path"}]
    truncated = tmp_path / "best.pt"
    truncated.write_bytes(Path(trained["checkpoint"]).read_bytes()[:1000])
    with pytest.raises(UserError, match="cannot be read"):
        predict_cli.main([photo_paths(trained)[0], "--checkpoint", str(truncated)])


def test_predict_cuts_the_aircraft_banner_as_training_and_eval_do(tmp_path, capsys):
    # The probabilities of each FGVC-Aircraft test file equal the softmax of the model on what the dataset (the
    # path training and bcnn.eval read) makes of that file: its banner cut, then the eval transform.
    from bcnn.data import build_dataset, write_synthetic_aircraft

    root = write_synthetic_aircraft(tmp_path / "data", classes=3, per_class=4, seed=0, image_size=64)
    cfg = load_config(REPO / "experiments" / "demo_stage1.yaml", ["--data.format=aircraft", f"--data.root={root}",
                                                                  "--data.crop=32", "--data.resize=40"])
    test_set = build_dataset(cfg.data, "test")
    torch.manual_seed(0)
    model = build_model(cfg.model, len(test_set.classes), input_size=cfg.data.crop).eval()
    with torch.no_grad():
        model.classifier.weight.normal_(0, 5)  # probabilities spread, not saturated, so another view shows
    checkpoint = tmp_path / "best.pt"
    save_checkpoint({"model": model.state_dict(), "config": config_to_dict(cfg), "classes": test_set.classes,
                     "epoch": 1, "metrics": {}}, checkpoint)
    paths = [path for path, _ in test_set.samples]
    results = predict_cli.main([*paths, "--checkpoint", str(checkpoint), "--json", "--topk", "3"])
    assert capsys.readouterr().err.count("cutting 20 px off the bottom") == 1
    for index, result in enumerate(results):
        with torch.no_grad():
            logits = model(test_set[index][0][None])[0]
        expected = logits.softmax(dim=0)
        for prediction in result["predictions"]:
            assert abs(prediction["probability"] - expected[prediction["index"]].item()) <= (
                2 * FORWARD_RTOL * logits.abs().max().item() + 1e-7)
    with torch.no_grad():  # the uncut file is another view: the comparison above could tell the difference
        whole = model(eval_transform(paths[0])[None])[0]
        cut = model(test_set[0][0][None])[0]
    assert (whole - cut).abs().max() > 10 * 2 * FORWARD_RTOL * cut.abs().max(), (whole, cut)
