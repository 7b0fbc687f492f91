"""The benchmark: how fast the B-CNN trains on this machine, against what it cannot beat (`python -m bcnn.bench`,
`make bench`). It prints figures and asserts nothing.

    __main__.py   the command line: its options and their defaults, the combinations refused, main(argv)
    steps.py      the step bench: its cases (bare, stage2_step, stage1_step, eval, the heads, the loader, the
                  feature cache's epochs), run(settings), the ratios between the cases and their targets
    recipe.py     --recipe: the whole recipe's wall time at CUB's scale, on generated photo-like JPEGs
    decoders.py   --decoders: the batched path's JPEG decoders (TorchCodec, torchvision) beside PIL
    augment.py, cost.py, protocols.py, probe.py, peft.py, runtime.py   --augment, --cost, --protocols,
                  --probe-grid, --peft, --runtime: the augmentations' cost, every model's size, k-NN at CUB's size, the
                  probe sweep, parameter-efficient fine-tuning against full, an exported model under ONNX Runtime
                  (each with its own text report)
    sqrt_sweep.py, sqrt_backward.py   python -m bcnn.bench.sqrt_sweep / .sqrt_backward: the matrix square root's
                  truncation and backwards, measured on VGG16 maps (docs/pooling.md)
    report.py     the text report of either (with --json, main prints their result as it is)
    probes.py     what both measure with: other processes' share of the CPUs, peak memory, the device's name,
                  the CUDA sync around a clock read
    settings.py   Settings: the resolved options that both take

Imports run one way, none back to its caller: __main__ imports settings, steps, report and (for --recipe or
--decoders alone) recipe or decoders; decoders imports recipe (its photos); recipe and report import steps; steps
and recipe import probes and settings, which import nothing of the bench. This file imports nothing: `python -m
bcnn.bench` runs __main__.py, and the callers import from the modules themselves (bcnn.bench.__main__.main,
bcnn.bench.steps.case_names, bcnn.bench.recipe.photo_like).
"""
