"""The one exception type for mistakes a user can fix (paths, config, data), and the CLI wrapper that prints it."""

import functools
import sys


class UserError(Exception):
    """A problem in the user's input; the message says what is wrong and what to do, in one sentence."""


def _original_message(error: UserError) -> str:
    message = str(error)
    # torch re-raises a DataLoader worker's exception as the same type with the worker's whole traceback as its
    # message; the traceback's last line is `bcnn.errors.UserError: <the sentence>`.
    if message.startswith("Caught UserError in DataLoader worker"):
        message = message.rstrip().splitlines()[-1].split("UserError: ", 1)[-1]
    return message


def exit_on_user_error(main):
    """Wrap a CLI's main(): a UserError becomes `error: <message>` on stderr and exit status 2, no traceback.

    Programming errors are not caught: their traceback is what a developer needs.
    """

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except UserError as e:
            print(f"error: {_original_message(e)}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper
