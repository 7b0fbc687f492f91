"""Where a model looks: the evidence for a class over the backbone's last feature map, for any head and backbone.

What is drawn. The evidence at a position p of the map A (C channels, h x w positions) is gradient x activation
summed over the channels, signed: e(p) = sum_c A_c(p) dS/dA_c(p) = x_p . dS/dx_p, where S is the class's logit and
x_p the C features at p. It is the rate at which S changes as position p's features are scaled (d/dt of S with
x_p -> t x_p, at t = 1): extrapolated linearly, how much the score would drop if p's features were set to zero.
Grad-CAM would average the gradient over positions first, throwing away what makes a bilinear head second-order,
and keep only the positive part; we keep the sign, because for the normalised heads the sign is the message:

- Summed over positions, the evidence is the change of S as the whole map is scaled, sum_p e(p) = d/da S(a A) at
  a = 1 (Euler's theorem for homogeneous functions). The bilinear, matrix square root and compact heads end in an
  L2 normalisation, so S does not change with the map's scale and the evidence sums to zero: it is relative, red
  where a position supports the class more than the image as a whole does, blue where less, and an image whose
  positions all look alike is all zero. Not exactly zero: the signed square root's sqrt(|g| + eps) is not quite
  homogeneous, which leaves 2 to 5% of the logit on the demo's test images (0.027 against a logit of 1.10, say).
- For a head without the normalisation, S = sum_p x_p' W x_p / HW + b (the Gram matrix into the classifier),
  e(p) = 2 x_p' W x_p / HW, twice position p's term, and the evidence sums to 2 (S - b); zeroing p lowers S by
  exactly half of e(p): the term is quadratic in x_p, so the first order is not the whole story. With the
  normalisation, zeroing p lowers S by about half of e(p) where p is a small part of the image.
- For the average head, S is linear in the map and the evidence sums to S - b; zeroing p lowers S by e(p).

Each map is drawn on the image with a diverging colour map centred on zero, divided by its own largest |value|:
the scale is per image, symmetric about zero, so colours compare positions within an image, not images.

    maps = class_heatmaps(model, images, classes)   # (B, 3, H, W) normalised images, (B,) class indices
    maps.shape                                      # (B, h, w): the backbone map's grid, float32, signed
    upsample(maps, (H, W))                          # on the image, bilinear, each divided by its largest |value|

The attribution comes from captum (PyTorch's interpretability library: LayerGradientXActivation), an optional
extra with light dependencies (pip install captum, or pip install -e ".[explain]"): it hooks the layer, runs the
model and takes the gradient, which we would otherwise write again; grad-cam (pytorch-grad-cam) would do as well
but brings opencv. The method needs only a differentiable path from the backbone's map to the class score, so every
pooling head (bilinear, matrix square root, iSQRT-COV, compact, average) and every backbone (VGG, ResNet, ConvNeXt,
a transformer's token grid) is explained the same way. The model runs in float32 (no autocast), on whatever device
it is; its weights get no gradient. Integrated gradients would not remove the cancellation: along a A, a > 0, a
normalised head's score does not change at all.
"""

from __future__ import annotations

import math

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
    """Each image's evidence for its class over model.backbone's map: (B, 3, H, W), (B,) -> (B, h, w), signed."""
    gradient_x_activation = require_captum()
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), torch.autocast(device_type=images.device.type, enabled=False):
            attributions = gradient_x_activation(model, model.backbone).attribute(
                images.float(), target=classes.to(images.device))  # (B, C, h, w)
    finally:
        model.train(was_training)
    return attributions.detach().float().sum(1)  # (B, h, w)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) -> (B, H, W): each map divided by its largest |value| (an all-zero map stays zero), then bilinear,
    so in [-1, 1] with zero at zero: a blend of grid values never leaves their range."""
    peak = maps.flatten(1).abs().amax(1).clamp_min(torch.finfo(maps.dtype).tiny).view(-1, 1, 1)
    resized = F.interpolate((maps / peak)[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return resized.clamp(-1.0, 1.0)  # a blend's rounding may pass 1 by an ulp


def peak_cells(maps: torch.Tensor) -> list[tuple[int, int]]:
    """Each map's (row, column) of its largest value: where the evidence for the class is strongest."""
    width = maps.shape[-1]
    return [divmod(int(index), width) for index in maps.flatten(1).argmax(1)]


FIX_BOX = ("correct it in the dataset's box annotations (CUB, NABirds: bounding_boxes.txt), or evaluate without "
           "--pointing-game")


def box_in_view(box, image_size: tuple[int, int], resize: int, crop: int,
                image: str = "an image") -> tuple[float, float, float, float] | None:
    """An (x, y, w, h) box of an image of image_size (width, height) in the eval view's pixels, (x0, y0, x1, y1)
    clipped to it: the eval transform's Resize(resize) of the shorter side, then CenterCrop(crop) as torchvision
    places it (offsets rounded). What is not a box (not four finite numbers, a width or height not above zero, wholly
    outside the image) is refused in one sentence naming the image (its path). None for a real box that the centre
    crop cuts off whole (an object at the edge of a wide photo): the model never sees it, so it cannot be scored."""
    try:
        x, y, w, h = (float(value) for value in box)
    except (TypeError, ValueError):
        raise UserError(f"the bounding box of {image}, {box!r}, is not four numbers (x, y, width, height); "
                        f"{FIX_BOX}.") from None
    width, height = image_size
    named = f"the bounding box of {image}, (x, y, w, h) = ({x:g}, {y:g}, {w:g}, {h:g}),"
    if not all(math.isfinite(value) for value in (x, y, w, h)):
        raise UserError(f"{named} is not finite; {FIX_BOX}.")
    if w <= 0 or h <= 0:
        sides = " and ".join(f"a {side} of {value:g}" for side, value in (("width", w), ("height", h)) if value <= 0)
        raise UserError(f"{named} has {sides}, so it covers nothing; {FIX_BOX}.")
    if x >= width or y >= height or x + w <= 0 or y + h <= 0:
        raise UserError(f"{named} lies wholly outside the {width} x {height} image; {FIX_BOX}.")
    scale = resize / min(width, height)
    if width <= height:  # the shorter side becomes resize, the longer one its truncated share (torchvision's rule)
        new_width, new_height = resize, int(resize * height / width)
    else:
        new_width, new_height = int(resize * width / height), resize
    left, top = int(round((new_width - crop) / 2.0)), int(round((new_height - crop) / 2.0))
    clip = lambda value: min(max(value, 0.0), float(crop))  # noqa: E731
    x0, y0 = clip(x * scale - left), clip(y * scale - top)
    x1, y1 = clip((x + w) * scale - left), clip((y + h) * scale - top)
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


def _view_box_problem(box, crop: int) -> str | None:
    """What keeps box from being an (x0, y0, x1, y1) box of positive area inside a crop x crop view, or None."""
    try:
        x0, y0, x1, y1 = (float(value) for value in box)
    except (TypeError, ValueError):
        return "is not four numbers (x0, y0, x1, y1)"
    if not all(math.isfinite(value) for value in (x0, y0, x1, y1)):
        return "is not finite"
    if not (0 <= x0 < x1 <= crop and 0 <= y0 < y1 <= crop):
        return f"is not a box of positive area inside the {crop} x {crop} view (0 <= x0 < x1 <= {crop}, same for y)"
    return None


def pointing_game(model, loader, boxes: list[tuple[float, float, float, float] | None], crop: int, device,
                  images: list[str] | None = None) -> dict:
    """The pointing game (Zhang et al., ECCV 2016) over a loader's images in its order, boxes[i] the i-th image's
    object box in the view (box_in_view), images[i] its path for messages: a hit when the centre of the heatmap's
    peak cell, for the image's true class, falls inside the box. Returns hits, images, and the boxes' mean share of
    the view: what a heatmap that points anywhere at random would score. A box that is not one inside the view is
    refused before the model runs, in one sentence naming the image; None (box_in_view: cut off by the crop) is not
    scored, and counted as "outside_view"."""
    for position, box in enumerate(boxes):
        problem = box is not None and _view_box_problem(box, crop)
        if problem:
            image = images[position] if images else f"image {position} of the loader"
            raise UserError(f"the bounding box of {image} in the model's view, {tuple(box)!r}, {problem}, so the "
                            f"pointing game cannot score it; {FIX_BOX}.")
    hits, seen, box_share = 0, 0, 0.0
    for batch, targets in loader:
        maps = class_heatmaps(model, batch.to(device), targets)
        rows, columns = maps.shape[-2:]
        for (row, column), box in zip(peak_cells(maps), boxes[seen:seen + len(batch)]):
            if box is None:
                continue
            x0, y0, x1, y1 = box
            x, y = (column + 0.5) * crop / columns, (row + 0.5) * crop / rows
            hits += x0 <= x <= x1 and y0 <= y <= y1
            box_share += (x1 - x0) * (y1 - y0) / crop**2
        seen += len(batch)
    if seen != len(boxes):
        raise ValueError(f"the loader gave {seen} images for {len(boxes)} boxes")
    scored = sum(box is not None for box in boxes)
    return {"hits": hits, "images": scored, "outside_view": seen - scored, "box_share": box_share / max(scored, 1)}


def evidence_on_views(model, views: torch.Tensor, label: int, device) -> torch.Tensor:
    """(N, 3, H, W) eval views -> (N, H, W) on the CPU: each view's evidence for class label, upsampled."""
    maps = class_heatmaps(model, views.to(device), torch.full((len(views),), label))
    return upsample(maps, tuple(views.shape[-2:])).cpu()


def confusion_gallery(model, dataset, pairs: list[dict], class_names: list[str], device, per_side: int = 4,
                      batch_size: int = 16, num_workers: int = 0) -> list[dict]:
    """For each most-confused pair {"true": A, "predicted": B} (bcnn.metrics.most_confused_pairs), the images of A
    the model calls B, each with its evidence for B and for A, and the images of B it gets right, with the evidence
    for B; at most per_side of each, in dataset order, on their eval views (the dataset's transform), the heatmaps
    upsampled into [-1, 1] (upsample):
    [{"true", "predicted", "count", "confused": [item, ...], "correct": [item, ...]}], item = {"index", "image" (path),
    "probability" (of B), "view" (3, H, W) normalised, "heatmap" (H, W): for B}, and a confused item also has
    "probability_true" (of A) and "heatmap_true" (for A). Pairs that share B share one "correct" list (the same
    object): it is computed once."""
    index_of = {name: position for position, name in enumerate(class_names)}
    predicted: dict[int, list[tuple[int, int, torch.Tensor]]] = {}  # class -> [(index, prediction, probs)]
    correct_of: dict[int, list[dict]] = {}  # class B -> its items

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

    def items(chosen: list[tuple[int, torch.Tensor]], label: int, also: int | None = None) -> list[dict]:
        if not chosen:
            return []
        views = torch.stack([dataset[index][0] for index, _ in chosen])
        maps = evidence_on_views(model, views, label, device)
        found = [{"index": index, "image": str(dataset.samples[index][0]), "probability": float(probs[label]),
                  "view": view, "heatmap": heatmap} for (index, probs), view, heatmap in zip(chosen, views, maps)]
        if also is not None:
            for item, (_, probs), heatmap in zip(found, chosen, evidence_on_views(model, views, also, device)):
                item.update(probability_true=float(probs[also]), heatmap_true=heatmap)
        return found

    gallery = []
    for pair in pairs:
        true, wrong = index_of[pair["true"]], index_of[pair["predicted"]]
        confused = [(index, probs) for index, guess, probs in predictions_of(true) if guess == wrong]
        if wrong not in correct_of:
            correct = [(index, probs) for index, guess, probs in predictions_of(wrong) if guess == wrong]
            correct_of[wrong] = items(correct[:per_side], wrong)
        gallery.append({"true": pair["true"], "predicted": pair["predicted"], "count": pair["count"],
                        "confused": items(confused[:per_side], wrong, also=true), "correct": correct_of[wrong]})
    return gallery
