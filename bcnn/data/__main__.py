"""python -m bcnn.data download | synth | verify: see bcnn/data/__init__.py."""

from __future__ import annotations

import argparse
from pathlib import Path

from bcnn.data import DOWNLOADS, FOLDERS, READERS, WRITERS, describe
from bcnn.data.dataset import refuse_a_file
from bcnn.data.download import check_room
from bcnn.errors import UserError, exit_on_user_error


def _verify(args: argparse.Namespace) -> None:
    if args.split_seed < 0:
        raise UserError(f"--split-seed must be at least 0, got {args.split_seed}; pass 0 or a positive whole number.")
    if not 0.0 <= args.val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {args.val_fraction}; pass e.g. 0.1, or 0 for no val.")
    refuse_a_file(args.root, "--root", READERS[args.format].FOLDER_HOLDS)
    print(describe(args.root, args.format, args.val_fraction, args.split_seed))


def _synth(args: argparse.Namespace) -> None:
    # A new dataset goes into a new or empty folder: written over an existing one it would rewrite its tables.
    target = Path(args.root) if args.format == "cub" else Path(args.root) / FOLDERS[args.format]
    check_room(target)
    held = sorted(target.iterdir()) if target.is_dir() else []
    if held:
        names = ", ".join(path.name for path in held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
        way_out = ("pass --root a new or empty folder" if args.format == "cub" else
                   f"pass another --root, or move {target} away")
        raise UserError(f"{target} is not empty (it holds {names}), and synth writes a new dataset there; {way_out}.")
    path = WRITERS[args.format](args.root, args.classes, args.per_class, args.seed, args.image_size)
    print(f"wrote {describe(path, args.format)}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bcnn.data", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    download = commands.add_parser("download", help="download, check and extract a dataset into ROOT")
    download.add_argument("--dataset", choices=tuple(DOWNLOADS), default="cub", help="which dataset")
    download.add_argument("--root", default="data", help="folder to hold the dataset's folder and its archive")
    download.set_defaults(run=lambda a: DOWNLOADS[a.dataset](a.root))
    synth = commands.add_parser("synth", help="write a small generated dataset in a real format's exact layout")
    synth.add_argument("--format", choices=tuple(WRITERS), default="cub", help="dataset layout")
    synth.add_argument("--root", required=True, help="for cub the dataset folder itself (images/ and the text "
                                                     "files); for the others the folder to hold it")
    synth.add_argument("--classes", type=int, default=5, help="number of classes")
    synth.add_argument("--per-class", type=int, default=12, help="images per class, about half of them train")
    synth.add_argument("--seed", type=int, default=0, help="same seed, same files")
    synth.add_argument("--image-size", type=int, default=96, help="typical image side in pixels")
    synth.set_defaults(run=_synth)
    verify = commands.add_parser("verify", help="check a dataset (its tables, boxes and every image, opened as "
                                                "training opens it) and print its per-split image counts")
    verify.add_argument("--root", required=True, help="the dataset's folder (the one --data-root takes)")
    verify.add_argument("--format", choices=tuple(READERS), default="cub", help="dataset layout")
    verify.add_argument("--val-fraction", type=float, default=0.1, help="share of each class held out as val")
    verify.add_argument("--split-seed", type=int, default=0, help="seed of the val hold-out")
    verify.set_defaults(run=_verify)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    exit_on_user_error(main)()
