"""The one exception type for mistakes a user can fix (paths, config, data), the one for a command stopped by a
signal, and the CLI wrapper that prints either in one line."""

import contextlib
import errno
import functools
import signal
import sys
import threading


class UserError(Exception):
    """A problem in the user's input; the message says what is wrong and what to do, in one sentence."""


class Interrupted(BaseException):
    """Ctrl-C (SIGINT) or SIGTERM (what schedulers send to pre-empt a job) stopped the command. A BaseException,
    like KeyboardInterrupt, so that no `except Exception` swallows it; `status` is the shell's 128 + signal."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def interrupted(stop: BaseException, message: str) -> Interrupted:
    """The same stop (Ctrl-C or SIGTERM) with a message that says what it interrupted and what to do now."""
    status = stop.status if isinstance(stop, Interrupted) else 128 + signal.SIGINT
    return Interrupted(message, status)


def signal_name(stop: BaseException) -> str:
    return "SIGTERM" if isinstance(stop, Interrupted) and stop.status == 128 + signal.SIGTERM else "Ctrl-C"


def _raise_on_sigterm(signum, frame):
    raise Interrupted("stopped by SIGTERM", 128 + signal.SIGTERM)


@contextlib.contextmanager
def sigterm_raises():
    """SIGTERM raises Interrupted in the main thread, as Ctrl-C raises KeyboardInterrupt: the code unwinds (a
    checkpoint being written is abandoned and its temporary file removed) and the CLI says where things stand."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def signals_held():
    """Hold Ctrl-C and SIGTERM until the block ends, then act on them as they would have acted: for a write that
    must not be cut in half (a checkpoint: seconds), so the newest checkpoint is the one a stop leaves."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    previous = {number: signal.signal(number, lambda received, frame: pending.append(received))
                for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if pending:
            handler = previous[pending[0]]
            if callable(handler):
                handler(pending[0], None)  # raises KeyboardInterrupt or Interrupted
            elif handler != signal.SIG_IGN:
                signal.raise_signal(pending[0])  # the default action: the process ends


def _original_message(error: UserError) -> str:
    message = str(error)
    # torch re-raises a DataLoader worker's exception as the same type with the worker's whole traceback as its
    # message; the traceback's last line is `bcnn.errors.UserError: <the sentence>`.
    if message.startswith("Caught UserError in DataLoader worker"):
        message = message.rstrip().splitlines()[-1].split("UserError: ", 1)[-1]
    return message


# File-system refusals that a user's path or disk causes, wherever the command met them, and what to do about each:
# said in one sentence like a UserError. Any other OSError keeps its traceback.
PATH_PROBLEMS = {
    errno.ENAMETOOLONG: "shorten it (most Linux file systems take 255 bytes a name and 4,096 a path)",
    errno.EACCES: "give a path this user may use, or change its permissions",
    errno.EPERM: "give a path this user may use, or change its permissions",
    errno.EROFS: "give a path on a disk that can be written to",
    errno.ENOSPC: "free some space on that disk, or give a path on another",
    errno.EDQUOT: "free some of your quota, or give a path on another disk",
    errno.ENOTDIR: "a folder in the path is a file: give another path",
    errno.ELOOP: "the path's symbolic links loop: give the real path",
}


def describe_path_problem(error: OSError) -> str:
    """One sentence for a file-system refusal of PATH_PROBLEMS: the path (its middle left out when it is long),
    the system's reason, what to do."""
    name = str(error.filename) if error.filename is not None else "a path"
    if len(name) > 120:
        name = f"{name[:60]}...{name[-40:]} ({len(name):,} characters)"
    return f"cannot use {name}: {(error.strerror or str(error)).lower()}; {PATH_PROBLEMS[error.errno]}."


def exit_on_user_error(main):
    """Wrap a CLI's main(): a UserError becomes `error: <message>` on stderr and exit status 2, Ctrl-C or SIGTERM
    one line and 130 or 143; no traceback. Programming errors are not caught: their traceback is what a developer
    needs."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            with sigterm_raises():
                return main(argv)
        except UserError as e:
            print(f"error: {_original_message(e)}", file=sys.stderr)
            raise SystemExit(2) from None
        except OSError as e:
            if e.errno not in PATH_PROBLEMS:
                raise
            print(f"error: {describe_path_problem(e)}", file=sys.stderr)
            raise SystemExit(2) from None
        except (KeyboardInterrupt, Interrupted) as stop:
            message = str(stop) if isinstance(stop, Interrupted) else "stopped by Ctrl-C"
            print(message, file=sys.stderr)
            raise SystemExit(stop.status if isinstance(stop, Interrupted) else 128 + signal.SIGINT) from None

    return wrapper
