"""``yolo-fgd curves``: two training runs compared epoch by epoch, from their Ultralytics ``results.csv``.

For each ``run`` against the ``control``, over the epochs both have from ``start`` to ``stop`` (inclusive; by default
to the last common one), of the column ``metric`` (Ultralytics' val mAP50-95 by default) in points (x100): how many
epochs the run is ahead of the control and behind it, the mean and spread (std over epochs) of run - control, and
run - control at the last common epoch and at each one's best epoch among those compared. Prints a Markdown table
on stdout; reads only, writes nothing.
"""

from __future__ import annotations

import csv
import difflib
from pathlib import Path

import numpy as np

from .. import console
from ..errors import FGDError

METRIC = "metrics/mAP50-95(B)"


def results_csv(path: str | Path, key: str) -> Path:
    """A results.csv itself, or the one in a run folder; one line naming ``key=`` when it is neither."""
    p = Path(path)
    f = p / "results.csv" if p.is_dir() else p
    if not f.is_file():
        raise FGDError(f"{key}={path} is not a results.csv or a run folder with one: pass e.g. "
                       f"{key}=runs/detect/NAME or {key}=path/to/results.csv")
    return f


def results_rows(path: str | Path) -> list[dict]:
    """The rows of an Ultralytics results.csv, column names stripped (older versions pad them); [] when it is not
    there."""
    if not Path(path).is_file():
        return []
    with open(path, newline="") as fh:
        return [{k.strip(): v for k, v in r.items() if k} for r in csv.DictReader(fh)]


def read_curve(path: Path, metric: str) -> dict[int, float]:
    """epoch -> ``metric`` of an Ultralytics results.csv."""
    rows = results_rows(path)
    columns = list(rows[0]) if rows else []
    if "epoch" not in columns:
        raise FGDError(f"{path} has no epoch column: pass an Ultralytics results.csv")
    if metric not in columns:
        close = difflib.get_close_matches(metric, columns, n=1)
        raise FGDError(f"{path} has no column '{metric}': "
                       + (f"did you mean metric={close[0]}?" if close else f"pass one of {', '.join(columns[1:])}"))
    try:
        return {int(float(r["epoch"])): float(r[metric]) for r in rows}
    except ValueError as e:
        raise FGDError(f"{path}: a value of epoch or {metric} is not a number ({e}): pass an Ultralytics "
                       "results.csv") from None


def compare(run: dict[int, float], control: dict[int, float], start: int = 1, stop: int | None = None) -> dict:
    """Run against control over their common epochs from ``start`` to ``stop`` (inclusive, None: the last):
    ``epochs`` (first, last, count), ``ahead`` / ``behind`` (epochs with run > / < control), ``mean`` and ``std``
    of run - control (x100, points), ``last`` (at the last common epoch) and ``best`` (the run's best epoch
    minus the control's, both within those epochs)."""
    common = sorted(e for e in run.keys() & control.keys() if start <= e and (stop is None or e <= stop))
    if not common:
        raise FGDError(f"the two runs have no common epoch from {start}" + (f" to {stop}" if stop else " on")
                       + f": pass a smaller start= (their last epochs are {max(run, default=0)} and "
                       f"{max(control, default=0)})")
    r, c = (100 * np.array([curve[e] for e in common]) for curve in (run, control))
    d = r - c
    return {"first": common[0], "last_epoch": common[-1], "epochs": len(common),
            "ahead": int((d > 0).sum()), "behind": int((d < 0).sum()),
            "mean": float(d.mean()), "std": float(d.std(ddof=1)) if len(d) > 1 else 0.0, "last": float(d[-1]),
            "best": float(r.max() - c.max())}


def curves(run: str | list | tuple = None, control: str = None, start: int = 1, stop: int | None = None,
           metric: str = METRIC) -> str:
    """Print (and return) the Markdown table of every ``run`` (comma-separated) against ``control`` over the epochs
    from ``start`` to ``stop`` (None: the last common one)."""
    if stop is not None and (isinstance(stop, bool) or not isinstance(stop, int) or stop < start):
        raise FGDError(f"stop={stop} is not an epoch at or after start={start}: pass e.g. stop={start + 10}, or "
                       "leave it out for the last epoch")
    runs = [r for r in str(run).split(",") if r] if isinstance(run, str) else [str(r) for r in run]
    ref_path = results_csv(control, "control")
    paths = [results_csv(r, "run") for r in runs]
    ref = read_curve(ref_path, metric)
    rows = [compare(read_curve(p, metric), ref, start, stop) | {"run": str(r)} for p, r in zip(paths, runs)]
    window = f"from {start} to {stop}" if stop else f"from {start} on"
    lines = [f"{metric}, points: run - control ({control}), epochs {window}",
             "",
             "| run | epochs | ahead | behind | mean Δ ± std | Δ last epoch | Δ best epoch |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['first']}–{r['last_epoch']} ({r['epochs']}) | {r['ahead']} | {r['behind']} | "
              f"{r['mean']:+.1f} ± {r['std']:.1f} | {r['last']:+.1f} | {r['best']:+.1f} |" for r in rows]
    text = "\n".join(lines) + "\n"
    console.result(text)
    return text
