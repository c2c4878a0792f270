"""One exception type for every user-facing problem: its message is one line saying what is wrong and the fix."""


class FGDError(ValueError):
    """A bad input (file, argument, model pairing). The CLI prints ``str(e)`` and exits 2, without a traceback."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type's name when it has none), cut at ``limit`` characters: what
    a one-line error quotes of a library's failure."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]
