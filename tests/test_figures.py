"""bcnn.figures: the tables against hand-counted answers, 200-class figures that stay legible, denormalize
against torchvision's Normalize, and a matplotlib left as the user set it up."""

import os
import random
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from bcnn.data import IMAGENET_MEAN, IMAGENET_STD
from bcnn.figures import (confusion_figure, confusion_gallery_figure, denormalize, explanation_figure, figure_to_array,
                          heatmap_grid_figure, per_class_accuracy_figure, save_figure)
from bcnn.metrics import most_confused_pairs, per_class_rows

REPO = Path(__file__).resolve().parent.parent
NAMES = ["Least Auklet", "Parakeet Auklet", "Crested Auklet", "Whiskered Auklet"]
# [true, predicted]; Whiskered Auklet has no images.
CONFUSION = [[6, 3, 1, 0],
             [1, 3, 1, 0],
             [3, 0, 3, 0],
             [0, 0, 0, 0]]
MANY = 200
MIN_PIXELS_PER_LABEL = 7


@pytest.mark.parametrize("as_type", [np.array, torch.tensor])
def test_most_confused_pairs_by_count_then_share_then_name(as_type):
    pairs = most_confused_pairs(as_type(CONFUSION), NAMES)
    assert pairs == [
        {"true": "Crested Auklet", "predicted": "Least Auklet", "count": 3, "share": pytest.approx(3 / 6)},
        {"true": "Least Auklet", "predicted": "Parakeet Auklet", "count": 3, "share": pytest.approx(3 / 10)},
        {"true": "Parakeet Auklet", "predicted": "Crested Auklet", "count": 1, "share": pytest.approx(1 / 5)},
        {"true": "Parakeet Auklet", "predicted": "Least Auklet", "count": 1, "share": pytest.approx(1 / 5)},
        {"true": "Least Auklet", "predicted": "Crested Auklet", "count": 1, "share": pytest.approx(1 / 10)},
    ]
    assert most_confused_pairs(as_type(CONFUSION), NAMES, k=2) == pairs[:2]
    assert all(isinstance(pair["count"], int) and isinstance(pair["share"], float) for pair in pairs)
    assert most_confused_pairs(np.diag([4, 5, 6, 0]), NAMES) == []


@pytest.mark.parametrize("as_type", [np.array, torch.tensor])
def test_per_class_rows(as_type):
    assert per_class_rows(as_type(CONFUSION), NAMES) == [
        {"index": 0, "class": "Least Auklet", "images": 10, "correct": 6, "accuracy": pytest.approx(60.0)},
        {"index": 1, "class": "Parakeet Auklet", "images": 5, "correct": 3, "accuracy": pytest.approx(60.0)},
        {"index": 2, "class": "Crested Auklet", "images": 6, "correct": 3, "accuracy": pytest.approx(50.0)},
        {"index": 3, "class": "Whiskered Auklet", "images": 0, "correct": 0, "accuracy": None},
    ]


@pytest.fixture(scope="module")
def many_classes():
    """200 classes with CUB-length random names, ~75% right, and class 0 without images."""
    rng, names_rng = np.random.default_rng(0), random.Random(0)
    names = ["".join(names_rng.choices(string.ascii_letters + "_", k=names_rng.randint(8, 30))) for _ in range(MANY)]
    true = rng.integers(0, MANY, 30 * MANY)
    predicted = np.where(rng.random(true.size) < 0.75, true, rng.integers(0, MANY, true.size))
    confusion = np.zeros((MANY, MANY), dtype=np.int64)
    np.add.at(confusion, (true, predicted), 1)
    confusion[0] = 0
    return torch.from_numpy(confusion), names


def test_confusion_figure_for_200_classes_is_row_normalised_and_legible(many_classes, tmp_path):
    confusion, names = many_classes
    fig = confusion_figure(confusion, names, "200 classes")
    heatmap = fig.axes[0]
    assert [label.get_text() for label in heatmap.get_xticklabels()] == names
    assert [label.get_text() for label in heatmap.get_yticklabels()] == names
    assert heatmap.get_xlabel() == "predicted class" and heatmap.get_ylabel() == "true class"
    shares = np.asarray(heatmap.images[0].get_array())
    expected_sums = np.where(confusion.sum(1).numpy() > 0, 1.0, 0.0)  # the empty class 0 is an all-zero row
    np.testing.assert_allclose(shares.sum(1), expected_sums, atol=1e-9)  # float64 sums of 200 shares: 200 * 2^-53
    assert len(fig.axes) == 2, "a colorbar"
    colour_bar = fig.axes[1]  # what a colour counts: the share of the true class's images, 0 to 1, as drawn
    assert colour_bar.get_ylabel().startswith("share of the true class's images") and "square-root" in \
        colour_bar.get_ylabel()
    assert (heatmap.images[0].norm.vmin, heatmap.images[0].norm.vmax) == (0.0, 1.0)

    pixels = figure_to_array(fig)
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
    height, width, _ = pixels.shape
    assert min(height, width) >= MANY * MIN_PIXELS_PER_LABEL
    assert pixels.min() < 100 < 200 < pixels.max(), "something was drawn"

    save_figure(fig, tmp_path / "confusion.png")
    with Image.open(tmp_path / "confusion.png") as png:
        assert png.format == "PNG" and min(png.size) >= MANY * 1.5 * MIN_PIXELS_PER_LABEL  # saved at 150 dpi


def test_per_class_figure_puts_the_worst_class_on_top_and_omits_empty_ones(many_classes):
    confusion, names = many_classes
    correct, total = confusion.diagonal(), confusion.sum(1)
    fig = per_class_accuracy_figure(correct, total, names, "200 classes")
    labels = [label.get_text() for label in fig.axes[0].get_yticklabels()]
    accuracy = {name: c / t for name, c, t in zip(names, correct.tolist(), total.tolist()) if t}
    assert len(labels) == MANY - 1 and names[0] not in labels
    assert labels[0] == min(accuracy, key=accuracy.get)
    assert labels[-1] == max(accuracy, key=accuracy.get)
    assert fig.axes[0].yaxis_inverted(), "row 0 is at the top"
    height, width, _ = figure_to_array(fig).shape
    assert height >= MANY * MIN_PIXELS_PER_LABEL


def test_small_figures_with_an_empty_class():
    for fig in (confusion_figure(torch.tensor(CONFUSION), NAMES, "four"),
                per_class_accuracy_figure([6, 3, 3, 0], [10, 5, 6, 0], NAMES, "four")):
        assert figure_to_array(fig).shape[2] == 3
    assert per_class_accuracy_figure([0], [0], ["nobody"], "no images at all").axes


def test_denormalize_inverts_imagenet_normalize():
    images = torch.rand(2, 3, 16, 12)
    normalized = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(images)
    # 4 float32 roundings there and back, on values up to 2.7: at most 4 * 2.7 * 2^-24 = 6.4e-7
    torch.testing.assert_close(denormalize(normalized), images, atol=1e-6, rtol=0)
    torch.testing.assert_close(denormalize(normalized[0]), images[0], atol=1e-6, rtol=0)
    assert denormalize(torch.full((1, 3, 2, 2), 50.0)).eq(1).all()
    assert denormalize(torch.full((1, 3, 2, 2), -50.0)).eq(0).all()


def test_figures_leave_the_users_matplotlib_alone(tmp_path):
    """With a user's backend set (svg here), making and saving figures neither switches it nor imports pyplot
    (so no pyplot figure can exist)."""
    code = (
        "import sys, matplotlib\n"
        "before = matplotlib.get_backend()\n"
        "from bcnn import figures\n"
        "fig = figures.confusion_figure([[2, 1], [0, 3]], ['a', 'b'], 't')\n"
        "figures.figure_to_array(fig)\n"
        "figures.save_figure(fig, sys.argv[1])\n"
        "figures.figure_to_array(figures.per_class_accuracy_figure([2, 3], [3, 3], ['a', 'b'], 't'))\n"
        "print(before, matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.png")], capture_output=True, text=True,
                            cwd=REPO, env={**os.environ, "MPLBACKEND": "svg"}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["svg", "svg", "False"]
    assert (tmp_path / "a.png").read_bytes().startswith(b"\x89PNG")


def _panel(fig, axes) -> np.ndarray:
    """The pixels of one axes of a drawn figure, (h, w, 3) int."""
    pixels = figure_to_array(fig).astype(int)
    box = axes.get_window_extent()
    height = pixels.shape[0]
    return pixels[int(height - box.y1) + 2: int(height - box.y0) - 2, int(box.x0) + 2: int(box.x1) - 2]


def test_the_explanation_is_red_for_the_class_blue_against_and_untouched_at_zero_with_a_labelled_scale():
    grey = np.full((32, 32, 3), 0.5)
    panels = {}
    for value in (0.0, 1.0, -1.0):
        fig = explanation_figure(grey, np.full((32, 32), value), "title", ["50.00%  A"], scale=0.031)
        plain, overlay = (_panel(fig, axes) for axes in fig.axes[:2])
        panels[value] = overlay.reshape(-1, 3).mean(0) - plain.reshape(-1, 3).mean(0)  # RGB shift the overlay makes
    assert np.abs(panels[0.0]).max() == 0  # zero evidence: the image as it is
    red, green, blue = panels[1.0]
    assert red > blue + 20 and red > green  # +1, for the class: red
    red, green, blue = panels[-1.0]
    assert blue > red + 20  # -1, against it: blue
    colour_bar = fig.axes[2]
    label = colour_bar.get_ylabel()
    assert "gradient × activation" in label and "scale per image, symmetric about 0" in label and "±0.031" in label
    assert colour_bar.get_ylim() == (-1.0, 1.0)
    assert [tick.get_text() for tick in colour_bar.get_yticklabels()] == ["-1: against", "0", "+1: for"]


def _item(image: str, heatmap: float, heatmap_true: float | None = None) -> dict:
    item = {"image": image, "probability": 0.6, "view": torch.zeros(3, 16, 16),
            "heatmap": torch.full((16, 16), heatmap)}
    if heatmap_true is not None:
        item.update(probability_true=0.3, heatmap_true=torch.full((16, 16), heatmap_true))
    return item


def test_the_gallery_shows_the_true_class_s_evidence_below_and_a_class_s_own_images_once():
    # A -> B and C -> B share B: B's correctly classified images are drawn once, at the first pair; B -> A draws A's.
    correct_b = [_item(f"b{i}.jpg", 0.75) for i in range(3)]
    gallery = [{"true": "A", "predicted": "B", "count": 3, "confused": [_item("a1.jpg", 0.5, -0.25),
                                                                        _item("a2.jpg", 0.5, -0.25)],
                "correct": correct_b},
               {"true": "C", "predicted": "B", "count": 1, "confused": [_item("c1.jpg", 0.5, -0.25)],
                "correct": correct_b},
               {"true": "B", "predicted": "A", "count": 1, "confused": [_item("b9.jpg", 0.5, -0.25)],
                "correct": [_item("a5.jpg", 0.75)]}]
    fig = confusion_gallery_figure(gallery, (IMAGENET_MEAN, IMAGENET_STD), "gallery", per_side=4)
    cells = [axes for axes in fig.axes if axes.images]
    overlays = {}
    for axes in cells:
        kind = axes.get_title().split("=")[0]
        overlays.setdefault(kind, []).append(float(np.asarray(axes.images[1].get_array()).mean()))
    assert overlays == {"p(predicted)": [0.5] * 4, "p(true)": [-0.25] * 4, "p": [0.75] * 4}  # 3 of B's, 1 of A's
    assert any("as in pair 1 above" in text.get_text() for text in fig.texts)
    labels = [axes.get_ylabel() for axes in cells if axes.get_ylabel()]
    assert labels == ["for B\n(predicted)", "for A\n(true)", "for B", "for B\n(predicted)", "for C\n(true)",
                      "for A\n(predicted)", "for B\n(true)", "for A"]
    colour_bars = [axes for axes in fig.axes if not axes.images and axes.get_xlabel()]
    assert len(colour_bars) == 1 and "scaled per image to its largest |value|, symmetric about 0" in \
        colour_bars[0].get_xlabel()
    assert figure_to_array(fig).shape[2] == 3


def test_the_tensorboard_heatmap_grid_has_a_labelled_symmetric_scale():
    fig = heatmap_grid_figure(torch.zeros(3, 3, 16, 16), torch.linspace(-1, 1, 3 * 16 * 16).view(3, 16, 16),
                              ["a", "b", "c"], (IMAGENET_MEAN, IMAGENET_STD), "val", columns=8)
    bar = fig.axes[-1]
    assert "symmetric about 0" in bar.get_xlabel() and bar.get_xlim() == (-1.0, 1.0)
    assert figure_to_array(fig).shape[2] == 3
