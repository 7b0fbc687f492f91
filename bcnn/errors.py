"""The one exception type for mistakes a user can fix (paths, config, data): the CLIs print its message alone."""


class UserError(Exception):
    """A problem in the user's input; the message says what is wrong and what to do, in one sentence."""
