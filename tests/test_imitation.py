"""The anchors' terms (issue: close the teacher gap where students converge): CWD, PKD, LD at a temperature and BCKD,
each against a direct formula written element by element at a realistic shape, then all four in one short training
run (loss items in results.csv, align convs trained and saved in the sidecar)."""

import csv
import math
from pathlib import Path

import torch
from conftest import TINY


def test_cwd_against_a_loop_over_images_and_channels():
    from yolo_fgd.core import cwd_loss

    torch.manual_seed(0)
    s, t = 10 * torch.randn(2, 6, 20, 20, dtype=torch.float64), 10 * torch.randn(2, 6, 20, 20, dtype=torch.float64)
    for tau in (1.0, 4.0):
        total = 0.0
        for n in range(2):
            for c in range(6):
                p = torch.softmax(t[n, c].flatten() / tau, 0)
                q = torch.softmax(s[n, c].flatten() / tau, 0)
                total += float((p * (p.log() - q.log())).sum())
        expect = total * tau**2 / (2 * 6)
        assert math.isclose(float(cwd_loss(s, t, tau)), expect, rel_tol=2e-6), tau
    assert float(cwd_loss(t.clone(), t)) == 0.0


def test_pkd_is_one_minus_pearson_per_channel():
    from yolo_fgd.core import pkd_loss

    torch.manual_seed(0)
    s = 10 * torch.randn(3, 5, 16, 16, dtype=torch.float64) + 3
    t = 0.5 * s + torch.randn(3, 5, 16, 16, dtype=torch.float64)
    m = 3 * 16 * 16
    r = torch.stack([torch.corrcoef(torch.stack([s[:, c].flatten(), t[:, c].flatten()]))[0, 1] for c in range(5)])
    # with the unbiased std: mean (z_s - z_t)^2 / 2 = (M-1)/M (1 - r), mean over channels
    expect = float(((1 - r) * (m - 1) / m).mean())
    assert math.isclose(float(pkd_loss(s, t)), expect, rel_tol=1e-6)
    # invariant to each channel's scale and shift of the student (what makes it Pearson), not to a channel swap
    a = torch.rand(1, 5, 1, 1, dtype=torch.float64) + 0.5
    assert math.isclose(float(pkd_loss(a * s - 7, t)), expect, rel_tol=1e-6)
    assert float(pkd_loss(s[:, [1, 0, 2, 3, 4]], t)) > expect + 0.1


def test_ld_is_the_box_term_at_a_temperature():
    from yolo_fgd.core import box_kd, response_kd

    torch.manual_seed(0)
    n, a, reg = 2, 30, 16
    sd, td = 3 * torch.randn(n, 4 * reg, a, dtype=torch.float64), 3 * torch.randn(n, 4 * reg, a, dtype=torch.float64)
    w = torch.rand(n, a, dtype=torch.float64)
    for temp in (1.0, 10.0):
        num = 0.0
        for i in range(n):
            for j in range(a):
                for side in range(4):
                    ls = torch.log_softmax(sd[i, side * reg:(side + 1) * reg, j] / temp, 0)
                    lt = torch.log_softmax(td[i, side * reg:(side + 1) * reg, j] / temp, 0)
                    num += float(w[i, j] * (lt.exp() * (lt - ls)).sum()) * temp**2
        expect = num / float(w.sum())
        assert math.isclose(float(box_kd(sd, td, reg, reg, w, temp)), expect, rel_tol=2e-6), temp
    # at T = 1 with the teacher's top score as weight it is the head response's box term
    scores = torch.randn(n, 3, a, dtype=torch.float64)
    plain = response_kd(torch.randn(n, 3, a, dtype=torch.float64), scores, sd, td, reg)["box"]
    assert math.isclose(float(box_kd(sd, td, reg, reg, scores.sigmoid().amax(1))), float(plain), rel_tol=2e-6)


def test_bckd_class_and_giou_terms_against_direct_formulas():
    from yolo_fgd.core import bckd_cls, ltrb_giou_kd

    torch.manual_seed(0)
    s, t = 4 * torch.randn(2, 3, 25, dtype=torch.float64), 4 * torch.randn(2, 3, 25, dtype=torch.float64)
    for beta in (1.0, 2.0):
        p, q = t.sigmoid(), s.sigmoid()
        kl = p * (p.log() - q.log()) + (1 - p) * ((1 - p).log() - (1 - q).log())
        expect = float(((q - p).abs() ** beta * kl).sum() / p.sum())
        assert math.isclose(float(bckd_cls(s, t, beta)), expect, rel_tol=2e-6), beta
    # GIoU of boxes around one anchor point (0, 0): (x1, y1, x2, y2) = (-l, -t, r, b)
    sl, tl = 5 * torch.rand(2, 4, 25, dtype=torch.float64), 5 * torch.rand(2, 4, 25, dtype=torch.float64)
    w = t.sigmoid().amax(1)
    num = 0.0
    for i in range(2):
        for j in range(25):
            b1 = torch.tensor([-sl[i, 0, j], -sl[i, 1, j], sl[i, 2, j], sl[i, 3, j]])
            b2 = torch.tensor([-tl[i, 0, j], -tl[i, 1, j], tl[i, 2, j], tl[i, 3, j]])
            iw = (torch.min(b1[2], b2[2]) - torch.max(b1[0], b2[0])).clamp(min=0)
            ih = (torch.min(b1[3], b2[3]) - torch.max(b1[1], b2[1])).clamp(min=0)
            inter = iw * ih
            area = lambda b: (b[2] - b[0]) * (b[3] - b[1])
            union = area(b1) + area(b2) - inter
            hull = (torch.max(b1[2], b2[2]) - torch.min(b1[0], b2[0])) * (torch.max(b1[3], b2[3]) - torch.min(b1[1], b2[1]))
            num += float(w[i, j] * (1 - (inter / union - (hull - union) / hull)))
    assert math.isclose(float(ltrb_giou_kd(sl, tl, t)), num / float(w.sum()), rel_tol=2e-6)
    assert float(ltrb_giou_kd(tl.clone(), tl, t)) < 1e-12


def test_four_anchor_terms_train_together(data, runs, teacher):
    from ultralytics import YOLO

    from yolo_fgd import FGDTrainer

    name = "anchors"
    YOLO("yolo11n.yaml").train(trainer=FGDTrainer, data=data, epochs=1, project=str(runs), name=name,
                               teacher=teacher, kd_cls=0, kd_box=0, crosskd=0, cwd=1.0, pkd=1.0, ld=1.0, bckd=1.0,
                               distill_warmup=0, **TINY)
    run = Path(runs) / name
    with open(run / "results.csv") as f:
        row = {k.strip(): v for k, v in next(csv.DictReader(f)).items()}
    for item in ("cwd", "pkd", "ld", "bckd"):
        assert float(row[f"train/{item}"]) > 0, item
    side = torch.load(run / "weights" / "fgd_last.pt", map_location="cpu", weights_only=False)
    assert {"cwd", "pkd"} <= set(side)
    # the 1x1 align convs from the student's 64 channels to the teacher's 128 on P3
    assert side["cwd"]["0.weight"].shape == (128, 64, 1, 1) and side["pkd"]["0.weight"].shape == (128, 64, 1, 1)


def test_linear_map_recovers_a_known_map_at_realistic_magnitudes():
    """t = W s + b (+ a little noise) on 80x80 maps of features x10: the fitted map is W and b; sums of two halves of
    the batch (what an all-reduce adds) give the same map; a channel that never varies gets weight 0."""
    from yolo_fgd.core import linear_map, moments

    g = torch.Generator().manual_seed(0)
    s = 10 * torch.randn(2, 16, 80, 80, generator=g) + 3.0
    s[:, 5] = 7.0  # a dead channel: no variance
    w, b = torch.randn(32, 16, generator=g), torch.randn(32, generator=g)
    w[:, 5] = 0
    t = torch.einsum("oc,nchw->nohw", w, s) + b[None, :, None, None] + 0.01 * torch.randn(2, 32, 80, 80, generator=g)
    m = moments(s, t)
    fw, fb = linear_map(m, ridge=1e-6)
    assert fw.shape == (32, 16) and fb.shape == (32,)
    assert torch.allclose(fw.float(), w, atol=1e-3) and torch.allclose(fb.float(), b, atol=5e-3), (fw - w).abs().max()
    assert fw[:, 5].abs().max() < 1e-6
    halves = [moments(s[i:i + 1], t[i:i + 1]) for i in range(2)]
    summed = {k: halves[0][k] + halves[1][k] for k in m}
    hw, hb = linear_map(summed, ridge=1e-6)
    assert torch.allclose(hw, fw, atol=1e-9) and torch.allclose(hb, fb, atol=1e-9)


def test_crosskd_fit_starts_its_convs_at_the_least_squares_map_once(teacher, data):
    """crosskd_fit=True: on the first training batch each 1x1 conv becomes the least-squares map of that batch's
    student features to the teacher's (so the crossed head starts near the teacher's outputs: a lower first loss than
    the random start), is not refitted on the next batch, and is not refitted after a sidecar restore."""
    from ultralytics.data.utils import check_det_dataset
    from ultralytics.nn.tasks import DetectionModel

    from yolo_fgd.core import linear_map, moments
    from yolo_fgd.core.presets import resolve
    from yolo_fgd.yolo.distiller import Distiller
    from yolo_fgd.yolo.model import neck_features, train_outputs

    names = check_det_dataset(data)["names"]
    torch.manual_seed(0)
    student = DetectionModel("yolo11n.yaml", nc=len(names), verbose=False).train()
    img = torch.rand(4, 3, 96, 96)
    batch = {"img": img, "bboxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]), "batch_idx": torch.tensor([0.0])}
    cfg = {"crosskd": 1.0, "kd_cls": 0, "kd_box": 0}
    random = Distiller(student, teacher, resolve({**cfg, "crosskd_fit": False}), names, "cpu")
    fitted = Distiller(student, teacher, resolve({**cfg, "crosskd_fit": True}), names, "cpu")
    first = fitted(train_outputs(student(img)), batch)["crosskd"]
    assert first < random(train_outputs(student(img)), batch)["crosskd"]
    with torch.no_grad():
        s_feats, t_feats = neck_features(student, img), fitted.teacher_features(img)
    for conv, s, t in zip(fitted.cross, s_feats, t_feats):
        w, b = linear_map(moments(s, t))
        assert torch.allclose(conv.weight[:, :, 0, 0], w.float(), atol=1e-4), (conv.weight[:, :, 0, 0] - w).abs().max()
        assert torch.allclose(conv.bias, b.float(), atol=1e-4)
    before = [c.weight.clone() for c in fitted.cross]
    fitted(train_outputs(student(torch.rand(4, 3, 96, 96))), batch)
    assert all(torch.equal(a, c.weight) for a, c in zip(before, fitted.cross))  # fitted once

    restored = Distiller(student, teacher, resolve({**cfg, "crosskd_fit": True}), names, "cpu")
    assert restored.load_sidecar(fitted.sidecar(1)) == []
    other = torch.rand(4, 3, 96, 96)
    restored(train_outputs(student(other)), {**batch, "img": other})
    assert all(torch.equal(a, c.weight) for a, c in zip(before, restored.cross))  # the restored map is kept
