"""Label assignment distillation (``lad=True``, issue: close the teacher gap where students converge): the student's
task-aligned assigner reads the teacher's class probabilities and boxes, decoded as Ultralytics decodes the student's
own; only within the criterion's call, and only on the one-to-many branch of an end-to-end loss."""

import csv
from pathlib import Path

import pytest
import torch
from conftest import TINY, run_cli, save_untrained

NAMES = ["circle", "ring", "triangle", "square", "star", "cross"]


def captured_assigner_inputs(criterion, preds, batch):
    """The (pd_scores, pd_bboxes) the Ultralytics assigner of ``criterion`` received in one call, and the loss."""
    seen = []
    hook = criterion.base.assigner.register_forward_pre_hook(lambda m, a: seen.append((a[0].clone(), a[1].clone())))
    try:
        loss, _ = criterion(preds, batch)
    finally:
        hook.remove()
    assert len(seen) == 1
    return seen[0], loss


def test_lad_assigns_from_the_teachers_predictions_as_ultralytics_decodes_them(teacher):
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils.loss import v8DetectionLoss
    from ultralytics.utils.tal import TaskAlignedAssigner, make_anchors

    from yolo_fgd.cfg.distill import resolve
    from yolo_fgd.yolo import Distiller
    from yolo_fgd.yolo.distiller import DistillCriterion
    from yolo_fgd.yolo.model import head_outputs

    torch.manual_seed(0)
    student = DetectionModel("yolo11n.yaml", nc=len(NAMES), verbose=False).train()
    student.args = get_cfg()
    img = torch.rand(2, 3, 64, 64)
    batch = {"img": img, "bboxes": torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.3, 0.3, 0.2, 0.3]]),
             "batch_idx": torch.tensor([0.0, 1.0]), "cls": torch.tensor([[1.0], [4.0]])}
    cfg = {"kd_cls": 0, "kd_box": 0, "crosskd": 0}  # LAD alone: no term reads the head but the assignment
    lad = DistillCriterion(v8DetectionLoss(student), Distiller(student, teacher, resolve({**cfg, "lad": True}),
                                                               NAMES, "cpu"))
    own = DistillCriterion(v8DetectionLoss(student), Distiller(student, teacher, resolve(cfg), NAMES, "cpu"))
    preds = student(img)
    (s_scores, s_boxes), own_loss = captured_assigner_inputs(own, preds, batch)
    (t_scores, t_boxes), lad_loss = captured_assigner_inputs(lad, preds, batch)

    # the reference: the teacher's head on its Detect inputs, decoded by Ultralytics' own detection loss of the teacher
    t = lad.distiller.teacher
    t.args = get_cfg()
    ref = v8DetectionLoss(t)
    feats = lad.distiller.teacher_features(img)
    with torch.no_grad():
        out = head_outputs(t, feats)
    anchors, stride = make_anchors(feats, ref.stride, 0.5)
    ref_boxes = ref.bbox_decode(anchors, out["boxes"].permute(0, 2, 1)) * stride
    torch.testing.assert_close(t_scores, out["scores"].permute(0, 2, 1).sigmoid())
    torch.testing.assert_close(t_boxes, ref_boxes)
    assert t_boxes.shape == s_boxes.shape == (2, 84, 4) and 0 < float(t_boxes[..., 2:].mean()) < 128
    # the student's own assignment is the plain loss's; the teacher's changes the loss
    torch.testing.assert_close(own_loss, v8DetectionLoss(student)(preds, batch)[0])
    torch.testing.assert_close(s_scores, preds["scores"].detach().permute(0, 2, 1).sigmoid())
    assert not torch.allclose(lad_loss, own_loss)
    # the assigner is put back: a copy of the loss (EMA, checkpoint) holds no teacher tensors
    assert type(lad.base.assigner) is TaskAlignedAssigner


def test_the_teachers_predictions_give_way_to_the_students_when_not_finite():
    from yolo_fgd.yolo.distiller import TeacherAssigner

    seen = []
    record = lambda s, b, *a, **k: seen.append((s, b, a, k))
    ts, tb, ss, sb = torch.rand(2, 5, 3), torch.rand(2, 5, 4), torch.rand(2, 5, 3), torch.rand(2, 5, 4)
    TeacherAssigner(record, ts, tb, torch.tensor(True))(ss, sb, "anchors", stride=8)
    TeacherAssigner(record, ts, tb, torch.tensor(False))(ss, sb, "anchors", stride=8)
    assert torch.equal(seen[0][0], ts) and torch.equal(seen[0][1], tb) and seen[0][2:] == (("anchors",), {"stride": 8})
    assert torch.equal(seen[1][0], ss) and torch.equal(seen[1][1], sb)


def test_an_end_to_end_loss_assigns_its_one_to_many_branch_from_the_teacher_only():
    from types import SimpleNamespace

    from yolo_fgd.yolo.distiller import TeacherAssigner, assigned_by

    o2m, o2o = SimpleNamespace(assigner="o2m"), SimpleNamespace(assigner="o2o")
    e2e = SimpleNamespace(one2many=o2m, one2one=o2o)
    teacher = (torch.zeros(1), torch.zeros(1), torch.tensor(True))
    with assigned_by(e2e, teacher):
        assert isinstance(o2m.assigner, TeacherAssigner) and o2m.assigner.assigner == "o2m"
        assert o2o.assigner == "o2o"
    assert o2m.assigner == "o2m"
    with pytest.raises(RuntimeError), assigned_by(e2e, teacher):
        raise RuntimeError  # put back on an error too
    assert o2m.assigner == "o2m"
    with assigned_by(e2e, None):
        assert o2m.assigner == "o2m"


def test_lad_trains_and_is_in_args_yaml(data, teacher, tmp_path):
    from ultralytics import YOLO

    from yolo_fgd import DistillTrainer

    YOLO("yolo11n.yaml").train(trainer=DistillTrainer, data=data, teacher=teacher, epochs=1, project=str(tmp_path),
                               name="lad", lad=True, **TINY)
    run = tmp_path / "lad"
    args = (run / "args.yaml").read_text()
    assert "lad: true" in args
    with open(run / "results.csv") as f:
        row = {k.strip(): v for k, v in next(csv.DictReader(f)).items()}
    assert float(row["train/box_loss"]) > 0 and "train/lad" not in row  # no loss item of its own


def test_lad_for_an_obb_student_is_one_line_before_any_folder(data, tmp_path):
    from test_edges import env_for, one_line_error, tree

    t = save_untrained("yolo11n-obb.yaml", NAMES, tmp_path / "t.pt")
    work = tmp_path / "w"
    work.mkdir()
    before = tree(work)
    r = run_cli("train", "model=yolo11n-obb.yaml", f"teacher={t}", f"data={data}", "epochs=1", "lad=True",
                "imgsz=64", "batch=4", "workers=0", "device=cpu", cwd=work, env=env_for(tmp_path))
    one_line_error(r, "lad=True", "OBB")
    assert tree(work) == before == []
    assert Path(t).is_file()
