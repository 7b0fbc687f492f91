"""python -m bcnn.data download | synth | verify: see bcnn/data/__init__.py."""

from __future__ import annotations

import argparse

from bcnn.data import describe
from bcnn.data.cub import download_cub, write_synthetic_cub
from bcnn.errors import exit_on_user_error

def _synth(args: argparse.Namespace) -> None:
    path = write_synthetic_cub(args.root, args.classes, args.per_class, args.seed, args.image_size)
    print(f"wrote {describe(path)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bcnn.data", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    download = commands.add_parser("download", help="download, check and extract CUB-200-2011 into ROOT")
    download.add_argument("--root", default="data", help="folder to hold CUB_200_2011/ and the tarball")
    download.set_defaults(run=lambda args: download_cub(args.root))
    synth = commands.add_parser("synth", help="write a small generated dataset in the CUB format")
    synth.add_argument("--root", required=True, help="dataset folder to write: images/ and the text files")
    synth.add_argument("--classes", type=int, default=5, help="number of classes")
    synth.add_argument("--per-class", type=int, default=12, help="images per class, about half of them train")
    synth.add_argument("--seed", type=int, default=0, help="same seed, same files")
    synth.add_argument("--image-size", type=int, default=96, help="typical image side in pixels")
    synth.set_defaults(run=_synth)
    verify = commands.add_parser("verify", help="check a dataset and print its per-split image counts")
    verify.add_argument("--root", required=True, help="the CUB_200_2011 folder, or the folder dataset's root")
    verify.add_argument("--format", choices=("cub", "folder"), default="cub", help="dataset layout")
    verify.add_argument("--val-fraction", type=float, default=0.1, help="share of each class held out as val")
    verify.add_argument("--split-seed", type=int, default=0, help="seed of the val hold-out")
    verify.set_defaults(run=lambda a: print(describe(a.root, a.format, a.val_fraction, a.split_seed)))
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    exit_on_user_error(main)()
