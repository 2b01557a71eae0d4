"""User-facing errors.

Anything a user can cause (a bad path, a malformed config, a checkpoint that does not fit) raises
`MarsError` with a one-line message that names the problem. The CLI prints it as `error: ...` and
exits with status 2 instead of showing a traceback.
"""


class MarsError(Exception):
    """An error caused by user input, reported as one line without a traceback."""
