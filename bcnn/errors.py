"""The one exception type for mistakes a user can fix (paths, config, data), and the CLI wrapper that prints it."""

import functools
import sys


class UserError(Exception):
    """A problem in the user's input; the message says what is wrong and what to do, in one sentence."""


def exit_on_user_error(main):
    """Wrap a CLI's main(): a UserError becomes `error: <message>` on stderr and exit status 2, no traceback.

    Programming errors are not caught: their traceback is what a developer needs.
    """

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper
