"""Predict the classes of images with a trained checkpoint: the top-k class names and their probabilities.

    python -m bcnn.predict bird.jpg                                   # stage 2's best.pt, top 5
    python -m bcnn.predict photos/ more/gull.png --topk 3             # a folder means its images, sorted
    python -m bcnn.predict photos/ --checkpoint runs/cub_vgg16_stage1/best.pt --json > predictions.json
    python -m bcnn.predict my_birds/test/                             # class folders: true classes, top-1
    python -m bcnn.predict photos/*.jpg --explain                     # + a PNG each in explanations/: the evidence
    python -m bcnn.predict photos/ --explain --explain-dir heatmaps/  # the same PNGs, in heatmaps/
    python -m bcnn.predict gull.jpg --explain --explain-class "Herring Gull"   # the evidence for another class

Everything comes from the checkpoint: the model, the class names and the eval transform of the run's config
(resize, centre crop, normalise), and what its dataset's reader cut from every image first: FGVC-Aircraft's
20-px banner comes off the bottom, as in training and bcnn.eval (a note on stderr says so once). A run trained
on bounding-box crops (data.crop_to_bbox) is given whole images, since files carry no boxes: a note says that
too; crop your images to the object for the trained model's view. No dataset and no ImageNet weights are needed.

A folder with no image files at its top level, as a dataset's class-per-folder images/, train/ or test/, means
every image below it, sorted by path; a note on stderr says so. An image whose folder names one of the
checkpoint's classes gets that class as its true class ("true_class" in --json), and a last line gives the top-1
accuracy over those images. An input that cannot be read (missing, not an image, a folder without images) gets
an `error: PATH: ...` line on stderr and an "error" entry in --json; the other images are still predicted and the
exit status is 1.

--explain writes, for each image, <image>_<checkpoint>_explain.png into --explain-dir (explanations/ by default;
a name too long for the file system is cut, with a hash of the whole name): the model's view of the image beside
it with the evidence for its top-1 class (or --explain-class's) laid over it, red for the class and blue against
it, scaled per image (bcnn.explain: gradient x activation through captum, an optional extra), and the top-k
classes written below. --json gives each image's PNG as "explanation". A file of that name that bcnn did not
write is never replaced.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from torchvision.datasets.folder import IMG_EXTENSIONS

from bcnn import distributed
from bcnn.data import READERS, REPLACE_IMAGE, clean_class_name, load_rgb
from bcnn.errors import UserError, exit_on_user_error
from bcnn.eval import DEFAULT_CHECKPOINT
from bcnn.explain import class_heatmaps, require_captum, upsample
from bcnn.figures import denormalize, explanation_figure, is_bcnn_figure, save_figure
from bcnn.models import input_normalisation
from bcnn.models.adapt import merge_adapters
from bcnn.models.trained import from_checkpoint
from bcnn.paths import not_a_file
from bcnn.precision import configure_device


NONFINITE_LOGITS = ("the model's class scores for it are NaN or inf (its weights are finite: an overflow in the "
                    "network); no class can be read from them")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bcnn.predict", description=__doc__.split("\n")[0])
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="image files, or folders: their image files, or when they have none at the top "
                             "level (a folder of class folders), every image below them")
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help=f"default: {DEFAULT_CHECKPOINT}")
    parser.add_argument("--topk", type=int, default=5, help="classes per image, at most all; default: 5")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON list on stdout and nothing else (no top-1 line)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass; default: 16")
    parser.add_argument("--explain", action="store_true",
                        help="also write a PNG per image with the evidence for its top-1 class (a heatmap) into "
                             "--explain-dir; needs captum")
    parser.add_argument("--explain-dir", metavar="DIR",
                        help="with --explain: the folder to write the PNGs into; default: explanations/")
    parser.add_argument("--explain-class", metavar="NAME",
                        help="with --explain: the heatmap of this class instead of the top-1 (e.g. the true one)")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    """One dict per input, in order: {"image", "predictions": [{"class", "index", "probability"}, ...]}, best
    first, with "true_class" after "image" when the image's folder names a class, or {"image", "error"} for an
    input that could not be predicted."""
    args = parse_args(argv)
    if args.topk < 1:
        raise UserError(f"--topk must be at least 1, got {args.topk}.")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}.")
    ctx = distributed.setup(args.device)
    try:
        return run(args, ctx.device)
    finally:
        distributed.teardown()


def run(args, device: torch.device) -> list[dict]:
    for option, value in (("--explain-class", args.explain_class), ("--explain-dir", args.explain_dir)):
        if value is not None and not args.explain:
            raise UserError(f"{option} goes with --explain, which is not given; add --explain.")
    if args.explain:  # all before the model's seconds, not after
        require_captum()
        folder = Path(args.explain_dir or "explanations")
        blocking = next((path for path in (folder, *folder.parents) if path.exists() and not path.is_dir()), None)
        if blocking is not None:
            raise UserError(f"--explain-dir {folder}: {blocking} is a file, so no folder can be made there; pass "
                            "--explain-dir a folder path (default: explanations/).")
        made = [path for path in (folder, *folder.parents) if not path.exists()]  # deepest first
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as error:
            raise UserError(f"cannot write the heatmaps into {folder} ({(error.strerror or str(error)).lower()}); "
                            "pass --explain-dir a folder you can write to.") from None
        finally:  # the check leaves nothing behind (a refused checkpoint, no image): the first heatmap makes them
            for path in made:
                with contextlib.suppress(OSError):
                    path.rmdir()
        args.explain_dir = str(folder)  # where explainer() writes
    trained = from_checkpoint(args.checkpoint, device)
    model, classes, cfg, transform = trained.model, trained.classes, trained.config, trained.transform
    merge_adapters(model)  # model.adapt=lora: the updates folded into the weights, the plain model's cost
    configure_device(device, tf32=False)  # IEEE float32 on a GPU too, as bcnn.eval's default: the same numbers
    banner = training_cut(cfg.data)
    explain = explainer(args, model, classes, cfg) if args.explain else None

    results = []
    for result in predict(expand_inputs(args.images), model, transform, classes, device,
                          topk=min(args.topk, len(classes)), batch_size=args.batch_size, banner=banner,
                          explain=explain):
        results.append(result)
        if "error" in result:
            print(f"error: {result['image']}: {result['error']}", file=sys.stderr)
        elif not args.json:
            true_class = result.get("true_class")
            print(result["image"] + (f"  (true: {true_class})" if true_class else ""))
            for prediction in result["predictions"]:
                mark = "  <- true" if prediction["class"] == true_class else ""
                print(f"{100 * prediction['probability']:7.2f}%  {prediction['class']}{mark}")
    if args.json:  # the errors too: a script reading stdout learns what failed for each input
        print(json.dumps(results, indent=2))
    if not any("predictions" in result for result in results):
        raise UserError("no input could be predicted (each one's reason is above); pass image files or folders "
                        "holding them.")
    labelled = [result for result in results if "true_class" in result]
    if labelled and not args.json:
        correct = sum(result["predictions"][0]["class"] == result["true_class"] for result in labelled)
        print(f"top-1 on the {len(labelled)} images whose folder names a class: {correct} "
              f"({100 * correct / len(labelled):.2f}%)")
    return results


def expand_inputs(arguments: Iterable[str]) -> Iterator[tuple[str, str | None]]:
    """(path, None) for each image to predict, (path, what is wrong) for an input that cannot be predicted.

    A file is tried whatever its extension; a folder contributes its files with an image extension, sorted. A
    folder with none at its top level is a dataset's layout (images/<class>/, test/<class>/) and contributes every
    image below it, sorted by path, with a note on stderr. One with images at its top level contributes only
    those: a subfolder beside photos (rejects, duplicates, thumbnails) is more likely set aside than meant.
    """
    for argument in arguments:
        path = Path(argument)
        kind = not_a_file(path)
        if kind == "missing":
            yield argument, "no such file or folder; check the path"
        elif kind is not None and kind.startswith("not readable"):
            yield argument, f"it is {kind}; check the path"
        elif kind not in (None, "a folder"):
            yield argument, f"it is {kind}, not an image file or a folder; pass image files or folders holding them"
        elif kind == "a folder":
            top_level = _image_files(path.iterdir())
            images = top_level or _image_files(path.rglob("*"))  # rglob does not enter symlinked folders: no loops
            if not images:
                yield argument, (f"no image files ({', '.join(IMG_EXTENSIONS)}) in this folder or its subfolders; "
                                 "pass another folder")
            elif not top_level:
                print(f"note: {argument} has no image files at its top level; predicting the {len(images)} in its "
                      "subfolders", file=sys.stderr)
            yield from ((str(image), None) for image in images)
        else:
            yield argument, None


def _image_files(entries: Iterable[Path]) -> list[Path]:
    return sorted(entry for entry in entries if entry.is_file() and entry.suffix.lower() in IMG_EXTENSIONS)


def true_class_finder(classes: list[str]) -> Callable[[str], str | None]:
    """A function from an image's path to the class its folder names, or None.

    A folder names a class by the class's own name (a folder dataset's classes are its folder names) or by a
    name that reads the same through clean_class_name, as CUB's classes.txt is read: `001.Black_footed_Albatross/`,
    `Black_footed_Albatross/` and `Black footed Albatross/` all name CUB's "Black footed Albatross", and name a
    folder dataset's "001.Black_footed_Albatross" too. A clean name that two classes share names neither.
    """
    by_clean_name: dict[str, list[str]] = {}
    for name in classes:
        by_clean_name.setdefault(clean_class_name(name), []).append(name)
    named = {clean: names[0] for clean, names in by_clean_name.items() if len(names) == 1}
    named.update((name, name) for name in classes)

    def true_class(path: str) -> str | None:
        folder = Path(os.path.abspath(path)).parent.name  # abspath: `./a.jpg` and `../x/a.jpg` have a folder too
        return named.get(folder) or named.get(clean_class_name(folder))

    return true_class


def training_cut(data_cfg) -> int:
    """Pixel rows the run's dataset reader cut off the bottom of every image (FGVC-Aircraft's banner), for files
    given by hand to get the same view; notes on stderr say what is and what cannot be applied."""
    reader = READERS.get(data_cfg.format)
    banner = getattr(reader, "bottom_crop", 0)
    if banner:
        print(f"note: cutting {banner} px off the bottom of every image, as training on data.format="
              f"{data_cfg.format} did (its copyright banner).", file=sys.stderr)
    if data_cfg.crop_to_bbox:
        print("note: this model was trained on bounding-box crops (data.crop_to_bbox); image files carry no boxes, "
              "so whole images are given: crop them to the object for the view it was trained on.", file=sys.stderr)
    return banner


def cut_banner(image, banner: int, path: str):
    if not banner:
        return image
    if image.height <= banner:
        raise UserError(f"cannot read image {path}: it is {image.height} px high, no more than the {banner}-px "
                        f"banner the model's training cut off; {REPLACE_IMAGE}.")
    return image.crop((0, 0, image.width, image.height - banner))


def predict(inputs: Iterable[tuple[str, str | None]], model: torch.nn.Module, transform, classes: list[str],
            device: torch.device, topk: int, batch_size: int, banner: int = 0, explain=None) -> Iterator[dict]:
    """One result per input, in input order, as soon as the batch holding it has run; banner: pixel rows cut off
    the bottom of each image first (training_cut); explain(batch): called on each batch once predicted."""
    true_class = true_class_finder(classes)
    waiting, batch = [], []  # results not yet yielded; (result, image tensor) pairs not yet through the model
    for path, problem in inputs:
        result = {"image": path}
        if problem is None:
            try:
                image = transform(cut_banner(load_rgb(path), banner, path))
            except UserError as error:
                problem = _what_is_wrong(error, path)
            else:
                if (name := true_class(path)) is not None:
                    result["true_class"] = name
                batch.append((result, image))
        if problem is not None:
            result["error"] = problem
        waiting.append(result)
        if len(batch) == batch_size:
            _run_batch(batch, model, classes, device, topk, explain)
            yield from waiting
            waiting, batch = [], []
    if batch:
        _run_batch(batch, model, classes, device, topk, explain)
    yield from waiting


def _run_batch(batch: list[tuple[dict, torch.Tensor]], model, classes, device, topk: int, explain) -> None:
    _add_predictions(batch, model, classes, device, topk)
    predicted = [item for item in batch if "predictions" in item[0]]
    if explain is not None and predicted:
        explain(predicted)


def _add_predictions(batch: list[tuple[dict, torch.Tensor]], model, classes, device, topk: int) -> None:
    images = torch.stack([image for _, image in batch]).to(device)  # (B, 3, crop, crop)
    with torch.no_grad():
        logits = model(images).float()  # (B, classes)
    finite = torch.isfinite(logits).all(1).tolist()
    top = logits.softmax(dim=1).topk(topk, dim=1)
    for (result, _), values, indices, sound in zip(batch, top.values.tolist(), top.indices.tolist(), finite):
        if not sound:  # NaN sorts anywhere: no class can be read from it
            result["error"] = NONFINITE_LOGITS
            continue
        result["predictions"] = [{"class": classes[index], "index": index, "probability": value}
                                 for value, index in zip(values, indices)]


def explainer(args, model, classes: list[str], cfg):
    """The --explain step: for a predicted batch, each image's evidence (its top-1 class, or --explain-class) drawn
    over the model's view of it, saved as a PNG in --explain-dir whose path goes into the result as "explanation"."""
    folder = Path(args.explain_dir)
    target = None
    if args.explain_class is not None:
        named = true_class_finder(classes)(str(Path(args.explain_class) / "x"))  # the folder-name rules: 001.Name
        if named is None:
            raise UserError(f"--explain-class {args.explain_class!r} is not one of the checkpoint's {len(classes)} "
                            f"classes (e.g. {classes[0]!r}); give a class name as the top-k lines print it.")
        target = classes.index(named)
    normalisation = input_normalisation(cfg.model.backbone)
    checkpoint = Path(args.checkpoint).stem
    try:
        name_limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_limit = 255  # ext4, XFS, btrfs, APFS, NTFS (in characters there)
    used: set[Path] = set()

    def explain(batch: list[tuple[dict, torch.Tensor]]) -> None:
        images = torch.stack([image for _, image in batch]).to(next(model.parameters()).device)
        chosen = [target if target is not None else result["predictions"][0]["index"] for result, _ in batch]
        evidence = class_heatmaps(model, images, torch.tensor(chosen))  # (B, h, w), signed
        scales = evidence.flatten(1).abs().amax(1).tolist()  # what +-1 on the colour bar is, in logit units
        maps = upsample(evidence, tuple(images.shape[-2:])).cpu()
        views = denormalize(images.cpu(), normalisation).permute(0, 2, 3, 1).numpy()
        for (result, _), view, heatmap, index, scale in zip(batch, views, maps.numpy(), chosen, scales):
            path = explanation_path(folder, result["image"], checkpoint, used, name_limit)
            lines = [f"{100 * prediction['probability']:6.2f}%  {prediction['class']}"
                     + ("  <- true" if prediction["class"] == result.get("true_class") else "")
                     for prediction in result["predictions"]]
            title = f"{Path(result['image']).name}: the evidence for {classes[index]} (red: for it, blue: against)"
            try:
                folder.mkdir(parents=True, exist_ok=True)
                save_figure(explanation_figure(view, heatmap, title, lines, scale=scale), path)
            except OSError as error:
                what = "pass a shorter --explain-dir" if error.errno == errno.ENAMETOOLONG else \
                    "pass --explain-dir a folder you can write to"
                raise UserError(f"cannot write the heatmap {path} ({(error.strerror or str(error)).lower()}); "
                                f"{what}.") from None
            result["explanation"] = str(path)

    return explain


def explanation_path(folder: Path, image: str, checkpoint: str, used: set[Path], name_limit: int = 255) -> Path:
    """folder/<image stem>_<checkpoint>_explain.png, numbered _2, _3... when two inputs share a stem. A name longer
    than name_limit bytes (the file system's, 255 on most) keeps the start of its stem and ends in ~ and 8 hex
    digits of the whole stem's SHA-1: the same name run after run, different names for different stems. A file
    there that bcnn did not write is refused, never replaced."""
    stem = f"{Path(image).stem}_{checkpoint}_explain"

    def name(number: int) -> Path:
        suffix = f"_{number}.png" if number > 1 else ".png"
        if len(os.fsencode(stem + suffix)) <= name_limit:
            return folder / f"{stem}{suffix}"
        tail = f"~{hashlib.sha1(os.fsencode(stem)).hexdigest()[:8]}{suffix}"
        head = stem
        while head and len(os.fsencode(head + tail)) > name_limit:  # whole characters: never half of one
            head = head[:-1]
        return folder / f"{head}{tail}"

    number = 1
    while name(number) in used:
        number += 1
    path = name(number)
    if path.exists() and not is_bcnn_figure(path):
        raise UserError(f"{path} exists and is not a heatmap bcnn wrote, so bcnn.predict will not replace it; pass "
                        "--explain-dir another folder, or move the file away.")
    used.add(path)
    return path


def _what_is_wrong(error: UserError, path: str) -> str:
    """load_rgb's sentence names the file, which our line already does, and tells a CUB user to re-extract the
    dataset; keep what is wrong and say what to do here."""
    reason = str(error).removeprefix(f"cannot read image {path}: ").removesuffix(f"; {REPLACE_IMAGE}.")
    return f"{reason}; pass a readable image file"


if __name__ == "__main__":
    results = exit_on_user_error(main)()
    raise SystemExit(1 if any("error" in result for result in results) else 0)
