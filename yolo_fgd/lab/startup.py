"""``yolo-fgd benchmark-startup``: how long ``yolo-fgd help``, ``yolo-fgd train help`` and a typo take to answer,
beside Ultralytics' own ``yolo help`` on the same machine in the same minute (runs alternate; prints medians)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from .. import console
from ..errors import FGDError

COMMANDS = {"yolo-fgd help": ["yolo-fgd", "help"], "yolo-fgd train help": ["yolo-fgd", "train", "help"],
            "yolo-fgd trian (typo)": ["yolo-fgd", "trian"], "yolo help": ["yolo", "help"]}


def startup(repeat: int = 5) -> dict:
    """Median seconds of each command over ``repeat`` alternating runs, and each ``yolo-fgd`` one's share of
    ``yolo help``'s (target: at most 0.5)."""
    bin_dir = Path(sys.executable).parent
    exe = {}
    for name, argv in COMMANDS.items():
        found = shutil.which(argv[0], path=str(bin_dir)) or shutil.which(argv[0])
        if not found:
            raise FGDError(f"benchmark-startup: '{argv[0]}' is not on PATH: install yolo-fgd (pip install .)")
        exe[name] = [found, *argv[1:]]
    times = {name: [] for name in COMMANDS}
    for _ in range(max(int(repeat), 1)):
        for name, argv in exe.items():
            t0 = time.perf_counter()
            subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - t0)
    med = {name: sorted(v)[len(v) // 2] for name, v in times.items()}
    base = med["yolo help"]
    lines = [f"{'command':24s} {'median s':>9s} {'x yolo help':>12s}"]
    lines += [f"{name:24s} {s:9.3f} {s / base:12.2f}" for name, s in med.items()]
    console.result("\n".join(lines))
    return {"seconds": med, "ratio": {k: v / base for k, v in med.items()}}
