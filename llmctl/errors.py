"""The one exception type for mistakes a user can fix: the CLI prints its message on one line, exit 2."""


class UserError(Exception):
    """Bad input (a path, a recipe key, a malformed file): the message names the thing and the fix."""
