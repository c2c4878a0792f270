"""Paper-faithful path: FGD for torchvision RetinaNet and FCOS (ResNet + FPN P3-P7, 256 channels), COCO data and
COCOeval, in the style of torchvision's ``references/detection`` (plain loop, SGD, warm-up, step schedule).

    yolo-fgd tv-train recipe=cfg/tv_retinanet_r101_r50.yaml [key=value ...]
    torchrun --nproc_per_node 2 -m yolo_fgd.tv recipe=... (DistributedDataParallel, gloo on CPU, nccl on GPU)
    yolo-fgd tv-val model=runs/tv/NAME/student.pth data=... arch=retinanet backbone=resnet50
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .coco import COLUMNS, evaluate_detections
from .errors import FGDError
from .presets import build_pyramid, resolve_fgd

ARCH_PRESET = {"retinanet": "anchor_based", "fcos": "anchor_free"}
DEFAULTS = {
    "arch": "retinanet", "teacher_backbone": "resnet101", "student_backbone": "resnet50", "teacher": None,
    "student_weights": None, "data": "shapes", "epochs": 24, "batch": 2, "lr": 0.01, "momentum": 0.9,
    "weight_decay": 1e-4, "warmup_iters": 500, "warmup_factor": 1e-3, "clip": 35.0, "min_size": [800],
    "max_size": 1333, "inherit": False, "hflip": 0.5, "workers": 0, "device": "cpu", "project": "runs/tv",
    "name": "train", "seed": 0, "resume": False, "fgd": True, "fgd_preset": None, "eval_every": 1,
}


# --- models -------------------------------------------------------------------------------------------------------
def build(arch: str, backbone: str, num_classes: int, weights: str | None = None, min_size=(800,), max_size=1333):
    """torchvision RetinaNet/FCOS with a ResNet FPN (P3-P7, 256 ch), random init or a local checkpoint file.

    From scratch the backbone's BatchNorm trains; from a checkpoint it is frozen, as in the paper's setting.
    """
    from torchvision.models.detection import FCOS, RetinaNet
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import misc as misc_nn_ops
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    if arch not in ARCH_PRESET:
        raise FGDError(f"arch '{arch}' is not supported: use retinanet or fcos")
    norm = misc_nn_ops.FrozenBatchNorm2d if weights else nn.BatchNorm2d
    try:
        bb = resnet_fpn_backbone(backbone_name=backbone, weights=None, norm_layer=norm,
                                 trainable_layers=3 if weights else 5, returned_layers=[2, 3, 4],
                                 extra_blocks=LastLevelP6P7(256, 256))
    except KeyError:
        raise FGDError(f"backbone '{backbone}' unknown: use resnet18/34/50/101/152 or resnext101_32x8d") from None
    cls = RetinaNet if arch == "retinanet" else FCOS
    min_size = tuple(min_size) if isinstance(min_size, (list, tuple)) else (int(min_size),)
    model = cls(bb, num_classes=num_classes, min_size=min_size, max_size=int(max_size))
    if weights:
        p = Path(weights)
        if not p.is_file():
            raise FGDError(f"checkpoint '{weights}' not found: pass a local .pth (no downloads at run time)")
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:
            raise FGDError(f"checkpoint '{weights}' could not be loaded ({str(e).splitlines()[0][:120]})") from None
        state = state.get("model", state) if isinstance(state, dict) else state
        missing, unexpected = model.load_state_dict(state, strict=False)
        if len(missing) > len(model.state_dict()) // 2:
            raise FGDError(f"checkpoint '{weights}' does not match {arch}/{backbone} ({len(missing)} missing keys)")
    return model


def inherit(student: nn.Module, teacher: nn.Module) -> list[str]:
    """Inheriting strategy (paper §4.2, †): copy the teacher's FPN and head into the student where shapes match."""
    t = teacher.state_dict()
    copied = []
    with torch.no_grad():
        for k, v in student.state_dict().items():
            if (k.startswith("backbone.fpn.") or k.startswith("head.")) and k in t and t[k].shape == v.shape:
                v.copy_(t[k])
                copied.append(k)
    return copied


class Distiller(nn.Module):
    """Student + FGD modules (one :class:`FGDLoss` per FPN level); the teacher is held outside the module tree.

    ``forward(images, targets)`` -> the student's loss dict plus ``loss_fgd``. Boxes are taken from the student's
    transformed targets and normalised by the padded batch tensor (what the FPN maps cover), not each image.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None, fgd_cfg: dict | None):
        super().__init__()
        self.student = student
        self._teacher = [teacher]  # a list: not a submodule (not in state_dict, DDP or the optimiser)
        self.fgd = None
        if teacher is not None and fgd_cfg:
            self.fgd = build_pyramid([256] * 5, [256] * 5, fgd_cfg)
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        self._seen = {}
        student.transform.register_forward_hook(lambda m, i, o: self._seen.__setitem__("transform", o))
        student.backbone.register_forward_hook(lambda m, i, o: self._seen.__setitem__("feats", o))

    @property
    def teacher(self):
        return self._teacher[0]

    def forward(self, images, targets):
        losses = self.student(images, targets)
        if self.fgd is None:
            return losses
        image_list, tgts = self._seen["transform"]
        x = image_list.tensors
        with torch.no_grad():
            t_feats = list(self.teacher.backbone(x).values())
        s_feats = list(self._seen["feats"].values())
        hp, wp = x.shape[-2:]
        boxes = torch.cat([t["boxes"] for t in tgts]) / x.new_tensor([wp, hp, wp, hp])
        bi = torch.cat([torch.full((len(t["boxes"]),), i, device=x.device) for i, t in enumerate(tgts)])
        out = self.fgd(s_feats, t_feats, boxes, bi)
        losses["loss_fgd"] = out["total"]
        return losses


# --- data ---------------------------------------------------------------------------------------------------------
class CocoDataset(torch.utils.data.Dataset):
    """COCO-format detection set -> (image float CHW in [0,1], {'boxes' xyxy px, 'labels', 'image_id'})."""

    def __init__(self, ann_file, image_root, train: bool = False, hflip: float = 0.5):
        d = json.loads(Path(ann_file).read_text())
        self.root, self.train, self.hflip = Path(image_root), train, hflip
        self.images = d["images"]
        self.anns = {}
        for a in d["annotations"]:
            self.anns.setdefault(a["image_id"], []).append(a)
        self.gt = d

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        info = self.images[i]
        img = cv2.imread(str(self.root / info["file_name"]))
        if img is None:
            raise FGDError(f"image '{self.root / info['file_name']}' is missing or unreadable")
        img = torch.from_numpy(img[:, :, ::-1].copy()).permute(2, 0, 1).float() / 255
        anns = [a for a in self.anns.get(info["id"], []) if a["bbox"][2] > 1 and a["bbox"][3] > 1]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
        if self.train and random.random() < self.hflip:
            img = img.flip(-1)
            w = img.shape[-1]
            boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
        return img, {"boxes": boxes, "labels": labels, "image_id": info["id"]}


def coco_files(data) -> dict:
    """Resolve ``data`` (a YOLO data YAML / 'shapes' / 'deepforest', or a dict with train_json/train_images/val_json/
    val_images) to COCO files, converting YOLO sets once (``annotations/instances_{split}.json`` beside the YAML)."""
    if isinstance(data, dict):
        return data
    from .cli import resolve_data
    from .coco import yolo_split_to_coco

    yaml_path = Path(resolve_data(data))
    if not yaml_path.is_file():
        raise FGDError(f"data '{data}' not found: pass a YOLO data YAML, shapes, deepforest, or COCO json paths")
    out = {}
    for split in ("train", "val"):
        ann = yaml_path.parent / "annotations" / f"instances_{split}.json"
        if not ann.is_file():
            gt, index = yolo_split_to_coco(yaml_path, split)
            for img, (_, f) in zip(gt["images"], index):
                img["file_name"] = str(Path(f).resolve())
            ann.parent.mkdir(parents=True, exist_ok=True)
            tmp = ann.with_suffix(".tmp")
            tmp.write_text(json.dumps(gt))
            tmp.replace(ann)
        out[f"{split}_json"], out[f"{split}_images"] = str(ann), "/"
    return out


def collate(batch):
    return tuple(zip(*batch))


# --- train / eval -------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, dataset: CocoDataset, device, batch: int = 4) -> dict:
    """COCOeval bbox -> the paper's columns (mAP, AP50, AP75, APs, APm, APl, AR100, ARs, ARm, ARl)."""
    model.eval()
    dets = []
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, collate_fn=collate)
    for imgs, tgts in loader:
        outs = model([i.to(device) for i in imgs])
        for o, t in zip(outs, tgts):
            for (x1, y1, x2, y2), s, c in zip(o["boxes"].tolist(), o["scores"].tolist(), o["labels"].tolist()):
                dets.append({"image_id": t["image_id"], "category_id": int(c), "score": float(s),
                             "bbox": [x1, y1, x2 - x1, y2 - y1]})
    return evaluate_detections(dataset.gt, dets)


def lr_factor(it: int, epoch: float, cfg: dict) -> float:
    """Linear warm-up over ``warmup_iters`` then the paper's step schedule (x0.1 at 16/24 and 22/24 of the epochs)."""
    warm = 1.0
    if it < cfg["warmup_iters"]:
        a = it / max(cfg["warmup_iters"], 1)
        warm = cfg["warmup_factor"] * (1 - a) + a
    steps = [round(cfg["epochs"] * 16 / 24), round(cfg["epochs"] * 22 / 24)]
    return warm * 0.1 ** sum(epoch >= s for s in steps)


def train(**kwargs) -> dict:
    """Train a (distilled) torchvision student; returns the final COCO metrics. See DEFAULTS for arguments."""
    from ultralytics.utils import LOGGER, TQDM

    cfg = dict(DEFAULTS)
    recipe = kwargs.pop("recipe", None)
    if recipe:
        import yaml

        p = Path(recipe) if Path(recipe).is_file() else Path(__file__).resolve().parent / "cfg" / Path(recipe).name
        if not p.is_file():
            raise FGDError(f"recipe '{recipe}' not found: see cfg/tv_*.yaml")
        cfg.update(yaml.safe_load(p.read_text()))
    unknown = set(kwargs) - set(DEFAULTS) - {f"fgd_{k}" for k in ("alpha", "beta", "gamma", "lambda", "temperature",
                                                                   "gain", "norm", "split", "spatial", "channel", "mse")}
    if unknown:
        raise FGDError(f"unknown tv-train argument(s) {sorted(unknown)}: see `yolo-fgd help`")
    cfg.update(kwargs)
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank = int(os.environ.get("RANK", "0"))
    if ddp and not dist.is_initialized():
        dist.init_process_group("nccl" if str(cfg["device"]).startswith("cuda") else "gloo")
    device = torch.device(cfg["device"] if not str(cfg["device"]).isdigit() else f"cuda:{cfg['device']}")
    if ddp and device.type == "cuda":
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    torch.manual_seed(cfg["seed"] + rank)
    random.seed(cfg["seed"] + rank)

    files = coco_files(cfg["data"])
    train_set = CocoDataset(files["train_json"], files["train_images"], train=True, hflip=cfg["hflip"])
    val_set = CocoDataset(files["val_json"], files["val_images"])
    nc = max((c["id"] for c in train_set.gt["categories"]), default=0) + 1
    save = Path(cfg["project"]) / cfg["name"]
    if rank == 0:
        save.mkdir(parents=True, exist_ok=True)
    student = build(cfg["arch"], cfg["student_backbone"], nc, cfg["student_weights"], cfg["min_size"], cfg["max_size"])
    teacher = None
    fgd_cfg = None
    if cfg["fgd"]:
        if not cfg["teacher"]:
            raise FGDError("tv-train with fgd=True needs teacher=path/to/teacher.pth (or fgd=False for the baseline)")
        teacher = build(cfg["arch"], cfg["teacher_backbone"], nc, cfg["teacher"], cfg["min_size"], cfg["max_size"])
        fgd_cfg = resolve_fgd({"fgd_preset": cfg["fgd_preset"] or ARCH_PRESET[cfg["arch"]],
                               **{k: v for k, v in cfg.items() if k.startswith("fgd_") and k != "fgd_preset"}})
        if fgd_cfg["kd_cls"] or fgd_cfg["kd_box"]:
            raise FGDError("fgd_kd_cls/fgd_kd_box are the YOLO adapter's response term; the torchvision path runs the "
                           "paper's FGD only: pick a paper preset (fgd_preset=anchor_based, anchor_free or "
                           "two_stage), or leave fgd_preset unset for the architecture's own")
        if cfg["inherit"]:
            LOGGER.info(f"inherit: copied {len(inherit(student, teacher))} FPN/head tensors from the teacher")
        teacher.to(device)
    model = Distiller(student, teacher, fgd_cfg).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    lr = cfg["lr"] * cfg["batch"] * (dist.get_world_size() if ddp else 1) / 16  # linear scaling from 16 images
    opt = torch.optim.SGD(params, lr=lr, momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    start_epoch, last = 0, save / "last.pth"
    if cfg["resume"] and last.is_file():
        ck = torch.load(last, map_location="cpu", weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start_epoch = ck["epoch"] + 1
        LOGGER.info(f"resumed {last} at epoch {start_epoch + 1}")
    net = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if ddp else model
    sampler = torch.utils.data.distributed.DistributedSampler(train_set, seed=cfg["seed"]) if ddp else None
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg["batch"], shuffle=sampler is None, sampler=sampler,
                                         collate_fn=collate, num_workers=cfg["workers"], drop_last=True)
    if rank == 0:
        (save / "args.json").write_text(json.dumps(cfg, indent=1, default=str))
    nb = len(loader)
    metrics = {}
    for epoch in range(start_epoch, cfg["epochs"]):
        model.train()
        if teacher is not None:
            teacher.eval()
        if sampler is not None:
            sampler.set_epoch(epoch)
        sums, t0 = {}, time.time()
        bar = TQDM(loader, total=nb, desc=f"{epoch + 1}/{cfg['epochs']}") if rank == 0 else loader
        for i, (imgs, tgts) in enumerate(bar):
            it = epoch * nb + i
            for g in opt.param_groups:
                g["lr"] = lr * lr_factor(it, epoch, cfg)
            imgs = [im.to(device) for im in imgs]
            tgts = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in tgts]
            losses = net(imgs, tgts)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FGDError(f"non-finite loss {dict((k, float(v)) for k, v in losses.items())} at epoch "
                               f"{epoch + 1}: lower lr= or the FGD weights")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, cfg["clip"])
            opt.step()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            if rank == 0:
                bar.set_description(f"{epoch + 1}/{cfg['epochs']} " + " ".join(f"{k.removeprefix('loss_')}={v / (i + 1):.3f}"
                                                                                  for k, v in sums.items()))
        if rank == 0:
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch}
            tmp = last.with_suffix(".tmp")
            torch.save(state, tmp)
            tmp.replace(last)
            final = epoch + 1 == cfg["epochs"]
            if final or (cfg["eval_every"] and (epoch + 1) % cfg["eval_every"] == 0):
                metrics = evaluate(student, val_set, device)
                LOGGER.info("  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
            row = {"epoch": epoch + 1, "time": round(time.time() - t0, 2), "lr": opt.param_groups[0]["lr"],
                   **{k: round(v / nb, 5) for k, v in sums.items()}, **{k: round(metrics.get(k, float("nan")), 5)
                                                                       for k in COLUMNS}}
            new = not (save / "results.csv").is_file()
            with open(save / "results.csv", "a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(row))
                if new:
                    w.writeheader()
                w.writerow(row)
        if ddp:
            dist.barrier()
    if rank == 0:
        torch.save(student.state_dict(), save / "student.pth")
        LOGGER.info(f"student weights: {save / 'student.pth'}\n" + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    if ddp:
        dist.destroy_process_group()
    return metrics


def val(model: str, data="shapes", arch: str = "retinanet", backbone: str = "resnet50", device: str = "cpu",
        min_size=(800,), max_size: int = 1333) -> dict:
    """COCOeval of a torchvision student checkpoint on the val split; prints the paper's columns."""
    files = coco_files(data)
    ds = CocoDataset(files["val_json"], files["val_images"])
    nc = max((c["id"] for c in ds.gt["categories"]), default=0) + 1
    net = build(arch, backbone, nc, model, min_size, max_size)
    m = evaluate(net.to(device), ds, torch.device(device))
    print(" | ".join(COLUMNS) + "\n" + " | ".join(f"{100 * m[k]:.1f}" for k in COLUMNS))
    return m


if __name__ == "__main__":  # torchrun --nproc_per_node N -m yolo_fgd.tv key=value ...
    from .cli import parse

    _, kv = parse(sys.argv[1:])
    train(**kv)


def _det_diff(onnx_out, ref) -> float:
    """Max difference between ONNX and PyTorch detections, insensitive to the order of equal scores: sorted scores,
    and for each ONNX box the closest PyTorch box of the same label and score."""
    ob, osc, ol = (np.asarray(a) for a in onnx_out)
    rb, rs, rl = ref["boxes"].numpy(), ref["scores"].numpy(), ref["labels"].numpy()
    if ob.shape != rb.shape:
        return float("inf")
    worst = float(np.abs(np.sort(osc) - np.sort(rs)).max()) if len(rs) else 0.0
    for b, sc, lab in zip(ob, osc, ol):
        same = (rl == lab) & (np.abs(rs - sc) < 1e-4)
        worst = max(worst, float(np.abs(rb[same] - b).max(1).min()) if same.any() else float("inf"))
    return worst


def export_onnx(model: str, data="shapes", arch: str = "retinanet", backbone: str = "resnet50", imgsz: int = 640,
                opset: int = 17, nc: int | None = None, max_det: int = 100) -> dict:
    """ONNX export of a torchvision student (opset >= 17, input (3, imgsz, imgsz) in [0,1], outputs boxes/scores/labels)
    with a parity check against PyTorch on real images of the data (error above 1e-3)."""
    import onnxruntime as ort

    from .edge import blob
    from .export import PARITY_TOL, sample_images

    if int(opset) < 17:
        raise FGDError(f"opset={opset}: torchvision detectors need opset>=17 here")
    files = coco_files(data) if nc is None else None
    if nc is None:
        gt = json.loads(Path(files["val_json"]).read_text())
        nc = max((c["id"] for c in gt["categories"]), default=0) + 1
    net = build(arch, backbone, int(nc), model, [imgsz], imgsz).eval()
    net.score_thresh, net.detections_per_img = 0.0, int(max_det)  # fixed-size outputs make parity exact
    out = Path(model).with_suffix(".onnx")
    x = torch.rand(3, imgsz, imgsz)
    torch.onnx.export(net, ([x],), str(out), opset_version=int(opset), input_names=["images"],
                      output_names=["boxes", "scores", "labels"], dynamo=False)
    # Parity of the network numerics: the same graph without post-processing (transform + backbone + head raw
    # outputs), since top-k/NMS over near-equal scores may legitimately pick different boxes.
    raw, head = out.with_name(f"{out.stem}-raw.onnx"), _RawHead(net).eval()
    torch.onnx.export(head, (x[None],), str(raw), opset_version=int(opset), input_names=["images"],
                      dynamo=False)
    session = ort.InferenceSession(str(raw), providers=["CPUExecutionProvider"])
    full = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    from .cli import resolve_data

    worst, det = 0.0, 0.0
    for f in sample_images(resolve_data(data) if isinstance(data, str) else None, "val") or [None]:
        img = cv2.imread(str(f)) if f else (np.random.rand(imgsz, imgsz, 3) * 255).astype(np.uint8)
        t = torch.from_numpy(blob(img, (imgsz, imgsz))[0][0])
        with torch.no_grad():
            ref = head(t[None]).numpy()
            ref_det = net([t])[0]
        worst = max(worst, float(np.abs(session.run(None, {"images": t[None].numpy()})[0] - ref).max()))
        det = max(det, _det_diff(full.run(None, {"images": t.numpy()}), ref_det))
    raw.unlink(missing_ok=True)
    if worst > PARITY_TOL:
        raise FGDError(f"ONNX output differs from PyTorch by {worst:.2e} > {PARITY_TOL}")
    res = {"onnx": str(out), "parity": worst, "detections_max_diff": det}
    print(json.dumps(res))
    return res


class _RawHead(nn.Module):
    """(1,3,H,W) in [0,1] -> concatenated raw head outputs (1, anchors, classes + 4 [+1 centerness])."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        images, _ = self.net.transform(list(x))
        feats = list(self.net.backbone(images.tensors).values())
        return torch.cat([v for v in self.net.head(feats).values()], dim=-1)
