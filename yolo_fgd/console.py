"""Where a command's output goes: its result (a path, a JSON record, a table: what a shell captures with ``$(...)``)
to stdout, everything else (logs, progress bars, Ultralytics' banners, warnings) to stderr."""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager, redirect_stdout

_RESULTS = []  # the real stdout while a command runs with sys.stdout pointing at stderr (innermost last)


def result(text: str) -> None:
    """Write a command's result on stdout (the real one, also while :func:`results_only` redirects the rest)."""
    print(text, file=_RESULTS[-1] if _RESULTS else sys.stdout, flush=True)


@contextmanager
def results_only():
    """Within: ``print`` and Ultralytics' logger go to stderr, :func:`result` to stdout. Loggers that already
    write to stdout (Ultralytics imported earlier in the process) are pointed at stderr and back on exit."""
    out = sys.stdout
    moved = [h for name in ("ultralytics", "yolo_fgd") for h in logging.getLogger(name).handlers
             if isinstance(h, logging.StreamHandler) and h.stream is out]
    for h in moved:
        h.setStream(sys.stderr)
    _RESULTS.append(out)
    try:
        with redirect_stdout(sys.stderr):
            yield
    finally:
        _RESULTS.pop()
        for h in moved:
            h.setStream(out)
