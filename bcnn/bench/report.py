"""The text report of the step bench (format_report) and of the recipe bench (format_recipe)."""

from __future__ import annotations

from bcnn.bench.steps import CACHE_CASES, NOT_MEASURED, timed_heads

DISTURBED = 0.1  # other processes' share of the CPUs above which a case's figures are flagged


def _ratio_text(name: str, ratios: dict) -> str:
    text = {
        "stage2_step": ("stage2_step_time_vs_bare", "{:.2f}x bare's time"),
        "stage1_step": ("stage1_step_time_vs_bare", "{:.2f}x bare's time"),
        "eval": ("eval_time_vs_bare", "{:.2f}x bare's time"),
        "stage2_step_fp32_nchw": ("speedup_vs_fp32_nchw", "stage2_step {:.2f}x faster"),
        "loader": ("loader_vs_stage2_step", "{:.2f}x stage2_step's images/s"),
        "cached_stage1_epoch": ("cached_vs_live_epoch", "live epoch / this: {:.2f}x"),
        **{f"stage2_step_{head}": (f"{head}_step_time_vs_bilinear", "{:.2f}x stage2_step's time")
           for head in timed_heads()},
        **{f"heads_{head}": (f"heads_{head}_vs_bilinear", "{:.2f}x heads_bilinear's time") for head in timed_heads()},
    }.get(name)
    if name in ("bare", "heads_bilinear"):
        return "the reference"
    if text is None or ratios.get(text[0]) is None:
        return ""
    return text[1].format(ratios[text[0]])


def _percent(share: float | None) -> str:
    return "n/a" if share is None else f"{share:.0%}"


def _digits_apart(value: float | None, target: float) -> int:
    """Decimals enough that a value just short of its target (2.4996 vs 2.5) is not shown as the target."""
    digits = 2
    while value is not None and value != target and round(value, digits) == target and digits < 6:
        digits += 1
    return digits


def _number(value, digits: int) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def format_report(result: dict) -> str:
    """The human-readable form of run()'s result: header, table, notes, targets and the command."""
    device = result["device"]
    threads = f"{result['threads']} threads" + (f", native bf16 {'yes' if device['native_bf16'] else 'no'}"
                                                if device["type"] == "cpu" else "")
    lines = [
        f"bcnn.bench on {device['name']} ({device['type']}, {threads}); torch {result['torch']}",
        f"image {result['image_size']} px, batch {result['batch_size']}, precision {result['precision']}, "
        f"{result['classes']} classes; median of {result['steps']} steps after {result['warmup']} warm-up; "
        f"loader workers {result['num_workers']}; heads side by side at {result['heads_image_size']} px, batch "
        f"{result['heads_batch_size']}",
        f"other processes used {_percent(result['others_cpu_share'])} of the CPUs during the run "
        f"(the figures are this machine's own only when that is near 0)",
        "",
    ]
    header = ("case", "precision", "layout", "images/s", "ms/step", "peak MiB", "ratio")
    rows = [(name, case["precision"], case["layout"], _number(case["images_per_sec"], 1),
             _number(case["ms_per_step"], 1), _number(case["peak_memory_mib"], 0),
             _ratio_text(name, result["ratios"])) for name, case in result["cases"].items()]
    if result["feature_cache"] != "measured":
        rows += [(name, "-", "-", "-", "-", "-", NOT_MEASURED) for name in CACHE_CASES]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    right = {3, 4, 5}
    for row in [header, *rows]:
        lines.append("  ".join(str(cell).rjust(widths[i]) if i in right else str(cell).ljust(widths[i])
                               for i, cell in enumerate(row)).rstrip())
    disturbed = [f"{name} ({_percent(case['others_cpu_share'])})" for name, case in result["cases"].items()
                 if (case.get("others_cpu_share") or 0) > DISTURBED]
    if disturbed:
        lines += ["", f"warning: other processes took over {DISTURBED:.0%} of the CPUs during {', '.join(disturbed)}; "
                      "run again on a quiet machine before trusting those rows"]
    lines += [
        "",
        "notes:",
        "  steps: random device-resident batches (no loader); ms/step is the median step, images/s = batch / it",
        "  heads_*: one step of each head in turn, round after round; ratio = the median over rounds of the round's "
        "ratio; no per-case peak memory (all five are built)",
        "  loader: whole epochs of the generated images (workers running), ms/step = epoch / batches",
        "  epochs: one epoch each (after at most one warm-up epoch), ms/step = epoch / optimizer steps; "
        "cache_build is the one-off cost before the cached epochs",
        f"  peak memory: {result['memory_method']}",
        "",
        "targets:",
    ]
    width = max(len(check["label"]) for check in result["targets"])
    for check in result["targets"]:
        value = (NOT_MEASURED if check["value"] is None and check["ratio"] == "cached_vs_live_epoch"
                 else _number(check["value"], _digits_apart(check["value"], check["target"])))
        lines.append(f"  {check['label'].ljust(width)}  {check['comparison']:>2} {check['target']:<5}  "
                     f"{value:>6}  {check['status']}")
    lines += ["", f"reproduce: {result['command']}"]
    return "\n".join(lines)


def format_recipe(result: dict) -> str:
    data, projection = result["data"], result["projection"]
    lines = [
        f"bcnn.bench --recipe on {result['device']['name']} ({result['device']['type']}); torch {result['torch']}",
        f"image {result['image_size']} px, batch {result['batch_size']}, precision {result['precision']}, "
        f"{result['num_workers']} loader workers, images decoded {result['decode']}",
        f"data: {data['train']} train, {data['val']} val, {data['test']} test photo-like JPEGs of "
        f"{data['mean_jpeg_kb']:.0f} KB on average (written in {data['generation_seconds']:.0f} s)",
        "",
        f"{'case':<20} {'images':>7} {'seconds':>9} {'images/s':>10} {'step images/s':>14} {'of step':>8}",
    ]
    for name, case in result["cases"].items():
        step = "-" if case["step_images_per_sec"] is None else f"{case['step_images_per_sec']:,.1f}"
        share = "-" if case["share_of_step"] is None else f"{case['share_of_step']:.0%}"
        lines.append(f"{name:<20} {case['images']:>7} {case['seconds']:>9.2f} {case['images_per_sec']:>10,.1f} "
                     f"{step:>14} {share:>8}")
    counts = projection["images"]
    lines += [
        "",
        f"projection at CUB's size ({counts['train']} train, {counts['val']} val, {counts['test']} test), from the "
        "rates above:",
        f"  stage 1, cached: cache + {projection['epochs']['stage1']} epochs  "
        f"{projection['stage1_cached_seconds']:9.1f} s   (live instead: {projection['stage1_live_seconds']:.1f} s)",
        f"  stage 2: {projection['epochs']['stage2']} epochs + val passes      {projection['stage2_seconds']:9.1f} s",
        f"  test evaluation                       {projection['test_eval_seconds']:9.1f} s",
        f"  total                                 {projection['total_seconds']:9.1f} s "
        f"({projection['total_seconds'] / 60:.1f} min)",
        "",
        f"reproduce: {result['command']}",
    ]
    return "\n".join(lines)


def format_decoders(result: dict) -> str:
    lines = [
        f"bcnn.bench --decoders on {result['device']['name']} ({result['device']['type']}); torch {result['torch']}; "
        f"the batched path uses {result['default_decoder']}",
        f"a batch of {result['images']} photo-like 500 x 375 JPEGs ({result['mean_jpeg_kb']:.0f} KB on average), "
        f"{result['rounds']} rounds, the decoders taken in turn",
        "",
        f"{'decoder':<12} {'s/batch':>9} {'images/s':>10}",
    ]
    for name, speed in result["speed"].items():
        lines.append(f"{name:<12} {speed['median_seconds']:>9.4f} {speed['images_per_sec']:>10,.0f}")
    if result["torchcodec_over_torchvision"] is not None:
        lines.append(f"torchcodec / torchvision, median of the rounds' ratios: "
                     f"{result['torchcodec_over_torchvision']:.3f}")
    lines += ["", "largest difference from PIL's RGB, in grey levels:"]
    for kind, by_decoder in result["max_grey_levels_from_pil"].items():
        lines.append(f"  {kind:<22} " + ", ".join(f"{name} {levels}" for name, levels in by_decoder.items()))
    lines += ["", f"reproduce: {result['command']}"]
    return "\n".join(lines)


def format_augment(result: dict) -> str:
    lines = [
        f"bcnn.bench --augment on {result['device']['name']} ({result['device']['type']}): {result['image_size']} px, "
        f"batch {result['batch_size']}, {result['num_workers']} loader workers",
        f"the stage-2 step: {result['step_images_per_sec']:,.1f} images/s; mixup / CutMix on a batch: "
        f"{result['mixup_cutmix_ms_per_batch']:.2f} ms",
        "",
        f"{'augmentations':<22} {'ms/image':>9} {'loader images/s':>16} {'loader / step':>14}",
    ]
    for row in result["sets"]:
        lines.append(f"{row['augmentations']:<22} {row['ms_per_image']:>9.2f} {row['loader_images_per_sec']:>16,.1f} "
                     f"{row['loader_over_step']:>14.2f}")
    lines += ["", "ms/image: the transform alone on one thread (a worker's CPU time per image); loader / step below 1: "
              "the loader is the bottleneck", f"reproduce: {result['command']}"]
    return "\n".join(lines)


def _millions(count: int) -> str:
    return f"{count / 1e6:,.2f}M"


def format_cost(result: dict) -> str:
    lines = [
        f"bcnn.bench --cost ({result['device']}); torch {result['torch']}: {result['image_size']} px, "
        f"{result['classes']} classes, random weights",
        "",
        f"{'backbone':<14} {'head':<12} {'backbone':>10} {'head':>8} {'classifier':>11} {'total':>10} "
        f"{'vector':>10} {'GFLOPs':>8}",
    ]
    for family, heads in result["families"].items():
        for head, cost in heads.items():
            if "refused" in cost:
                lines.append(f"{family:<14} {head:<12} refused: {cost['refused']}")
                continue
            lines.append(f"{family:<14} {head:<12} {_millions(cost['backbone_params']):>10} "
                         f"{_millions(cost['head_params']):>8} {_millions(cost['classifier_params']):>11} "
                         f"{_millions(cost['total_params']):>10} {cost['vector_size']:>10,} {cost['gflops']:>8.1f}")
    lines += ["", "parameters in millions; GFLOPs: one image's forward, 2 FLOPs per multiply-add of the convolutions "
              "and matrix products (torch.utils.flop_counter)", f"reproduce: {result['command']}"]
    return "\n".join(lines)
