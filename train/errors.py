"""The one exception type that reaches the user as a single line.

Anything the user can fix (a config typo, a missing dataset, a corrupt checkpoint)
raises `UserError` with a message that says what is wrong and what to do; the entry
points print it as `error: <message>` and exit non-zero, without a traceback.
"""


class UserError(Exception):
    """A mistake in the user's input, reported as one line."""

    exit_code = 2
