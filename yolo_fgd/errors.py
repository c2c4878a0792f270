"""One exception type for every user-facing problem: its message is one line saying what is wrong and the fix."""


class FGDError(ValueError):
    """A bad input (file, argument, model pairing). The CLI prints ``str(e)`` and exits 2, without a traceback."""
