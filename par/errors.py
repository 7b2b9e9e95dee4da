"""The one exception type the CLI turns into a one-line error message."""


class ParError(Exception):
    """A problem with the user's input (file, name, option), not a bug in par.

    The CLI prints ``error: <message>`` and exits non-zero; anything else that
    escapes is a bug and keeps its traceback.
    """
