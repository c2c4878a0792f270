"""Feature-level candidates in the FGD family (issue: close more of the teacher gap): FGD's focal weighting in
prediction space, masked generative distillation, CrossKD. Exact values, zero at equality, gradients to the student
and its modules only; one short training run with all of them."""

import csv
from pathlib import Path

import pytest
import torch
from conftest import TINY


def test_focal_weights_mean_one_and_focus_on_boxes():
    from yolo_fgd.core import focal_weights

    torch.manual_seed(0)
    feats = [torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 4, 4)]  # uniform attention: weights are the masks alone
    boxes, bi = torch.tensor([[0.0, 0.0, 0.25, 0.25]]), torch.tensor([0])
    w = focal_weights(boxes, bi, feats, bg=0.5)
    assert w.shape == (2, 64 + 16)
    torch.testing.assert_close(w.mean(1), torch.ones(2))
    # image 0, level P3: the box covers 2x2 cells at 1/4 each, the 60 others share 0.5 * 1/60; A_S = 1
    raw = torch.full((8, 8), 0.5 / 60)
    raw[:2, :2] = 0.25
    raw4 = torch.full((4, 4), 0.5 / 15)
    raw4[0, 0] = 1.0
    expect = torch.cat([raw.flatten(), raw4.flatten()])
    torch.testing.assert_close(w[0], expect / expect.mean())
    # no box: all background, each level's background mask summing to 1 (as FGD weighs levels)
    bg_only = torch.cat([torch.full((64,), 1 / 64), torch.full((16,), 1 / 16)])
    torch.testing.assert_close(w[1], bg_only / bg_only.mean())


def test_response_kd_anchor_weight_ones_is_the_plain_term_and_zero_at_match():
    from yolo_fgd.core import response_kd

    torch.manual_seed(0)
    s, t, sd, td = torch.randn(2, 3, 10), torch.randn(2, 3, 10), torch.randn(2, 64, 10), torch.randn(2, 64, 10)
    plain = response_kd(s, t, sd, td, 16)
    ones = response_kd(s, t, sd, td, 16, anchor_weight=torch.ones(2, 10))
    for k in ("cls", "box"):
        torch.testing.assert_close(plain[k], ones[k])
    w = torch.rand(2, 10)
    same = response_kd(t.clone(), t, td.clone(), td, 16, anchor_weight=w)
    assert same["cls"].abs() < 1e-6 and same["box"].abs() < 1e-6
    doubled = response_kd(s, t, sd, td, 16, anchor_weight=2 * torch.ones(2, 10))
    torch.testing.assert_close(doubled["cls"], 2 * plain["cls"])


def test_mgd_exact_zero_at_identity_and_gradients():
    from yolo_fgd.core import MGDLoss

    torch.manual_seed(0)
    loss = MGDLoss(4, 4, fg=1.0, ratio=0.0)
    with torch.no_grad():  # generator = identity on non-negative features
        for conv in (loss.generator[0], loss.generator[2]):
            conv.weight.zero_()
            conv.bias.zero_()
            conv.weight[torch.arange(4), torch.arange(4), 1, 1] = 1.0
    f = torch.rand(2, 4, 6, 6)
    out = loss(f, f)
    assert out["total"].item() == pytest.approx(0.0, abs=1e-10) and set(out) == {"fg", "bg", "at", "gl", "total"}
    g = torch.rand(2, 4, 6, 6)
    ref = (loss.generator(f) - g).square().sum() / 2
    assert loss(f, g)["fg"].item() == pytest.approx(ref.item(), rel=1e-6)

    loss = MGDLoss(3, 5, ratio=0.65)
    fs, ft = torch.randn(2, 3, 8, 8, requires_grad=True), torch.randn(2, 5, 8, 8, requires_grad=True)
    loss(fs, ft)["total"].backward()
    assert fs.grad.abs().sum() > 0 and ft.grad is None
    assert all(p.grad is not None for p in loss.parameters())
    seen = {}
    loss.generator.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    loss(torch.randn(4, 3, 32, 32), torch.randn(4, 5, 32, 32))
    masked = (seen["x"].abs().sum(1) == 0).float().mean().item()
    assert 0.55 < masked < 0.75  # about the ratio of positions masked out


def test_mgd_preset_builds_mgd_levels():
    from yolo_fgd.core import MGDLoss
    from yolo_fgd.core.presets import build_pyramid, resolve

    cfg = resolve({"distill_preset": "mgd"})
    assert cfg["mgd"] and cfg["kd_cls"] == 1.0
    pyr = build_pyramid([4, 8], [8, 16], cfg)
    assert all(isinstance(level, MGDLoss) for level in pyr.levels)
    out = pyr([torch.randn(2, 4, 8, 8), torch.randn(2, 8, 4, 4)], [torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4)],
              torch.zeros(0, 4), torch.zeros(0))
    assert out["total"] > 0 and out["bg"] == 0


def test_crosskd_zero_at_equality_and_gradients_only_to_student_side(teacher, data):
    """Student = the teacher's own network: its features through the teacher's head give the teacher's outputs."""
    from ultralytics.data.utils import check_det_dataset

    from yolo_fgd.core.presets import resolve
    from yolo_fgd.yolo.distiller import Distiller
    from yolo_fgd.yolo.model import load_model, neck_features, train_outputs

    names = check_det_dataset(data)["names"]
    student = load_model(teacher, "cpu", "model")
    d = Distiller(student, teacher, resolve({"crosskd": 1.0, "kd_cls": 0, "kd_box": 0}), names, "cpu")
    assert d.terms == ("crosskd",) and all(isinstance(m, torch.nn.Identity) for m in d.cross)
    img = torch.rand(2, 3, 64, 64)
    feats = neck_features(student, img)
    batch = {"img": img, "bboxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]), "batch_idx": torch.tensor([0.0])}
    out = d({"feats": feats}, batch)
    assert out["crosskd"].abs() < 1e-5

    moved = [(f + torch.randn_like(f)).requires_grad_() for f in feats]  # other features: a positive term
    out = d({"feats": moved}, batch)
    assert out["crosskd"] > 0
    out["crosskd"].backward()
    assert all(f.grad.abs().sum() > 0 for f in moved)
    assert all(p.grad is None for p in d.teacher.parameters())

    from ultralytics.nn.tasks import DetectionModel

    small = DetectionModel("yolo11n.yaml", nc=len(names), verbose=False)  # other widths: 1x1 convs to the teacher's
    d2 = Distiller(small, teacher, resolve({"crosskd": 1.0, "kd_cls": 0, "kd_box": 0}), names, "cpu")
    small.train()
    out = d2(train_outputs(small(img)), batch)
    out["crosskd"].backward()
    assert all(m.weight.grad.abs().sum() > 0 for m in d2.cross)
    assert small.model[0].conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in d2.teacher.parameters())


def test_candidates_train_with_finite_terms(data, runs, teacher):
    from ultralytics import YOLO

    from yolo_fgd import DistillTrainer

    YOLO("yolo11n.yaml").train(trainer=DistillTrainer, teacher=teacher, data=data, epochs=1, project=str(runs),
                               name="candidates", distill_preset="mgd", crosskd=1.0, kd_focal=True, distill_warmup=0, **TINY)
    with open(Path(runs) / "candidates" / "results.csv") as f:
        row = {k.strip(): v for k, v in next(csv.DictReader(f)).items()}
    for k in ("train/mgd", "train/kd", "train/crosskd"):  # the MGD preset's feature term is logged as mgd
        assert float(row[k]) > 0 and float(row[k]) < 1e6, (k, row[k])
    assert int(float(row["distill/skipped"])) == 0
    state = torch.load(Path(runs) / "candidates" / "weights" / "fgd_last.pt", weights_only=True)
    assert state["fgd"] and state["cross"]
