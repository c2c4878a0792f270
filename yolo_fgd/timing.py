"""One wall-clock timer for every cost figure (loss benchmarks, deployment latency)."""

from __future__ import annotations

import time
from typing import Callable


def times_ms(fn: Callable[[], object], runs: int, warmup: int = 2, sync: Callable[[], None] | None = None) -> list[float]:
    """Milliseconds of ``runs`` calls of ``fn`` after ``warmup`` untimed calls; ``sync`` (e.g. a CUDA synchronise)
    runs before each clock read so that queued device work is counted."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(max(int(runs), 1)):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(1e3 * (time.perf_counter() - t0))
    return out


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, linearly interpolated (numpy's default)."""
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)
