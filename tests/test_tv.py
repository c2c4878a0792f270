"""torchvision path (RetinaNet, FCOS, Faster R-CNN, Mask R-CNN): building, padded-batch box mapping, FGD step, inheriting, COCO, torchrun, resume."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from yolo_fgd.core import fgd_masks
from yolo_fgd.core.presets import resolve as resolve_fgd
from yolo_fgd.tv.coco_utils import coco_files, collate
from yolo_fgd.tv.distiller import Distiller
from yolo_fgd.tv.models import build, inherit
from yolo_fgd.tv.train import train

SMALL = dict(min_size=[64], max_size=96)


@pytest.fixture(scope="module")
def tv_teacher(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("tv")
    train(data=data, fgd=False, student_backbone="resnet18", epochs=1, batch=4, project=str(root), name="teacher",
          warmup_iters=2, **SMALL)
    assert not (root / "teacher" / "student.pth").exists()  # a plain run's weights are not a student's
    return str(root / "teacher" / "model.pth"), root


TV_TRAIN_RECIPES = sorted(p.stem for p in (Path(__file__).parents[1] / "yolo_fgd/cfg/recipes").glob("tv_*.yaml")
                          if "\nmethods:" not in p.read_text())  # tv-train's (the others are studies)


@pytest.mark.parametrize("recipe", TV_TRAIN_RECIPES)
def test_every_tv_train_recipe_is_checked_builds_its_family_and_names_its_preset(recipe):
    """Each shipped tv-train recipe passes tv-train's own checks, builds the architecture it names (a ResNet-18 in
    place of its ResNet-50/101, at a small size) with the FPN levels of its family (P3-P7 one-stage, P2-P6
    two-stage), and names the paper's preset of that family."""
    from yolo_fgd.tv.models import ARCH_PRESET
    from yolo_fgd.tv.train import config

    cfg = config(recipe=recipe)
    m = build(cfg["arch"], "resnet18", 3, norm=cfg["norm"], width=cfg["width"], anchor=cfg["anchor"], rois=cfg["rois"],
              **SMALL)
    feats = m.backbone(torch.zeros(1, 3, 64, 96))
    assert [f.shape[1] for f in feats.values()] == [cfg["width"]] * 5
    two_stage = cfg["arch"] in ("faster_rcnn", "mask_rcnn")
    assert [f.shape[-1] for f in feats.values()] == ([24, 12, 6, 3, 2] if two_stage else [12, 6, 3, 2, 1])
    assert cfg["distill_preset"] in (None, ARCH_PRESET[cfg["arch"]]), cfg["distill_preset"]
    assert len(TV_TRAIN_RECIPES) >= 6 and {"tv_faster_rcnn_r101_r50", "tv_mask_rcnn_r101_r50"} <= set(TV_TRAIN_RECIPES)


def test_coco_files_takes_a_shapes_spec_and_refuses_an_incomplete_coco_dict(tmp_path):
    """data= as a dict: {kind: shapes, ...} builds that set and converts it (segment polygons for Mask R-CNN); COCO
    files missing a key are one line naming them (they were returned as given and failed later with a KeyError)."""
    from yolo_fgd.errors import FGDError
    from yolo_fgd.tv.coco_utils import CocoDataset

    files = coco_files({"kind": "shapes", "root": str(tmp_path), "n_train": 4, "n_val": 2, "size": 64,
                        "task": "segment"})
    assert CocoDataset(files["train_json"], files["train_images"], train=True, masks=True).has_masks()
    with pytest.raises(FGDError, match=r"lacks train_images, val_json, val_images"):
        coco_files({"train_json": "a.json"})


def test_boxes_mapped_on_padded_batch():
    """Two images of different sizes: boxes are normalised by the padded batch tensor, not by each image."""
    s = build("retinanet", "resnet18", 3, min_size=[64], max_size=64)
    t = build("retinanet", "resnet18", 3, min_size=[64], max_size=64)
    fgd_cfg = resolve_fgd({"distill_preset": "anchor_based"})
    d = Distiller(s, t, fgd_cfg)
    seen = {}
    d.fgd.register_forward_pre_hook(lambda m, args: seen.update(boxes=args[2], bi=args[3], shape=args[0][0].shape))
    imgs = [torch.rand(3, 64, 64), torch.rand(3, 32, 64)]  # second image: half height -> padded to 64
    tg = [{"boxes": torch.tensor([[8.0, 8.0, 24.0, 24.0]]), "labels": torch.tensor([1])},
          {"boxes": torch.tensor([[32.0, 0.0, 64.0, 16.0]]), "labels": torch.tensor([2])}]
    d.train()(imgs, tg)
    assert seen["shape"][-2:] == (8, 8)  # P3 of the 64 x 64 padded batch
    fg, _ = fgd_masks(seen["boxes"], seen["bi"], 2, 8, 8)
    expect = torch.zeros(2, 8, 8)
    expect[0, 1:3, 1:3] = 1 / 4
    expect[1, 0:2, 4:8] = 1 / 8  # rows 0-1 of the padded map, not rows 0-3 of the unpadded image
    assert torch.allclose(fg, expect)


def test_one_fgd_step_trains_student_and_gcblocks_not_teacher(tv_teacher):
    path, _ = tv_teacher
    s = build("retinanet", "resnet18", 6, **SMALL)
    t = build("retinanet", "resnet18", 6, path, **SMALL)
    d = Distiller(s, t, resolve_fgd({"distill_preset": "anchor_based"}))  # (a gain of 100 saturates the attention)
    before = {k: v.clone() for k, v in d.state_dict().items()}
    t_before = {k: v.clone() for k, v in t.state_dict().items()}
    opt = torch.optim.SGD([p for p in d.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    imgs = [torch.rand(3, 64, 64) for _ in range(2)]
    tg = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])}] * 2
    for _ in range(2):
        losses = d.train()(imgs, tg)
        assert "loss_fgd" in losses and losses["loss_fgd"] > 0
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    after = d.state_dict()
    for k in ("student.backbone.body.conv1.weight", "fgd.levels.0.gc_s.context.weight", "fgd.levels.2.gc_t.transform.3.weight"):
        assert not torch.equal(before[k], after[k]), k
    assert not any(k.startswith("_teacher") or k.startswith("teacher") for k in after)
    for k, v in t.state_dict().items():
        assert torch.equal(v, t_before[k]), k


def test_inherit_copies_fpn_and_head_only():
    s, t = build("fcos", "resnet18", 3, **SMALL), build("fcos", "resnet34", 3, **SMALL)
    copied = inherit(s, t)
    assert copied and all(k.startswith(("backbone.fpn.", "head.")) for k in copied)
    assert torch.equal(s.state_dict()["head.classification_head.cls_logits.weight"],
                       t.state_dict()["head.classification_head.cls_logits.weight"])
    assert not torch.equal(s.state_dict()["backbone.body.layer1.0.conv1.weight"][:1],
                           t.state_dict()["backbone.body.layer1.0.conv1.weight"][:1])


def test_coco_conversion_round_trip(data):
    import numpy as np

    files = coco_files(data)
    gt = json.loads(Path(files["val_json"]).read_text())
    img = gt["images"][0]
    lab = Path(img["file_name"].replace("/images/", "/labels/")).with_suffix(".txt")
    rows = np.loadtxt(lab, ndmin=2)
    anns = [a for a in gt["annotations"] if a["image_id"] == img["id"]]
    assert len(anns) == len(rows)
    for a, (c, x, y, w, h) in zip(anns, rows):
        W, H = img["width"], img["height"]
        assert a["category_id"] == int(c)
        assert np.allclose(a["bbox"], [(x - w / 2) * W, (y - h / 2) * H, w * W, h * H], atol=1e-3)


def test_distilled_train_eval_and_resume(tv_teacher, data):
    path, root = tv_teacher
    kw = dict(data=data, teacher=path, teacher_backbone="resnet18", student_backbone="resnet18", batch=4,
              project=str(root), name="fgd", warmup_iters=2, **SMALL)
    m = train(epochs=1, **kw)
    assert set(m) >= {"mAP", "AP50", "APs", "AR100"}
    m = train(epochs=2, resume=True, **kw)  # continues from epoch 1
    with open(root / "fgd" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"] and float(rows[-1]["loss_fgd"]) > 0


def test_teacher_below_the_plain_baseline_is_refused_before_training(tv_teacher, data, tmp_path):
    """FGD from a teacher that scores below the plain student (baseline=) is a one-line error before anything is
    written: the H100 run distilled from a 0.4-mAP teacher and drove both students to 0.0."""
    from yolo_fgd.errors import FGDError

    path, _ = tv_teacher
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "results.csv").write_text("epoch,mAP\n1,0.99\n")
    with pytest.raises(FGDError, match="not above the plain student's 99.0"):
        train(data=data, teacher=path, teacher_backbone="resnet18", student_backbone="resnet18", batch=4, epochs=1,
              project=str(tmp_path), name="fgd", baseline=str(plain), warmup_iters=2, **SMALL)
    assert not (tmp_path / "fgd").exists()


def test_fgd_dominating_the_detection_losses_is_flagged():
    from yolo_fgd.tv.train import fgd_dominates

    assert fgd_dominates({"classification": 1.1, "bbox_regression": 0.7, "loss_fgd": 162.9}) == pytest.approx(90.5)
    assert fgd_dominates({"classification": 1.1, "bbox_regression": 0.7, "loss_fgd": 2.0}) == 0.0
    assert fgd_dominates({"classification": 1.1, "bbox_regression": 0.7}) == 0.0  # plain training


def test_torchrun_two_processes(tv_teacher, data):
    path, root = tv_teacher
    exe = Path(sys.executable).with_name("torchrun")
    cmd = [str(exe), "--standalone", "--nproc_per_node", "2", "-m", "yolo_fgd.tv", f"data={data}", f"teacher={path}",
           "teacher_backbone=resnet18", "student_backbone=resnet18", "epochs=1", "batch=2", f"project={root}",
           "name=ddp", "warmup_iters=2", "min_size=64", "max_size=96"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert (root / "ddp" / "student.pth").is_file()


def test_tv_val_cli(tv_teacher, data):
    from conftest import run_cli

    path, _ = tv_teacher
    out = run_cli("tv-val", f"model={path}", f"data={data}", "arch=retinanet", "backbone=resnet18", "min_size=64",
                  "max_size=96")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "mAP | AP50 | AP75 | APs | APm | APl | AR100 | ARs | ARm | ARl" in out.stdout
    bad = run_cli("tv-train", "fgd=True", f"data={data}", "epochs=1")
    assert bad.returncode == 2 and "needs teacher=" in bad.stderr
    bad = run_cli("tv-train", "fgd=True", f"teacher={path}", "distill_preset=yolo", f"data={data}", "epochs=1",
                  "teacher_backbone=resnet18", "student_backbone=resnet18", "min_size=64", "max_size=96")
    assert bad.returncode == 2 and "paper's FGD only" in bad.stderr, bad.stderr[-500:]


def test_tv_student_onnx_export_parity(tv_teacher, data):
    from yolo_fgd.deploy.export import export

    path, _ = tv_teacher
    res = export(path, imgsz=96, data=data, arch="retinanet", backbone="resnet18")
    assert Path(res["onnx"]).is_file() and res["parity"] < 1e-3


def test_a_checkpoint_rebuilds_the_model_it_was_saved_from(tmp_path):
    """norm, width and anchors travel with the checkpoint: a GroupNorm, 32-wide, 8-px-anchor RetinaNet saved by this
    path comes back identical when built with other (default) arguments; a bare state dict is read as given."""
    from yolo_fgd.tv.models import save

    torch.manual_seed(0)
    m = build("retinanet", "resnet18", 4, norm="gn", width=32, anchor=8, **SMALL).eval()
    save(m, tmp_path / "m.pth")
    back = build("retinanet", "resnet50", 4, str(tmp_path / "m.pth"), **SMALL).eval()
    assert back.build_args == {"arch": "retinanet", "backbone": "resnet18", "norm": "gn", "width": 32, "anchor": 8}
    assert isinstance(back.backbone.body.bn1, torch.nn.GroupNorm) and back.backbone.out_channels == 32
    x = [torch.rand(3, 64, 64)]
    a, b = m(x)[0], back(x)[0]
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])
    torch.save(m.state_dict(), tmp_path / "bare.pth")  # no build arguments: frozen BN would not match GroupNorm's keys
    again = build("retinanet", "resnet18", 4, str(tmp_path / "bare.pth"), norm="gn", width=32, anchor=8, **SMALL)
    assert torch.equal(again.eval()(x)[0]["scores"], a["scores"])


def test_the_mask_head_is_as_wide_as_the_fpn_and_torchvisions_at_the_papers_width():
    """Mask R-CNN's mask head (four 3x3 convs, the up-sampling and the predictor) has ``width`` channels: a quarter
    of the cost at the CPU recipes' 128 against torchvision's fixed 256; at 256 its every head parameter has the
    shape of torchvision's ``maskrcnn_resnet50_fpn``, so the paper-scale recipe keeps torchvision's model."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    narrow = build("mask_rcnn", "resnet18", 3, norm="gn", width=64, **SMALL)
    convs = [m for m in narrow.roi_heads.mask_head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4 and all(c.in_channels == c.out_channels == 64 for c in convs)
    assert narrow.roi_heads.mask_predictor.mask_fcn_logits.weight.shape == (4, 64, 1, 1)
    ours = build("mask_rcnn", "resnet50", 3, norm="frozen_bn", **SMALL).state_dict()
    theirs = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=4).state_dict()
    heads = [k for k in theirs if k.startswith(("rpn.", "roi_heads.", "backbone.fpn."))]
    assert len(heads) > 20 and {k: ours[k].shape for k in heads} == {k: theirs[k].shape for k in heads}


def test_a_two_stage_checkpoint_brings_its_rpn_anchors_and_rois_set_the_sampler(tmp_path):
    """Faster R-CNN's RPN anchors start at ``anchor`` on P2 and double per level, and travel with the checkpoint: a
    model built from it with the default (32) proposes the same boxes. ``rois`` is the box head's sample per image."""
    from yolo_fgd.tv.models import save

    torch.manual_seed(0)
    m = build("faster_rcnn", "resnet18", 3, norm="gn", width=32, anchor=8, rois=64, **SMALL).eval()
    assert m.rpn.anchor_generator.sizes == ((8,), (16,), (32,), (64,), (128,))
    assert m.roi_heads.fg_bg_sampler.batch_size_per_image == 64
    assert build("faster_rcnn", "resnet18", 3, norm="gn", width=32, **SMALL).roi_heads.fg_bg_sampler \
        .batch_size_per_image == 512  # torchvision's
    save(m, tmp_path / "m.pth")
    back = build("faster_rcnn", "resnet50", 3, str(tmp_path / "m.pth"), **SMALL).eval()
    assert back.build_args["anchor"] == 8 and back.rpn.anchor_generator.sizes == m.rpn.anchor_generator.sizes
    x = [torch.rand(3, 64, 64)]
    images, _ = m.transform(x)
    with torch.no_grad():
        a = m.rpn(images, m.backbone(images.tensors))[0][0]
        b = back.rpn(images, back.backbone(images.tensors))[0][0]
    assert torch.equal(a, b)


@pytest.mark.parametrize("recipe", ["tv_study_cpu", "tv_ablations_cpu", "tv_faster_rcnn_cpu", "tv_mask_rcnn_cpu",
                                    "tv_fcos_cpu", "tv_ablations_frcnn_cpu"])
def test_shipped_tv_studies_plan_runs_tv_train_accepts(recipe, tmp_path):
    """Every run a shipped torchvision study plans (teacher and students) has arguments tv-train takes and builds the
    architecture it names; a distilled run waits for the teacher and the plain run of its seed."""
    from yolo_fgd.cfg import load_recipe
    from yolo_fgd.lab.study import plan
    from yolo_fgd.tv.train import config

    specs = plan(load_recipe(recipe), tmp_path)
    assert specs[0]["method"] == "teacher"
    for s in specs:
        cfg = config(**{**s["train"], **s.get("args", {})})
        build(cfg["arch"], "resnet18", 3, norm=cfg["norm"], width=32, anchor=cfg["anchor"], rois=cfg["rois"], **SMALL)
        if s.get("args", {}).get("fgd"):
            assert any(n.endswith(f"plain-s{s['seed']}/summary.json") for n in s["needs"]), s["dir"]


@pytest.mark.parametrize("ablations, study", [("tv_ablations_frcnn_cpu", "tv_faster_rcnn_cpu"),
                                               ("tv_ablations_cpu", "tv_study_cpu")])
def test_an_ablation_recipe_shares_only_identical_runs_with_its_study(ablations, study, tmp_path):
    """An ablation recipe run under its study's name reuses that study's finished runs of the same folder (teacher,
    plain, fgd_calibrated, ...): each such run must be the same experiment in both recipes (the same tv-train
    arguments and data), or the ablation table would pair rows trained differently."""
    from yolo_fgd.cfg import load_recipe
    from yolo_fgd.lab.study import plan

    a = {s["dir"]: s for s in plan(load_recipe(ablations), tmp_path)}
    b = {s["dir"]: s for s in plan(load_recipe(study), tmp_path)}
    shared = sorted(set(a) & set(b))
    assert any(d.endswith("/teacher") for d in shared) and any(d.endswith("/plain-s0") for d in shared), shared
    for d in shared:
        for key in ("train", "args", "data", "seed"):
            assert a[d].get(key) == b[d].get(key), (d, key, a[d].get(key), b[d].get(key))


def test_the_cpu_recipe_anchors_match_the_most_objects(tmp_path):
    """Most objects of the embedded data are under 32 px: at the CPU recipe's 192 px, torchvision's 32-px P3
    anchors reach RetinaNet's IoU 0.5 with about 40 % of them (the rest learn from one low-quality match); 16-px
    anchors (the recipe's) with most, and more than 8-px ones, whose stride-8 grid is too coarse for them."""
    from torchvision.models.detection.image_list import ImageList
    from torchvision.ops import box_iou

    from yolo_fgd.cfg import load_recipe
    from yolo_fgd.data import shapes
    from yolo_fgd.tv.models import anchors

    rec = load_recipe("tv_study_cpu")["train"]
    size = rec["max_size"]
    gt = json.loads(Path(coco_files(str(shapes(tmp_path, n_train=60, n_val=1)))["train_json"]).read_text())
    k = size / gt["images"][0]["height"]
    boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                          for a in gt["annotations"]]) * k
    feats = [torch.zeros(1, 1, -(-size // s), -(-size // s)) for s in (8, 16, 32, 64, 128)]
    images = ImageList(torch.zeros(1, 3, size, size), [(size, size)])
    matched = {a: float((box_iou(boxes, anchors(a)(images, feats)[0]).max(1).values >= 0.5).float().mean())
               for a in (32, 16, 8)}
    assert max(matched, key=matched.get) == rec["anchor"] == 16 and matched[16] > matched[32] + 0.15, matched


def test_distill_warmup_and_decay_scale_fgd_per_iteration(tv_teacher, data, monkeypatch):
    """tv-train distill_warmup= / distill_decay= (the YOLO path's schedule, one row of the table of terms): FGD's loss
    at each iteration is its unscaled value times min(1, p / warmup) * (1 + cos(pi t)) / 2, p the epochs done after
    the batch, t the fraction of the last ``decay`` epochs passed. 8 images, batch 4: 2 iterations an epoch."""
    import math

    import yolo_fgd.tv.train as tv_train

    raw, seen = [], []

    class Spy(Distiller):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.fgd.register_forward_hook(lambda m, i, o: raw.append(float(o["total"])))

        def forward(self, images, targets):
            losses = super().forward(images, targets)
            seen.append(float(losses["loss_fgd"]))
            return losses

    monkeypatch.setattr(tv_train, "Distiller", Spy)
    path, root = tv_teacher
    train(data=data, teacher=path, teacher_backbone="resnet18", student_backbone="resnet18", batch=4, epochs=3,
          project=str(root), name="schedule", warmup_iters=2, check_teacher=False, eval_every=0,
          distill_warmup=1.5, distill_decay=1, **SMALL)
    pos = [(k + 1) / 2 for k in range(6)]
    want = [min(1.0, p / 1.5) * 0.5 * (1 + math.cos(math.pi * min(max(p - 2, 0.0), 1.0))) for p in pos]
    assert len(raw) == len(seen) == 6 and all(r > 0 for r in raw), (raw, seen)
    assert [round(v / r, 6) for v, r in zip(seen, raw)] == pytest.approx(want, abs=1e-6), (seen, raw, want)
    assert json.loads((root / "schedule" / "args.json").read_text())["distill_warmup"] == 1.5


def test_auto_gain_makes_fgd_equal_the_detection_losses_and_survives_a_resume(tv_teacher, data, monkeypatch):
    """fgd_gain=auto: at the measured gain FGD's loss equals the detection losses on the batch it was measured on;
    the run records the gain (args.json, last.pth) and a resumed run reads it back instead of measuring again."""
    import yolo_fgd.tv.train as tv_train
    from yolo_fgd.tv.coco_utils import CocoDataset

    path, root = tv_teacher
    files = coco_files(data)
    ds = CocoDataset(files["train_json"], files["train_images"], train=True, hflip=0.0)
    torch.manual_seed(0)
    s = build("retinanet", "resnet18", 6, **SMALL)
    t = build("retinanet", "resnet18", 6, path, **SMALL)
    cfg = resolve_fgd({"distill_preset": "anchor_based"})
    monkeypatch.setattr(tv_train, "AUTO_BATCHES", 1)
    gain = tv_train.calibrated_gain(s, t, cfg, ds, 4, torch.device("cpu"))
    imgs, tgts = collate([ds[i] for i in range(4)])
    with torch.no_grad():
        losses = Distiller(s, t, {**cfg, "gain": gain}).train()(list(imgs), list(tgts))
    det = float(losses["classification"] + losses["bbox_regression"])
    assert gain != 1.0 and abs(float(losses["loss_fgd"]) / det - 1) < 1e-4, (gain, losses)

    kw = dict(data=data, teacher=path, teacher_backbone="resnet18", student_backbone="resnet18", batch=4,
              project=str(root), name="auto", warmup_iters=2, fgd_gain="auto", **SMALL)
    train(epochs=1, **kw)
    saved = json.loads((root / "auto" / "args.json").read_text())["fgd_gain"]
    assert isinstance(saved, float) and saved > 0
    assert torch.load(root / "auto" / "last.pth", weights_only=True)["fgd_gain"] == saved
    monkeypatch.setattr(tv_train, "AUTO_BATCHES", 0)  # measuring again would find no batch and fail
    train(epochs=2, resume=True, **kw)
    assert json.loads((root / "auto" / "args.json").read_text())["fgd_gain"] == saved


@pytest.mark.slow
def test_an_epoch_not_evaluated_has_no_figures_in_results_csv(data, tmp_path):
    """eval_every=2 over 4 epochs: epochs 2 and 4 are scored; epochs 1 and 3 have empty (nan) COCO columns, not the
    figures of the last evaluation carried over."""
    train(data=data, fgd=False, student_backbone="resnet18", epochs=4, batch=4, project=str(tmp_path), name="p",
          warmup_iters=2, eval_every=2, **SMALL)
    with open(tmp_path / "p" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [all(r[k] == "nan" for k in ("mAP", "AP50", "AR100")) for r in rows] == [True, False, True, False], rows


def test_two_runs_converting_the_same_data_at_once_both_succeed(tmp_path, monkeypatch):
    """Two study lanes (teacher and plain student) convert a YOLO data set to COCO files at the same moment: both
    have written their temporary file before either moves it into place (a barrier forces it); both must succeed
    (with one shared temporary name, the second move found its file gone: FileNotFoundError in a fresh-clone run)."""
    import threading

    from yolo_fgd.data import shapes

    data = str(shapes(tmp_path, n_train=4, n_val=2, size=64))
    barrier, replace = threading.Barrier(2, timeout=30), Path.replace

    def synchronised(self, target):
        if self.suffix == ".tmp":
            barrier.wait()
        return replace(self, target)

    monkeypatch.setattr(Path, "replace", synchronised)
    out, errors = [], []

    def convert():
        try:
            out.append(coco_files(data))
        except Exception as e:  # noqa: BLE001 (the test reports it)
            errors.append(repr(e))

    threads = [threading.Thread(target=convert) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(out) == 2 and out[0] == out[1], errors
    assert json.loads(Path(out[0]["train_json"]).read_text())["images"]
    assert not list(Path(out[0]["train_json"]).parent.glob("*.tmp"))


def test_faster_rcnn_trains_distils_resumes_evaluates_and_exports(data, tmp_path):
    """arch=faster_rcnn: torchvision's Faster R-CNN on a ResNet FPN P2-P6 (five levels, FGD on each, the official
    two-stage weights), 0-based class ids in and out; a plain teacher, a distilled student that resumes, tv-val and
    an ONNX export with its parity check; a checkpoint of another architecture is a one-line error."""
    from conftest import run_cli

    from yolo_fgd.core.presets import presets
    from yolo_fgd.deploy.export import export
    from yolo_fgd.errors import FGDError
    from yolo_fgd.tv.models import ARCH_PRESET

    m = build("faster_rcnn", "resnet18", 3, **SMALL)
    feats = m.backbone(torch.zeros(1, 3, 64, 96))
    assert list(feats) == ["0", "1", "2", "3", "pool"] and [f.shape[-1] for f in feats.values()] == [24, 12, 6, 3, 2]
    assert ARCH_PRESET["faster_rcnn"] == "two_stage" and presets()["two_stage"]["fg"] == 5e-5
    m.eval()
    with torch.no_grad():
        det = m([torch.rand(3, 64, 64)])[0]
    assert det["labels"].numel() == 0 or int(det["labels"].min()) >= 0  # 0-based, background never reported

    kw = dict(data=data, arch="faster_rcnn", student_backbone="resnet18", batch=4, project=str(tmp_path),
              warmup_iters=2, **SMALL)
    train(fgd=False, epochs=1, name="teacher", **kw)
    teacher = tmp_path / "teacher" / "model.pth"
    metrics = train(epochs=1, name="fgd", teacher=str(teacher), teacher_backbone="resnet18", check_teacher=False, **kw)
    assert set(metrics) >= {"mAP", "AP50", "APs", "AR100"}
    train(epochs=2, name="fgd", teacher=str(teacher), teacher_backbone="resnet18", check_teacher=False, resume=True,
          **kw)
    with open(tmp_path / "fgd" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"] and float(rows[-1]["loss_fgd"]) > 0
    assert {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"} <= set(rows[-1])
    out = run_cli("tv-val", f"model={tmp_path / 'fgd' / 'student.pth'}", f"data={data}", "arch=faster_rcnn",
                  "backbone=resnet18", "min_size=64", "max_size=96")
    assert out.returncode == 0 and "mAP | AP50" in out.stdout, out.stderr[-2000:]
    res = export(str(tmp_path / "fgd" / "student.pth"), imgsz=96, data=data, arch="faster_rcnn", backbone="resnet18")
    assert Path(res["onnx"]).is_file() and res["parity"] < 1e-3 and res["detections_max_diff"] < 1e-3, res
    with pytest.raises(FGDError, match="does not"):  # a RetinaNet checkpoint read as Faster R-CNN
        from yolo_fgd.tv.models import save

        save(build("retinanet", "resnet18", 6, **SMALL), tmp_path / "r.pth")
        torch.save(torch.load(tmp_path / "r.pth", weights_only=True)["model"], tmp_path / "bare.pth")
        build("faster_rcnn", "resnet18", 6, str(tmp_path / "bare.pth"), **SMALL)


def test_mask_rcnn_trains_on_polygons_reports_mask_ap_and_refuses_box_data(data, tmp_path_factory):
    """arch=mask_rcnn: YOLO polygons (the embedded set's task=segment) become COCO masks; a distilled Mask R-CNN
    (FGD's focal masks from the boxes, as the paper) trains and reports the segm COCOeval mask AP beside the box
    columns; box-only data is a one-line error before anything is written; the export names its masks output."""
    from yolo_fgd.data import shapes
    from yolo_fgd.deploy.export import export
    from yolo_fgd.errors import FGDError
    from yolo_fgd.tv.coco_utils import CocoDataset

    tmp = tmp_path_factory.mktemp("mask")
    seg = str(shapes(tmp / "data", n_train=8, n_val=4, size=96, task="segment"))
    files = coco_files(seg)
    ds = CocoDataset(files["train_json"], files["train_images"], masks=True)
    img, t = ds[0]
    assert ds.has_masks() and t["masks"].shape == (len(t["boxes"]), *img.shape[-2:])
    box = t["boxes"][0].round().long()  # the mask lies inside its box
    inside = t["masks"][0][box[1]:box[3] + 1, box[0]:box[2] + 1].sum()
    assert t["masks"][0].sum() > 0 and inside == t["masks"][0].sum()
    kw = dict(data=seg, arch="mask_rcnn", student_backbone="resnet18", batch=4, project=str(tmp), warmup_iters=2,
              **SMALL)
    train(fgd=False, epochs=1, name="teacher", **kw)
    metrics = train(epochs=1, name="fgd", teacher=str(tmp / "teacher" / "model.pth"), teacher_backbone="resnet18",
                    check_teacher=False, **kw)
    assert {"mAP", "mask_mAP", "mask_AP50"} <= set(metrics)
    with open(tmp / "fgd" / "results.csv") as f:
        row = list(csv.DictReader(f))[-1]
    assert "mask_mAP" in row and "loss_mask" in row and float(row["loss_fgd"]) > 0
    with pytest.raises(FGDError, match="arch=mask_rcnn needs instance masks"):
        train(fgd=False, epochs=1, name="boxes", **{**kw, "data": data})
    assert not (tmp / "boxes").exists()
    res = export(str(tmp / "fgd" / "student.pth"), imgsz=96, data=seg, arch="mask_rcnn", backbone="resnet18")
    import onnx

    assert [o.name for o in onnx.load(res["onnx"]).graph.output] == ["boxes", "scores", "labels", "masks"]
    assert res["parity"] < 1e-3
