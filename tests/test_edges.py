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


SETTINGS_NOTICE = ("Creating new Ultralytics Settings", "View Ultralytics Settings", "Update Settings with")


def one_line_error(r, *parts):
    """Exit 2, no traceback, and the error line the only line on stderr but for Ultralytics' own first-run notice of
    a new settings folder (printed when it is imported with a fresh YOLO_CONFIG_DIR, before any command runs)."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [x for x in r.stderr.splitlines() if x.strip() and not x.startswith(SETTINGS_NOTICE)]
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


# --- students no trainer takes, hub names offline, run folders ------------------------------------------------------
@pytest.mark.parametrize("model,words", [
    ("yolo11n.pt", ("could not be downloaded", "model=yolo11n.yaml")),
    ("yolov8s.pt", ("could not be downloaded", "model=yolov8s.yaml")),
    ("rtdetr-l.yaml", ("RT-DETR", "model=yolo11n.yaml")),
    ("yolo11n-cls.yaml", ("classification", "model=yolo11n.yaml")),
    ("nope.yaml", ("neither a file nor a model YAML", "model=yolo11n.yaml")),
])
def test_students_that_cannot_be_distilled_are_one_line(model, words, data, tmp_path):
    """Offline (YOLO_OFFLINE=1 here, no network), from a fresh settings folder outside the checkout; nothing made."""
    work = tmp_path / "w"
    work.mkdir()
    (work / "t.pt").write_bytes(b"")  # the teacher is checked later; the student's error comes first
    before = tree(work)
    r = run_cli("train", f"model={model}", "teacher=t.pt", f"data={data}", "epochs=1", *TINY.split(), cwd=work,
                env=env_for(tmp_path))
    one_line_error(r, *words)
    assert tree(work) == before


def test_val_and_predict_missing_inputs_are_one_line_and_leave_no_folder(teacher, tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    before = tree(work)
    r = run_cli("val", f"model={teacher}", "data=missing.yaml", cwd=work, env=env_for(tmp_path))
    one_line_error(r, "data 'missing.yaml' not found", "data=shapes")
    r = run_cli("predict", f"model={teacher}", "source=missing.jpg", cwd=work, env=env_for(tmp_path))
    one_line_error(r, "source 'missing.jpg' not found", "folder of images")
    r = run_cli("val", f"model={teacher}", "data=coco8.yaml", cwd=work, env=env_for(tmp_path))  # needs a download
    assert r.returncode == 2 and "cannot download it" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert tree(work) == before


def test_ultralytics_deprecated_aliases_reach_the_mode_that_maps_them(teacher, data, tmp_path):
    """`val half=True` and `predict hide_labels=True` are Ultralytics' deprecated names (quantize, show_labels): the
    delegated mode takes and maps them (with its own warning when verbose), as `yolo val` does; a typo is still
    refused."""
    work = tmp_path / "w"
    work.mkdir()
    r = run_cli("val", f"model={teacher}", f"data={data}", "imgsz=64", "half=True", cwd=work, env=env_for(tmp_path))
    assert r.returncode == 0 and '"metrics/mAP50-95(B)"' in r.stdout, r.stderr[-2000:]
    images = Path(data).parent / "images" / "val"
    r = run_cli("predict", f"model={teacher}", f"source={images}", "imgsz=64", "hide_labels=True", cwd=work,
                env=env_for(tmp_path))
    assert r.returncode == 0 and "predicted" in r.stderr, r.stderr[-2000:]
    one_line_error(run_cli("val", f"model={teacher}", "hlaf=True", cwd=work, env=env_for(tmp_path)),
                   "unknown val argument 'hlaf'")


def test_export_opset_out_of_range_is_one_line(teacher, tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    model = work / "m.pt"
    shutil.copy(teacher, model)
    before = tree(work)
    for opset in ("5", "99", "abc"):
        r = run_cli("export", f"model={model}", f"opset={opset}", "imgsz=64", cwd=work, env=env_for(tmp_path))
        one_line_error(r, "opset=")
    assert tree(work) == before


def test_export_killed_mid_way_is_swept_and_an_earlier_ir_is_never_lost(tmp_path, monkeypatch):
    """The staging folder of a dead process (a full checkpoint copy) is removed by the next export; an OpenVINO IR
    folder is replaced by moving the earlier one aside: killed between the two moves, the earlier IR survives aside
    and the next export puts it back."""
    from yolo_fgd.deploy import export as ex

    weights = tmp_path / "weights"
    weights.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = weights / ".export-abc123"
    stale.mkdir()
    (stale / "pid").write_text(dead)
    (stale / "best.pt").write_bytes(b"x" * 1000)
    live = weights / ".export-live"
    live.mkdir()
    (live / "pid").write_text(str(os.getpid()))  # another export in flight: left alone
    ir = weights / "best_openvino_model"
    ir.mkdir()
    (ir / "old.xml").write_text("earlier IR")
    new = tmp_path / "new_ir"
    new.mkdir()
    (new / "new.xml").write_text("new IR")
    real = os.replace
    calls = []

    def killed(src, dst):  # the process dies after its first move
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(ex.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        ex.place_over(new, ir)
    monkeypatch.setattr(ex.os, "replace", real)
    aside = [p for p in weights.iterdir() if p.name.startswith(".aside-")]
    assert not ir.exists() and len(aside) == 1 and (aside[0] / "old.xml").read_text() == "earlier IR"
    aside[0].rename(weights / f".aside-{dead}-best_openvino_model")  # as if that process had died
    ex.sweep(weights)
    assert (ir / "old.xml").read_text() == "earlier IR"
    assert not stale.exists() and live.exists()
    assert sorted(p.name for p in weights.iterdir()) == [".export-live", "best_openvino_model"]


def test_benchmark_failure_leaves_nothing_and_a_second_report_gets_its_own_folder(teacher, tmp_path):
    from yolo_fgd.deploy.edge import claim_dir

    empty = tmp_path / "empty"
    for split in ("train", "val"):
        (empty / "images" / split).mkdir(parents=True)
    (empty / "data.yaml").write_text(f"path: {empty}\ntrain: images/train\nval: images/val\nnames: ['a']\n")
    work = tmp_path / "w"
    work.mkdir()
    before = tree(work)
    r = run_cli("benchmark", f"model={teacher}", f"data={empty / 'data.yaml'}", "imgsz=64", "runs=1", cwd=work,
                env=env_for(tmp_path))
    one_line_error(r, "calibration images")
    assert tree(work) == before
    made = [claim_dir(work / "runs" / "bench") for _ in range(3)]
    assert [p.name for p in made] == ["bench", "bench-2", "bench-3"]


@pytest.mark.parametrize("kind", ["classes", "task", "corrupt"])
def test_teacher_checks_answer_before_ultralytics_banner(kind, data, tmp_path):
    """A teacher of other classes, of another task, or a damaged file: the one error line is all of stderr, with
    Ultralytics verbose (no trainer banner or model table before it), and no run folder is made."""
    from conftest import save_untrained

    names = ["circle", "ring", "triangle", "square", "star", "cross"]
    t = tmp_path / "t.pt"
    if kind == "classes":
        save_untrained("yolo11n.yaml", ["a", "b", "c"], t)
    elif kind == "task":
        save_untrained("yolo11n-seg.yaml", names, t)
    else:
        t.write_bytes(b"\x00not a checkpoint" * 64)
    work = tmp_path / "w"
    work.mkdir()
    before = tree(work)
    for _ in range(2):  # the first run in a fresh settings folder also has Ultralytics' "Creating new settings" notice
        r = run_cli("train", "model=yolo11n.yaml", f"teacher={t}", f"data={data}", "epochs=1", *TINY.split(),
                    cwd=work, env={**env_for(tmp_path), "YOLO_VERBOSE": "True"})
    one_line_error(r, {"classes": "3 classes", "task": "'segment' model", "corrupt": "could not be loaded"}[kind])
    assert tree(work) == before


def test_a_run_failing_after_its_trainer_started_leaves_no_folder(data, tmp_path):
    """A teacher whose Detect strides differ is found once the student is built (after Ultralytics made the run
    folder): the one error line, and the folder this run's trainer made is gone; an earlier run of the same name is
    left as it was."""
    from conftest import save_untrained

    names = ["circle", "ring", "triangle", "square", "star", "cross"]
    t = save_untrained("yolov8n-p2.yaml", names, tmp_path / "p2.pt")
    work = tmp_path / "w"
    (work / "runs" / "detect" / "x" / "weights").mkdir(parents=True)
    (work / "runs" / "detect" / "x" / "weights" / "last.pt").write_bytes(b"an earlier run's")
    before = tree(work)
    r = run_cli("train", "model=yolo11n.yaml", f"teacher={t}", f"data={data}", "epochs=1", *TINY.split(), "name=x",
                cwd=work, env=env_for(tmp_path))
    # found after Ultralytics' banner (the student must be built first): exit 2, one error line, no traceback
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    errors = [x for x in r.stderr.splitlines() if x.startswith("yolo-fgd: error: ")]
    assert len(errors) == 1 and "strides" in errors[0], r.stderr[-2000:]
    assert tree(work) == before  # its own folder (x-2) removed, x untouched


def test_edge_runner_backend_and_precision_mismatches_are_one_line(tmp_path):
    """--backend onnxruntime on an OpenVINO folder names the right backend (not "re-export it"); --precision with ONNX
    Runtime, which it would ignore, is refused; neither leaves a results folder."""
    ir = tmp_path / "best_openvino_model"
    ir.mkdir()
    onnx = tmp_path / "best.onnx"
    onnx.write_bytes(b"")
    img = tmp_path / "a.jpg"
    img.write_bytes(b"")
    before = tree(tmp_path)
    for args, words in (([str(ir), str(img), "--backend", "onnxruntime"], "--backend openvino"),
                        ([str(onnx), str(img), "--precision", "bf16"], "OpenVINO's inference precision")):
        r = subprocess.run([sys.executable, "-m", "yolo_fgd.deploy.edge", *args], capture_output=True, text=True,
                           cwd=tmp_path, timeout=120)
        assert r.returncode == 2 and words in r.stderr and "re-export" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert tree(tmp_path) == before


def test_attention_takes_run_folders(teacher, data, tmp_path):
    """`attention` takes run folders for model= and teacher=, as every other command (it said "not found")."""
    run = tmp_path / "runs" / "detect" / "t"
    (run / "weights").mkdir(parents=True)
    shutil.copy(teacher, run / "weights" / "best.pt")
    img = next((Path(data).parent / "images" / "val").glob("*.jpg"))
    r = run_cli("attention", f"model={run}", f"teacher={run}", f"source={img}", "imgsz=64", cwd=tmp_path,
                env=env_for(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert Path(r.stdout.strip().splitlines()[-1]).is_file()


def test_edge_runner_on_an_unreadable_image_leaves_no_folder(tmp_path):
    """A detector-shaped ONNX model and an image that cannot be read: one line, exit 2, and no empty runs/edge."""
    import torch

    class Detector(torch.nn.Module):  # (1,3,32,32) -> (1, 4 + 6 classes, 21 anchors): what the runner takes
        def forward(self, x):
            return x.mean((1, 2, 3)).view(1, 1, 1).expand(1, 10, 21) * 1.0

    onnx = tmp_path / "det.onnx"
    torch.onnx.export(Detector(), (torch.rand(1, 3, 32, 32),), str(onnx), dynamo=False)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    before = tree(tmp_path)
    r = subprocess.run([sys.executable, "-m", "yolo_fgd.deploy.edge", str(onnx), str(bad)], capture_output=True,
                       text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "is not readable" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert tree(tmp_path) == before
