"""How fast the B-CNN trains on this machine, against what it cannot beat: prints figures, asserts nothing.

    python -m bcnn.bench                                  # CPU: 224 px, batch 8; CUDA: 448 px, batch 64
    python -m bcnn.bench --device cuda --precision fp16 --steps 50
    python -m bcnn.bench --json                           # the same figures as JSON, nothing else on stdout
    python -m bcnn.bench --recipe --device cuda           # the whole recipe's wall time at CUB's scale
    python -m bcnn.bench --cost                           # every head's parameters and GFLOPs at 448 px
    python -m bcnn.bench --protocols                      # k-NN and retrieval at CUB's size
    python -m bcnn.bench --probe-grid                     # 12 linear probes in one pass vs one (train.probe_grid)
    python -m bcnn.bench --peft                           # LoRA, BitFit, VPT-deep vs full fine-tuning, ViT-B/16
    python -m bcnn.bench --runtime                        # the exported model in ONNX Runtime vs eager PyTorch
    make bench ARGS="--batch-size 16"

The command line alone: the step bench's cases are in steps.py, the recipe's in recipe.py, the report in report.py.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys

from bcnn import distributed
from bcnn.bench.report import format_augment, format_cost, format_decoders, format_recipe, format_report
from bcnn.bench.settings import Settings
from bcnn.bench.steps import run
from bcnn.config import DataConfig
from bcnn.data import default_num_workers
from bcnn.errors import UserError, exit_on_user_error
from bcnn.precision import resolve_precision


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bcnn.bench", allow_abbrev=False,
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda when available (default: auto)")
    parser.add_argument("--image-size", type=int, help="input side in pixels (default: 448 on CUDA, 224 on CPU)")
    parser.add_argument("--batch-size", type=int, help="images per step (default: 64 on CUDA, 8 on CPU)")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"),
                        help="the backbone's autocast, as train.precision (default: auto)")
    parser.add_argument("--steps", type=int, help="timed steps per case (default: 20 on CUDA, 3 on CPU)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: 5 on CUDA, 1 on CPU)")
    parser.add_argument("--classes", type=int, help="classifier outputs (default: 200, CUB's)")
    parser.add_argument("--num-workers", type=int,
                        help="loader worker processes (default: data.num_workers's default for this machine)")
    parser.add_argument("--cache-image-size", type=int,
                        help="input side of the cached-vs-live stage 1 epochs (default: 448, the recipe's)")
    parser.add_argument("--cache-batch-size", type=int,
                        help="batch of the cached-vs-live stage 1 epochs, and their number of train images "
                        "(default: 64, the recipe's batch: the live epoch is one step)")
    parser.add_argument("--heads-image-size", type=int,
                        help="input side of the heads timed side by side (default: 448, the recipe's)")
    parser.add_argument("--heads-batch-size", type=int,
                        help="batch of the heads timed side by side (default: 64 on CUDA, 4 on CPU)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON and nothing else")
    recipe = parser.add_argument_group("the whole recipe at CUB's scale (bcnn/bench/recipe.py)")
    recipe.add_argument("--recipe", action="store_true",
                        help="time an epoch of each stage and the evaluations on generated photo-like JPEGs, and "
                        "project the full recipe's wall time")
    recipe.add_argument("--recipe-images", type=int,
                        help="train images to generate (default: CUB's 5,394 on CUDA, 48 on a CPU); val and test "
                        "in the recipe's proportions")
    recipe.add_argument("--decode", choices=("auto", "cpu", "gpu"),
                        help="data.decode for the recipe's loaders (default: auto, batched on a GPU)")
    recipe.add_argument("--photo-side", type=int,
                        help="height of the generated photos (default 0: 500 x 375, CUB's typical size)")
    decoders = parser.add_argument_group("the batched path's JPEG decoders (bcnn/bench/decoders.py)")
    decoders.add_argument("--decoders", action="store_true",
                          help="time TorchCodec's, torchvision's and PIL's JPEG decoding on a batch of --batch-size "
                          "photo-like JPEGs (default 64) over --steps rounds (default 21), and compare their pixels")
    augment = parser.add_argument_group("the training augmentations' cost (bcnn/bench/augment.py)")
    augment.add_argument("--augment", action="store_true",
                         help="time each augmentation set's transform per image and the training loader's images/s "
                         "with it, against the stage-2 step's images/s at the same size and batch")
    cost = parser.add_argument_group("each model's parameters and GFLOPs (bcnn/bench/cost.py)")
    cost.add_argument("--cost", action="store_true",
                      help="every pooling head on every torchvision backbone family, random weights: parameters "
                      "(backbone, head, classifier), the pooled vector's size and one image's forward GFLOPs at "
                      "--image-size (default: 448, the recipe's crop) for --classes classes")
    protocols = parser.add_argument_group("k-NN and retrieval at CUB's size (bcnn/bench/protocols.py)")
    protocols.add_argument("--protocols", action="store_true",
                           help="time bcnn.eval's k-NN and retrieval on random unit vectors: 5,794 queries against "
                           "5,994 gallery vectors at 8,192-d for --classes classes (CUB's test and train splits)")
    protocols.add_argument("--protocol-sizes", type=int, nargs=3, metavar=("QUERIES", "GALLERY", "DIM"),
                           help="other sizes for --protocols (default: 5794 5994 8192)")
    probe = parser.add_argument_group("the linear-probe sweep's cost (bcnn/bench/probe.py)")
    probe.add_argument("--probe-grid", action="store_true",
                       help="time a stage-1 epoch over a synthetic feature cache for one classifier and for a grid "
                       "of 12 (train.probe_grid), at 768-d and at 262,144-d, with --classes classes in batches of "
                       "--cache-batch-size (default 64)")
    probe.add_argument("--probe-images", type=int,
                       help="train images of each --probe-grid case (default: CUB's 5,394; 64 at 262,144-d on a CPU)")
    peft = parser.add_argument_group("parameter-efficient fine-tuning against full (bcnn/bench/peft.py)")
    peft.add_argument("--peft", action="store_true",
                      help="full fine-tuning, LoRA, BitFit and VPT-deep (model.adapt) of ViT-B/16 side by side, one "
                      "step of each in turn: step time, peak memory, trained parameters, optimizer state and best.pt "
                      "size, at --image-size (default 224) and --batch-size (default 4 on a CPU, 64 on CUDA), "
                      "--steps rounds (default 10 on a CPU, 20 on CUDA)")
    peft.add_argument("--peft-backbone",
                      help="the transformer adapted, as model.backbone (default: vit_b16_in21k, timm's "
                      "vit_base_patch16_224.orig_in21k, random weights)")
    runtime = parser.add_argument_group("an exported model's runtime (bcnn/bench/runtime.py)")
    runtime.add_argument("--runtime", action="store_true",
                         help="the recipe's model exported to ONNX and run by ONNX Runtime against eager PyTorch "
                         "fp32 and bf16, at batch 1 and 8, --image-size (default 448), --steps rounds (default 3)")
    return parser.parse_args(argv)


RECIPE_ONLY = ("recipe_images", "decode", "photo_side")  # options of --recipe alone
STEPS_ONLY = ("cache_image_size", "cache_batch_size", "heads_image_size", "heads_batch_size")  # the step bench's
MODEL_ONLY = ("image_size", "precision", "classes", "num_workers")  # of both, which --decoders (no model) ignores
TIMED_ONLY = ("batch_size", "precision", "steps", "warmup", "num_workers")  # of timing, which --cost does not do
# Each option's least value, and why: a smaller one is refused in one sentence before any work.
LEAST = (
    ("image_size", 16, "VGG16's relu5_3 map is 1/16 of the image"),
    ("batch_size", 1, "a step takes one image at least"),
    ("steps", 1, "the figures are medians of timed steps"),
    ("warmup", 0, "a count of untimed steps"),
    ("classes", 2, "a classifier over one class learns nothing: its loss is 0 whatever its weights"),
    ("num_workers", 0, "0 loads in the main process"),
    ("cache_image_size", 16, "VGG16's relu5_3 map is 1/16 of the image"),
    ("cache_batch_size", 1, "a step takes one image at least"),
    ("heads_image_size", 16, "VGG16's relu5_3 map is 1/16 of the image"),
    ("heads_batch_size", 1, "a step takes one image at least"),
)


def check_combination(args) -> None:
    """Options that the chosen benchmark would ignore are refused rather than silently dropped."""
    if args.protocol_sizes is not None and (not args.protocols or min(args.protocol_sizes) < 1):
        raise UserError("--protocol-sizes takes three positive numbers (queries, gallery, dimensions) and goes with "
                        "--protocols; add --protocols, or leave it out.")
    if args.probe_images is not None and not args.probe_grid:
        raise UserError("--probe-images goes with --probe-grid; add --probe-grid, or leave it out.")
    if args.peft_backbone is not None and not args.peft:
        raise UserError("--peft-backbone goes with --peft; add --peft, or leave it out.")
    chosen = [name.replace("_", "-") for name in ("decoders", "recipe", "augment", "cost", "protocols", "probe_grid",
                                                  "peft", "runtime") if getattr(args, name)]
    if len(chosen) > 1:
        raise UserError(f"--{chosen[0]} and --{chosen[1]} are two benchmarks; run them one at a time.")
    if args.augment:
        others, where, fix = (*STEPS_ONLY, *RECIPE_ONLY), "with --augment", "drop --augment"
    elif args.decoders:
        others, where, fix = (*MODEL_ONLY, *STEPS_ONLY, *RECIPE_ONLY), "with --decoders", "drop --decoders"
    elif args.recipe:
        others, where, fix = STEPS_ONLY, "with --recipe", "drop --recipe"
    elif args.cost:
        others, where, fix = (*TIMED_ONLY, *STEPS_ONLY, *RECIPE_ONLY), "with --cost", "drop --cost"
    elif args.protocols:
        others, where, fix = ("image_size", *TIMED_ONLY, *STEPS_ONLY, *RECIPE_ONLY), "with --protocols", \
            "drop --protocols"
    elif args.probe_grid:  # its batch is --cache-batch-size, stage 1's over the cache
        others, where, fix = ((*TIMED_ONLY, "image_size", "cache_image_size", "heads_image_size", "heads_batch_size",
                               *RECIPE_ONLY), "with --probe-grid", "drop --probe-grid")
    elif args.peft:  # random device-resident batches: no loader
        others, where, fix = (*STEPS_ONLY, *RECIPE_ONLY, "num_workers"), "with --peft", "drop --peft"
    elif args.runtime:  # batches of 1 and 8, fp32 and bf16 side by side
        others, where, fix = ((*STEPS_ONLY, *RECIPE_ONLY, "num_workers", "batch_size", "precision"), "with --runtime",
                              "drop --runtime")
    else:
        others, where, fix = RECIPE_ONLY, "without --recipe", "add --recipe"
    ignored = [name for name in others if getattr(args, name) is not None]
    if ignored:
        options = " and ".join(f"--{name.replace('_', '-')}" for name in ignored)
        raise UserError(f"{options} {'do' if len(ignored) > 1 else 'does'} not apply {where}; {fix} or leave "
                        f"{options} out.")


def resolve_settings(args) -> Settings:
    check_combination(args)
    device = distributed.setup(args.device).device
    cuda = device.type == "cuda"
    settings = Settings(
        device=device,
        image_size=args.image_size if args.image_size is not None else (
            448 if (cuda or args.cost or args.runtime) and not args.peft else 224),  # --peft: ViT-B/16's 224 px
        batch_size=args.batch_size if args.batch_size is not None else (
            64 if cuda or args.decoders else 4 if args.peft else 8),
        precision=resolve_precision(args.precision or "auto", device),
        steps=args.steps if args.steps is not None else (
            21 if args.decoders else 20 if cuda else 10 if args.peft else 3),  # --runtime: 3 rounds on a CPU
        warmup=args.warmup if args.warmup is not None else (2 if args.decoders else 5 if cuda else 1),
        classes=args.classes if args.classes is not None else 200,
        num_workers=args.num_workers if args.num_workers is not None else default_workers(),
        cache_image_size=args.cache_image_size if args.cache_image_size is not None else 448,
        cache_batch_size=args.cache_batch_size if args.cache_batch_size is not None else 64,
        heads_image_size=args.heads_image_size if args.heads_image_size is not None else 448,
        heads_batch_size=args.heads_batch_size if args.heads_batch_size is not None else (64 if cuda else 4),
    )
    for name, least, why in LEAST:
        if getattr(settings, name) < least:
            raise UserError(f"--{name.replace('_', '-')} must be at least {least} ({why}), got "
                            f"{getattr(settings, name)}.")
    return settings


def default_workers() -> int:
    """data.num_workers's default, resolved the way build_loader resolves it (-1: from this machine's cores)."""
    workers = DataConfig().num_workers
    return default_num_workers() if workers < 0 else workers


def main(argv=None) -> dict:
    # The probes collect garbage around each case (loaders' workers, freed memory): with what the process held
    # before the bench set aside (gc.freeze), each collection walks the bench's own objects alone, not a caller's
    # whole heap (half the toy bench's time when run inside a test process).
    gc.freeze()
    try:
        return run_bench(argv)
    finally:
        gc.unfreeze()


def run_bench(argv) -> dict:
    args = parse_args(argv)
    settings = resolve_settings(args)
    # With --json, stdout carries the JSON alone: anything else printed on the way goes to stderr.
    if args.decoders:
        from bcnn.bench.decoders import run_decoders
        result = run_decoders(settings)
        print(json.dumps(result, indent=2) if args.json else format_decoders(result))
        return result
    if args.protocols:
        from bcnn.bench.protocols import CUB_SIZES, format_protocols, run_protocols
        result = run_protocols(settings, tuple(args.protocol_sizes or CUB_SIZES))
        print(json.dumps(result, indent=2) if args.json else format_protocols(result))
        return result
    if args.cost:
        from bcnn.bench.cost import run_cost
        result = run_cost(settings)
        print(json.dumps(result, indent=2) if args.json else format_cost(result))
        return result
    if args.probe_grid:
        from bcnn.bench.probe import format_probe_grid, run_probe_grid
        return reported(args, format_probe_grid, run_probe_grid, settings, args.probe_images)
    if args.runtime:
        from bcnn.bench.runtime import format_runtime, run_runtime
        return reported(args, format_runtime, run_runtime, settings)
    if args.peft:
        from bcnn.bench.peft import BACKBONE, format_peft, run_peft
        return reported(args, format_peft, run_peft, settings, args.peft_backbone or BACKBONE)
    if args.augment:
        from bcnn.bench.augment import run_augment
        return reported(args, format_augment, run_augment, settings)
    if args.recipe:
        # Imported for --recipe alone: it needs bcnn.feature_cache, which the step bench does without.
        from bcnn.bench import recipe
        images = args.recipe_images if args.recipe_images is not None else (
            recipe.CUB_IMAGES["train"] if settings.device.type == "cuda" else 48)
        photo_side = args.photo_side if args.photo_side is not None else 0
        recipe.check_recipe_arguments(images, photo_side)
        return reported(args, format_recipe, recipe.run_recipe, settings, images, args.decode or "auto", photo_side)
    return reported(args, format_report, run, settings)


def reported(args, format_text, bench, *arguments) -> dict:
    """bench(*arguments)'s result printed as JSON (--json: stdout holds the JSON alone, what the bench prints as it
    goes is sent to stderr) or as format_text's report; returned."""
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        result = bench(*arguments)
    print(json.dumps(result, indent=2) if args.json else format_text(result))
    return result


if __name__ == "__main__":
    exit_on_user_error(main)()
