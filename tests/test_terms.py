"""The table of terms drives the distiller: a new term is one module and one row of TERM_TABLE, shown by adding one
to a copy of the package and training with it."""

import csv
import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

NEW_TERM = '''"""FitNet-style hint on P3 (a test's new term): the student's P3 through a 1x1 conv, MSE to the teacher's."""

from torch import nn

from .terms import Term


class Hint(Term):
    state = "hint"

    @classmethod
    def on(cls, cfg, name, task):
        return cfg["kd_hint"] > 0

    def __init__(self, d, name):
        super().__init__(d, name)
        self.module = nn.Conv2d(d.student_channels[0], d.teacher_channels[0], 1)

    def __call__(self, b):
        return self.cfg["kd_hint"] * (self.module(b.student_feats[0]) - b.teacher_feats[0]).pow(2).mean(), {}
'''
NEW_ROW = '''    {"name": "hint", "impl": "hint:Hint", "prefix": "",
     "keys": {"kd_hint": (0.0, "weight", "weight of the P3 hint (FitNet)")},
     "what": "FitNet hint on P3", "modules": "1x1 conv", "columns": "hint"},
'''


def changed_files(a: Path, b: Path) -> list[str]:
    """Files that differ between two trees (added, removed or changed), relative paths."""
    out, cmp = [], filecmp.dircmp(a, b, ignore=["__pycache__"])

    def walk(c, rel):
        out.extend(str(rel / n) for n in c.left_only + c.right_only + c.diff_files)
        for name, sub in c.subdirs.items():
            walk(sub, rel / name)

    walk(cmp, Path())
    return sorted(out)


def test_a_new_term_is_one_module_and_one_row(tmp_path, data, teacher):
    pkg = tmp_path / "src" / "yolo_fgd"
    shutil.copytree(ROOT / "yolo_fgd", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "yolo" / "hint.py").write_text(NEW_TERM)
    table = pkg / "cfg" / "distill.py"
    text = table.read_text()
    anchor = '    {"name": "schedule"'
    assert text.count(anchor) == 1
    table.write_text(text.replace(anchor, NEW_ROW + anchor))
    assert changed_files(ROOT / "yolo_fgd", pkg) == ["cfg/distill.py", "yolo/hint.py"]

    env = {**os.environ, "PYTHONPATH": str(tmp_path / "src")}
    run = lambda *a: subprocess.run([sys.executable, "-m", "yolo_fgd.cli", *a], capture_output=True, text=True,
                                    env=env, cwd=tmp_path, timeout=900)
    helped = run("train", "help")
    assert helped.returncode == 0 and "kd_hint" in helped.stdout + helped.stderr
    bad = run("train", f"teacher={teacher}", f"data={data}", "kd_hint=-1")
    assert bad.returncode == 2 and "kd_hint=-1.0 is negative" in bad.stderr, bad.stderr[-1000:]
    project = tmp_path / "runs"
    done = run("train", "model=yolo11n.yaml", f"teacher={teacher}", f"data={data}", "epochs=1", "imgsz=64", "batch=4",
               "workers=0", "plots=False", "amp=False", "device=cpu", f"project={project}", "name=hint",
               "kd_hint=0.5", "crosskd=0", "distill_warmup=0")
    assert done.returncode == 0, done.stderr[-3000:]
    with open(project / "hint" / "results.csv") as f:
        row = {k.strip(): v for k, v in next(csv.DictReader(f)).items()}
    assert float(row["train/hint"]) > 0 and float(row["train/kd"]) > 0 and "train/crosskd" not in row
    sidecar = torch.load(project / "hint" / "weights" / "fgd_last.pt", weights_only=True)
    assert set(sidecar) == {"hint", "mult", "epoch"} and sidecar["hint"]["weight"].shape[:2] == (128, 64)
