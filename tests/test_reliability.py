"""Odd labels, non-finite features, SIGKILL mid-run and resume, atomic checkpoints."""

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, run_cli


def rows(run):
    with open(Path(run) / "results.csv") as f:
        return [{k.strip(): v for k, v in r.items()} for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def odd_data(data, tmp_path_factory):
    """The tiny set with odd labels: an empty image, zero-area boxes, boxes on the border, 500 boxes in one image."""
    src = Path(data).parent
    dst = tmp_path_factory.mktemp("odd")
    shutil.copytree(src / "images", dst / "images")
    shutil.copytree(src / "labels", dst / "labels")
    labels = sorted((dst / "labels" / "train").glob("*.txt"))
    labels[0].write_text("")
    labels[1].write_text("0 0.5 0.5 0.0 0.2\n1 0.5 0.5 0.3 0.0\n2 0.02 0.02 0.04 0.04\n")
    labels[2].write_text("3 0.99 0.99 0.02 0.02\n4 0.5 0.5 1.0 1.0\n")
    rng = np.random.RandomState(0)
    xy = rng.uniform(0.05, 0.95, (500, 2))
    labels[3].write_text("".join(f"{i % 6} {x:.4f} {y:.4f} 0.05 0.05\n" for i, (x, y) in enumerate(xy)))
    (dst / "data.yaml").write_text(Path(data).read_text().replace(str(src.resolve()), str(dst.resolve())))
    return str(dst / "data.yaml")


def test_odd_labels_train_with_finite_fgd(odd_data, runs, teacher):
    from ultralytics import YOLO

    from yolo_fgd import DistillTrainer

    YOLO("yolo11n.yaml").train(trainer=DistillTrainer, teacher=teacher, data=odd_data, epochs=1, project=str(runs),
                               name="odd", distill_warmup=0, fgd_gain=0.05, **TINY)
    r = rows(Path(runs) / "odd")[0]
    for k in ("train/fgd", "train/fgd_fg", "train/fgd_bg", "train/fgd_gl", "train/kd"):
        assert np.isfinite(float(r[k])), k
    assert int(float(r["distill/skipped"])) == 0


def test_non_finite_teacher_features_are_dropped_not_learned(data, runs, teacher):
    from ultralytics import YOLO

    from yolo_fgd import DistillTrainer

    def poison(trainer):  # every teacher feature becomes NaN
        trainer.distiller.teacher.model[0].conv.weight.data.fill_(float("nan"))

    seen = {}
    model = YOLO("yolo11n.yaml")
    model.add_callback("on_pretrain_routine_end", poison)
    model.add_callback("on_train_end", lambda t: seen.update(trainer=t))
    model.train(trainer=DistillTrainer, teacher=teacher, data=data, epochs=1, project=str(runs), name="nan", nbs=4,
                warmup_epochs=0, distill_warmup=0, fgd_gain=0.05, **TINY)
    r = rows(Path(runs) / "nan")[0]
    assert int(float(r["distill/skipped"])) == 2  # both batches of the epoch
    t = seen["trainer"]
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
    assert all(torch.isfinite(p).all() for p in t.distiller.parameters())
    assert float(r["train/box_loss"]) > 0 and np.isfinite(float(r["train/box_loss"]))


def test_sigkill_mid_run_then_resume_matches_uninterrupted(data, runs, teacher):
    common = ["model=yolo11n.yaml", f"teacher={teacher}", f"data={data}", "epochs=3", "imgsz=64", "batch=4",
              "workers=0", "plots=False", f"project={runs}", "exist_ok=True", "device=cpu", "seed=0", "deterministic=True"]
    full = run_cli("train", *common, "name=full")
    assert full.returncode == 0, full.stderr[-2000:]

    exe = Path(sys.executable).with_name("yolo-fgd")
    wdir = Path(runs) / "killed" / "weights"
    proc = subprocess.Popen([str(exe), "train", *common, "name=killed"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (wdir / "last.pt").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-run: after the first checkpoint, during epoch 2
    proc.wait()
    assert (wdir / "last.pt").is_file()
    done = len(rows(wdir.parent))
    assert 1 <= done < 3
    torch.load(wdir / "last.pt", weights_only=False)  # never half-written

    resumed = run_cli("train", "resume", f"model={wdir / 'last.pt'}", env={"YOLO_VERBOSE": "True"})
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "restored the distiller's state from" in resumed.stderr  # CrossKD's convs continue, not restart
    a, b = rows(Path(runs) / "full"), rows(wdir.parent)
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b] == ["1", "2", "3"]
    # the schedules continue where the kill left them: every epoch's learning rates and distillation weight are
    # those of the uninterrupted run, exactly (the data order after a resume differs, so losses and mAP may not)
    for col in ("lr/pg0", "lr/pg1", "lr/pg2", "distill/scale"):
        assert [r[col] for r in a] == [r[col] for r in b], col


def test_missing_data_yaml_is_one_line(runs, teacher, tmp_path):
    out = run_cli("train", "model=yolo11n.yaml", f"teacher={teacher}", f"data={tmp_path / 'nope.yaml'}", "epochs=1",
                  "imgsz=64", f"project={runs}", "name=nodata", "device=cpu")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "nope.yaml" in out.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_short_soak_runs_fgd_on_every_step_and_memory_is_stable(tmp_path):
    from yolo_fgd.lab.cost import soak

    res = soak(steps=40, batch=8, project=str(tmp_path))  # 32 images / batch 8: 4 steps an epoch, 10 epochs
    assert res["steps"] == 40 and res["fgd_steps"] == 40, res  # FGD really ran on every step
    early, end = res["rss_mb"][10], res["rss_mb"][40]
    assert end - early < 150, res  # peak RSS must not keep growing with steps


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_check_without_a_gpu_is_one_line_exit_2():
    r = subprocess.run([sys.executable, "-m", "yolo_fgd.lab.cuda_check"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["cuda_check: no CUDA GPU here; run it on a machine "
                                                                   "with one"]


def test_cuda_check_answers_help_and_refuses_arguments_in_one_line():
    cmd = [sys.executable, "-m", "yolo_fgd.lab.cuda_check"]
    r = subprocess.run([*cmd, "help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "python -m yolo_fgd.lab.cuda_check" in r.stdout
    r = subprocess.run([*cmd, "batch=4"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "takes no arguments" in r.stderr


def test_a_last_checkpoint_never_exists_without_its_sidecar(data, runs, teacher, monkeypatch):
    """A kill right after last.pt lands (the SIGKILL test's moment) finds the distiller's fgd_last.pt already in place:
    the sidecar is renamed first. Simulated: the rename of last.pt is the process' last act."""
    from ultralytics import YOLO

    from yolo_fgd import DistillTrainer
    from yolo_fgd.yolo import trainer as trainer_module

    real = os.replace

    class Killed(BaseException):
        pass

    def replace(src, dst):
        real(src, dst)
        if Path(dst).name == "last.pt":
            raise Killed

    monkeypatch.setattr(trainer_module.os, "replace", replace)
    with pytest.raises(Killed):
        YOLO("yolo11n.yaml").train(trainer=DistillTrainer, teacher=teacher, data=data, epochs=1, project=str(runs),
                                   name="killed_at_rename", **TINY)
    wdir = Path(runs) / "killed_at_rename" / "weights"
    assert (wdir / "last.pt").is_file() and (wdir / "fgd_last.pt").is_file()
