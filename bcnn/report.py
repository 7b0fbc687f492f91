"""Several runs' evaluations in one table, with the mean and spread over seeds.

    python -m bcnn.report runs/cub_vgg16_stage2_seed*          # the test split, best.pt of each run
    python -m bcnn.report runs/a runs/b --split val --json

Fine-grained accuracies vary by about a point between seeds, so one run cannot tell a gain from noise. For each
run directory this reads what `python -m bcnn.eval` wrote beside its checkpoint (eval_<checkpoint>_<split>.json,
and eval_<checkpoint>_<split>_flip.json when evaluated with --tta flip) and its config.yaml, and prints per run
top-1, top-5 and mean per-class accuracy, single view and flip side by side, then the mean and the sample
standard deviation over the runs. It evaluates nothing itself, and says which runs lack an evaluation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import yaml

from bcnn.errors import UserError, exit_on_user_error

METRICS = (("top1", "top-1"), ("top5", "top-5"), ("mean_class_acc", "mean per-class"))
VIEWS = (("", "single view"), ("_flip", "flip"))
# Keys that differ between runs of one experiment by design; any other difference is pointed out.
EXPECTED_TO_DIFFER = {("train", "seed"), ("train", "run_dir"), ("train", "init_from")}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bcnn.report", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (each with its eval JSONs)")
    parser.add_argument("--split", default="test", choices=["train", "val", "trainval", "test"])
    parser.add_argument("--checkpoint", default="best", help="whose evaluation: best (default) or last")
    parser.add_argument("--json", action="store_true", help="print the table as JSON and nothing else")
    return parser.parse_args(argv)


def read_run(run_dir: Path, split: str, checkpoint: str) -> dict:
    """One run's row: its seed and, per view, its metrics (None for a view it was not evaluated with)."""
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a run directory; give the folders bcnn.train wrote (runs/...).")
    views = {}
    for suffix, _ in VIEWS:
        path = run_dir / f"eval_{checkpoint}_{split}{suffix}.json"
        views[suffix] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    if views[""] is None and views["_flip"] is None:
        raise UserError(f"{run_dir} has no evaluation of {checkpoint}.pt on {split}; run python -m bcnn.eval "
                        f"--checkpoint {run_dir / (checkpoint + '.pt')} --split {split} (add --tta flip for the "
                        "flip column) first.")
    config_file = run_dir / "config.yaml"
    config = yaml.safe_load(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    return {"run": str(run_dir), "seed": (config.get("train") or {}).get("seed"), "config": config,
            "views": {suffix: {key: result[key] for key, _ in METRICS} if result else None
                      for suffix, result in views.items()},
            "images": next(result["count"] for result in views.values() if result)}


def summarise(rows: list[dict]) -> dict:
    """Per view and metric: the mean and sample standard deviation over the runs that have it (std needs two)."""
    summary = {}
    for suffix, _ in VIEWS:
        for key, _ in METRICS:
            values = [row["views"][suffix][key] for row in rows if row["views"][suffix]]
            summary[f"{key}{suffix}"] = {
                "n": len(values),
                "mean": statistics.fmean(values) if values else None,
                "std": statistics.stdev(values) if len(values) > 1 else None,
            }
    return summary


def config_differences(rows: list[dict]) -> list[str]:
    """The config keys (other than seed and paths) whose values differ between the runs: worth knowing before
    reading a spread as seed noise."""
    keys = sorted({(section, key) for row in rows for section, values in row["config"].items()
                   if isinstance(values, dict) for key in values} - EXPECTED_TO_DIFFER)
    differing = []
    for section, key in keys:
        values = {json.dumps((row["config"].get(section) or {}).get(key)) for row in rows}
        if len(values) > 1:
            differing.append(f"{section}.{key}")
    return differing


def format_table(rows: list[dict], summary: dict, split: str, checkpoint: str, differing: list[str]) -> str:
    header = ["run", "seed", "images"] + [f"{label} ({view})" for suffix, view in VIEWS for _, label in METRICS]

    def cell(value):
        return "-" if value is None else f"{value:.2f}"

    lines = [header]
    for row in rows:
        lines.append([row["run"], "-" if row["seed"] is None else str(row["seed"]), str(row["images"])]
                     + [cell(row["views"][suffix][key] if row["views"][suffix] else None)
                        for suffix, _ in VIEWS for key, _ in METRICS])
    spread = []
    for suffix, _ in VIEWS:
        for key, _ in METRICS:
            stats = summary[f"{key}{suffix}"]
            spread.append("-" if stats["mean"] is None else
                          f"{stats['mean']:.2f} ± {stats['std']:.2f}" if stats["std"] is not None else
                          f"{stats['mean']:.2f}")
    lines.append([f"mean ± std over {len(rows)} run(s)", "", ""] + spread)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [f"{split} split, {checkpoint}.pt of each run; accuracies in %; std: sample standard deviation"]
    for index, line in enumerate(lines):
        if index == len(lines) - 1:
            text.append("  ".join("-" * width for width in widths))
        text.append("  ".join(value.ljust(widths[i]) if i == 0 else value.rjust(widths[i])
                              for i, value in enumerate(line)).rstrip())
    if len(rows) == 1:
        text.append("one run: no spread to show; train more seeds (make stage2 SEEDS=3) to tell a gain from noise")
    if differing:
        text.append(f"note: the runs differ in {', '.join(differing)}, not only in their seed")
    return "\n".join(text)


def main(argv=None) -> dict:
    args = parse_args(argv)
    rows = [read_run(Path(run), args.split, args.checkpoint) for run in args.runs]
    summary, differing = summarise(rows), config_differences(rows)
    result = {"split": args.split, "checkpoint": args.checkpoint, "config_differences": differing,
              "runs": [{key: value for key, value in row.items() if key != "config"} for row in rows],
              "summary": summary}
    print(json.dumps(result, indent=2) if args.json else
          format_table(rows, summary, args.split, args.checkpoint, differing), file=sys.stdout)
    return result


if __name__ == "__main__":
    exit_on_user_error(main)()
