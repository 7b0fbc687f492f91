"""Several runs' evaluations in one table, with the mean and spread over seeds.

    python -m bcnn.report runs/cub_vgg16_stage2_seed*          # the test split, best.pt of each run
    python -m bcnn.report runs/a runs/b --split val --json

Fine-grained accuracies vary by about a point between seeds, so one run cannot tell a gain from noise. For each
run directory this reads what `python -m bcnn.eval` wrote beside its checkpoint (eval_<checkpoint>_<split>.json,
and eval_<checkpoint>_<split>_flip.json when evaluated with --tta flip) and its config.yaml, and prints per run
top-1, top-5 and mean per-class accuracy, single view and flip side by side, and the k-NN and retrieval scores
where bcnn.eval computed them (--knn, --retrieval; an evaluation of a class-disjoint test split has those alone),
then the mean and the sample standard deviation over the runs. It evaluates nothing itself, and says which runs lack an evaluation.

A run directory given twice (or through a link) counts once. An evaluation of another epoch than the run's
checkpoint now holds (best.pt was replaced after bcnn.eval ran) is refused, naming the command that renews it; one
whose checkpoint was moved away is reported with a note that it could not be checked.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import yaml

from bcnn.errors import UserError, exit_on_user_error
from bcnn.protocols import flat_scores

METRICS = (("top1", "top-1"), ("top5", "top-5"), ("mean_class_acc", "mean per-class"))
# bcnn.eval --knn / --retrieval's scores (the single view's JSON: they read the embed vectors, not the TTA's logits),
# flattened: knn_top1@<k>, recall@<K>, precision@1, r_precision, map@r; the table shows these three, the JSON all.
TABLE_PROTOCOLS = (("knn_top1@20", "k-NN@20"), ("recall@1", "R@1"), ("map@r", "MAP@R"))
VIEWS = (("", "single view"), ("_flip", "flip"))
# Keys that differ between runs of one experiment by design; any other difference is pointed out.
EXPECTED_TO_DIFFER = {("train", "seed"), ("train", "run_dir"), ("train", "init_from")}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bcnn.report", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (each with its eval JSONs)")
    parser.add_argument("--split", default="test", choices=["train", "val", "trainval", "test"])
    parser.add_argument("--checkpoint", default="best", choices=["best", "last"],
                        help="whose evaluation: best (default) or last")
    parser.add_argument("--json", action="store_true", help="print the table as JSON and nothing else")
    return parser.parse_args(argv)


def read_run(run_dir: Path, split: str, checkpoint: str) -> dict:
    """One run's row: its seed and, per view, its metrics (None for a view it was not evaluated with)."""
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a run directory; give the folders bcnn.train wrote (runs/...).")
    checkpoint_file = run_dir / f"{checkpoint}.pt"
    evaluate = f"python -m bcnn.eval --checkpoint {checkpoint_file} --split {split}"
    views = {suffix: read_evaluation(run_dir / f"eval_{checkpoint}_{split}{suffix}.json",
                                     evaluate + (" --tta flip" if suffix else ""))
             for suffix, _ in VIEWS}
    single = views[""]  # k-NN and retrieval are read from it alone
    protocols = flat_scores(single) if single is not None else {}
    if single is not None and "embeddings_only" in single:  # no top-1 (the test split of a class-disjoint run)
        views[""] = None
    if views[""] is None and views["_flip"] is None and not protocols:
        raise UserError(f"{run_dir} has no evaluation of {checkpoint}.pt on {split}; run {evaluate} (add --tta flip "
                        "for the flip column) first.")
    current = checkpoint_epoch(checkpoint_file)
    for suffix, result in {**views, "": single}.items():
        if result is not None and current is not None and result.get("epoch") != current:
            name = f"eval_{checkpoint}_{split}{suffix}.json"
            raise UserError(f"{run_dir / name} evaluates epoch {result.get('epoch')}, but {checkpoint_file} now "
                            f"holds epoch {current}; run {evaluate}{' --tta flip' if suffix else ''} again.")
    if current is None:
        print(f"note: {checkpoint_file} is not there, so {run_dir}'s evaluation could not be checked against it",
              file=sys.stderr)
    config = read_config(run_dir)
    evaluations = [result for result in (single, views["_flip"]) if result]
    return {"run": str(run_dir), "seed": (config.get("train") or {}).get("seed"), "config": config,
            "views": {suffix: {key: result[key] for key, _ in METRICS} if result else None
                      for suffix, result in views.items()},
            "protocols": protocols,
            "images": next(result["count"] for result in evaluations),
            "data_roots": sorted({str(result.get("data_root")) for result in evaluations})}


def read_evaluation(path: Path, evaluate: str) -> dict | None:
    """An eval JSON bcnn.eval wrote, or None when there is none; a damaged one is one sentence."""
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        reason = "not UTF-8" if isinstance(error, UnicodeDecodeError) else f"not JSON: {error}"
        raise UserError(f"{path} cannot be read ({reason}); delete it and run {evaluate} again.") from None
    embeddings_only = isinstance(result, dict) and "embeddings_only" in result  # scored by k-NN / retrieval alone
    scored = () if embeddings_only else tuple(key for key, _ in METRICS)
    needed = ("count", "epoch", *scored)
    if not isinstance(result, dict) or any(key not in result for key in needed) or not all(
            _is_number(result[key]) for key in ("count", *scored)):
        raise UserError(f"{path} is not an evaluation bcnn.eval wrote (it needs {', '.join(needed)} with numbers); "
                        f"delete it and run {evaluate} again.")
    protocols = flat_scores(result)
    if not all(_is_number(value) for value in protocols.values()):
        raise UserError(f"{path} holds k-NN or retrieval scores that are not numbers, so it is not an evaluation as "
                        f"bcnn.eval writes it; delete it and run {evaluate} again.")
    impossible = [f"{key} {value}" for key, value in [*((key, result[key]) for key in scored), *protocols.items()]
                  if not 0 <= value <= 100]
    if not (isinstance(result["count"], int) and result["count"] > 0):
        impossible.insert(0, f"count {result['count']}")
    if impossible:  # NaN fails every comparison, so it lands here too
        raise UserError(f"{path} holds impossible values ({', '.join(impossible)}: accuracies are percentages of a "
                        f"positive image count), so it is not an evaluation as bcnn.eval writes it; delete it and run "
                        f"{evaluate} again.")
    return result


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def checkpoint_epoch(path: Path) -> int | None:
    """The epoch a checkpoint holds, read without its tensors (memory-mapped); None when it is not there."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return state["epoch"]
    except Exception:  # noqa: BLE001 - any damage to the file reads the same to the user
        raise UserError(f"{path} cannot be read as a bcnn checkpoint (damaged or not one), so its evaluation cannot "
                        "be checked against it; move it out of the run directory or train the run again.") from None


def read_config(run_dir: Path) -> dict:
    """The run's config.yaml as a dict of sections ({} when there is none); a damaged one is one sentence."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        reason = "not UTF-8" if isinstance(error, UnicodeDecodeError) else "not valid YAML"
        raise UserError(f"{path} cannot be read ({reason}); restore the config.yaml bcnn.train wrote there, or "
                        "remove it (the table then shows no seed for this run).") from None
    if config is None:
        return {}
    if not isinstance(config, dict) or not all(isinstance(values, dict) for values in config.values()):
        raise UserError(f"{path} is not a config bcnn.train wrote (it needs sections such as train: with keys); "
                        "restore it, or remove it (the table then shows no seed for this run).")
    return config


def unique_runs(runs: list[str]) -> list[Path]:
    """The run directories in the order given, each once, however it was spelled (a link, a trailing slash)."""
    seen, unique = set(), []
    for run in runs:
        key = Path(run).resolve()
        if key in seen:
            print(f"note: {run} was given more than once; it counts once", file=sys.stderr)
            continue
        seen.add(key)
        unique.append(Path(run))
    return unique


def summarise(rows: list[dict]) -> dict:
    """Per view and metric, and per k-NN or retrieval score any run has: the mean and sample standard deviation
    over the runs that have it (std needs two)."""
    summary = {}
    for suffix, _ in VIEWS:
        for key, _ in METRICS:
            summary[f"{key}{suffix}"] = spread([row["views"][suffix][key] for row in rows if row["views"][suffix]])
    for key in dict.fromkeys(key for row in rows for key in row["protocols"]):  # in the JSON's order
        summary[key] = spread([row["protocols"][key] for row in rows if key in row["protocols"]])
    return summary


def spread(values: list[float]) -> dict:
    return {"n": len(values), "mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None}


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


def data_differences(rows: list[dict]) -> list[str]:
    """Which runs were evaluated on which data, where they were not all evaluated on the same data root and image
    count: a mean over different test sets is no measure of seed noise (a dataset that merely moved reads the
    same)."""
    groups: dict[tuple, list[str]] = {}
    for row in rows:
        groups.setdefault((", ".join(row["data_roots"]), row["images"]), []).append(row["run"])
    if len(groups) < 2:
        return []
    return [f"{', '.join(runs)} on {root} ({images} images)" for (root, images), runs in groups.items()]


def format_table(rows: list[dict], summary: dict, split: str, checkpoint: str, differing: list[str],
                 data: list[str]) -> str:
    protocols = [(key, label) for key, label in TABLE_PROTOCOLS if key in summary]  # columns only where scored
    header = (["run", "seed", "images"] + [f"{label} ({view})" for suffix, view in VIEWS for _, label in METRICS]
              + [label for _, label in protocols])

    def cell(value):
        return "-" if value is None else f"{value:.2f}"

    lines = [header]
    for row in rows:
        lines.append([row["run"], "-" if row["seed"] is None else str(row["seed"]), str(row["images"])]
                     + [cell(row["views"][suffix][key] if row["views"][suffix] else None)
                        for suffix, _ in VIEWS for key, _ in METRICS]
                     + [cell(row["protocols"].get(key)) for key, _ in protocols])
    spreads = []
    for key in [f"{key}{suffix}" for suffix, _ in VIEWS for key, _ in METRICS] + [key for key, _ in protocols]:
        stats = summary[key]
        spreads.append("-" if stats["mean"] is None else
                       f"{stats['mean']:.2f} ± {stats['std']:.2f}" if stats["std"] is not None else
                       f"{stats['mean']:.2f}")
    lines.append([f"mean ± std over {len(rows)} run(s)", "", ""] + spreads)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [f"{split} split, {checkpoint}.pt of each run; accuracies in %; std: sample standard deviation"
            + ("; k-NN@20: k-NN top-1 with k = 20, R@1: Recall@1 (--json has every k and K)" if protocols else "")]
    for index, line in enumerate(lines):
        if index == len(lines) - 1:
            text.append("  ".join("-" * width for width in widths))
        text.append("  ".join(value.ljust(widths[i]) if i == 0 else value.rjust(widths[i])
                              for i, value in enumerate(line)).rstrip())
    if len(rows) == 1:
        text.append("one run: no spread to show; train more seeds (make stage2 SEEDS=3) to tell a gain from noise")
    if differing:
        text.append(f"note: the runs differ in {', '.join(differing)}, not only in their seed")
    if data:
        text.append(f"note: the runs were evaluated on different data: {'; '.join(data)}; the mean mixes them "
                    "unless these are one dataset that moved")
    return "\n".join(text)


def main(argv=None) -> dict:
    args = parse_args(argv)
    rows = [read_run(run, args.split, args.checkpoint) for run in unique_runs(args.runs)]
    summary, differing, data = summarise(rows), config_differences(rows), data_differences(rows)
    result = {"split": args.split, "checkpoint": args.checkpoint, "config_differences": differing,
              "data_differences": data,
              "runs": [{key: value for key, value in row.items() if key != "config"} for row in rows],
              "summary": summary}
    print(json.dumps(result, indent=2) if args.json else
          format_table(rows, summary, args.split, args.checkpoint, differing, data), file=sys.stdout)
    return result


if __name__ == "__main__":
    exit_on_user_error(main)()
