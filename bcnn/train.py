"""Train a bilinear CNN: one loop for both stages, the stage being data in the config; one process or many.

    python -m bcnn.train --config experiments/cub_vgg16_stage1.yaml [--data-root PATH] [--device cpu|cuda|auto]
                         [--run-dir PATH] [--resume CHECKPOINT | --overwrite] [--section.key=value ...]
    torchrun --standalone --nproc_per_node=4 -m bcnn.train --config ...      # DDP on 4 GPUs

Stage 1 trains the classifier on a frozen ImageNet VGG16; stage 2 (experiments/cub_vgg16_stage2.yaml) starts
from stage 1's best.pt (`train.init_from`: weights only) and fine-tunes everything. Model selection and the
plateau schedule use the val split held out from train; the test split is never read here. With
`train.probe_grid`, stage 1 over the feature cache trains a grid of classifiers (learning rates x weight decays) on
the same batches in one pass and keeps the one best on val (bcnn/probe_grid.py).

Running the same command again resumes from the run directory's last.pt (written every epoch, and every
`train.checkpoint_every` steps), exactly where it stopped: the weights at the end equal those of a run that
never stopped. `--resume PATH` resumes from another checkpoint; `--overwrite` starts the run again from scratch,
keeping the run it replaces in previous_run/ until the new one writes its first last.pt.

The run directory receives config.yaml (the resolved config), train.log, metrics.jsonl (a line per epoch),
TensorBoard events, last.pt and best.pt (best val top-1, or the last epoch when there is no val split). A new run
starts only in a directory that holds nothing but an earlier bcnn run's files (bcnn/run_dir.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torchvision
import yaml
from torch.nn.parallel import DistributedDataParallel

from bcnn import distributed
from bcnn.checkpoint import load_checkpoint, load_weights, restore_rng_states, rng_states
from bcnn.config import Config, config_to_dict, load_config
from bcnn.data import build_dataset, build_image_loader, decode_on_device
from bcnn.data.jpeg import default_decoder
from bcnn.engine import EpochMeter, evaluate, train_one_epoch
from bcnn.explain import class_heatmaps, require_captum, upsample
from bcnn.feature_cache import build_feature_cache, feature_loader
from bcnn.figures import figure_to_array, heatmap_grid_figure
from bcnn.errors import Interrupted, UserError, exit_on_user_error, interrupted, signal_name
from bcnn.mixing import build_mixer
from bcnn.models import build_model, input_normalisation, load_model_weights
from bcnn.models.adapt import trained_share
from bcnn.models.frozen_weights import FrozenBackbone, complete_weights
from bcnn.models.backbones import resolve_cut
from bcnn.models.cost import model_cost
from bcnn.optim import build_ema, build_optimizer, per_step, update_ema
from bcnn.precision import configure_device, grad_scaler, resolve_precision
from bcnn.probe_grid import ProbeGrid, after_optimizer_steps, build_schedules, check_world_size, step_schedules
from bcnn.progress import ConsoleFilter
from bcnn.projector import COMPONENTS, MAX_DIM, embed_split, projector_vectors
from bcnn.run_dir import (PROJECTOR_FOLDER, RunCounters, RunDirectory, RunRecorder, read_metric_rows,
                          write_projector_folder, written_by_bcnn)
from bcnn.tensorboard_log import TensorBoardLog

log = logging.getLogger("bcnn")

# Keys a resumed run may change: where things are and how they are run, never what is computed.
RESUMABLE_CHANGES = {"data.root", "data.num_workers", "train.epochs", "train.device", "train.run_dir",
                     "train.cache_dir", "train.log_every", "train.checkpoint_every", "train.eval_batch_size",
                     "train.init_from"}


# What a resumed run reads from last.pt beyond the weights, config and classes (training_state, RunCounters).
RESUME_ENTRIES = ("optimizer", "scheduler", "scaler", "rng", *RunCounters.__dataclass_fields__)
PROJECTOR_LIMIT = 2000  # val images in the projector at most (its sprite of thumbnails grows with them)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m bcnn.train",
        allow_abbrev=False,
        description="Train a bilinear CNN. Any config key can be overridden as --section.key=value "
        "(e.g. --optim.lr=0.5 --train.epochs=10); see bcnn/config.py for the keys.",
    )
    parser.add_argument("--config", required=True, help="experiment YAML, e.g. experiments/cub_vgg16_stage1.yaml")
    parser.add_argument("--data-root", help="dataset folder (CUB_200_2011, or train/ + test/ class folders)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or auto (cuda when available); under torchrun "
                        "each process takes GPU LOCAL_RANK")
    parser.add_argument("--run-dir", help="where checkpoints, logs and TensorBoard events go")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", metavar="CHECKPOINT",
                       help="continue from this last.pt (default: the run directory's last.pt when it exists)")
    start.add_argument("--overwrite", action="store_true",
                       help="replace the run directory's earlier run (checkpoints, logs, events, evaluations) and "
                       "start from scratch; the earlier run waits in previous_run/ until this one writes its first "
                       "last.pt, and is put back if this one stops before")
    args, overrides = parser.parse_known_args(argv)
    for flag, key in (("data_root", "data.root"), ("device", "train.device"), ("run_dir", "train.run_dir")):
        if getattr(args, flag) is not None:
            overrides.append(f"--{key}={getattr(args, flag)}")
    return args, overrides


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_logging(log_file: Path | None = None, quiet: bool = False) -> None:
    """INFO to the console and log_file; `quiet` (ranks other than 0) keeps only warnings and errors."""
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    console = logging.StreamHandler(sys.stdout)
    console.addFilter(ConsoleFilter())  # progress lines stay off a terminal that shows a progress bar
    handlers = [console]
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file))
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)


def tensorboard_command(logdir) -> str:
    """The command to look at the curves, with this environment's tensorboard when the venv is not activated."""
    local = Path(sys.executable).parent / "tensorboard"
    return f"{local if local.exists() else 'tensorboard'} --logdir {logdir}"


def git_commit() -> str:
    """The commit of the bcnn checkout this run uses, "+changes" when it has uncommitted ones; "unknown"
    outside a git checkout."""
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+changes" if dirty else "")


def log_environment(ctx: distributed.Context, config_path: str, config_dict: dict) -> None:
    gpu = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "none"
    log.info("bcnn %s; python %s, torch %s, torchvision %s; %d process(es) (process group: %s), device %s "
             "(GPU %s); %d CPU threads", git_commit(), sys.version.split()[0], torch.__version__,
             torchvision.__version__, ctx.world_size, distributed.backend(), ctx.device, gpu, torch.get_num_threads())
    log.info("config %s, resolved:\n%s", config_path, yaml.safe_dump(config_dict, sort_keys=False).rstrip())


def find_resume_checkpoint(args, run_dir: Path) -> Path | None:
    if args.resume:
        return Path(args.resume)
    last = run_dir / "last.pt"
    return last if last.exists() and not args.overwrite else None


def check_resumable(cfg: Config, state: dict, path: Path) -> None:
    """Resuming under another recipe would silently train a run that neither config describes."""
    saved, current, defaults = state.get("config") or {}, config_to_dict(cfg), config_to_dict(Config())
    # A key the checkpoint lacks came in a later version of bcnn, with its default as the old behaviour; a cut
    # named differently ("auto" or the name it stands for) is the same cut.
    saved = {section: {key: saved.get(section, {}).get(key, default) for key, default in values.items()}
             for section, values in defaults.items()}
    for old_and_new in (saved, current):
        old_and_new["model"]["cut"] = resolve_cut(old_and_new["model"]["backbone"], old_and_new["model"]["cut"])[0]
    for section, values in current.items():
        for key, value in values.items():
            name = f"{section}.{key}"
            if name not in RESUMABLE_CHANGES and saved[section][key] != value:
                raise UserError(
                    f"cannot resume from {path}: it was trained with {name}={saved[section][key]!r}, "
                    f"this command asks for {value!r}; use the same config, or start again with --overwrite "
                    "or another --run-dir."
                )
    if "optimizer" not in state:
        raise UserError(f"{path} holds weights only (a best.pt?); resume from a last.pt, or pass it as "
                        "--train.init_from to start a new run from its weights.")
    missing = [name for name in RESUME_ENTRIES if name not in state]
    if missing:
        raise UserError(f"cannot resume from {path}: it has no {', '.join(repr(name) for name in missing)} "
                        "entry, which a last.pt bcnn.train wrote carries (damaged, or written by another program); "
                        "start again with --overwrite or another --run-dir.")


def read_init_from(path: str, classes: list[str]) -> dict:
    """Weights only (stage 2 <- stage 1, or another codebase's state dict): optimizer, schedule and epoch start
    fresh. A bare state dict names no classes; its classifier's shape still has to fit."""
    state = load_weights(path)
    if "classes" in state and state["classes"] != classes:
        raise UserError(
            f"init_from checkpoint {path} was trained on other classes than this dataset; "
            "point train.init_from at a checkpoint of the same dataset."
        )
    return state


def restore_training_state(state: dict, path: Path, model, optimizer, scheduler, scaler, ema, grid=None) -> None:
    load_model_weights(model, complete_weights(model, state, f"checkpoint {path}"))
    try:
        if grid is not None:
            grid.load_state_dict(state["probe_grid"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot resume from {path}: its optimizer or schedule state does not fit this run ({e}); "
                        "start again with --overwrite or another --run-dir.") from None


def restore_step_schedule(state: dict, path: Path, scheduler) -> None:
    try:
        scheduler.load_state_dict(state["scheduler"])
    except (KeyError, TypeError) as e:
        raise UserError(f"cannot resume from {path}: its schedule state does not fit this run's per-step schedule "
                        f"({type(e).__name__}: {e}); start again with --overwrite or another --run-dir.") from None


def cached_feature_loaders(cfg: Config, model, with_val: bool, micro_batch: int, precision: str,
                           ctx: distributed.Context):
    """Stage 1 as the original authors ran it: the frozen backbone's normalised bilinear features of every train
    image and its mirror (no random crop), and of the val images, computed once into cfg.train.cache_dir and
    reused by every later run with the same backbone, image size and data. An epoch then visits each image
    twice (both views) and costs a pass of the classifier alone."""
    views_of = {"train": ("center", "flip"), "val": ("center",)}
    loaders = []
    for split, batch, shuffle in (("train", micro_batch, True), ("val", cfg.train.eval_batch_size, False)):
        if split == "val" and not with_val:
            loaders.append(None)
            continue
        eval_view = build_dataset(cfg.data, split, train_transform=False,
                                  normalisation=input_normalisation(cfg.model.backbone))
        cache = build_feature_cache(model, eval_view, views_of[split], cfg.train.cache_dir, ctx.device, precision,
                                    batch_size=cfg.train.eval_batch_size, num_workers=cfg.data.num_workers,
                                    rank=ctx.rank, world_size=ctx.world_size, data_cfg=cfg.data)
        loaders.append(feature_loader(cache, batch, train=shuffle, seed=cfg.train.seed, device=ctx.device,
                                      rank=ctx.rank, world_size=ctx.world_size))
    return tuple(loaders)


def main(argv=None) -> dict:
    args, overrides = parse_args(argv)
    cfg = load_config(args.config, overrides)
    ctx = distributed.setup(cfg.train.device)
    run = RunDirectory(Path(cfg.train.run_dir))
    try:
        return train(cfg, ctx, args, run)
    except (KeyboardInterrupt, Interrupted) as stop:
        where = run.describe_last_checkpoint() if ctx.is_main else "rank 0 says where the last checkpoint is"
        raise interrupted(stop, f"{signal_name(stop)} stopped training; {where}.") from None
    finally:
        run.release()
        distributed.teardown()


def train(cfg: Config, ctx: distributed.Context, args, run: RunDirectory) -> dict:
    micro_batch = distributed.per_rank_batch_size(cfg.train.batch_size, ctx.world_size, cfg.train.accum_steps)
    device, precision = ctx.device, resolve_precision(cfg.train.precision, ctx.device)
    check_world_size(cfg, ctx.world_size)
    configure_device(device)
    setup_logging(quiet=not ctx.is_main)  # the console only, until the run directory is held and ready

    # Every input is read and checked before anything in the run directory changes: a mistake costs nothing.
    resume_path = find_resume_checkpoint(args, run.path)
    state = (load_checkpoint(resume_path, option="--resume", then="start again with --overwrite or another --run-dir")
             if resume_path else None)
    if state is not None:
        check_resumable(cfg, state, resume_path)
    seed_everything(cfg.train.seed)
    normalisation = input_normalisation(cfg.model.backbone)  # the mean and std its weights expect
    train_set = build_dataset(cfg.data, "train", normalisation=normalisation)
    val_set = build_dataset(cfg.data, "val", normalisation=normalisation) if cfg.data.val_fraction > 0 else None
    classes = list(train_set.classes)
    if state is not None and state.get("classes") != classes:
        raise UserError(f"cannot resume from {resume_path}: it was trained on other classes than this dataset; "
                        "pass the --data-root it was trained on.")
    if state is not None and state["epoch"] >= cfg.train.epochs and not state.get("step_in_epoch"):
        if ctx.is_main and projector_wanted(cfg, val_set) and not (run.path / PROJECTOR_FOLDER).exists():
            finish_projector(cfg, run, state, val_set, classes, device)
        log.info("%s already finished %d epochs; nothing to do (raise --train.epochs to train on, or pass "
                 "--overwrite to start again)", run.path, state["epoch"])
        return state["metrics"]  # before the run directory is held: a finished run is not written to
    initial = read_init_from(cfg.train.init_from, classes) if cfg.train.init_from and state is None else None
    model = build_model_once_per_machine(cfg, len(classes), ctx)

    # The run directory: held by this run, cleared (or its earlier run set aside) for a fresh start, its log opened.
    if ctx.is_main:
        run.hold()
        run.prepare(fresh=state is None, overwrite=args.overwrite,
                    inputs={"train.init_from": cfg.train.init_from, "--config": args.config})
    config_dict = open_run_log(cfg, ctx, args, run, train_set, val_set, micro_batch)

    # The model, optimizer and schedule: initialised, or restored to where the run stopped.
    if initial is not None:
        load_model_weights(model, complete_weights(model, initial, f"train.init_from {cfg.train.init_from}"))
        log.info("initialised model weights from %s (epoch %s)", cfg.train.init_from, initial.get("epoch"))
        del initial
    model.to(device, memory_format=torch.channels_last if cfg.train.channels_last else torch.preserve_format)
    grid = ProbeGrid(cfg, model) if cfg.train.probe_grid else None  # a linear-probe sweep's classifiers
    optimizer = grid.optimizer if grid is not None else build_optimizer(cfg, model)  # each member's, or the model's
    scaler = grad_scaler(precision, device)
    scheduler = build_schedules(cfg, optimizer)  # a per-step schedule: once the epoch's length is known, below
    ema = build_ema(cfg, model)
    counters = RunCounters()
    if state is not None:
        restore_training_state(state, resume_path, model, optimizer, scheduler, scaler, ema, grid)
        counters = RunCounters.from_checkpoint(state)
        restore_rng_states(state["rng"])
        log.info("resumed from %s: epoch %d, step %d of it (global step %d)", resume_path, counters.epoch + 1,
                 counters.step_in_epoch, counters.global_step)
    log_model(cfg, model, precision)
    if grid is not None:
        log.info("%s", grid.describe())
    if cfg.train.compile:
        for backbone in model.backbones():
            backbone.compile()  # in place: the state dict keys stay as they are (no _orig_mod. prefix)

    # The data, and what the steps run: the whole model, or the classifier alone on cached features.
    if cfg.train.cache_features:  # float32, on the 2-d vectors the loader reads
        train_loader, val_loader = cached_feature_loaders(cfg, model, val_set is not None, micro_batch, precision,
                                                          ctx)
        step_model = grid.classifiers if grid is not None else model.classifier
        step_precision, step_channels_last = "fp32", False
    else:
        shard = dict(seed=cfg.train.seed, device=device, rank=ctx.rank, world_size=ctx.world_size)
        train_loader = build_image_loader(cfg.data, train_set, micro_batch, train=True, **shard)
        val_loader = (build_image_loader(cfg.data, val_set, cfg.train.eval_batch_size, train=False, **shard)
                      if val_set is not None else None)
        step_model, step_precision, step_channels_last = model, precision, cfg.train.channels_last
    mixer = build_mixer(cfg, len(classes), ctx.rank)  # None unless data.mixup or data.cutmix
    if per_step(cfg):
        steps = math.ceil(math.ceil(train_loader.sampler.num_samples / micro_batch) / cfg.train.accum_steps)
        scheduler = build_schedules(cfg, optimizer, steps)
        if state is not None:
            restore_step_schedule(state, resume_path, scheduler)
    # DDP all-reduces the gradients of the trainable parameters; a frozen backbone takes no part.
    ddp_model = (DistributedDataParallel(step_model, device_ids=[device.index] if device.type == "cuda" else None)
                 if ctx.distributed else step_model)

    board = None
    if ctx.is_main:
        board = TensorBoardLog(run.path, purge_step=counters.global_step + 1 if state is not None else None)
        run.writers.append(board)
        if state is None and not cfg.train.cache_features:
            board.augmented_images(train_set, cfg.train.seed)
    diverged_hint = (grid.diverged_hint(run.path) if grid is not None else
                     f"lower the learning rate (optim.lr={cfg.optim.lr}, optim.backbone_lr={cfg.optim.backbone_lr}) "
                     f"and start again with --overwrite; the last good checkpoint, if any, is untouched in {run.path}")
    recorder = RunRecorder(run, counters, model, lambda: training_state(optimizer, scheduler, scaler, ema, grid),
                           {"config": config_dict, "classes": classes}, ctx.is_main, cfg.train.checkpoint_every,
                           diverged_hint, board, ema=ema, best_of=cfg.train.best_of,
                           on_best=val_heatmaps(cfg, val_set, classes, board, device), probe=grid,
                           frozen=FrozenBackbone.of(cfg, model) if ctx.is_main else None)

    def after_step(step: int, meter: EpochMeter) -> None:
        """After each optimizer step, before a mid-epoch checkpoint: the next step's lr, the weights' average."""
        after_optimizer_steps(scheduler)
        update_ema(ema, model)
        recorder.after_step(step, meter)

    for epoch in range(counters.epoch + 1, cfg.train.epochs + 1):
        train_loader.sampler.set_epoch(epoch, skip=counters.step_in_epoch * cfg.train.batch_size)
        steps = math.ceil(math.ceil(train_loader.sampler.num_samples / micro_batch) / cfg.train.accum_steps)
        recorder.start_epoch(epoch, steps, {group["name"]: group["lr"] for group in optimizer.param_groups}, device)
        train_stats = train_one_epoch(ddp_model, train_loader, optimizer, device, epoch,
                                      accum_steps=cfg.train.accum_steps, scaler=scaler,
                                      meter=EpochMeter.resumed(counters.epoch_totals, device, ctx.is_main,
                                                               len(grid) if grid is not None else 1),
                                      first_step=counters.step_in_epoch, after_step=after_step,
                                      on_report=recorder.report, log_every=cfg.train.log_every,
                                      diverged_hint=diverged_hint, precision=step_precision,
                                      channels_last=step_channels_last, label_smoothing=cfg.train.label_smoothing,
                                      clip_grad_norm=cfg.optim.clip_grad_norm, mix=mixer)
        val_stats, ema_val_stats = ((evaluate(weights, val_loader, device, len(classes), confusion=True,
                                              precision=step_precision, channels_last=step_channels_last)
                                     if val_loader is not None and weights is not None else None)
                                    for weights in (step_model, ema and ema.module))
        step_schedules(scheduler, val_stats)  # plateau: each grid member on its own val numbers
        row = recorder.end_epoch(train_stats, val_stats, device, ema_val_stats)
        log.info("epoch %d done: train loss %.4f top1 %.2f%%%s%s%s (%.0f s)", epoch, train_stats["loss"],
                 train_stats["top1"],
                 f", val top1 {row['val_top1']:.2f}% top5 {row['val_top5']:.2f}%" if val_stats else "",
                 f", val_ema_top1 {ema_val_stats['top1']:.2f}%" if ema_val_stats else "",  # what best_of=ema picks by
                 f"; val: the epoch's best member ({row['probe_member']}) of {len(grid)}; train: the members' mean"
                 if grid is not None else "", train_stats["seconds"])

    row = counters.metrics
    if board is not None:
        final = {"final_train_loss": row["train_loss"], "final_train_top1": row["train_top1"]}
        if "val_top1" in row:
            final.update(best_val_top1=counters.best_score, final_val_top1=row["val_top1"])
        board.hyperparameters(config_dict, ctx.world_size, final, counters.global_step)
        if projector_wanted(cfg, val_set):
            write_projector(cfg, model, val_set, classes, run.path / PROJECTOR_FOLDER, device, counters.global_step)
        board.close()
    if grid is not None and ctx.is_main:
        rows = [json.loads(line) for line in read_metric_rows(recorder.metrics_path, counters.epoch)]
        for line in grid.summary(rows):
            log.info("%s", line)
    log.info("finished: checkpoints in %s (best.pt, last.pt); curves: %s", run.path,
             tensorboard_command(run.path.parent))
    return row


def val_heatmaps(cfg: Config, val_set, classes: list[str], board, device):
    """The on_best hook that draws the first train.heatmap_images val images with the evidence for their true
    class (bcnn.explain) into TensorBoard: the same images each time, so attention is seen to sharpen. None where
    there is nothing to draw: another rank, no val split, cached features, or captum missing (a log line says so)."""
    count = min(cfg.train.heatmap_images, len(val_set)) if val_set is not None else 0
    if board is None or not count or cfg.train.cache_features:
        return None
    try:
        require_captum()
    except UserError as missing:
        log.info("no val heatmaps in TensorBoard: %s", missing)
        return None
    normalisation, fixed = input_normalisation(cfg.model.backbone), []

    def draw(weights, global_step: int) -> None:
        if not fixed:  # read once, at the first best.pt, through the loader (its workers, their timeout)
            loader = build_image_loader(cfg.data, val_set, count, train=False, seed=cfg.train.seed, device=device)
            fixed.extend(next(iter(loader)))  # the val split's first images, in its order
        images, labels = fixed
        maps = upsample(class_heatmaps(weights, images.to(device), labels), tuple(images.shape[-2:])).cpu()
        figure = heatmap_grid_figure(images, maps, [classes[label] for label in labels.tolist()], normalisation,
                                     f"val: the evidence for each image's class, step {global_step}")
        board.heatmaps(figure_to_array(figure), global_step)

    return draw


def projector_wanted(cfg: Config, val_set) -> bool:
    """Whether the run ends by writing its val embeddings to the projector (not from cached features: no images)."""
    return cfg.train.projector and val_set is not None and not cfg.train.cache_features


def finish_projector(cfg: Config, run: RunDirectory, state: dict, val_set, classes: list[str], device) -> None:
    """The final projector of a run that a stop cut short while writing it, after its last checkpoint: written now
    from last.pt's weights, which are the weights the run ended with."""
    run.hold()
    run.prepare(fresh=False, overwrite=False, inputs={})  # removes the cut-short write's temporary folder
    for note in run.notes:
        log.info("%s", note)
    log.info("%s finished training but not its projector (stopped while writing it); writing it now", run.path)
    model = build_model(cfg.model, num_classes=len(classes), input_size=cfg.data.crop)
    load_model_weights(model, complete_weights(model, state, f"checkpoint {run.path / 'last.pt'}"))
    write_projector(cfg, model.to(device), val_set, classes, run.path / PROJECTOR_FOLDER, device, state["global_step"])


def write_projector(cfg: Config, model, val_set, classes: list[str], folder: Path, device, global_step: int) -> None:
    """The val set's model.embed vectors, classes and thumbnails in TensorBoard's projector (bcnn.projector), from
    the final weights, read by rank 0 alone with the eval transform, in a log folder of its own inside the run
    directory (replaced by a later run's)."""
    loader = build_image_loader(cfg.data, val_set, cfg.train.eval_batch_size, train=False, seed=cfg.train.seed,
                                device=device)
    vectors, labels, thumbnails = embed_split(model, loader, input_normalisation(cfg.model.backbone), device,
                                              limit=PROJECTOR_LIMIT)
    if folder.exists() and not written_by_bcnn(folder):
        log.info("no projector: %s holds files bcnn did not write; move it away to get one", folder)
        return

    def write(into: Path) -> None:
        board = TensorBoardLog(into)
        board.projector(projector_vectors(vectors), [classes[label] for label in labels.tolist()], thumbnails,
                        global_step)
        board.close()

    write_projector_folder(folder, write)  # replaces a resumed run's earlier projector
    log.info("projector: %d val images' %d-d embed vectors%s in TensorBoard's PROJECTOR tab", len(vectors),
             vectors.shape[1], "" if vectors.shape[1] <= MAX_DIM else
             f" (their first {min(COMPONENTS, len(vectors))} principal components)")


def build_model_once_per_machine(cfg: Config, num_classes: int, ctx: distributed.Context):
    """build_model with one download of the ImageNet weights per machine: the other ranks wait, then read torch's
    hub cache."""
    if ctx.local_rank != 0:
        distributed.barrier()
    model = build_model(cfg.model, num_classes=num_classes, input_size=cfg.data.crop)
    if ctx.local_rank == 0:
        distributed.barrier()
    return model


def open_run_log(cfg: Config, ctx: distributed.Context, args, run: RunDirectory, train_set, val_set,
                 micro_batch: int) -> dict:
    """train.log (rank 0), config.yaml, and the run's first lines; returns the config as a dict, stored with every
    checkpoint as plain values. A train.log's first line, "run dir(ectory) PATH", and config.yaml as yaml.safe_dump
    writes it are how a later run recognises them as bcnn's (bcnn.run_dir.written_by_bcnn)."""
    setup_logging(run.path / "train.log" if ctx.is_main else None, quiet=not ctx.is_main)
    for note in run.notes:
        log.info("run directory %s: %s", run.path, note)
    config_dict = config_to_dict(cfg)
    if ctx.is_main:
        with open(run.path / "config.yaml", "w") as f:
            yaml.safe_dump(config_dict, f, sort_keys=False)
    log.info("run dir %s", run.path)
    log_environment(ctx, args.config, config_dict)
    val = "no" if val_set is None else f"{len(val_set)}{' (the official)' if val_set.OFFICIAL_VAL else ''}"
    log.info("data %s: %d train, %s val images, %d classes; batch %d = %d process(es) x %d accumulation "
             "step(s) x %d", cfg.data.root, len(train_set), val,
             len(train_set.classes), cfg.train.batch_size, ctx.world_size, cfg.train.accum_steps, micro_batch)
    if not cfg.train.cache_features:
        on_device = decode_on_device(cfg.data, ctx.device)
        where = (f"in batches on {ctx.device.type} by {default_decoder()}'s JPEG decoder" if on_device else
                 "by PIL in the workers")
        log.info("images decoded and augmented %s (data.decode=%s)", where, cfg.data.decode)
    return config_dict


def log_model(cfg: Config, model, precision: str) -> None:
    trainable, total = trained_share(model)
    second = f" + {cfg.model.backbone_b}" if cfg.model.backbone_b else ""
    cut = resolve_cut(cfg.model.backbone, cfg.model.cut)[0]
    backbone = ("trainable" if not model.backbone_frozen else "frozen" if cfg.model.adapt == "none" else
                f"frozen but for model.adapt={cfg.model.adapt}")
    log.info("model: %s%s to %s, %s pooling (%d-d), %d trainable parameters of %d (%.2f%%), backbone %s; precision "
             "%s (pooling and classifier float32), %s", cfg.model.backbone, second, cut, cfg.model.pooling,
             model.pooling.output_dim, trainable, total, 100 * trainable / max(total, 1), backbone, precision,
             "channels_last" if cfg.train.channels_last else "NCHW")
    cost = model_cost(model, cfg.data.crop, next(model.parameters()).device)
    log.info("cost: %s parameters (backbone %s, head %s, classifier %s), %.2f GFLOPs per %d-px image (2 per "
             "multiply-add)", f"{cost['total_params']:,}", f"{cost['backbone_params']:,}", f"{cost['head_params']:,}",
             f"{cost['classifier_params']:,}", cost["gflops"], cfg.data.crop)


def training_state(optimizer, scheduler, scaler, ema, grid=None) -> dict:
    """What a last.pt holds beyond the weights and the counters, to continue exactly; a probe grid's members under
    "probe_grid" (its "model" holds the best member so far, as best.pt)."""
    return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict(), "rng": rng_states(), **({"ema": ema.state_dict()} if ema else {}),
            **({"probe_grid": grid.state_dict()} if grid is not None else {})}



if __name__ == "__main__":
    exit_on_user_error(main)()
