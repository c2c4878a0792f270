"""`yolo-fgd curves`: the per-epoch comparison the docs quote, against a direct computation, its error paths, and the
docs' figures reproduced from the committed CSVs."""

import re
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
METRIC = "metrics/mAP50-95(B)"


def write_run(path: Path, values, extra: str = "metrics/mAP50(B)") -> Path:
    """An Ultralytics-like results.csv of one value per epoch (epochs 1..n), padded column names as older versions."""
    lines = [f"                  epoch,           time, {METRIC}, {extra}"]
    lines += [f"{e},{e * 2.5},{v:.5f},{v + 0.1:.5f}" for e, v in enumerate(values, 1)]
    path.write_text("\n".join(lines) + "\n")
    return path


def tree(d: Path) -> list:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def test_compare_matches_a_direct_computation_over_the_window(tmp_path):
    """ahead/behind/mean/std/last/best from start= on (inclusive), over the common epochs only (the best epochs too),
    against numpy on the same arrays. The run differs from the control exactly at epoch `start` and at the epoch before it, and runs two
    epochs longer than the control: an off-by-one in the window, or counting epochs the control lacks, changes
    the figures."""
    from yolo_fgd.lab.curves import compare, read_curve

    rng = np.random.default_rng(0)
    control = np.clip(np.linspace(0.0, 0.6, 30) + rng.normal(0, 0.01, 30), 0, 1)
    run = np.concatenate([control + rng.normal(0, 0.01, 30), [0.9, 0.95]])
    start = 12
    run[start - 1] = control[start - 1] + 0.05  # epoch `start`: ahead by 5 points
    run[start - 2] = control[start - 2] - 0.07  # epoch `start - 1`: behind, outside the window
    run[20] = control[20]  # a tie: neither ahead nor behind
    r = read_curve(write_run(tmp_path / "run.csv", run), METRIC)
    c = read_curve(write_run(tmp_path / "control.csv", control), METRIC)
    got = compare(r, c, start)
    d = 100 * (np.round(run[start - 1:30], 5) - np.round(control[start - 1:], 5))
    assert (got["first"], got["last_epoch"], got["epochs"]) == (start, 30, 30 - start + 1)
    assert (got["ahead"], got["behind"]) == ((d > 0).sum(), (d < 0).sum())
    assert got["ahead"] + got["behind"] == got["epochs"] - 1
    assert got["mean"] == pytest.approx(d.mean(), abs=1e-9)
    assert got["std"] == pytest.approx(d.std(ddof=1), abs=1e-9)
    assert got["last"] == pytest.approx(d[-1], abs=1e-9)
    best = np.round(run[start - 1:30], 5).max() - np.round(control[start - 1:], 5).max()  # not the run's 0.95 at 32
    assert got["best"] == pytest.approx(100 * best, abs=1e-9)
    upto = compare(r, c, start, stop=25)  # inclusive at both ends
    assert (upto["first"], upto["last_epoch"], upto["epochs"]) == (start, 25, 25 - start + 1)
    assert (upto["ahead"], upto["behind"]) == ((d[:25 - start + 1] > 0).sum(), (d[:25 - start + 1] < 0).sum())
    assert upto["last"] == pytest.approx(d[25 - start], abs=1e-9)


def test_curves_command_prints_the_table_and_takes_run_folders(tmp_path):
    control = write_run(tmp_path / "control.csv", [0.1, 0.2, 0.3, 0.4])
    (tmp_path / "a").mkdir()
    write_run(tmp_path / "a" / "results.csv", [0.1, 0.25, 0.28, 0.45])
    b = write_run(tmp_path / "b.csv", [0.0, 0.1, 0.2, 0.3])  # a: +5, -2, +5 points from epoch 2, b: -10 each
    before = tree(tmp_path)
    r = run_cli("curves", f"run={tmp_path / 'a'},{b}", f"control={control}", "start=2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and "epochs" not in line]
    assert rows[0].split(" | ")[1:] == ["2–4 (3)", "2", "1", "+2.7 ± 4.0", "+5.0", "+5.0 |"]
    assert rows[1].split(" | ")[1:] == ["2–4 (3)", "0", "3", "-10.0 ± 0.0", "-10.0", "-10.0 |"]
    assert tree(tmp_path) == before  # reads only


@pytest.mark.parametrize("args, says", [
    (["run=nowhere.csv", "control=c.csv"], "run=nowhere.csv is not a results.csv or a run folder"),
    (["run=c.csv", "control=missing"], "control=missing is not a results.csv or a run folder"),
    (["run=c.csv", "control=c.csv", "metric=metrics/mAP50-95"], "did you mean metric=metrics/mAP50-95(B)?"),
    (["run=c.csv", "control=c.csv", "start=9"], "no common epoch from 9 on: pass a smaller start="),
    (["run=c.csv", "control=c.csv", "start=0"], "start=0 must be > 0"),
    (["run=c.csv"], "curves needs control="),
    (["run=c.csv", "control=c.csv", "start=3", "stop=2"], "stop=2 is not an epoch at or after start=3"),
    (["run=bad.csv", "control=c.csv"], "has no epoch column"),
])
def test_curves_bad_input_is_one_line_and_touches_nothing(tmp_path, args, says):
    write_run(tmp_path / "c.csv", [0.1, 0.2, 0.3])
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    before = tree(tmp_path)
    r = run_cli("curves", *args, cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == "", (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("yolo-fgd: error: ") and says in lines[0], r.stderr
    assert tree(tmp_path) == before


def test_the_docs_per_epoch_figures_are_what_the_command_prints():
    """The full-schedule screen's per-epoch comparisons in results.md (epochs behind the default, mean difference)
    come from `yolo-fgd curves` on the committed CSVs."""
    text = " ".join((ROOT / "docs" / "results.md").read_text().split())
    fit = ROOT / "docs" / "converged" / "full_fit-s0.csv"
    runs = {"full_response": ROOT / "docs/full_screen/full_response-s0.csv",
            "full_cwd": ROOT / "docs/full_screen/full_cwd-s0.csv",
            "full_ta": ROOT / "docs/full_screen/full_ta-s0.csv",
            "full_lad": ROOT / "docs/lad/full_lad-s0.csv",
            "full_x2": ROOT / "docs/full_screen/full_x2-s0.csv",
            "full_fgd": ROOT / "docs/full_screen/full_fgd-s0.csv"}
    r = run_cli("curves", "run=" + ",".join(map(str, runs.values())), f"control={fit}", "start=40", cwd=ROOT)
    assert r.returncode == 0, r.stderr
    table = " ".join((ROOT / "docs" / "results.md").read_text().split("\n"))
    got = {}
    for line in r.stdout.splitlines():  # the table in the docs is the command's, with each run's short name
        m = re.match(r"\| \S+/(full_\w+)-s0\.csv \| 40–150 \((\d+)\) \| (\d+) \| (\d+) \| ([-+]\d+\.\d)", line)
        if m:
            assert "| `" + m[1] + "` | " + line.split(" | ", 1)[1] in table, line
            got[m[1]] = m.groups()[1:]
    assert set(got) == set(runs), r.stdout
    for name, (n, ahead, behind, mean) in got.items():
        claim = f"`{name}` is behind the default at {behind} of the {n} epochs from 40 on ({mean} on average"
        assert claim in text, claim
    r = run_cli("curves", "run=" + ",".join(map(str, [*runs.values(), fit])),
                f"control={ROOT / 'docs/full_screen/full_fit-s0.csv'}", "start=40", cwd=ROOT)  # the teacher-paired run
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and "-s0.csv" in line]
    assert len(rows) == len(runs) + 1, r.stdout
    for line in rows:
        name = re.search(r"(full_\w+)-s0\.csv", line)[1]
        assert re.search(r"\| `" + name + r"`[^|]* \| " + re.escape(line.split(" | ", 1)[1]), table), line
    for control, window, says in (("plateau", ["start=5"], "ahead at {} of {}"),
                                  ("full_fit", ["start=11", "stop=36"], "ahead at {} of {};")):
        r = run_cli("curves", f"run={runs['full_lad']}", f"control={ROOT / 'docs/converged' / control}-s0.csv", *window)
        n, ahead = re.search(r"\| \d+–\d+ \((\d+)\) \| (\d+) \|", r.stdout).groups()
        claim = f"control=docs/converged/{control}-s0.csv {' '.join(window)}`: " + says.format(ahead, n)
        assert claim in text, claim


def test_the_cwd_confirmation_in_the_docs_is_what_the_command_prints():
    """The three-seed CWD confirmation's per-epoch table, its 30-epoch sentence and the default-against-itself figure
    in results.md are `yolo-fgd curves` on the committed CSVs, row by row."""
    text = " ".join((ROOT / "docs" / "results.md").read_text().split())
    controls = {0: "docs/full_screen/full_fit-s0.csv", 1: "docs/full_screen/full_fit-s1.csv",
                2: "docs/full_screen/full_fit-s2.csv"}
    for seed, control in controls.items():
        r = run_cli("curves", f"run=docs/full_screen/full_cwd-s{seed}.csv", f"control={control}", "start=40", cwd=ROOT)
        assert r.returncode == 0, r.stderr
        row = next(line for line in r.stdout.splitlines() if line.startswith(f"| docs/full_screen/full_cwd-s{seed}"))
        assert re.search(rf"\| seed {seed}: `{re.escape(control)}` \([^|]*\) \| " + re.escape(row.split(" | ", 1)[1]),
                         text), row
    r = run_cli("curves", "run=docs/full_screen/short_cwd-s1.csv", "control=docs/full_screen/short_crosskd_fit-s1.csv",
                "start=1", cwd=ROOT)
    n, ahead, behind, mean = re.search(r"\| 1–30 \((\d+)\) \| (\d+) \| (\d+) \| ([-+]\d+\.\d)", r.stdout).groups()
    assert f"behind it at {behind} of the {n} epochs and ahead at {ahead} ({mean} on average" in text, r.stdout
    r = run_cli("curves", "run=docs/full_screen/full_fit-s1.csv", "control=docs/converged/full_fit-s1.csv",
                "start=40", cwd=ROOT)
    mean = re.search(r"\| 40–150 \(\d+\) \| \d+ \| \d+ \| ([-+]\d+\.\d)", r.stdout)[1]
    assert f"control=docs/converged/full_fit-s1.csv start=40`, {mean} on average" in text, r.stdout
