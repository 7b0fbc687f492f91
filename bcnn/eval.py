"""Evaluate a checkpoint: top-1, top-5 and mean per-class accuracy on one split, printed and saved as JSON.

    python -m bcnn.eval --split test                       # stage 2's best.pt, right after `make stage2`
    python -m bcnn.eval --checkpoint runs/cub_vgg16_stage1/best.pt --split val --tta flip
    torchrun --standalone --nproc_per_node=4 -m bcnn.eval --split test   # sharded: every image counted once

The dataset, split and transforms come from the config stored in the checkpoint (the val split is the same
seeded hold-out the run used); `--data-root` points at the data when it has moved. The model is rebuilt from
the checkpoint alone: no ImageNet weights are needed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bcnn.checkpoint import load_checkpoint
from bcnn.config import config_from_dict
from bcnn import distributed
from bcnn.data import build_dataset, build_loader
from bcnn.engine import evaluate
from bcnn.errors import UserError, exit_on_user_error
from bcnn.model import build_model, load_model_weights

DEFAULT_CHECKPOINT = "runs/cub_vgg16_stage2/best.pt"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bcnn.eval", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help=f"default: {DEFAULT_CHECKPOINT}")
    parser.add_argument("--split", default="test", choices=["train", "val", "trainval", "test"])
    parser.add_argument("--tta", default="none", choices=["none", "flip"],
                        help="flip: average the logits of each image and its mirror")
    parser.add_argument("--batch-size", type=int, help="default: the run's train.eval_batch_size")
    parser.add_argument("--data-root", help="dataset folder, when it differs from the one the run used")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--num-workers", type=int, help="default: the run's data.num_workers")
    parser.add_argument("--output", help="JSON file to write; default: eval_<split>[_flip].json beside the checkpoint")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    ctx = distributed.setup(args.device)
    try:
        return run(args, ctx)
    finally:
        distributed.teardown()


def run(args, ctx: distributed.Context) -> dict:
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}.")
    state = load_checkpoint(args.checkpoint)
    cfg = config_from_dict(state["config"])
    if args.data_root:
        cfg.data.root = args.data_root
    cfg.model.backbone_weights = "none"  # every weight comes from the checkpoint

    dataset = build_dataset(cfg.data, args.split, train_transform=False)
    if list(dataset.classes) != state["classes"]:
        raise UserError(
            f"the classes of {cfg.data.root} differ from those the checkpoint was trained on; "
            "pass the --data-root of the dataset it was trained on."
        )
    loader = build_loader(dataset, args.batch_size or cfg.train.eval_batch_size, train=False,
                          num_workers=cfg.data.num_workers if args.num_workers is None else args.num_workers,
                          seed=0, rank=ctx.rank, world_size=ctx.world_size)
    model = build_model(cfg.model, num_classes=len(state["classes"]))
    load_model_weights(model, state["model"])
    model.to(ctx.device)

    metrics = evaluate(model, loader, ctx.device, len(state["classes"]), tta=args.tta)
    result = {"checkpoint": str(args.checkpoint), "epoch": state.get("epoch"), "split": args.split,
              "tta": args.tta, "data_root": cfg.data.root, **metrics}
    output = Path(args.output) if args.output else (
        Path(args.checkpoint).parent / f"eval_{args.split}{'_flip' if args.tta == 'flip' else ''}.json")
    if not ctx.is_main:  # every rank holds the same numbers; one writes them
        return result
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.split}: {metrics['count']} images, top-1 {metrics['top1']:.2f}%, top-5 {metrics['top5']:.2f}%, "
          f"mean per-class {metrics['mean_class_acc']:.2f}% (tta {args.tta}; {args.checkpoint})")
    print(f"wrote {output}")
    return result


if __name__ == "__main__":
    exit_on_user_error(main)()
