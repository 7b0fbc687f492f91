"""Figures and tables of a classifier's results: confusion matrix, per-class accuracy, augmented images.

    fig = confusion_figure(confusion, class_names, "test, stage 2")   # confusion: (C, C) counts [true, predicted]
    save_figure(fig, "runs/cub_vgg16_stage2/eval_best_test_confusion.png")
    writer.add_image("val/confusion", figure_to_array(fig), epoch, dataformats="HWC")
    writer.add_images("train/augmented", denormalize(images[:16]), step)

Figures are built on matplotlib's Figure with an Agg canvas, not pyplot: no display is needed, pyplot's
global figure list and the user's chosen backend stay untouched, and nothing leaks if a figure is dropped.
Every class name is a tick label, so sizes grow with the number of classes (200 for CUB).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties

from bcnn.data import IMAGENET_MEAN, IMAGENET_STD

SCREEN_DPI = 100  # figure_to_array's resolution: 200 classes at 0.12 inch -> 12 px per label
SAVE_DPI = 150  # PNG files: 18 px per label, so 5pt names stay legible when zoomed
INCHES_PER_CLASS = 0.12
MIN_PLOT_INCHES = 6.0
TITLE_FONTSIZE = 10


def _numpy(values) -> np.ndarray:
    return values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)


def _label_fontsize(inches_per_label: float) -> float:
    # 60% of the row pitch keeps neighbouring names apart: 5.2pt at 0.12 inch (200 classes), capped at 10pt.
    return float(np.clip(0.6 * 72 * inches_per_label, 4.0, 10.0))


def _widest_text_inches(texts: list[str], fontsize: float) -> float:
    """Measured with the Agg renderer, so the margins fit the longest class name exactly."""
    renderer = FigureCanvasAgg(Figure(dpi=72)).get_renderer()
    font = FontProperties(size=fontsize)
    widths = [renderer.get_text_width_height_descent(text, font, ismath=False)[0] for text in texts]
    return max(widths, default=0.0) / 72


def _title_inches(title: str) -> float:
    return 0.2 + 0.2 * (title.count("\n") + 1)  # a 10pt line with its spacing is about 0.17 inch


def _tick_labels(class_names: list[str]) -> list[str]:
    return [name.replace("$", r"\$") for name in class_names]  # a lone $ would start matplotlib's mathtext


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=SCREEN_DPI)
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas
    return fig


def confusion_figure(confusion, class_names: list[str], title: str) -> Figure:
    """Heatmap of the row-normalised confusion matrix: row i is where true class i's images went (the diagonal
    is the per-class recall); a class without images is an all-zero row. Colours follow the square root of
    the share, so a confusion of 1 image in 30 still shows beside a diagonal near 1."""
    counts = _numpy(confusion).astype(np.float64)  # (C, C) [true, predicted]
    num_classes = len(class_names)
    if counts.shape != (num_classes, num_classes):
        raise ValueError(f"confusion has shape {counts.shape}, expected ({num_classes}, {num_classes})")
    images = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, images, out=np.zeros_like(counts), where=images > 0)

    plot_inches = max(MIN_PLOT_INCHES, INCHES_PER_CLASS * num_classes)
    fontsize = _label_fontsize(plot_inches / max(num_classes, 1))
    labels_inches = _widest_text_inches(class_names, fontsize) + 0.1
    left, bottom, top, colorbar = labels_inches + 0.45, labels_inches + 0.45, _title_inches(title), 1.0
    width, height = left + plot_inches + colorbar, bottom + plot_inches + top
    fig = _new_figure(width, height)
    ax = fig.add_axes((left / width, bottom / height, plot_inches / width, plot_inches / height))
    cax = fig.add_axes(((left + plot_inches + 0.15) / width, bottom / height, 0.2 / width, plot_inches / height))

    image = ax.imshow(shares, cmap="Blues", norm=PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0), interpolation="nearest")
    ticks = np.arange(num_classes)
    ax.set_xticks(ticks, _tick_labels(class_names), rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, _tick_labels(class_names), fontsize=fontsize)
    ax.tick_params(length=2, pad=1)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=TITLE_FONTSIZE)
    fig.colorbar(image, cax=cax, label="share of the true class's images")
    if num_classes <= 20:  # few classes: the numbers themselves fit in the cells
        for (row, column), share in np.ndenumerate(shares):
            if counts[row, column]:
                ax.text(column, row, f"{share:.2f}", ha="center", va="center", fontsize=fontsize,
                        color="white" if share > 0.5 else "black")
    return fig


def per_class_accuracy_figure(correct, total, class_names: list[str], title: str) -> Figure:
    """Horizontal bars of each class's accuracy, worst at the top, with the mean per-class accuracy as a
    dashed line; classes without images are left out (they have no accuracy)."""
    correct, total = _numpy(correct).astype(np.float64), _numpy(total).astype(np.float64)
    present = np.flatnonzero(total > 0)
    accuracy = 100 * correct[present] / total[present]
    order = sorted(range(len(present)), key=lambda i: (accuracy[i], class_names[present[i]]))
    names = [class_names[present[i]] for i in order]
    values = accuracy[order]

    plot_height = max(3.0, INCHES_PER_CLASS * len(names))
    fontsize = _label_fontsize(plot_height / max(len(names), 1))
    left, bottom, plot_width = _widest_text_inches(names, fontsize) + 0.55, 0.6, 6.0
    top = _title_inches(title) + 0.3  # the x scale is repeated above the bars
    width, height = left + plot_width + 0.3, bottom + plot_height + top
    fig = _new_figure(width, height)
    ax = fig.add_axes((left / width, bottom / height, plot_width / width, plot_height / height))

    rows = np.arange(len(names))
    ax.barh(rows, values, height=0.8, color="tab:blue")
    ax.set_yticks(rows, _tick_labels(names), fontsize=fontsize)
    ax.set_ylim(max(len(names), 1) - 0.5, -0.5)  # row 0, the worst class, at the top
    ax.set_xlim(0, 100)
    ax.tick_params(axis="y", length=2, pad=1)
    ax.tick_params(axis="x", top=True, labeltop=True)  # a tall figure needs its scale at both ends
    ax.grid(axis="x", alpha=0.3)
    ax.set_xlabel("accuracy (%)")
    if len(names):
        mean = float(values.mean())
        ax.axvline(mean, color="tab:red", linestyle="--", linewidth=1)
        # Top right of the line: the rows there are the worst classes, whose bars end left of the mean.
        ax.annotate(f"mean per-class {mean:.1f}%", xy=(mean, 1), xycoords=("data", "axes fraction"),
                    xytext=(3, -3), textcoords="offset points", va="top", color="tab:red", fontsize=8)
    ax.set_title(title, fontsize=TITLE_FONTSIZE, pad=22)
    return fig


def figure_to_array(fig: Figure) -> np.ndarray:
    """(H, W, 3) uint8 RGB, for TensorBoard's add_image(..., dataformats="HWC")."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


FIGURE_SOFTWARE = "bcnn"  # the PNG's Software entry: how a later run knows the file is one bcnn wrote


def save_figure(fig: Figure, path, dpi: int = SAVE_DPI) -> None:
    """A PNG written whole or not at all: drawn into a temporary file beside it, then renamed over it."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(temporary, dpi=dpi, format="png", metadata={"Software": FIGURE_SOFTWARE})
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def is_bcnn_figure(path) -> bool:
    """Whether the PNG at path is a figure save_figure wrote (its Software entry), so it may be replaced."""
    try:
        with Image.open(path) as image:
            return image.format == "PNG" and image.info.get("Software") == FIGURE_SOFTWARE
    except OSError:
        return False


def explanation_figure(image: np.ndarray, heatmap: np.ndarray, title: str, lines: list[str]) -> Figure:
    """An image (H, W, 3) in [0, 1] beside itself with a heatmap (H, W) in [0, 1] laid over it, a title above and
    lines of text (the top-k classes) below."""
    height, width = image.shape[:2]
    panel = 3.2  # inches per image
    text_inches = 0.22 * (len(lines) + 1)
    fig = _new_figure(2 * panel, panel * height / width + text_inches + 0.4)
    for column, overlay in enumerate((False, True)):
        axes = fig.add_axes([column / 2 + 0.01, (text_inches + 0.05) / fig.get_figheight(), 0.48,
                             panel * height / width / fig.get_figheight()])
        axes.imshow(image)
        if overlay:
            axes.imshow(heatmap, cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
        axes.set_axis_off()
    fig.suptitle(title, fontsize=TITLE_FONTSIZE, y=0.99)
    fig.text(0.02, 0.02, "\n".join(lines), fontsize=8, family="monospace", va="bottom")
    return fig


def confusion_gallery_figure(gallery: list[dict], normalisation, title: str, per_side: int = 4) -> Figure:
    """One row per confused pair (bcnn.explain.confusion_gallery): on the left the images of A called B, on the
    right images of B called B, each with the evidence for B laid over it and p(B) above it."""
    cell = 1.3  # inches per image
    fig = _new_figure(2 * per_side * cell, len(gallery) * (cell + 0.5) + 0.9)
    fig.suptitle(title, fontsize=TITLE_FONTSIZE)
    rows = fig.subfigures(len(gallery) + 1, 1, height_ratios=[0.9] + [cell + 0.5] * len(gallery))[1:]
    for row, entry in zip(rows, gallery):
        row.suptitle(f"left: {entry['true']} called {entry['predicted']} ({len(entry['confused'])} of "
                     f"{entry['count']} shown)   "
                     f"right: {entry['predicted']} called {entry['predicted']}; the evidence for "
                     f"{entry['predicted']} on each", fontsize=7)
        cells = row.subplots(1, 2 * per_side)
        for side, offset in (("confused", 0), ("correct", per_side)):
            for column in range(per_side):
                axes = cells[offset + column]
                axes.set_axis_off()
                if column < len(entry[side]):
                    item = entry[side][column]
                    axes.imshow(denormalize(item["view"], normalisation).permute(1, 2, 0).numpy())
                    axes.imshow(_numpy(item["heatmap"]), cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
                    axes.set_title(f"p={item['probability']:.2f}", fontsize=6, pad=2)
    return fig


def heatmap_grid_figure(views: torch.Tensor, heatmaps: torch.Tensor, titles: list[str], normalisation,
                        title: str, columns: int = 8) -> Figure:
    """Images (N, 3, H, W) normalised, each with its heatmap (N, H, W) in [0, 1] laid over it and a title."""
    cell, rows = 1.3, -(-len(views) // columns)
    fig = _new_figure(columns * cell, rows * (cell + 0.3) + 0.4)
    fig.suptitle(title, fontsize=TITLE_FONTSIZE)
    for index, (view, heatmap, name) in enumerate(zip(views, heatmaps, titles)):
        axes = fig.add_subplot(rows, columns, index + 1)
        axes.imshow(denormalize(view.cpu(), normalisation).permute(1, 2, 0).numpy())
        axes.imshow(_numpy(heatmap), cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
        axes.set_title(name, fontsize=5, pad=2)
        axes.set_axis_off()
    return fig


def denormalize(images: torch.Tensor, normalisation=(IMAGENET_MEAN, IMAGENET_STD)) -> torch.Tensor:
    """Undo Normalize(mean, std): (B, 3, H, W) or (3, H, W) -> the same in [0, 1]."""
    mean = images.new_tensor(normalisation[0]).view(3, 1, 1)
    std = images.new_tensor(normalisation[1]).view(3, 1, 1)
    return (images * std + mean).clamp(0.0, 1.0)
