"""Evaluate a checkpoint: top-1, top-5 and mean per-class accuracy on one split, printed and saved as JSON,
with the per-class accuracies (CSV), the confusion matrix and per-class accuracy figures (PNG) beside it.

    python -m bcnn.eval --split test                       # stage 2's best.pt, right after `make stage2`
    python -m bcnn.eval --checkpoint runs/cub_vgg16_stage1/best.pt --split val --tta flip
    python -m bcnn.eval --split test --tta ten_crop        # the mean logits of 10 crops a test image (bcnn.tta)
    python -m bcnn.eval --split test --no-figures          # numbers only: JSON and CSV, no PNGs
    torchrun --standalone --nproc_per_node=4 -m bcnn.eval --split test   # sharded: every image counted once
    python -m bcnn.eval --split test --knn --retrieval     # also k-NN and retrieval on the embed vectors
    python -m bcnn.eval --config experiments/cub_dinov2_vitb14_avg_stage1.yaml --knn   # frozen features, untrained

Without a classifier to score (--config's untrained model, or the test split of data.class_split=retrieval, whose
classes the run never saw) only k-NN and retrieval are computed, and only the JSON is written.

The files are named after the checkpoint and the split, beside the checkpoint: for best.pt on the test split
eval_best_test.json, eval_best_test_per_class.csv, eval_best_test_confusion.png and eval_best_test_per_class.png,
with the --tta choice after the split unless it is none (eval_best_test_ten_crop.json) (last.pt's evaluation does
not replace best.pt's; with --output, named after its stem). The JSON also lists the most confused pairs of
classes, and the five largest are printed. An existing file is replaced only when an evaluation wrote it
(bcnn.run_dir.written_by_eval): never a checkpoint, a config or a user's file.

The dataset, split and transforms come from the config stored in the checkpoint (the val split is the same
seeded hold-out the run used); `--data-root` points at the data when it has moved. The model is rebuilt from
the checkpoint alone: no ImageNet weights are needed.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import json
from pathlib import Path

import torch
from PIL import Image

from bcnn import distributed
from bcnn.data import build_dataset, build_image_loader, default_num_workers
from bcnn.distributed import all_reduce_
from bcnn.engine import evaluate
from bcnn.explain import box_in_view, confusion_gallery, pointing_game, require_captum
from bcnn.errors import UserError, exit_on_user_error
from bcnn.figures import confusion_figure, confusion_gallery_figure, per_class_accuracy_figure, save_figure
from bcnn.metrics import most_confused_pairs, per_class_rows
from bcnn.models import input_normalisation
from bcnn.models.cost import model_cost
from bcnn.config import load_config
from bcnn.models.backbones import TIMM_PREFIX
from bcnn.models.trained import TrainedModel, from_checkpoint, untrained
from bcnn.precision import configure_device, resolve_precision
from bcnn.projector import embed_split, projector_vectors
from bcnn.protocols import flat_scores, knn_accuracy, retrieval_metrics
from bcnn.run_dir import EVAL_SIBLINGS, write_projector_folder, written_by_bcnn, written_by_eval
from bcnn.tensorboard_log import TensorBoardLog
from bcnn.tta import TTA_CHOICES, images_per_batch, is_multi_view, view_transform

DEFAULT_CHECKPOINT = "runs/cub_vgg16_stage2/best.pt"
MOST_CONFUSED_SAVED, MOST_CONFUSED_PRINTED = 10, 5
GALLERY_PAIRS, GALLERY_PER_SIDE = 3, 4  # the confusion gallery: its pairs, and images on each side of a pair


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bcnn.eval", description=__doc__.split("\n")[0],
                                     allow_abbrev=False)
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--checkpoint", help=f"the trained model; default: {DEFAULT_CHECKPOINT}")
    model.add_argument("--config", help="instead of a checkpoint: score the frozen features of the model an experiment "
                       "YAML describes, untrained (its backbone's pretrained weights, no classifier), with --knn "
                       "and/or --retrieval; any config key can follow as --section.key=value (e.g. "
                       "--model.backbone=dinov2_vitl14)")
    parser.add_argument("--split", default="test", choices=["train", "val", "trainval", "test"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16", "auto"],
                        help="backbone autocast; default fp32 (IEEE float32 on GPUs too, no TF32): the reference "
                        "numbers; bf16 is faster on GPUs")
    parser.add_argument("--tta", default="none", choices=TTA_CHOICES,
                        help="test-time augmentation; an image's class scores are the mean of its views' logits. "
                        "flip: the centre view and its mirror; five_crop: the 4 corners and the centre of the "
                        "resized image; ten_crop: those and their mirrors; multiscale: centre crops of the image "
                        "resized to data.resize x 1, 1.15, 1.3 (bcnn.tta)")
    parser.add_argument("--batch-size", type=int,
                        help="default: the run's train.eval_batch_size; with five_crop, ten_crop or multiscale a "
                        "batch holds batch-size // views images (at least 1), so one forward sees as many crops")
    parser.add_argument("--data-root", help="dataset folder, when it differs from the one the run used")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--num-workers", type=int, help="default: the run's data.num_workers")
    parser.add_argument("--output", help="JSON file to write; default: eval_<checkpoint name>_<split>[_<tta>].json "
                        "beside the checkpoint; the CSV and PNGs are named after its stem")
    parser.add_argument("--pointing-game", action="store_true",
                        help="also score where the model looks: the share of images whose heatmap peak (true "
                             "class) falls in the object's bounding box (datasets with boxes; needs captum)")
    parser.add_argument("--projector", action="store_true",
                        help="also put the split's embed vectors, classes and thumbnails in TensorBoard's projector: "
                             "a log folder projector_<checkpoint>_<split>/ beside the checkpoint")
    parser.add_argument("--knn", action="store_true",
                        help="also score k-NN accuracy on the embed vectors, as DINOv2 does (cosine, the k nearest "
                        "training images vote with weight exp(sim / 0.07), k = 10, 20, 100, 200); the gallery is "
                        "trainval for --split test, train for --split val (bcnn.protocols)")
    parser.add_argument("--retrieval", action="store_true",
                        help="also score retrieval within the split on the embed vectors: Recall@1, 2, 4, 8, "
                        "precision@1, R-precision, MAP@R (Musgrave et al., ECCV 2020; bcnn.protocols)")
    parser.add_argument("--no-figures", action="store_true",
                        help="skip the confusion and per-class PNGs (slow to draw for 200 classes); JSON and CSV only")
    args, overrides = parser.parse_known_args(argv)
    if overrides and not args.config:  # config keys set a model that --config builds; a checkpoint holds its own
        parser.error(f"unrecognized arguments: {' '.join(overrides)} (config keys as --section.key=value go with "
                     "--config only)")
    if args.checkpoint is None and args.config is None:
        args.checkpoint = DEFAULT_CHECKPOINT
    args.overrides = overrides
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    ctx = distributed.setup(args.device)
    try:
        return run(args, ctx)
    finally:
        distributed.teardown()


def output_paths(args) -> dict[str, Path]:
    """What this evaluation writes: "json" (--output, or eval_<checkpoint name>_<split>[_<tta>].json beside the
    checkpoint; no _<tta> for none), and the CSV and PNGs named after it; a file already there must be one an
    evaluation wrote."""
    if args.output:
        output = Path(args.output)
        if output.is_dir():
            raise UserError(f"--output {output} is a folder; give a file name, e.g. --output {output / 'eval.json'}.")
    elif args.config:
        output = FROZEN_FOLDER / f"eval_{frozen_name(args)}_{args.split}.json"
    else:
        checkpoint = Path(args.checkpoint)
        tta = "" if args.tta == "none" else f"_{args.tta}"
        output = checkpoint.parent / f"eval_{checkpoint.stem}_{args.split}{tta}.json"
    paths = {"json": output, **{suffix: sibling(output, suffix) for suffix in EVAL_SIBLINGS
                                if suffix.endswith(".csv") or not args.no_figures}}
    for path in paths.values():
        if path.exists() and not written_by_eval(path):
            raise UserError(f"{path} exists and is not an evaluation's file, so bcnn.eval will not replace it; pass "
                            "--output a new file name, or move it away.")
    return paths


def run(args, ctx: distributed.Context) -> dict:
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}.")
    if args.num_workers is not None and args.num_workers < -1:
        raise UserError(f"--num-workers must be -1 (from this machine's cores) or at least 0, got {args.num_workers}.")
    outputs = output_paths(args)  # checked before the evaluation's minutes, not after
    check_embedding_protocols(args, ctx)
    if args.pointing_game:
        require_captum()
    trained = load_model(args, ctx)
    model, cfg, classes = trained.model.to(memory_format=torch.channels_last), trained.config, trained.classes
    dataset = build_dataset(cfg.data, args.split, train_transform=False, normalisation=trained.normalisation)
    if protocols_only(args, cfg):
        return run_protocols_only(args, ctx, trained, dataset, outputs["json"])
    if list(dataset.classes) != classes:
        raise UserError(
            f"the classes of {cfg.data.root} differ from those the checkpoint was trained on; "
            "pass the --data-root of the dataset it was trained on."
        )
    batch_size = args.batch_size or cfg.train.eval_batch_size
    loader = build_image_loader(cfg.data, dataset, batch_size, train=False, seed=0, device=ctx.device,
                                rank=ctx.rank, world_size=ctx.world_size, num_workers=args.num_workers)
    if is_multi_view(args.tta):
        evaluated = multi_view_loader(cfg.data, dataset, batch_size, args, ctx)
    else:
        evaluated = loader
    boxes = pointing_game_boxes(loader, dataset, cfg.data) if args.pointing_game else None

    precision = resolve_precision(args.precision, ctx.device)
    configure_device(ctx.device, tf32=precision != "fp32")
    metrics = evaluate(model, evaluated, ctx.device, len(classes), tta=args.tta, confusion=True,
                       precision=precision, channels_last=True)
    if args.pointing_game:
        metrics["pointing_game"] = run_pointing_game(model, loader, *boxes, cfg.data.crop, ctx.device)
    if args.knn or args.retrieval:
        metrics.update(embedding_protocols(args, model, loader, trained, batch_size, ctx))
    gallery = None
    confusion = metrics.pop("confusion")  # (C, C) counts [true, predicted], the same on every rank
    most_confused = most_confused_pairs(confusion, classes, k=MOST_CONFUSED_SAVED)
    result = {"checkpoint": str(args.checkpoint), "epoch": trained.epoch, "split": args.split,
              "tta": args.tta, "data_root": cfg.data.root, **metrics, "most_confused": most_confused,
              "cost": model_cost(model, cfg.data.crop, ctx.device)}  # parameters and GFLOPs beside the accuracy
    if not ctx.is_main:  # every rank holds the same numbers; one writes them
        return result
    rows = per_class_rows(confusion, classes)
    # The numbers first: whatever happens to the files, the evaluation's result is on the screen.
    print(f"{args.split}: {metrics['count']} images, top-1 {metrics['top1']:.2f}%, top-5 {metrics['top5']:.2f}%, "
          f"mean per-class {metrics['mean_class_acc']:.2f}% (tta {args.tta}; {args.checkpoint})")
    print_most_confused(most_confused[:MOST_CONFUSED_PRINTED], {row["class"]: row["images"] for row in rows})
    print_embedding_protocols(metrics)
    if "pointing_game" in metrics:
        game = metrics["pointing_game"]
        print(f"pointing game: {game['hits']} of {game['images']} images "
              f"({100 * game['hits'] / max(game['images'], 1):.1f}%) have their heatmap's peak in the object's box; "
              f"the boxes cover {100 * game['box_share']:.1f}% of the view on average (a random point's chance)"
              + (f"; {game['outside_view']} image(s) not scored: the centre crop cuts their object's box off whole"
                 if game["outside_view"] else ""))
    try:
        outputs["json"].parent.mkdir(parents=True, exist_ok=True)
        outputs["json"].write_text(json.dumps(result, indent=2) + "\n")
        write_per_class_csv(rows, outputs["per_class.csv"])
        if not args.no_figures:  # last: drawing 200 classes takes seconds
            write_figures(confusion, classes, outputs, figure_subtitle(args, metrics))
            gallery = write_gallery(model, dataset, most_confused[:GALLERY_PAIRS], classes, cfg, ctx.device,
                                    outputs, figure_subtitle(args, metrics))
    except OSError as error:
        raise UserError(f"cannot write {error.filename or outputs['json']} ({(error.strerror or str(error)).lower()}); "
                        "the numbers are printed above; pass --output PATH.json on a disk you can write to.") from None
    write_scalars(args, trained, result)
    if args.projector:
        folder = write_projector(model, dataset, classes, cfg, ctx.device, args)
        print(f"projector: {folder} (tensorboard --logdir {folder})")
    if gallery is not None:  # which images the gallery shows, beside the numbers
        result["confusion_gallery"] = gallery
        outputs["json"].write_text(json.dumps(result, indent=2) + "\n")
    for path in outputs.values():
        if path.exists():
            print(f"wrote {path}")
    return result


def multi_view_loader(data_cfg, dataset, batch_size: int, args, ctx: distributed.Context):
    """evaluate()'s loader for a multi-view --tta: each image as its (V, 3, crop, crop) views (bcnn.tta), in the
    plain loader's order and shards, batch_size // V images a batch (one forward then holds about batch_size crops,
    as without TTA). Always decoded by PIL in the loader workers: data.decode's device path makes the centre view
    only. The pointing game, gallery and projector keep reading the centre view."""
    views = copy.copy(dataset)  # the same images and labels, another transform
    views.transform = view_transform(data_cfg, args.tta, dataset.normalisation)
    cpu_decode = dataclasses.replace(data_cfg, decode="cpu")
    return build_image_loader(cpu_decode, views, images_per_batch(batch_size, args.tta), train=False, seed=0,
                              device=ctx.device, rank=ctx.rank, world_size=ctx.world_size,
                              num_workers=args.num_workers)


def write_gallery(model, dataset, pairs: list[dict], class_names: list[str], cfg, device, outputs: dict,
                  title: str) -> list[dict] | None:
    """The most confused pairs' images with their evidence (bcnn.explain.confusion_gallery), one page; None, with a
    note, where captum is missing or nothing was confused."""
    if not pairs:
        return None
    try:
        require_captum()
    except UserError as missing:
        print(f"note: no confusion gallery: {missing}")
        return None
    gallery = confusion_gallery(model.float(), dataset, pairs, class_names, device, per_side=GALLERY_PER_SIDE,
                                num_workers=default_num_workers() if cfg.data.num_workers == -1 else cfg.data.num_workers)
    save_figure(confusion_gallery_figure(gallery, input_normalisation(cfg.model.backbone),
                                         "most confused pairs, with the evidence for the class predicted and for "
                                         f"the true one\n{title}", per_side=GALLERY_PER_SIDE),
                outputs["confused_gallery.png"])
    kept = ("image", "probability", "probability_true")  # the pixels and heatmaps stay in the PNG
    return [{"true": entry["true"], "predicted": entry["predicted"], "count": entry["count"],
             **{side: [{key: item[key] for key in kept if key in item} for item in entry[side]]
                for side in ("confused", "correct")}} for entry in gallery]


def write_projector(model, dataset, class_names: list[str], cfg, device, args) -> Path:
    """The split's model.embed vectors in TensorBoard's projector (bcnn.projector), in a log folder of their own
    beside the checkpoint, replaced only when an earlier --projector wrote it."""
    checkpoint = Path(args.checkpoint) if args.checkpoint else FROZEN_FOLDER / frozen_name(args)
    folder = checkpoint.parent / f"projector_{checkpoint.stem}_{args.split}"
    if folder.exists() and not written_by_bcnn(folder):
        raise UserError(f"{folder} exists and is not a projector bcnn.eval wrote; move it away, or evaluate a "
                        "checkpoint in another folder.")
    loader = build_image_loader(cfg.data, dataset, args.batch_size or cfg.train.eval_batch_size, train=False, seed=0,
                                device=device, num_workers=args.num_workers)  # every image, on this rank
    vectors, labels, thumbnails = embed_split(model, loader, input_normalisation(cfg.model.backbone), device)

    def write(into: Path) -> None:
        board = TensorBoardLog(into)
        board.projector(projector_vectors(vectors), [class_names[label] for label in labels.tolist()], thumbnails,
                        0, tag=args.split)
        board.close()

    write_projector_folder(folder, write)
    return folder


KNN_GALLERY = {"test": "trainval", "val": "train"}  # the training images a query is compared with
FROZEN_FOLDER = Path("runs") / "frozen"  # where --config's evaluations go by default


def frozen_name(args) -> str:
    """A --config evaluation's name: its backbone and head, e.g. dinov2_vitb14_avg (read again by load_model)."""
    cfg = load_config(args.config, [*args.overrides, *([f"--data.root={args.data_root}"] if args.data_root else [])])
    backbone = cfg.model.backbone.replace(TIMM_PREFIX, "timm_").replace("/", "_")
    return f"{backbone}_{cfg.model.pooling}"


def load_model(args, ctx: distributed.Context) -> TrainedModel:
    """The checkpoint's model, or with --config the untrained model the config describes (its classes: the
    dataset's, or the trained half under data.class_split=retrieval)."""
    if not args.config:
        return from_checkpoint(args.checkpoint, ctx.device, data_root=args.data_root)
    cfg = load_config(args.config, [*args.overrides, *([f"--data.root={args.data_root}"] if args.data_root else [])])
    if not (args.knn or args.retrieval):
        raise UserError("--config scores a model before any training, whose classifier has learnt nothing; pass "
                        "--knn and/or --retrieval (they score its features), or --checkpoint a trained model.")
    classes = list(build_dataset(cfg.data, "trainval", train_transform=False).classes)
    return untrained(cfg, classes, ctx.device)


def protocols_only(args, cfg) -> bool:
    """Whether this evaluation scores the embeddings alone: an untrained model (--config), or the test split of a
    class-disjoint run (data.class_split=retrieval), whose classes the classifier never saw."""
    return bool(args.config) or (cfg.data.class_split == "retrieval" and args.split == "test")


def run_protocols_only(args, ctx: distributed.Context, trained: TrainedModel, dataset, output: Path) -> dict:
    """k-NN and retrieval on the embed vectors, printed and in the JSON; no top-1, no per-class files or figures."""
    cfg, untrained_model = trained.config, bool(args.config)
    why = ("an untrained model (--config)" if untrained_model else
           "the test split of a run trained with data.class_split=retrieval, whose classes the classifier never saw")
    if not (args.knn or args.retrieval):
        raise UserError(f"{why} has no top-1 to score; pass --retrieval (and --knn where the gallery shares its "
                        "classes), or evaluate --split val.")
    if args.knn and cfg.data.class_split == "retrieval" and args.split == "test":
        raise UserError("--knn on the test split of data.class_split=retrieval would compare test images with "
                        "training images of other classes; drop --knn (--retrieval is the protocol's score).")
    for flag, on in (("--tta", args.tta != "none"), ("--pointing-game", args.pointing_game)):
        if on:
            raise UserError(f"{flag} reads the classifier, which {why} cannot use; drop {flag}.")
    if not untrained_model:  # the data is the run's: its trained half must be the checkpoint's classes
        trained_half = build_dataset(cfg.data, "trainval", train_transform=False).classes
        if list(trained_half) != trained.classes:
            raise UserError(f"the classes of {cfg.data.root} differ from those the checkpoint was trained on; pass "
                            "the --data-root of the dataset it was trained on.")
    batch_size = args.batch_size or cfg.train.eval_batch_size
    loader = build_image_loader(cfg.data, dataset, batch_size, train=False, seed=0, device=ctx.device,
                                num_workers=args.num_workers)
    metrics = embedding_protocols(args, trained.model, loader, trained, batch_size, ctx)
    result = {"checkpoint": str(args.checkpoint) if args.checkpoint else None,
              "config": str(args.config) if args.config else None, "epoch": trained.epoch, "split": args.split,
              "embeddings_only": why, "data_root": cfg.data.root, "class_split": cfg.data.class_split,
              "backbone": cfg.model.backbone, "backbone_weights": cfg.model.backbone_weights,
              "pooling": cfg.model.pooling, "count": len(dataset), **metrics,
              "cost": model_cost(trained.model, cfg.data.crop, ctx.device)}
    print(f"{args.split}: {len(dataset)} images of {len(dataset.classes)} classes, embeddings only ({why}; "
          f"{args.checkpoint or args.config})")
    print_embedding_protocols(metrics)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2) + "\n")
    except OSError as error:
        raise UserError(f"cannot write {error.filename or output} ({(error.strerror or str(error)).lower()}); the "
                        "numbers are printed above; pass --output PATH.json on a disk you can write to.") from None
    write_scalars(args, trained, result)
    if args.projector:
        folder = write_projector(trained.model, dataset, list(dataset.classes), cfg, ctx.device, args)
        print(f"projector: {folder} (tensorboard --logdir {folder})")
    print(f"wrote {output}")
    return result


def scalar_values(result: dict) -> dict:
    """An evaluation's numbers as TensorBoard scalars: top-1, top-5, mean per-class, and k-NN and retrieval."""
    return {**{key: result[key] for key in ("top1", "top5", "mean_class_acc") if key in result},
            **flat_scores(result)}


def write_scalars(args, trained: TrainedModel, result: dict) -> None:
    """The evaluation's numbers into the run's TensorBoard log, as eval_<checkpoint>_<split>[_<tta>]/<name> at the
    step the checkpoint was written: beside its val curves. Only into a run directory bcnn.train wrote (its
    train.log), never a folder of the user's; nothing for --config (no run)."""
    if trained.path is None or trained.global_step is None:
        return
    run = trained.path.parent
    if not ((run / "train.log").is_file() and written_by_bcnn(run / "train.log")):
        return
    tta = "" if args.tta == "none" else f"_{args.tta}"
    try:
        board = TensorBoardLog(run)
        board.scalars(f"eval_{trained.path.stem}_{args.split}{tta}", scalar_values(result), trained.global_step)
        board.close()
    except OSError as error:  # a read-only run directory: the numbers are printed and in the JSON already
        print(f"note: no TensorBoard scalars in {run} ({(error.strerror or str(error)).lower()})")


def check_embedding_protocols(args, ctx) -> None:
    """Refuse, before any work, what k-NN or retrieval cannot do here."""
    if (args.knn or args.retrieval) and ctx.distributed:
        raise UserError("--knn and --retrieval compare every image with every other, which one process does; run "
                        "python -m bcnn.eval without torchrun for them.")
    if args.knn and args.split not in KNN_GALLERY:
        raise UserError(f"--knn compares the evaluated images with the training images, and --split {args.split} is "
                        "training images itself; use --split test (gallery: trainval) or val (gallery: train).")


def embedding_protocols(args, model, loader, trained, batch_size: int, ctx) -> dict:
    """k-NN accuracy against the training images and retrieval within the split, on model.embed vectors (the
    normalised vector the classifier reads), each computed once."""
    vectors, labels, _ = embed_split(model, loader, trained.normalisation, ctx.device)
    vectors, labels = on_device_if_it_fits(vectors, ctx.device), labels.to(ctx.device)
    results = {}
    if args.knn:
        gallery_split = KNN_GALLERY[args.split]
        gallery_set = build_dataset(trained.config.data, gallery_split, train_transform=False,
                                    normalisation=trained.normalisation)
        gallery_loader = build_image_loader(trained.config.data, gallery_set, batch_size, train=False, seed=0,
                                            device=ctx.device, num_workers=args.num_workers)
        gallery, gallery_labels, _ = embed_split(model, gallery_loader, trained.normalisation, ctx.device)
        results["knn"] = {"gallery_split": gallery_split,
                          **knn_accuracy(vectors, labels, on_device_if_it_fits(gallery, ctx.device),
                                         gallery_labels.to(ctx.device))}
    if args.retrieval:
        results["retrieval"] = retrieval_metrics(vectors, labels)
    return results


def on_device_if_it_fits(vectors: torch.Tensor, device) -> torch.Tensor:
    """Embed vectors moved to the evaluation's device, or left in host memory when the device has no room for them
    (iNaturalist's 2.7 M train images at 8,192-d are 88 GB): bcnn.protocols then moves them a chunk at a time."""
    try:
        return vectors.to(device)
    except torch.OutOfMemoryError:
        return vectors


def print_embedding_protocols(metrics: dict) -> None:
    if "knn" in metrics:
        knn = metrics["knn"]
        scores = ", ".join(f"k={k} {knn['top1'][k]:.2f}%" + (f" (all {used})" if used < k else "")
                           for k, used in knn["k_used"].items())
        print(f"k-NN top-1 against the {knn['gallery_split']} images ({knn['gallery']}): {scores}")
    if "retrieval" in metrics:
        found = metrics["retrieval"]
        recalls = ", ".join(f"{key} {value:.2f}%" for key, value in found.items() if key.startswith("recall@"))
        print(f"retrieval within the split ({found['queries']} queries): {recalls}, precision@1 "
              f"{found['precision@1']:.2f}%, R-precision {found['r_precision']:.2f}%, MAP@R {found['map@r']:.2f}%")


def pointing_game_boxes(loader, dataset, data_cfg) -> tuple[list[str], list]:
    """The loader's images (paths, in its order) and their boxes in the eval view (bcnn.explain.box_in_view: one that
    is not a box is refused here, naming the image, before the evaluation's minutes)."""
    require_captum()
    if not getattr(dataset, "HAS_BOXES", False) or data_cfg.crop_to_bbox:
        raise UserError(f"--pointing-game needs bounding boxes around the objects, and data.format={data_cfg.format}"
                        f"{' is cropped to them (data.crop_to_bbox)' if data_cfg.crop_to_bbox else ' has none'}; "
                        "drop --pointing-game.")
    order = list(loader.sampler)  # the images in the order the loader yields them
    paths, boxes = [str(dataset.samples[index][0]) for index in order], []
    for index, path in zip(order, paths):
        with Image.open(path) as image:  # the size only: no pixels are decoded
            boxes.append(box_in_view(dataset.bboxes[index], image.size, data_cfg.resize, data_cfg.crop, image=path))
    return paths, boxes


def run_pointing_game(model, loader, paths: list[str], boxes: list, crop: int, device) -> dict:
    """bcnn.explain.pointing_game over this evaluation's loader (its shard under DDP, summed over ranks)."""
    game = pointing_game(model.float(), loader, boxes, crop, device, images=paths)
    totals = all_reduce_(torch.tensor([game["hits"], game["images"], game["outside_view"],
                                       game["box_share"] * game["images"]], dtype=torch.float64, device=device))
    hits, images, outside, share = totals.tolist()
    return {"hits": int(hits), "images": int(images), "outside_view": int(outside), "box_share": share / max(images, 1)}


def print_most_confused(pairs: list[dict], images_of: dict) -> None:
    for pair in pairs:
        print(f"most confused: {pair['true']} -> {pair['predicted']} "
              f"({pair['count']} of {images_of[pair['true']]} images, {100 * pair['share']:.1f}%)")
    if not pairs:
        print("most confused: none, every image was classified correctly")


def sibling(output: Path, suffix: str) -> Path:
    """eval_best_test.json -> eval_best_test_<suffix>: the files of one evaluation sort together."""
    return output.with_name(f"{output.stem}_{suffix}")


def figure_subtitle(args, metrics: dict) -> str:
    return (f"{args.split} split, {metrics['count']} images, tta {args.tta}: top-1 {metrics['top1']:.2f}%, "
            f"mean per-class {metrics['mean_class_acc']:.2f}%\n{args.checkpoint}")


def write_per_class_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["index", "class", "images", "correct", "accuracy"])
        writer.writeheader()
        for row in rows:  # a class without images keeps an empty accuracy cell
            writer.writerow({**row, "accuracy": "" if row["accuracy"] is None else f"{row['accuracy']:.2f}"})


def write_figures(confusion, class_names: list[str], outputs: dict[str, Path], title: str) -> None:
    save_figure(confusion_figure(confusion, class_names, f"confusion, row-normalised\n{title}"),
                outputs["confusion.png"])
    figure = per_class_accuracy_figure(confusion.diagonal(), confusion.sum(1), class_names,
                                       f"per-class accuracy\n{title}")
    save_figure(figure, outputs["per_class.png"])


if __name__ == "__main__":
    exit_on_user_error(main)()
