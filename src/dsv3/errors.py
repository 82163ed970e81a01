"""User-facing errors.

`UserError` is raised for anything a user can fix (a bad path, a wrong config value, a corrupt
file). The CLI prints its message as one line and exits with status 2, without a traceback.
"""


class UserError(Exception):
    """A problem with the user's input: printed as one line by the CLI, never as a traceback."""
