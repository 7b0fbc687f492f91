"""--peft: what parameter-efficient fine-tuning (model.adapt, issue 31) costs beside full fine-tuning, side by side in
one run: ViT-B/16 (vit_b16_in21k) at 224 px, 200 classes, each of full fine-tuning, LoRA (rank 8 on every block's
qkv), BitFit and VPT-deep (10 prompts per block) built by build_model from its config, as a run builds it, and
stepped by train_one_epoch itself (forward, cross-entropy, backward, optimizer step) on one device-resident batch.

    python -m bcnn.bench --peft                             # CPU: batch 4; CUDA: batch 64
    python -m bcnn.bench --peft --device cuda --json
    python -m bcnn.bench --peft --peft-backbone timm:vit_small_patch16_224    # another ViT

For each case: its trained parameters; its peak memory, over its own first MEMORY_STEPS steps (the first allocates
the optimizer's state), the earlier cases built but idle (bcnn/bench/probes.py's MemoryProbe: peak RSS growth on a
CPU, peak allocation above what was allocated before on CUDA); the bytes of its optimizer's state tensors after
those steps; the bytes of a best.pt of it, as bcnn.train writes one (the tensors that trained and the frozen
backbone's fingerprint for model.adapt, every weight for full fine-tuning) with the step's head and with the compact
head; then the median of its step times over --steps rounds after --warmup rounds, one step of each case in turn
every round (the order reversed every other round), so that a drift of the machine's speed falls on all alike.

The step's head is model.pooling=avg, the head every ViT-B/16 recipe of experiments/ trains: with the compact head
the classifier's 8192 x 200 weights (1.6M, as many as LoRA's 295k updates five times over) would train in every
case and hide what the backbone's adaptation costs. The optimizer is the recipes' SGD with momentum 0.9 (fused) for
all four: the full fine-tuning recipe's (and VPT-deep's); the LoRA and BitFit recipes' AdamW holds twice the state
for every case alike (the same ratios) and makes full fine-tuning's update the slower, which would flatter the
step-time ratios. Random weights (model.backbone_weights=none: nothing is downloaded) cost what pretrained ones do.

Targets (issue 31): each adaptation's step at most 0.75x full fine-tuning's (no weight gradients for the frozen
backbone), its optimizer state at most 2% of full fine-tuning's; a LoRA best.pt of ViT-B/16 with the compact head
under 40 MB. Printed as met or missed, never asserted.
"""

from __future__ import annotations

import io
import statistics

import torch

from bcnn.bench.probes import CpuShare, MemoryProbe, device_name
from bcnn.bench.settings import Settings
from bcnn.bench.steps import random_batch, timed_step
from bcnn.config import Config, config_to_dict, validate
from bcnn.errors import UserError
from bcnn.models.adapt import trained_share
from bcnn.models.bilinear_cnn import BilinearCNN, build_model
from bcnn.models.frozen_weights import FrozenBackbone, fingerprint, frozen_keys
from bcnn.models.pooling import build_pooling
from bcnn.optim import build_optimizer
from bcnn.precision import configure_device

BACKBONE = "vit_b16_in21k"
CASES = ("full", "lora", "bitfit", "vpt_deep")  # full: model.freeze_backbone=false, model.adapt=none
STEP_POOLING = "avg"
CHECKPOINT_POOLINGS = ("avg", "compact")  # the compact head at model.compact_dim's default, 8,192
MEMORY_STEPS = 2  # each case's own first steps, its peak memory measured over them
STEP_TARGET = 0.75  # each adaptation's step time / full fine-tuning's
STATE_TARGET = 0.02  # each adaptation's optimizer state / full fine-tuning's
CHECKPOINT_TARGET_MB = 40.0  # a LoRA best.pt of ViT-B/16 with the compact head, MB = 10^6 bytes
MB = 1e6


def case_config(case: str, backbone: str, pooling: str, image_size: int, classes: int) -> Config:
    """The config a run of this case would have (its checkpoint keeps it): the recipes' SGD; the learning rates
    are small enough that random weights do not diverge in a few steps (they do not change the speed)."""
    cfg = Config()
    cfg.data.crop, cfg.data.resize = image_size, image_size * 8 // 7  # VPT's Resize(256) for a 224 crop
    cfg.model.backbone, cfg.model.backbone_weights, cfg.model.pooling = backbone, "none", pooling
    cfg.model.freeze_backbone = case != "full"
    cfg.model.adapt = "none" if case == "full" else case
    cfg.optim.name, cfg.optim.momentum, cfg.optim.weight_decay = "sgd", 0.9, 0.0
    cfg.optim.lr, cfg.optim.backbone_lr = 1e-3, 1e-4
    validate(cfg)
    return cfg


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer keeps per parameter (SGD's momentum buffers; Adam's moments and steps)."""
    return sum(value.numel() * value.element_size() for state in optimizer.state.values()
               for value in state.values() if torch.is_tensor(value))


def checkpoint_bytes(cfg: Config, model, classes: list[str], sha256: str | None) -> int:
    """Bytes of a best.pt of this model as bcnn.train's RunRecorder writes one: a model.adapt run's keeps the tensors
    that trained and the frozen backbone's fingerprint (sha256: computed from pretrained weights in a real run, as
    long here), full fine-tuning's every weight; with the config and the class names."""
    state = model.state_dict()
    if cfg.model.adapt == "none":
        weights = {"model": state}
    else:
        kept = FrozenBackbone(frozenset(frozen_keys(model)), "imagenet", sha256)
        weights = {"model": kept.without(state), **kept.entry()}
    buffer = io.BytesIO()
    torch.save({**weights, "config": config_to_dict(cfg), "classes": classes, "epoch": 1,
                "metrics": {"epoch": 1, "train_loss": 0.0, "val_top1": 0.0}}, buffer)
    return buffer.tell()


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return ("CUDA: torch.cuda.max_memory_allocated over the case's steps less what was allocated before it was "
                "built (the earlier cases' tensors); not the CUDA context or the allocator's cache")
    return ("CPU: peak RSS growth of this process over the case's steps above the RSS before it was built (freed "
            "memory handed back with malloc_trim first, the peak reset once it is built)")


def _peak_mib(probe: MemoryProbe, allocated_before: int) -> float | None:
    """The case's own peak: on CUDA the peak allocation less what the earlier cases hold (MemoryProbe's is the
    whole allocation); on a CPU MemoryProbe's RSS growth is the case's already."""
    peak = probe.peak_mib()
    return None if peak is None else peak - allocated_before / 2**20


def build_case(case: str, settings: Settings, backbone: str, images: torch.Tensor, targets: torch.Tensor) -> tuple:
    """Build the case, take its MEMORY_STEPS steps and measure what does not need the timed rounds: (its record, its
    model, its optimizer); a case that cannot be built (LoRA without peft) is one sentence, "not_measured", and
    (record, None, None)."""
    device, classes = settings.device, [f"class_{index}" for index in range(settings.classes)]
    cfg = case_config(case, backbone, STEP_POOLING, settings.image_size, settings.classes)
    probe = MemoryProbe(device).begin()
    allocated_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    try:
        model = build_model(cfg.model, settings.classes, input_size=settings.image_size)
    except UserError as error:
        return {"case": case, "not_measured": str(error)}, None, None
    model.to(device, memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model)
    probe.ready()
    memory_steps = [timed_step(model, optimizer, images, targets, settings) for _ in range(MEMORY_STEPS)]
    peak_mib = _peak_mib(probe, allocated_before)
    trained, total = trained_share(model)
    sha256 = fingerprint(model.state_dict(), frozen_keys(model)) if cfg.model.adapt != "none" else None
    checkpoints = {STEP_POOLING: checkpoint_bytes(cfg, model, classes, sha256)}
    for pooling in CHECKPOINT_POOLINGS:
        if pooling not in checkpoints:  # the same backbone under another head, made only to be saved
            other_cfg = case_config(case, backbone, pooling, settings.image_size, settings.classes)
            head = build_pooling(other_cfg.model, channels=model.pooling.output_dim)  # avg's vector: the channels
            checkpoints[pooling] = checkpoint_bytes(other_cfg, BilinearCNN(model.backbone, head, settings.classes),
                                                    classes, sha256)
    record = {
        "case": case, "adapt": cfg.model.adapt, "freeze_backbone": cfg.model.freeze_backbone,
        "trained_params": trained, "all_params": total,
        "trained_backbone_params": sum(p.numel() for p in model.backbone.parameters() if p.requires_grad),
        "peak_memory_mib": peak_mib, "optimizer_state_bytes": state_bytes(optimizer),
        "checkpoint_bytes": checkpoints, "memory_step_seconds": memory_steps, "step_seconds": [],
    }
    return record, model, optimizer


def _ratio(numerator, denominator) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def compute_ratios(cases: dict) -> dict:
    """Each adaptation against full fine-tuning: step time (the median over rounds of the round's ratio, the two
    steps taken seconds apart, so that a drift of the machine's speed between rounds cancels), peak memory,
    optimizer state; None where a case was not measured."""
    full, ratios = cases["full"], {}
    for name, case in cases.items():
        if name == "full":
            continue
        measured = "not_measured" not in case and "not_measured" not in full
        ratios[name] = {
            "step_time_vs_full": statistics.median(mine / theirs for mine, theirs in
                                                   zip(case["step_seconds"], full["step_seconds"]))
            if measured else None,
            "peak_memory_vs_full": _ratio(case.get("peak_memory_mib"), full.get("peak_memory_mib")),
            "optimizer_state_vs_full": _ratio(case.get("optimizer_state_bytes"), full.get("optimizer_state_bytes")),
        }
    return ratios


def check_targets(cases: dict, ratios: dict) -> list[dict]:
    checks = []
    for key, label, limit in (("step_time_vs_full", "step time / full fine-tuning's", STEP_TARGET),
                              ("optimizer_state_vs_full", "optimizer state / full fine-tuning's", STATE_TARGET)):
        for name, ratio in ratios.items():
            checks.append({"case": name, "label": f"{name}: {label}", "comparison": "<=", "target": limit,
                           "value": ratio[key]})
    lora = cases.get("lora", {})
    compact = lora.get("checkpoint_bytes", {}).get("compact")
    checks.append({"case": "lora", "label": "lora: best.pt with the compact head, MB", "comparison": "<",
                   "target": CHECKPOINT_TARGET_MB, "value": None if compact is None else compact / MB})
    for check in checks:
        value, target = check["value"], check["target"]
        passed = None if value is None else value <= target if check["comparison"] == "<=" else value < target
        check["status"] = "n/a" if passed is None else "PASS" if passed else "MISS"
    return checks


def run_peft(settings: Settings, backbone: str = BACKBONE) -> dict:
    configure_device(settings.device)
    whole_run = CpuShare()
    images, targets = random_batch(settings, channels_last=True)
    built = [build_case(case, settings, backbone, images, targets) for case in CASES]
    cases = {record["case"]: record for record, _, _ in built}
    timed = [(record, model, optimizer) for record, model, optimizer in built if model is not None]
    del built
    for index in range(settings.warmup + settings.steps):
        for record, model, optimizer in timed if index % 2 == 0 else timed[::-1]:
            seconds = timed_step(model, optimizer, images, targets, settings)
            if seconds is None:
                raise UserError(f"a step of {record['case']} ended in a non-finite loss on random weights; run the "
                                "bench again with --precision fp32.")
            if index >= settings.warmup:
                record["step_seconds"].append(seconds)
    for record, _, _ in timed:
        record["ms_per_step"] = 1000 * statistics.median(record["step_seconds"])
        record["images_per_sec"] = settings.batch_size / statistics.median(record["step_seconds"])
    ratios = compute_ratios(cases)
    command = (f"python -m bcnn.bench --peft --device {settings.device.type} --image-size {settings.image_size} "
               f"--batch-size {settings.batch_size} --precision {settings.precision} --steps {settings.steps} "
               f"--warmup {settings.warmup} --classes {settings.classes}"
               + (f" --peft-backbone {backbone}" if backbone != BACKBONE else ""))
    return {
        "device": {"type": settings.device.type, "name": device_name(settings.device)},
        "torch": torch.__version__, "threads": torch.get_num_threads(), "backbone": backbone,
        "image_size": settings.image_size, "batch_size": settings.batch_size, "precision": settings.precision,
        "steps": settings.steps, "warmup": settings.warmup, "classes": settings.classes,
        "step_pooling": STEP_POOLING, "optimizer": "SGD, momentum 0.9, fused (build_optimizer)",
        "memory_steps": MEMORY_STEPS, "memory_method": memory_method(settings.device),
        "others_cpu_share": whole_run.others(), "cases": cases, "ratios": ratios,
        "targets": check_targets(cases, ratios), "command": command,
    }


def _number(value, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


def format_peft(result: dict) -> str:
    others = result["others_cpu_share"]
    lines = [f"bcnn.bench --peft on {result['device']['name']} ({result['device']['type']}, {result['threads']} "
             f"threads); torch {result['torch']}",
             f"{result['backbone']} at {result['image_size']} px, batch {result['batch_size']}, precision "
             f"{result['precision']}, {result['classes']} classes, model.pooling={result['step_pooling']}, "
             f"{result['optimizer']}; median of {result['steps']} rounds after {result['warmup']} warm-up, one step "
             "of each case in turn",
             "other processes used " + ("n/a" if others is None else f"{others:.0%}") + " of the CPUs during the run "
             "(the figures are this machine's own only when that is near 0)", ""]
    header = ("case", "trained", "of all", "ms/step", "vs full", "peak MiB", "vs full", "opt. state MB", "vs full",
              f"best.pt MB ({CHECKPOINT_POOLINGS[0]})", f"best.pt MB ({CHECKPOINT_POOLINGS[1]})")
    rows = []
    for name, case in result["cases"].items():
        if "not_measured" in case:
            rows.append((name, f"not measured: {case['not_measured']}"))
            continue
        ratio = result["ratios"].get(name, {})
        reference = name == "full"
        rows.append((name, f"{case['trained_params']:,}", f"{case['trained_params'] / case['all_params']:.2%}",
                     f"{case['ms_per_step']:,.1f}",
                     "reference" if reference else _number(ratio["step_time_vs_full"], "{:.3f}x"),
                     _number(case["peak_memory_mib"], "{:,.0f}"),
                     "reference" if reference else _number(ratio["peak_memory_vs_full"], "{:.3f}x"),
                     f"{case['optimizer_state_bytes'] / MB:,.3f}",
                     "reference" if reference else _number(ratio["optimizer_state_vs_full"], "{:.4f}x"),
                     *(f"{case['checkpoint_bytes'][pooling] / MB:,.2f}" for pooling in CHECKPOINT_POOLINGS)))
    full_rows = [row for row in rows if len(row) == len(header)]
    widths = [max(len(row[i]) for row in [header, *full_rows]) for i in range(len(header))]
    for row in [header, *rows]:
        if len(row) != len(header):
            lines.append(f"{row[0].ljust(widths[0])}  {row[1]}")
            continue
        lines.append("  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                               for i, cell in enumerate(row)))
    lines += ["", "notes:",
              "  trained: parameters that train (the head's included), of all the model's; ms/step: train_one_epoch's "
              "step (forward, loss, backward, optimizer step) on a device-resident batch; vs full: the median over "
              "rounds of the round's ratio",
              f"  peak memory: each case over its own first {result['memory_steps']} steps, the earlier cases built "
              f"but idle: its weights, gradients, optimizer state and activations; {result['memory_method']}",
              "  opt. state: the optimizer's state tensors after those steps; best.pt: as bcnn.train writes it (a "
              "model.adapt run's keeps what trained and the frozen backbone's fingerprint, full fine-tuning's every "
              "weight), with the step's head and with the compact head (8,192-d); MB = 10^6 bytes",
              "", "targets (issue 31):"]
    width = max(len(check["label"]) for check in result["targets"])
    for check in result["targets"]:
        value = _number(check["value"], "{:.4f}" if check["target"] < 1 else "{:.2f}")
        lines.append(f"  {check['label'].ljust(width)}  {check['comparison']:>2} {check['target']:<5}  {value:>7}  "
                     f"{check['status']}")
    lines += ["", f"reproduce: {result['command']}"]
    return "\n".join(lines)
