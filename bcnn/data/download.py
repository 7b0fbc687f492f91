"""Fetching a dataset's archive: to a .part file then renamed, md5-checked, extracted without leaving the root,
then verified by the dataset's reader."""

from __future__ import annotations

import hashlib
import os
import tarfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from bcnn.errors import UserError
from bcnn.paths import file_kind


def md5_of(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(url: str, target: Path) -> None:
    """Download to target.part, then rename: an interrupted download never looks like a finished one."""
    part = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as out:
            total, done = int(response.headers.get("Content-Length") or 0), 0
            for chunk in iter(lambda: response.read(1 << 20), b""):
                out.write(chunk)
                done += len(chunk)
                print(f"\rdownloading {target.name}: {done >> 20} / {total >> 20} MiB", end="", flush=True)
        print()
    except OSError as error:  # URLError is an OSError
        part.unlink(missing_ok=True)
        raise UserError(
            f"could not download {url} ({getattr(error, 'reason', error)}); download it by hand, place it at "
            f"{target} and rerun."
        ) from None
    os.replace(part, target)


def _within(base: str, path: str) -> bool:
    return os.path.commonpath([base, os.path.normpath(path)]) == base


def safe_extract(tarball: Path, root: Path) -> None:
    """Check every member before writing anything: no absolute paths, no `..`, no links leading out of root."""
    base = os.path.abspath(root)
    with tarfile.open(tarball) as tar:
        members = tar.getmembers()
        for member in members:
            target = os.path.join(base, member.name)
            safe = not os.path.isabs(member.name) and _within(base, target)
            if member.issym():
                safe = safe and _within(base, os.path.join(os.path.dirname(target), member.linkname))
            if member.islnk():
                safe = safe and _within(base, os.path.join(base, member.linkname))
            if not safe:
                raise UserError(f"{tarball} holds an unsafe member {member.name!r}; delete it and download again.")
        # Python's own "data" filter (3.11.4+) also drops device files and odd permissions.
        tar.extractall(base, members=members, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))


def fetch_advice(root: Path, folder: str, dataset: str) -> str:
    """What to do about a dataset folder root that does not exist: the download into root itself (its archive
    extracts as `folder`), not into a default folder."""
    flag = "" if dataset == "cub" else f" --dataset {dataset}"
    lands = "" if root.name == folder else f", which makes {root.parent / folder}"
    return f"check the path or fetch the dataset with `python -m bcnn.data download{flag} --root {root.parent}`{lands}"


def check_room(folder: Path) -> None:
    """Before a command makes or fills folder: no file stands at folder or above it, named in one sentence."""
    blocker = next((path for path in (folder, *folder.parents) if path.exists() and not path.is_dir()), None)
    if blocker is None:
        return
    kind = file_kind(blocker.stat().st_mode)  # a file, or a named pipe, ...
    if blocker == folder:
        raise UserError(f"{folder} is {kind}, where a folder belongs; pass another --root or move it away.")
    raise UserError(f"{blocker} is {kind}, so {folder} cannot be made; pass another --root or move it away.")


def make_folder(folder: Path) -> None:
    check_room(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # no permission, a read-only disk, ...
        raise UserError(f"cannot make the folder {folder}: {(error.strerror or str(error)).lower()}; pass --root a "
                        "folder you can write to.") from None


def download_dataset(root: str, folder: str, archive: str, url: str, md5: str, marker: str,
                     verify: Callable[[Path], str]) -> Path:
    """Fetch, md5-check, safely extract and verify root/archive into root/folder; a no-op once it verifies.

    marker: a file whose presence means the archive was extracted; verify(dataset folder) reads the whole dataset
    (raising UserError if it is incomplete) and returns the line to print.
    """
    root = Path(root)
    dataset_dir, tarball = root / folder, root / archive
    check_room(dataset_dir)  # before a large download, not at its extraction
    if (dataset_dir / marker).is_file():
        try:
            print(f"already present, nothing to do: {verify(dataset_dir)}")
            return dataset_dir
        except UserError as error:
            print(f"{dataset_dir} is incomplete ({error}); extracting again")
    make_folder(root)  # a --root that cannot be a folder fails now, not after a large download
    if not tarball.is_file():
        fetch(url, tarball)
    if md5_of(tarball) != md5:
        raise UserError(f"{tarball} has the wrong md5 (expected {md5}); delete it and run the download again.")
    safe_extract(tarball, root)
    print(f"extracted and verified: {verify(dataset_dir)}")
    return dataset_dir


def placed_by_hand(root: str, folder: str, get: Callable[[Path], str], verify: Callable[[Path], str]) -> Path:
    """The download of a dataset that has none: verify the copy placed by hand in root/folder, or say how to place
    it there. get(dataset folder): how; verify: as download_dataset's."""
    dataset_dir = Path(root).absolute() / folder
    check_room(dataset_dir)
    if not dataset_dir.exists():
        raise UserError(f"{dataset_dir} does not exist; {get(dataset_dir)}.")
    print(f"no download needed, verified: {verify(dataset_dir)}")
    return dataset_dir
