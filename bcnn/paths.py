"""What a path is, said without opening it: the check before a file is read, so that a folder or a named pipe given
where a file goes is named as what it is (opening a named pipe for reading waits for a writer: a hang)."""

from __future__ import annotations

import os
import stat


def file_kind(mode: int) -> str:
    """What a stat mode names, for a sentence: "a file", "a folder", "a named pipe", "a socket", "a device"."""
    if stat.S_ISREG(mode):
        return "a file"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    return "a socket" if stat.S_ISSOCK(mode) else "a device"


def not_a_file(path) -> str | None:
    """None for a regular file (or a link to one); else "missing", or what it is instead ("a folder", "a named
    pipe", ...), or the system's reason it cannot be looked at."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "missing"
    except OSError as error:  # no permission on a folder above it, a name too long, a broken file system
        return f"not readable ({(error.strerror or str(error)).lower()})"
    return None if stat.S_ISREG(mode) else file_kind(mode)
