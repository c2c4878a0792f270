"""``yolo-fgd attention``: spatial and channel attention (Eq. 5-8) of teacher, baseline and FGD student on an image
(paper Fig. 1 and 5). Writes one PNG: a row per model, a column per Detect level (spatial attention over the image),
and a last column with the channel attention of the middle level.

``yolo-fgd imitation``: how much of the teacher's Detect-input features a student can reach linearly (held-out R^2 of
the best 1x1 map, per level), the ceiling FGD's align layer works against."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from ultralytics.utils import LOGGER

from ..core import attention, standardise
from ..data import resolve_data
from ..data.coco import split_images
from ..deploy.edge import blob
from ..errors import FGDError
from .. import console
from ..yolo.model import load_model, neck_features


def attention_maps(model: str, teacher: str, source: str, baseline: str | None = None, imgsz: int = 640,
                   temperature: float = 0.5, out: str | None = None) -> Path:
    img = cv2.imread(str(source)) if Path(str(source)).is_file() else None
    if img is None:
        raise FGDError(f"source '{source}' is not a readable image: pass source=path/to/image.jpg")
    x, _, _ = blob(img, (imgsz, imgsz))
    t = torch.from_numpy(x)
    rgb = (x[0].transpose(1, 2, 0) * 255).astype(np.uint8)
    models = [("teacher", teacher)] + ([("baseline", baseline)] if baseline else []) + [("FGD student", model)]
    rows = []
    for label, path in models:
        net = load_model(path, "cpu", "model" if label != "teacher" else "teacher")
        with torch.no_grad():
            feats = neck_features(net, t)
        rows.append((label, [attention(f, temperature) for f in feats]))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nl = len(rows[0][1])
    fig, axes = plt.subplots(len(rows), nl + 1, figsize=(3.2 * (nl + 1), 3.0 * len(rows)), squeeze=False)
    for r, (label, atts) in enumerate(rows):
        for lvl, (a_s, _) in enumerate(atts):
            ax = axes[r, lvl]
            heat = cv2.resize(a_s[0].numpy(), (imgsz, imgsz), interpolation=cv2.INTER_NEAREST)
            ax.imshow(rgb)
            ax.imshow(heat, cmap="jet", alpha=0.5)
            ax.set_title(f"{label}: spatial P{lvl + 3}", fontsize=8)
            ax.axis("off")
        a_c = atts[min(1, nl - 1)][1][0].numpy()
        ax = axes[r, nl]
        ax.bar(np.arange(len(a_c)), a_c, width=1.0)
        ax.set_title(f"{label}: channel P{min(1, nl - 1) + 3} ({len(a_c)} ch)", fontsize=8)
    fig.tight_layout()
    dst = Path(out) if out else Path("runs") / "attention" / f"{Path(str(source)).stem}_attention.png"
    dst.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(dst, dpi=110)
    plt.close(fig)
    print(f"yolo-fgd: attention maps saved to {dst.resolve()}")
    console.result(str(dst.resolve()))  # the path alone on stdout, as every command's result
    return dst


def imitation(model: str, teacher: str, data: str = "shapes", imgsz: int = 640, images: int = 120) -> dict:
    """Per student checkpoint (comma-separated ``model``): held-out R^2, per Detect level, of the least-squares 1x1 map
    (with bias) from its features (N,Cs,H,W) to the teacher's per-image, per-channel standardised ones (N,Ct,H,W),
    fitted on half the pixels of ``images`` validation images and scored on the other half."""
    files, _ = split_images(resolve_data(data), "val")
    if not files:
        raise FGDError(f"no validation images in {data}: check the data YAML's val path")
    x = torch.cat([torch.from_numpy(blob(cv2.imread(str(p)), (imgsz, imgsz))[0]) for p in files[: int(images)]])
    with torch.no_grad():
        targets = [standardise(f) for f in neck_features(load_model(teacher, "cpu", "teacher"), x)]
    out = {}
    for path in str(model).split(","):
        with torch.no_grad():
            feats = neck_features(load_model(path, "cpu", "model"), x)
        r2 = []
        for fs, ft in zip(feats, targets):
            a = torch.cat([fs.permute(0, 2, 3, 1).flatten(0, 2), torch.ones(fs.numel() // fs.shape[1], 1)], 1)
            b = ft.permute(0, 2, 3, 1).flatten(0, 2)
            g = torch.Generator().manual_seed(0)
            fit = torch.randperm(len(a), generator=g) < len(a) // 2
            w = torch.linalg.lstsq(a[fit], b[fit]).solution
            r2.append(round(1 - float(((a[~fit] @ w - b[~fit]) ** 2).mean() / b[~fit].var(0).mean()), 3))
        out[path] = r2
        LOGGER.info(f"imitation: {path}: held-out R^2 of the best linear map to the teacher, "
                    + ", ".join(f"P{i + 3} {v:.3f}" for i, v in enumerate(r2)))
    return out


PROBED = {"kd_cls": 1.0, "kd_box": 1.0, "crosskd": 1.0, "cwd": 1.0, "pkd": 1.0, "ld": 1.0, "bckd": 1.0,
          "fgd_gain": 0.05, "lad": True}  # every term at its screening weight, and the teacher's assignment


def gradients(model: str, teacher: str, data: str = "shapes", imgsz: int = 640, batch: int = 16, batches: int = 8,
              seed: int = 0, **distill) -> dict:
    """Where each distillation term pulls a (converged) student: its gradient g_k on the student's parameters, summed
    over ``batches`` training batches (no mosaic, as a continuation sees them), against the detection loss's gradient
    on the same batches (g_det) and on the validation images (g_val):

        ratio_k = |g_k| / |g_det|,   cos_det = cos(g_k, g_det),   cos_val = cos(g_k, g_val)

    cos_val > 0: a small step down g_k lowers the held-out detection loss (to first order); the row ``det`` gives
    cos(g_det, g_val), what more plain training does. Terms at their screening weights (:data:`PROBED`), or as given
    (``kd_cls=0`` leaves one out). With ``lad`` (on unless ``lad=False``) the row ``lad`` is the detection loss
    with the teacher's label assignment in place of the student's, and its ``fg_jaccard`` the overlap of the two
    assignments' foreground anchors (intersection over union, over every batch). Returns {term: {ratio, cos_det,
    cos_val}} and prints it as JSON on stdout."""
    import json

    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_dataloader, build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset
    from ultralytics.nn.tasks import load_checkpoint
    from ultralytics.utils.torch_utils import init_seeds

    from ..core.presets import resolve
    from ..yolo.distiller import Distiller, assigned_by
    from ..yolo.model import checkpoint_file, detect_head, train_outputs

    init_seeds(int(seed))  # torch, numpy and random: the same batches, augmentations and adapters for the same seed
    cfg = resolve({**PROBED, **distill})  # bad distillation values: one line, before any work
    info = check_det_dataset(resolve_data(data))
    student, _ = load_checkpoint(checkpoint_file(model, "model"), device="cpu")
    student = student.float().train()
    head = detect_head(student)
    if head is None or int(head.nc) != len(info["names"]):
        raise FGDError(f"model '{model}' has {getattr(head, 'nc', 'no detection')} classes but {data} has "
                       f"{len(info['names'])}: probe a student trained on this data")
    for p in student.parameters():
        p.requires_grad_(True)
    args = get_cfg(overrides={"imgsz": int(imgsz), "mosaic": 0.0, "batch": int(batch)})
    student.args = args
    criterion = student.init_criterion()
    distiller = Distiller(student, teacher, cfg, info["names"], "cpu")
    params = [p for p in student.parameters() if p.requires_grad]

    def loader(split, mode):
        ds = build_yolo_dataset(args, info[split], int(batch), info, mode=mode, stride=int(max(student.stride)))
        return build_dataloader(ds, int(batch), 0, shuffle=mode == "train", device="cpu")

    def flat(loss):
        gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(p)).double().flatten() for g, p in zip(gs, params)])

    sums: dict[str, torch.Tensor] = {}
    fg = []  # the foreground masks (N,A) of each assigner call, the student's own then the teacher's
    hook = getattr(criterion, "one2many", criterion).assigner.register_forward_hook(lambda m, a, o: fg.append(o[3]))
    both = torch.zeros(2)  # anchors in both assignments' foreground, in either
    for i, b in zip(range(int(batches)), loader("train", "train")):
        b["img"] = b["img"].float() / 255
        preds = student(b["img"])
        det, _ = criterion(preds, b)
        losses = [("det", det.sum())]
        teacher_pass = distiller.teacher_pass(b["img"])
        if cfg["lad"]:
            with assigned_by(criterion, distiller.assignment(teacher_pass)):
                losses.append(("lad", criterion(preds, b)[0].sum()))
            own, lad = fg[-2:]
            both += torch.stack([(own & lad).sum(), (own | lad).sum()]).float()
        out = distiller(train_outputs(preds), b, teacher_pass)
        n = b["img"].shape[0]
        for name, loss in losses + [(t.name, out[t.name] * n) for t in distiller.built]:
            sums[name] = sums.get(name, 0) + flat(loss)
    hook.remove()
    g_val = 0
    for b in loader("val", "val"):
        b["img"] = b["img"].float() / 255
        g_val = g_val + flat(criterion(student(b["img"]), b)[0].sum())
    cos = torch.nn.functional.cosine_similarity
    det = sums["det"]
    result = {name: {"ratio": round(float(g.norm() / det.norm()), 4), "cos_det": round(float(cos(g, det, 0)), 4),
                     "cos_val": round(float(cos(g, g_val, 0)), 4)} for name, g in sums.items()}
    if "lad" in result:
        result["lad"]["fg_jaccard"] = round(float(both[0] / both[1].clamp(min=1)), 4)
    LOGGER.info(f"gradients: {model} ({batches} batches of {batch}, imgsz {imgsz}): |g_k|/|g_det|, cos(g_k, g_det), "
                "cos(g_k, g_val)\n" + "\n".join(f"  {k:<8} {v['ratio']:>9.4f} {v['cos_det']:>8.4f} {v['cos_val']:>8.4f}"
                                                + (f"  fg_jaccard {v['fg_jaccard']:.4f}" if "fg_jaccard" in v else "")
                                                for k, v in result.items()))
    console.result(json.dumps(result))
    return result
