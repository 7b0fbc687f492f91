"""The whole pipeline on a generated mini-CUB, on the CPU, in minutes: what `make demo` runs.

    python -m bcnn.demo [--root demo] [--crop 64] [--epochs 10]

Writes a mini-CUB in the real CUB-200-2011 format (`python -m bcnn.data synth`), trains stage 1 and stage 2
with experiments/demo_stage{1,2}.yaml through the same `bcnn.train` entry point as the real recipe, then
evaluates stage 2's best.pt on the test split with `bcnn.eval`. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from bcnn import eval as evaluate_cli
from bcnn import train as train_cli
from bcnn.data import write_synthetic_cub
from bcnn.errors import exit_on_user_error

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bcnn.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="demo", help="folder for the mini-CUB and the runs (replaced)")
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--per-class", type=int, default=24, help="images per class, train and test together")
    parser.add_argument("--crop", type=int, default=64, help="input size of the model")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of each stage")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    root = Path(args.root)
    data_root, runs = root / "mini_cub", root / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    shutil.rmtree(data_root, ignore_errors=True)
    write_synthetic_cub(data_root, classes=args.classes, per_class=args.per_class, seed=args.seed)

    common = [f"--data-root={data_root}", "--device=cpu", f"--data.crop={args.crop}",
              f"--data.resize={args.crop * 5 // 4}", f"--train.epochs={args.epochs}", f"--train.seed={args.seed}"]
    for stage in ("stage1", "stage2"):
        print(f"\n== {stage} ==")
        extra = [f"--train.init_from={runs / 'stage1' / 'best.pt'}"] if stage == "stage2" else []
        train_cli.main(["--config", str(EXPERIMENTS / f"demo_{stage}.yaml"), f"--run-dir={runs / stage}",
                        *common, *extra])
    print("\n== test ==")
    result = evaluate_cli.main(["--checkpoint", str(runs / "stage2" / "best.pt"), "--split", "test",
                                "--device", "cpu"])
    print(f"\nrun directories: {runs / 'stage1'}, {runs / 'stage2'} (config.yaml, train.log, metrics.jsonl, "
          f"best.pt, last.pt, eval_best_test.json)")
    print(f"TensorBoard logs: {train_cli.tensorboard_command(runs)}")
    return result


if __name__ == "__main__":
    exit_on_user_error(main)()
