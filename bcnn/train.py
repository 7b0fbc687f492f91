"""Train a bilinear CNN: one loop for both stages, the stage being data in the config.

    python -m bcnn.train --config experiments/cub_vgg16_stage1.yaml [--data-root PATH] [--device cpu|cuda|auto]
                         [--run-dir PATH] [--section.key=value ...]

Stage 1 trains the classifier on a frozen ImageNet VGG16; stage 2 (experiments/cub_vgg16_stage2.yaml) starts
from stage 1's best.pt (`train.init_from`) and fine-tunes everything. Model selection and the plateau schedule
use the val split held out from train; the test split is never read here. The run directory receives
config.yaml (the resolved config), train.log, metrics.jsonl (a line per epoch), TensorBoard events, last.pt
(every epoch) and best.pt (best val top-1, or the last epoch when there is no val split).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.tensorboard import SummaryWriter

from bcnn.checkpoint import load_checkpoint, save_checkpoint
from bcnn.config import Config, config_to_dict, load_config
from bcnn.data import build_dataset, build_loader
from bcnn.engine import evaluate, train_one_epoch
from bcnn.errors import UserError, exit_on_user_error
from bcnn.model import build_model, load_model_weights

log = logging.getLogger("bcnn")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m bcnn.train",
        allow_abbrev=False,
        description="Train a bilinear CNN. Any config key can be overridden as --section.key=value "
        "(e.g. --optim.lr=0.5 --train.epochs=10); see bcnn/config.py for the keys.",
    )
    parser.add_argument("--config", required=True, help="experiment YAML, e.g. experiments/cub_vgg16_stage1.yaml")
    parser.add_argument("--data-root", help="dataset folder (CUB_200_2011, or train/ + test/ class folders)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or auto (cuda when available)")
    parser.add_argument("--run-dir", help="where checkpoints, logs and TensorBoard events go")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished or stopped run in --run-dir")
    args, overrides = parser.parse_known_args(argv)
    for flag, key in (("data_root", "data.root"), ("device", "train.device"), ("run_dir", "train.run_dir")):
        if getattr(args, flag) is not None:
            overrides.append(f"--{key}={getattr(args, flag)}")
    return args, overrides


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} was asked for but CUDA is not available; use --device cpu or auto.")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"device {name!r} is not a device; use cpu, cuda, cuda:N or auto.") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_logging(log_file: Path | None = None) -> None:
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    handlers = [logging.StreamHandler(sys.stdout)]
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file))
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)


def build_optimizer(cfg: Config, model) -> torch.optim.Optimizer:
    groups = model.param_groups(backbone_lr=cfg.optim.backbone_lr, classifier_lr=cfg.optim.lr)
    opt = cfg.optim
    if opt.name == "sgd":
        return torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
    optimizer_class = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[opt.name]
    return optimizer_class(groups, lr=opt.lr, weight_decay=opt.weight_decay)


def build_scheduler(cfg: Config, optimizer):
    """Stepped once per epoch; plateau is stepped with the val top-1."""
    sched = cfg.schedule
    if sched.name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=sched.factor, patience=sched.patience, min_lr=sched.min_lr
        )
    if sched.name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=sched.step_size, gamma=sched.factor)
    if sched.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.train.epochs, eta_min=sched.min_lr)
    return None


def tensorboard_command(logdir) -> str:
    """The command to look at the curves, with this environment's tensorboard when the venv is not activated."""
    local = Path(sys.executable).parent / "tensorboard"
    return f"{local if local.exists() else 'tensorboard'} --logdir {logdir}"


def prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Never train over an earlier run's checkpoints by accident."""
    if (run_dir / "last.pt").exists() and not overwrite:
        raise UserError(
            f"{run_dir} already holds a run (last.pt); pass another --run-dir, or --overwrite to replace it."
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)


def init_from_checkpoint(model, path: str, classes: list[str]) -> None:
    """Weights only (stage 2 <- stage 1): the optimizer, schedule and epoch start fresh."""
    state = load_checkpoint(path)
    if state.get("classes") != classes:
        raise UserError(
            f"init_from checkpoint {path} was trained on other classes than this dataset; "
            "point train.init_from at a checkpoint of the same dataset."
        )
    load_model_weights(model, state["model"])
    log.info("initialised model weights from %s (epoch %s)", path, state.get("epoch"))


def main(argv=None) -> dict:
    args, overrides = parse_args(argv)
    cfg = load_config(args.config, overrides)
    device = resolve_device(cfg.train.device)
    run_dir = Path(cfg.train.run_dir)
    prepare_run_dir(run_dir, args.overwrite)
    setup_logging(run_dir / "train.log")
    config_dict = config_to_dict(cfg)  # stored with every checkpoint as plain values
    with open(run_dir / "config.yaml", "w") as f:
        yaml.safe_dump(config_dict, f, sort_keys=False)
    seed_everything(cfg.train.seed)
    log.info("run dir %s, device %s, config %s", run_dir, device, args.config)

    train_set = build_dataset(cfg.data, "train")
    val_set = build_dataset(cfg.data, "val") if cfg.data.val_fraction > 0 else None
    classes = list(train_set.classes)
    log.info("data %s: %d train, %s val images, %d classes", cfg.data.root, len(train_set),
             len(val_set) if val_set is not None else "no", len(classes))
    train_loader = build_loader(train_set, cfg.train.batch_size, train=True,
                                num_workers=cfg.data.num_workers, seed=cfg.train.seed)
    val_loader = (build_loader(val_set, cfg.train.eval_batch_size, train=False,
                               num_workers=cfg.data.num_workers, seed=cfg.train.seed)
                  if val_set is not None else None)

    model = build_model(cfg.model, num_classes=len(classes))
    if cfg.train.init_from:
        init_from_checkpoint(model, cfg.train.init_from, classes)
    model.to(device)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("model: VGG16 %s bilinear, %d trainable parameters, backbone %s", cfg.model.cut, trainable,
             "frozen" if model.backbone_frozen else "trainable")

    writer = SummaryWriter(log_dir=str(run_dir))
    best_score, row = -math.inf, {}
    for epoch in range(1, cfg.train.epochs + 1):
        lrs = {group["name"]: group["lr"] for group in optimizer.param_groups}
        train_stats = train_one_epoch(model, train_loader, optimizer, device, epoch, cfg.train.log_every)
        val_stats = evaluate(model, val_loader, device, len(classes)) if val_loader is not None else None
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(val_stats["top1"])
        elif scheduler is not None:
            scheduler.step()

        row = {"epoch": epoch, **{f"lr_{name}": lr for name, lr in lrs.items()},
               **{f"train_{k}": v for k, v in train_stats.items()},
               **({f"val_{k}": v for k, v in val_stats.items()} if val_stats else {})}
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        for key in ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "val_mean_class_acc"):
            if key in row:
                writer.add_scalar(key.replace("_", "/", 1), row[key], epoch)
        for name, lr in lrs.items():
            writer.add_scalar(f"lr/{name}", lr, epoch)
        writer.flush()

        state = {"model": model.state_dict(), "config": config_dict, "classes": classes,
                 "epoch": epoch, "metrics": row}
        save_checkpoint({**state, "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict() if scheduler is not None else None},
                        run_dir / "last.pt")
        # Selection on val only; with no val split the paper's fixed schedule keeps the last epoch.
        score = val_stats["top1"] if val_stats else epoch
        if score > best_score:
            best_score = score
            save_checkpoint(state, run_dir / "best.pt")
        log.info("epoch %d done: train loss %.4f top1 %.2f%%%s (%.0f s)", epoch, train_stats["loss"],
                 train_stats["top1"],
                 f", val top1 {val_stats['top1']:.2f}% top5 {val_stats['top5']:.2f}%" if val_stats else "",
                 train_stats["seconds"])
    writer.close()
    log.info("finished: checkpoints in %s (best.pt, last.pt); curves: %s", run_dir,
             tensorboard_command(run_dir.parent))
    return row


if __name__ == "__main__":
    exit_on_user_error(main)()
