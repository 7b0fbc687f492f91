"""Where a model looks: the evidence for a class over the backbone's last feature map, for any head and backbone.

The evidence at a position p is the map weighted by the class score's gradient there, summed over channels, its
positive part: relu(sum_c A_c(p) dS/dA_c(p)) (gradient x activation: Grad-CAM without Grad-CAM's averaging of the
gradient over positions). For a bilinear head that average would throw away what makes the head second-order:
before its normalisation the score is sum_p x_p' W x_p / HW, and x_p . dS/dx_p = 2 x_p' W x_p / HW is exactly
position p's term of it. For the average head the two methods agree up to the map's scale at each position.

    maps = class_heatmaps(model, images, classes)   # (B, 3, H, W) normalised images, (B,) class indices
    maps.shape                                      # (B, h, w): the backbone map's grid, float32, >= 0
    upsample(maps, (H, W))                          # on the image, bilinear, each scaled to [0, 1]

The attribution comes from captum (PyTorch's interpretability library: LayerGradientXActivation), an optional
extra with light dependencies (pip install captum, or pip install -e ".[explain]"): it hooks the layer, runs the
model and takes the gradient, which we would otherwise write again; grad-cam (pytorch-grad-cam) would do as well
but brings opencv. The method needs only a differentiable path from the backbone's map to the class score, so every pooling head (bilinear, matrix square root, iSQRT-COV, compact,
average) and every backbone (VGG, ResNet, ConvNeXt, a transformer's token grid) is explained the same way. The
model runs in float32 (no autocast), on whatever device it is; its weights get no gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bcnn.errors import UserError

INSTALL = 'pip install captum (or pip install -e ".[explain]")'


def require_captum():
    try:
        from captum.attr import LayerGradientXActivation
    except ImportError:
        raise UserError(f"heatmaps need captum, an optional extra: {INSTALL}.") from None
    return LayerGradientXActivation


def class_heatmaps(model, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Each image's evidence for its class over model.backbone's map: (B, 3, H, W), (B,) -> (B, h, w), >= 0."""
    gradient_x_activation = require_captum()
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), torch.autocast(device_type=images.device.type, enabled=False):
            attributions = gradient_x_activation(model, model.backbone).attribute(
                images.float(), target=classes.to(images.device))  # (B, C, h, w)
    finally:
        model.train(was_training)
    return attributions.detach().float().sum(1).clamp_min(0)  # (B, h, w)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) -> (B, H, W) bilinear, each map scaled to [0, 1] by its maximum (an all-zero map stays zero)."""
    resized = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0].clamp_min(0)
    peak = resized.flatten(1).amax(1).clamp_min(torch.finfo(resized.dtype).tiny).view(-1, 1, 1)
    return resized / peak


def peak_cells(maps: torch.Tensor) -> list[tuple[int, int]]:
    """Each map's (row, column) of its largest value: where it points."""
    width = maps.shape[-1]
    return [divmod(int(index), width) for index in maps.flatten(1).argmax(1)]


def box_in_view(box, image_size: tuple[int, int], resize: int, crop: int) -> tuple[float, float, float, float]:
    """An (x, y, w, h) box of an image of image_size (width, height) in the eval view's pixels, (x0, y0, x1, y1)
    clipped to it: the eval transform's Resize(resize) of the shorter side, then CenterCrop(crop) as torchvision
    places it (offsets rounded)."""
    width, height = image_size
    scale = resize / min(width, height)
    if width <= height:  # the shorter side becomes resize, the longer one its truncated share (torchvision's rule)
        new_width, new_height = resize, int(resize * height / width)
    else:
        new_width, new_height = int(resize * width / height), resize
    left, top = int(round((new_width - crop) / 2.0)), int(round((new_height - crop) / 2.0))
    x, y, w, h = (value * scale for value in box)
    clip = lambda value: min(max(value, 0.0), float(crop))  # noqa: E731
    return clip(x - left), clip(y - top), clip(x + w - left), clip(y + h - top)


def pointing_game(model, loader, boxes: list[tuple[float, float, float, float]], crop: int, device) -> dict:
    """The pointing game (Zhang et al., ECCV 2016) over a loader's images in its order, boxes[i] the i-th image's
    object box in the view (box_in_view): a hit when the centre of the heatmap's peak cell, for the image's true
    class, falls inside the box. Returns hits, images, and the boxes' mean share of the view: what a heatmap that
    points anywhere at random would score."""
    hits, seen, box_share = 0, 0, 0.0
    for images, targets in loader:
        maps = class_heatmaps(model, images.to(device), targets)
        rows, columns = maps.shape[-2:]
        for (row, column), (x0, y0, x1, y1) in zip(peak_cells(maps), boxes[seen:seen + len(images)]):
            x, y = (column + 0.5) * crop / columns, (row + 0.5) * crop / rows
            hits += x0 <= x <= x1 and y0 <= y <= y1
            box_share += (x1 - x0) * (y1 - y0) / crop**2
        seen += len(images)
    return {"hits": hits, "images": seen, "box_share": box_share / max(seen, 1)}


def confusion_gallery(model, dataset, pairs: list[dict], class_names: list[str], device, per_side: int = 4,
                      batch_size: int = 16, num_workers: int = 0) -> list[dict]:
    """For each most-confused pair {"true": A, "predicted": B} (bcnn.metrics.most_confused_pairs), the images of A
    the model calls B and images of B it gets right, at most per_side of each in dataset order, each with its
    probability of B and its evidence for B (upsampled, [0, 1]) on its eval view (the dataset's transform):
    [{"true", "predicted", "count", "confused": [item, ...], "correct": [item, ...]}], item = {"index", "image" (path),
    "probability", "view" (3, H, W) normalised, "heatmap" (H, W)}."""
    index_of = {name: position for position, name in enumerate(class_names)}
    predicted: dict[int, list[tuple[int, int, torch.Tensor]]] = {}  # class -> [(index, prediction, probs)]

    def predictions_of(label: int):
        if label not in predicted:
            members = [index for index, target in enumerate(dataset.targets) if target == label]
            loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, members), batch_size=batch_size,
                                                 num_workers=num_workers)
            rows = []
            with torch.no_grad():
                for images, _ in loader:
                    probabilities = model(images.to(device).float()).float().softmax(1).cpu()
                    rows += list(zip(probabilities.argmax(1).tolist(), probabilities))
            predicted[label] = [(index, guess, probs) for index, (guess, probs) in zip(members, rows)]
        return predicted[label]

    gallery = []
    for pair in pairs:
        true, wrong = index_of[pair["true"]], index_of[pair["predicted"]]
        sides = {"confused": [(index, probs) for index, guess, probs in predictions_of(true) if guess == wrong],
                 "correct": [(index, probs) for index, guess, probs in predictions_of(wrong) if guess == wrong]}
        entry = {"true": pair["true"], "predicted": pair["predicted"], "count": pair["count"]}
        for side, chosen in sides.items():
            chosen = chosen[:per_side]
            items = []
            if chosen:
                views = torch.stack([dataset[index][0] for index, _ in chosen])
                maps = upsample(class_heatmaps(model, views.to(device), torch.full((len(chosen),), wrong)),
                                tuple(views.shape[-2:])).cpu()
                items = [{"index": index, "image": str(dataset.samples[index][0]), "probability": float(probs[wrong]),
                          "view": view, "heatmap": heatmap} for (index, probs), view, heatmap in zip(chosen, views, maps)]
            entry[side] = items
        gallery.append(entry)
    return gallery
