"""The edges a user meets (issue: what the README promises holds in every case): resume, students that cannot be
distilled, folders left behind, Ultralytics' own argument aliases. Each as the user arrives: the installed console
script, a fresh settings folder, a working folder outside the checkout, the tree listed before and after."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import run_cli

TINY = "imgsz=64 batch=4 workers=0 plots=False device=cpu"


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def env_for(tmp: Path) -> dict:
    return {"YOLO_CONFIG_DIR": str(tmp / "settings")}


def one_line_error(r, *parts):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("yolo-fgd: error: "), r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    for p in parts:
        assert p in lines[0], lines[0]
    return lines[0]


INTERRUPT = r"""
import sys
from pathlib import Path
from ultralytics import YOLO
from yolo_fgd import DistillTrainer

def stop(trainer):  # after epoch 1 is saved: an unfinished run with a last.pt
    raise KeyboardInterrupt

model = YOLO("yolo11n.yaml")
model.add_callback("on_fit_epoch_end", stop)
try:
    model.train(trainer=DistillTrainer, data=sys.argv[1], teacher="teacher.pt", epochs=3, imgsz=64, batch=4,
                workers=0, plots=False, device="cpu", project=str(Path.cwd() / "runs"), name="r", exist_ok=True)
except KeyboardInterrupt:
    pass
"""


def test_resume_from_another_folder_and_args_yaml_reproduces_the_run(data, teacher, tmp_path):
    """A run started with a teacher given as a relative path, interrupted after an epoch, resumes from another folder
    and finishes; its args.yaml holds the teacher's absolute path and every distillation value in force (not the
    nulls of "take it from the preset")."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    shutil.copy(teacher, a / "teacher.pt")
    env = {**os.environ, **env_for(tmp_path)}
    r = subprocess.run([sys.executable, "-c", INTERRUPT, data], cwd=a, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    run = a / "runs" / "r"
    args = yaml.safe_load((run / "args.yaml").read_text())
    assert args["teacher"] == str(a / "teacher.pt"), args["teacher"]
    assert args["kd_cls"] == 1.0 and args["crosskd"] == 1.0 and args["fgd_gain"] == 0.0, args
    assert args["fgd_temperature"] == 0.5 and args["distill_warmup"] == 3.0, args
    r = run_cli("train", "resume", f"model={run}", cwd=b, env=env_for(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = (run / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3, rows  # epochs 1 (before) + 2, 3 (resumed)
    assert not (b / "runs").exists()


def test_resume_a_finished_run_is_one_line_and_creates_nothing(data, teacher, tmp_path):
    """`train resume` on a finished run (with or without teacher=): one line naming the fix, exit 2, nothing made;
    Ultralytics would start a new default training (coco8.yaml, 100 epochs) in runs/detect/train."""
    work = tmp_path / "w"
    work.mkdir()
    r = run_cli("train", "model=yolo11n.yaml", f"teacher={teacher}", f"data={data}", "epochs=1", *TINY.split(),
                "name=done", cwd=work, env=env_for(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    before = tree(work)
    for extra in ((), (f"teacher={teacher}",)):
        r = run_cli("train", "resume", "model=runs/detect/done", *extra, cwd=work, env=env_for(tmp_path))
        one_line_error(r, "has finished its training", "nothing to resume", "yolo-fgd train model=",
                       f"teacher={teacher}")
        assert tree(work) == before
