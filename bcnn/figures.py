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
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from bcnn.data import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# matplotlib is imported where a figure is drawn, not with this module: it is 0.4 s of every command's start-up
# (bcnn.train, eval and predict import this module), and a command that draws nothing should not pay it.

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
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties

    renderer = FigureCanvasAgg(Figure(dpi=72)).get_renderer()
    font = FontProperties(size=fontsize)
    widths = [renderer.get_text_width_height_descent(text, font, ismath=False)[0] for text in texts]
    return max(widths, default=0.0) / 72


def _title_inches(title: str) -> float:
    return 0.2 + 0.2 * (title.count("\n") + 1)  # a 10pt line with its spacing is about 0.17 inch


def _tick_labels(class_names: list[str]) -> list[str]:
    return [name.replace("$", r"\$") for name in class_names]  # a lone $ would start matplotlib's mathtext


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=SCREEN_DPI)
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas
    return fig


CONFUSION_COLOUR_LABEL = "share of the true class's images given each predicted class (colours: square-root scale)"


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

    from matplotlib.colors import PowerNorm

    image = ax.imshow(shares, cmap="Blues", norm=PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0), interpolation="nearest")
    ticks = np.arange(num_classes)
    ax.set_xticks(ticks, _tick_labels(class_names), rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, _tick_labels(class_names), fontsize=fontsize)
    ax.tick_params(length=2, pad=1)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=TITLE_FONTSIZE)
    fig.colorbar(image, cax=cax, label=CONFUSION_COLOUR_LABEL)
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
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


FIGURE_SOFTWARE = "bcnn"  # the PNG's Software entry: how a later run knows the file is one bcnn wrote


def save_figure(fig: Figure, path, dpi: int = SAVE_DPI) -> None:
    """A PNG written whole or not at all: drawn into a temporary file beside it, then renamed over it."""
    path = Path(path)
    # The name's first 48 characters (at most 192 bytes): the temporary fits wherever the PNG's own name does (the
    # 255-byte limit of most file systems), whose name bcnn.predict builds from an image's.
    temporary = path.with_name(f".{path.name[:48]}.{os.getpid()}.tmp")
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


EVIDENCE_COLOURS = "RdBu_r"  # diverging, white at zero: red for the class, blue against it
EVIDENCE_OPACITY = 0.8  # of a value of ±1; the overlay fades with |value|, so a zero leaves the image as it is
EVIDENCE_SCALE = "scaled per image to its largest |value|, symmetric about 0"


def _overlay(axes, view: np.ndarray, heatmap) -> None:
    """An image (H, W, 3) in [0, 1] with evidence (H, W) in [-1, 1] (bcnn.explain.upsample) laid over it."""
    heatmap = _numpy(heatmap)
    axes.imshow(view)
    axes.imshow(heatmap, cmap=EVIDENCE_COLOURS, vmin=-1.0, vmax=1.0,
                alpha=EVIDENCE_OPACITY * np.clip(np.abs(heatmap), 0.0, 1.0))


def _evidence_colorbar(fig, cax, label: str, orientation: str = "vertical"):
    """The overlay's colour scale, -1 to 1, at full opacity, its ends named."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    scale = ScalarMappable(norm=Normalize(vmin=-1.0, vmax=1.0), cmap=EVIDENCE_COLOURS)
    bar = fig.colorbar(scale, cax=cax, orientation=orientation)
    bar.set_ticks([-1.0, 0.0, 1.0], labels=["-1: against", "0", "+1: for"], fontsize=6)
    bar.set_label(label, fontsize=7)
    return bar


def _frameless(axes) -> None:
    """No ticks and no frame, but room for a y label (set_axis_off would hide it)."""
    axes.set_xticks([])
    axes.set_yticks([])
    for spine in axes.spines.values():
        spine.set_visible(False)


def explanation_figure(image: np.ndarray, heatmap: np.ndarray, title: str, lines: list[str],
                       scale: float | None = None) -> Figure:
    """An image (H, W, 3) in [0, 1] beside itself with a class's evidence (H, W) in [-1, 1] (bcnn.explain.upsample)
    laid over it, a colour bar saying what the colours are (scale: the largest |value| on the grid, the ±1 of the
    bar, in logit units), a title above and lines of text (the top-k classes) below."""
    height, width = image.shape[:2]
    panel, bar = 3.2, 1.3  # inches per image; the colour bar with its ticks and label
    image_inches = panel * height / width
    text_inches = 0.22 * (len(lines) + 1)
    fig_width, fig_height = 2 * panel + bar, image_inches + text_inches + 0.4
    fig = _new_figure(fig_width, fig_height)
    bottom = (text_inches + 0.05) / fig_height
    for column, overlay in enumerate((False, True)):
        axes = fig.add_axes([(column * panel + 0.05) / fig_width, bottom, (panel - 0.1) / fig_width,
                             image_inches / fig_height])
        if overlay:
            _overlay(axes, image, heatmap)
        else:
            axes.imshow(image)
        axes.set_axis_off()
    cax = fig.add_axes([(2 * panel + 0.05) / fig_width, bottom + 0.1 * image_inches / fig_height, 0.15 / fig_width,
                        0.8 * image_inches / fig_height])
    largest = f"±{scale:.3g} logit, its largest |value|" if scale is not None else "its largest |value|"
    _evidence_colorbar(fig, cax, "evidence (gradient × activation): the score's\nchange as a position's features "
                                 f"are scaled;\nscale per image, symmetric about 0:\n±1 = {largest}")
    fig.suptitle(title, fontsize=TITLE_FONTSIZE, y=0.99)
    fig.text(0.02, 0.02, "\n".join(lines), fontsize=8, family="monospace", va="bottom")
    return fig


def confusion_gallery_figure(gallery: list[dict], normalisation, title: str, per_side: int = 4) -> Figure:
    """Two rows per confused pair, A called B (bcnn.explain.confusion_gallery): on the left the images of A called
    B with the evidence for B over them, and below the same images with the evidence for A; right of the top row,
    images of B called B with the evidence for B, drawn at the first pair that names B (a later pair points to it).
    p(class) above each image, and one colour bar."""
    cell, step, label, middle = 1.2, 1.3, 0.4, 0.3  # inches: an image, image to image, the row labels, the halves
    block_title, caption, header = 0.35, 0.2, 1.7
    block = block_title + 2 * (caption + cell) + 0.15
    width = label + 2 * per_side * step + middle
    height = header + len(gallery) * block
    fig = _new_figure(width, height)
    fig.suptitle(title, fontsize=TITLE_FONTSIZE)
    bar_axes = fig.add_axes(((width / 2 - 2.5) / width, (height - header + 0.45) / height, 5.0 / width, 0.12 / height))
    bar = _evidence_colorbar(fig, bar_axes, "evidence for the class named left of each row (gradient × activation), "
                             f"{EVIDENCE_SCALE}", orientation="horizontal")
    bar.ax.xaxis.set_label_position("top")

    def cell_axes(top: float, column: int):
        left = label + column * step + (middle if column >= per_side else 0.0)
        return fig.add_axes((left / width, (top - caption - cell) / height, cell / width, cell / height))

    shown_at: dict[str, int] = {}  # class B -> the pair whose row shows B's own images
    for number, entry in enumerate(gallery, start=1):
        true, wrong = entry["true"], entry["predicted"]
        top = height - header - (number - 1) * block  # inches from the bottom
        fig.text(0.1 / width, (top - 0.1) / height, f"{number}. {true} called {wrong} ({len(entry['confused'])} of "
                 f"{entry['count']} shown): the evidence for {wrong} above, for {true} below; right: {wrong} called "
                 f"{wrong}", fontsize=7, va="top", weight="bold")
        rows = (("heatmap", "probability", wrong, "predicted"), ("heatmap_true", "probability_true", true, "true"))
        for row, (heatmap, probability, name, role) in enumerate(rows):
            row_top = top - block_title - row * (caption + cell)
            for column, item in enumerate(entry["confused"][:per_side]):
                axes = cell_axes(row_top, column)
                _draw_cell(axes, item, heatmap, f"p({role})={item[probability]:.2f}", normalisation)
                if column == 0:
                    axes.set_ylabel(f"for {name}\n({role})", fontsize=6)
        right_top = top - block_title
        if wrong in shown_at or not entry["correct"]:
            note = (f"{wrong} called {wrong}: as in pair {shown_at[wrong]} above" if wrong in shown_at
                    else f"no image of {wrong} was called {wrong}")
            fig.text((label + per_side * step + middle) / width, (right_top - caption - cell / 2) / height, note,
                     fontsize=7, va="center")
        else:
            for column, item in enumerate(entry["correct"][:per_side]):
                axes = cell_axes(right_top, per_side + column)
                _draw_cell(axes, item, "heatmap", f"p={item['probability']:.2f}", normalisation)
                if column == 0:
                    axes.set_ylabel(f"for {wrong}", fontsize=6)
        shown_at.setdefault(wrong, number)
    return fig


def _draw_cell(axes, item: dict, heatmap: str, caption: str, normalisation) -> None:
    _frameless(axes)
    _overlay(axes, denormalize(item["view"], normalisation).permute(1, 2, 0).numpy(), item[heatmap])
    axes.set_title(caption, fontsize=6, pad=2)


def heatmap_grid_figure(views: torch.Tensor, heatmaps: torch.Tensor, titles: list[str], normalisation,
                        title: str, columns: int = 8) -> Figure:
    """Images (N, 3, H, W) normalised, each with its evidence (N, H, W) in [-1, 1] laid over it and a title, and a
    colour bar below."""
    cell, rows, bar = 1.3, -(-len(views) // columns), 0.7
    height = rows * (cell + 0.3) + 0.4 + bar
    fig = _new_figure(columns * cell, height)
    fig.subplots_adjust(bottom=bar / height, top=1 - 0.4 / height)
    fig.suptitle(title, fontsize=TITLE_FONTSIZE)
    for index, (view, heatmap, name) in enumerate(zip(views, heatmaps, titles)):
        axes = fig.add_subplot(rows, columns, index + 1)
        _overlay(axes, denormalize(view.cpu(), normalisation).permute(1, 2, 0).numpy(), heatmap)
        axes.set_title(name, fontsize=5, pad=2)
        axes.set_axis_off()
    colour_bar = _evidence_colorbar(fig, fig.add_axes((0.3, 0.25 / height, 0.4, 0.12 / height)),
                                    f"evidence for the class above each image (gradient × activation), "
                                    f"{EVIDENCE_SCALE}", orientation="horizontal")
    colour_bar.ax.xaxis.set_label_position("top")
    return fig


def denormalize(images: torch.Tensor, normalisation=(IMAGENET_MEAN, IMAGENET_STD)) -> torch.Tensor:
    """Undo Normalize(mean, std): (B, 3, H, W) or (3, H, W) -> the same in [0, 1]."""
    mean = images.new_tensor(normalisation[0]).view(3, 1, 1)
    std = images.new_tensor(normalisation[1]).view(3, 1, 1)
    return (images * std + mean).clamp(0.0, 1.0)
