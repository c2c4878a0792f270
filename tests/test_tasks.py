"""Every YOLO task: segmentation, pose and OBB students distilled from a teacher of their task, from YAML models on the
embedded data; checkpoints load with plain YOLO under ULTRALYTICS_SAFE_LOAD=1, validate, and export with parity."""

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY

TASKS = {"segment": ("yolo11s-seg.yaml", "yolo11n-seg.yaml", "kd_mask", "metrics/mAP50-95(M)"),
         "pose": ("yolo11s-pose.yaml", "yolo11n-pose.yaml", "kd_kpt", "metrics/mAP50-95(P)"),
         "obb": ("yolo11s-obb.yaml", "yolo11n-obb.yaml", "kd_angle", "metrics/mAP50-95(B)")}


@pytest.fixture(scope="module", params=list(TASKS))
def task_run(request, tmp_path_factory):
    from ultralytics import YOLO

    from yolo_fgd.data import shapes
    from yolo_fgd.yolo import trainer_for

    task = request.param
    teacher_cfg, student_cfg, term, _ = TASKS[task]
    root = tmp_path_factory.mktemp(task)
    data = str(shapes(root / "data", n_train=8, n_val=4, size=96, task=task))
    YOLO(teacher_cfg).train(data=data, epochs=1, project=str(root), name="teacher", **TINY)
    teacher = root / "teacher" / "weights" / "best.pt"
    student = YOLO(student_cfg)
    assert student.task == task
    student.train(trainer=trainer_for(task), teacher=str(teacher), data=data, epochs=1, project=str(root),
                  name="student", fgd_gain=0.05, distill_warmup=0, lad=task != "obb", **{term: 1.0}, **TINY)
    return task, root, data, teacher


def rows(run):
    with open(Path(run) / "results.csv") as f:
        return [{k.strip(): v for k, v in r.items()} for r in csv.DictReader(f)]


def test_task_student_trains_with_finite_terms_and_its_metric(task_run):
    task, root, _, _ = task_run
    r = rows(root / "student")[0]
    term = TASKS[task][2]
    for k in ("train/fgd", "train/kd", f"train/{term}"):
        assert math.isfinite(float(r[k])) and float(r[k]) >= 0, (k, r[k])
    assert float(r[f"train/{term}"]) > 0 and int(float(r["distill/skipped"])) == 0
    assert TASKS[task][3] in r
    assert ("lad: true" in (root / "student" / "args.yaml").read_text()) == (task != "obb")  # the teacher's assignment


def test_task_checkpoint_loads_safely_validates_and_exports_with_parity(task_run):
    task, root, data, _ = task_run
    best = root / "student" / "weights" / "best.pt"
    code = ("import sys; from ultralytics import YOLO; m = YOLO(sys.argv[1]); assert m.task == sys.argv[2], m.task; "
            "mods = {type(x).__module__ for x in m.model.modules()}; assert not any('yolo_fgd' in x for x in mods); "
            "r = m.val(data=sys.argv[3], imgsz=64, batch=4, plots=False, device='cpu', verbose=False); print('OK')")
    out = subprocess.run([sys.executable, "-c", code, str(best), task, data], capture_output=True, text=True,
                         env={**os.environ, "ULTRALYTICS_SAFE_LOAD": "1"}, timeout=600)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]
    from yolo_fgd.deploy.export import export

    res = export(str(best), imgsz=64, data=data)
    assert Path(res["onnx"]).is_file() and res["parity"] is not None and res["parity"] < 1e-3


def test_task_teacher_must_match_the_student(task_run, tmp_path):
    from ultralytics import YOLO

    from yolo_fgd.errors import FGDError
    from yolo_fgd.yolo import DistillTrainer

    task, root, data, teacher = task_run
    with pytest.raises(FGDError, match=f"is a '{task}' model but the student is 'detect'"):
        YOLO("yolo11n.yaml").train(trainer=DistillTrainer, teacher=str(teacher), data=data, epochs=1,
                                   project=str(tmp_path), name="mismatch", **TINY)


def test_edge_runner_says_which_tasks_it_does_not_decode(task_run, tmp_path):
    from yolo_fgd.deploy.edge import EdgeModel

    task, root, _, _ = task_run
    onnx = root / "student" / "weights" / "best.onnx"
    if not onnx.is_file():
        pytest.skip("exported by the parity test")
    with pytest.raises(ValueError, match=f"task {task}"):
        EdgeModel(onnx)


def test_obb_boxes_map_to_their_axis_aligned_hull():
    from yolo_fgd.yolo.model import batch_boxes

    # a 0.2 x 0.1 box at the centre of a 100 x 100 image turned by 90 degrees: hull 0.1 wide, 0.2 high
    out = batch_boxes(torch.tensor([[0.5, 0.5, 0.2, 0.1, math.pi / 2]]), (100, 100))
    torch.testing.assert_close(out, torch.tensor([[0.45, 0.4, 0.55, 0.6]]), atol=1e-6, rtol=0)
    out = batch_boxes(torch.tensor([[0.5, 0.5, 0.2, 0.2, math.pi / 4]]), (100, 100))  # a square at 45 degrees
    half = 0.1 * math.sqrt(2)
    torch.testing.assert_close(out, torch.tensor([[0.5 - half, 0.5 - half, 0.5 + half, 0.5 + half]]), atol=1e-6, rtol=0)
    plain = batch_boxes(torch.tensor([[0.5, 0.5, 0.2, 0.1]]), (100, 100))
    torch.testing.assert_close(plain, torch.tensor([[0.4, 0.45, 0.6, 0.55]]))


def test_task_terms_zero_at_match_positive_otherwise_student_only_gradient():
    from yolo_fgd.core import angle_kd, keypoint_kd, mask_kd

    torch.manual_seed(0)
    scores = torch.randn(2, 3, 20)
    k = torch.randn(2, 15, 20)
    assert keypoint_kd(k.clone(), k, scores, 3).abs() < 1e-6
    ks = torch.randn(2, 15, 20, requires_grad=True)
    kt = k.clone().requires_grad_()
    keypoint_kd(ks, kt, scores, 3).backward()
    assert ks.grad.abs().sum() > 0 and kt.grad is None
    # hand value: one anchor, one keypoint, xy off by (1, -2), same visibility -> 3
    one = torch.tensor([[[5.0]]])
    assert keypoint_kd(torch.tensor([[[1.0], [-2.0], [0.3]]]), torch.tensor([[[0.0], [0.0], [0.3]]]), one, 3) == \
        pytest.approx(3.0, abs=1e-6)
    a = torch.rand(2, 1, 20)
    assert angle_kd(a + math.pi, a, scores) < 1e-5  # a box turned by pi is the same box
    assert angle_kd(a + 0.3, a, scores) == pytest.approx(0.3, abs=1e-5)
    coef, proto = torch.randn(2, 4, 20), torch.randn(2, 4, 6, 6)
    assert mask_kd(coef.clone(), proto.clone(), coef, proto, scores, k=5).abs() < 1e-6
    cs = torch.randn(2, 4, 20, requires_grad=True)
    m = mask_kd(cs, proto, coef, proto, scores, k=5)
    m.backward()
    assert m > 0 and cs.grad.abs().sum() > 0


def test_data_for_every_task_comes_from_the_same_images(tmp_path):
    from yolo_fgd.data import shapes

    paths = {t: shapes(tmp_path, n_train=3, n_val=1, size=64, task=t) for t in ("detect", "segment", "pose", "obb")}
    imgs = {t: sorted((p.parent / "images" / "train").glob("*.jpg")) for t, p in paths.items()}
    assert all(a.read_bytes() == b.read_bytes() for t in imgs for a, b in zip(imgs["detect"], imgs[t]))
    assert "kpt_shape: [5, 3]" in paths["pose"].read_text() and "flip_idx: [0, 1, 3, 2, 4]" in paths["pose"].read_text()
    lab = {t: (p.parent / "labels" / "train" / "train_00000.txt").read_text().splitlines() for t, p in paths.items()}
    assert len({len(v) for v in lab.values()}) == 1  # one line per object in every task
    assert all(len(line.split()) == 9 for line in lab["obb"]) and all(len(line.split()) == 20 for line in lab["pose"])
    assert all(len(line.split()) % 2 == 1 and len(line.split()) >= 7 for line in lab["segment"])


def test_cli_picks_the_trainer_from_the_students_task(task_run):
    from conftest import run_cli

    task, root, data, teacher = task_run
    if task != "pose":
        pytest.skip("one task through the CLI is enough")
    out = run_cli("train", f"model={TASKS[task][1]}", f"teacher={teacher}", f"data={data}", "epochs=1", "imgsz=64",
                  "batch=4", "workers=0", "plots=False", "device=cpu", f"project={root}", "name=cli", "kd_kpt=1")
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"distilled student saved to {root / 'cli' / 'weights' / 'best.pt'}" in out.stderr
    assert out.stdout.strip() == str(root / "cli" / "weights" / "best.pt")  # the path alone on stdout
    assert "train/kd_kpt" in (root / "cli" / "results.csv").read_text().replace(" ", "")
    bad = run_cli("data", "shapes", "task=depth")
    assert bad.returncode == 2 and "unknown task 'depth'" in bad.stderr
