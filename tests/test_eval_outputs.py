"""What `python -m bcnn.eval` writes beside its JSON: the per-class CSV (against a count made here without
bcnn's data code), the confusion and per-class PNGs, the most confused pairs printed by name, and --no-figures;
and what it never replaces: any file an evaluation did not write.

The checkpoint is an untrained demo model on a 3-class mini-CUB: its predictions are poor, which is what
gives the confusion matrix something to show. Its seed is one whose guesses spread over all three classes,
so per-class counts differ from class to class and there are several confused pairs.
"""

import contextlib
import csv
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from bcnn import eval as eval_cli
from bcnn.checkpoint import save_checkpoint
from bcnn.config import config_to_dict, load_config
from bcnn.data import IMAGENET_MEAN, IMAGENET_STD, build_dataset, write_synthetic_cub
from bcnn.errors import UserError
from bcnn.models import build_model
from helpers.runs import run_in_process

REPO = Path(__file__).resolve().parent.parent
STAGE1 = str(REPO / "experiments" / "demo_stage1.yaml")
CLASSES = 3
CSV_HEADER = ["index", "class", "images", "correct", "accuracy"]


def read_table(cub: Path, name: str) -> dict:
    return dict(line.split(maxsplit=1) for line in (cub / name).read_text().splitlines() if line.strip())


def independent_count(model, cub: Path, resize: int, crop: int) -> dict:
    """{label: [images, correct]} over the official test split, read from the CUB text files and classified
    with the eval transform written out here."""
    paths, labels = read_table(cub, "images.txt"), read_table(cub, "image_class_labels.txt")
    test_ids = [image_id for image_id, flag in read_table(cub, "train_test_split.txt").items() if flag == "0"]
    transform = T.Compose([T.Resize(resize), T.CenterCrop(crop), T.ToTensor(),
                           T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    images = []
    for image_id in test_ids:
        with Image.open(cub / "images" / paths[image_id]) as image:
            images.append(transform(image.convert("RGB")))
    with torch.no_grad():
        predicted = model.eval()(torch.stack(images)).argmax(1).tolist()
    counts = {label: [0, 0] for label in range(CLASSES)}
    for image_id, guess in zip(test_ids, predicted):
        label = int(labels[image_id]) - 1
        counts[label][0] += 1
        counts[label][1] += int(guess == label)
    return counts


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == CSV_HEADER
        return list(reader)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """An untrained checkpoint, evaluated in-process with the default outputs; its stdout and what it counts."""
    root = tmp_path_factory.mktemp("eval_outputs")
    cub = write_synthetic_cub(root / "cub", classes=CLASSES, per_class=6, seed=0)
    cfg = load_config(STAGE1, ["--data.crop=32", "--data.resize=40", f"--data.root={cub}"])
    torch.manual_seed(3)
    model = build_model(cfg.model, CLASSES, input_size=cfg.data.crop)
    classes = build_dataset(cfg.data, "test").classes
    checkpoint = root / "run" / "best.pt"
    save_checkpoint({"model": model.state_dict(), "config": config_to_dict(cfg), "classes": classes, "epoch": 1,
                     "metrics": {}}, checkpoint)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        eval_cli.main(["--checkpoint", str(checkpoint), "--device=cpu"])
    return {"checkpoint": checkpoint, "cub": cub, "classes": classes, "stdout": stdout.getvalue(),
            "expected": independent_count(model, cub, resize=40, crop=32)}


def test_per_class_csv_equals_an_independent_count(evaluated):
    rows = read_csv(evaluated["checkpoint"].parent / "eval_best_test_per_class.csv")
    expected = evaluated["expected"]
    assert [int(row["index"]) for row in rows] == list(range(CLASSES))
    assert [row["class"] for row in rows] == evaluated["classes"]
    for row in rows:
        images, correct = expected[int(row["index"])]
        assert (int(row["images"]), int(row["correct"])) == (images, correct), row
        assert float(row["accuracy"]) == pytest.approx(100 * correct / images, abs=0.005)  # written with 2 decimals
    test_images = sum(flag == "0" for flag in read_table(evaluated["cub"], "train_test_split.txt").values())
    assert sum(int(row["images"]) for row in rows) == test_images


def test_json_keeps_its_numbers_and_adds_the_most_confused_pairs(evaluated):
    report = json.loads((evaluated["checkpoint"].parent / "eval_best_test.json").read_text())
    images = sum(images for images, _ in evaluated["expected"].values())
    correct = sum(correct for _, correct in evaluated["expected"].values())
    assert "confusion" not in report
    assert report["count"] == images and report["top1"] == pytest.approx(100 * correct / images)
    pairs = report["most_confused"]
    assert images > correct, "the untrained model should make mistakes for this test to mean anything"
    # 3 classes have at most 6 off-diagonal cells, all within the 10 kept: together they are every mistake.
    assert sum(pair["count"] for pair in pairs) == images - correct
    for label, (class_images, class_correct) in evaluated["expected"].items():
        name = evaluated["classes"][label]
        assert sum(pair["count"] for pair in pairs if pair["true"] == name) == class_images - class_correct
    assert all(pair["true"] != pair["predicted"] and pair["predicted"] in evaluated["classes"] for pair in pairs)


def test_most_confused_pairs_are_printed_by_name(evaluated):
    report = json.loads((evaluated["checkpoint"].parent / "eval_best_test.json").read_text())
    lines = [line for line in evaluated["stdout"].splitlines() if line.startswith("most confused: ")]
    images = {evaluated["classes"][label]: count[0] for label, count in evaluated["expected"].items()}
    expected = [f"most confused: {pair['true']} -> {pair['predicted']} ({pair['count']} of {images[pair['true']]} "
                f"images, {100 * pair['share']:.1f}%)" for pair in report["most_confused"][:5]]
    assert lines == expected and lines
    accuracy_line = next(i for i, line in enumerate(evaluated["stdout"].splitlines()) if "top-1" in line)
    assert evaluated["stdout"].splitlines()[accuracy_line + 1] == lines[0]


def test_figures_are_written_as_pngs(evaluated):
    for name in ("eval_best_test_confusion.png", "eval_best_test_per_class.png"):
        path = evaluated["checkpoint"].parent / name
        assert f"wrote {path}" in evaluated["stdout"]
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 300


def test_the_command_with_output_and_no_figures(evaluated, tmp_path):
    output = tmp_path / "reports" / "stage1_test.json"
    result = run_in_process(eval_cli.main, "--checkpoint", evaluated["checkpoint"], "--device=cpu",
                            f"--output={output}", "--no-figures")
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(path.name for path in output.parent.iterdir()) == ["stage1_test.json",
                                                                     "stage1_test_per_class.csv"]
    assert read_csv(output.parent / "stage1_test_per_class.csv") == read_csv(
        evaluated["checkpoint"].parent / "eval_best_test_per_class.csv")
    assert "most confused: Synthetic Class" in result.stdout
    assert ".png" not in result.stdout


@pytest.mark.parametrize("target", ["the checkpoint", "last.pt", "config.yaml", "a JSON of the user's",
                                    "a CSV of the user's where the per-class CSV goes", "a PNG where a figure goes"])
def test_eval_never_replaces_a_file_it_did_not_write(evaluated, tmp_path, target):
    checkpoint = evaluated["checkpoint"]
    output, in_the_way = {
        "the checkpoint": (checkpoint, checkpoint),
        "last.pt": (tmp_path / "last.pt",) * 2,
        "config.yaml": (tmp_path / "config.yaml",) * 2,
        "a JSON of the user's": (tmp_path / "notes.json",) * 2,
        "a CSV of the user's where the per-class CSV goes": (tmp_path / "test.json", tmp_path / "test_per_class.csv"),
        "a PNG where a figure goes": (tmp_path / "test.json", tmp_path / "test_confusion.png"),
    }[target]
    if not in_the_way.exists():
        in_the_way.write_bytes(b"\x89PNG the user's own" if in_the_way.suffix == ".png" else
                               b'{"top1": 84.1, "note": "from the paper"}\n')
    before = in_the_way.read_bytes()
    with pytest.raises(UserError, match=rf"^{in_the_way} exists and is not an evaluation's file, so bcnn.eval will "
                                        r"not replace it; pass --output a new file name, or move it away.$"):
        eval_cli.main(["--checkpoint", str(checkpoint), "--device=cpu", f"--output={output}"])
    assert in_the_way.read_bytes() == before


def test_eval_replaces_its_own_files(evaluated, tmp_path, capsys):
    output = tmp_path / "stage1_test.json"
    for _ in range(2):
        eval_cli.main(["--checkpoint", str(evaluated["checkpoint"]), "--device=cpu", f"--output={output}",
                       "--no-figures"])
    assert f"wrote {output.parent / 'stage1_test_per_class.csv'}" in capsys.readouterr().out
    assert json.loads(output.read_text())["count"] == sum(images for images, _ in evaluated["expected"].values())


@pytest.mark.parametrize("option, value, message", [
    ("--num-workers", "-5", "--num-workers must be -1 (from this machine's cores) or at least 0, got -5."),
    ("--batch-size", "0", "--batch-size must be at least 1, got 0."),
])
def test_a_count_out_of_range_is_refused_not_taken_for_the_default(evaluated, option, value, message):
    with pytest.raises(UserError) as error:
        eval_cli.main(["--checkpoint", str(evaluated["checkpoint"]), "--device", "cpu", option, value])
    assert str(error.value) == message
