"""Paper-faithful path: FGD for torchvision RetinaNet, FCOS, Faster R-CNN and Mask R-CNN, in the style of torchvision's
``references/detection/train.py`` (plain loop, SGD, warm-up, the 2x step schedule, COCOeval).

    yolo-fgd tv-train recipe=tv_retinanet_r101_r50 [key=value ...]
    torchrun --nproc_per_node 2 -m yolo_fgd.tv recipe=... (DistributedDataParallel, gloo on CPU, nccl on GPU)
    yolo-fgd tv-val model=runs/tv/NAME/student.pth data=... arch=retinanet backbone=resnet50
    (a plain run, fgd=False, saves model.pth: a teacher or the plain baseline; a distilled one student.pth)
"""

from __future__ import annotations

import copy
import csv
import json
import os
import random
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from ultralytics.utils import LOGGER

from .. import console
from ..cfg import load_recipe
from ..cfg.tv import ARGS, FGD_KEYS
from ..core.presets import RESPONSE_KEYS, YOLO_TERM_WEIGHTS, renamed, resolve
from ..data.coco import COLUMNS
from ..errors import FGDError
from .coco_utils import CocoDataset, coco_files, collate
from .distiller import Distiller
from .engine import MASK_COLUMNS, evaluate, to_device, train_one_epoch
from .models import ARCH_PRESET, build, inherit
from .models import save as save_model

def config(**kwargs) -> dict:
    """tv-train arguments: ``ARGS`` < recipe (``recipe=``) < ``kwargs``; unknown keys are a one-line error."""
    cfg = dict(ARGS)
    recipe = kwargs.pop("recipe", None)
    if recipe:
        given = load_recipe(recipe)
        if not isinstance(given, dict) or "methods" in given:
            raise FGDError(f"recipe={recipe} is not a recipe of tv-train arguments"
                           + (" but a study of several runs: run `yolo-fgd study recipe=" + str(recipe) + "`"
                              if isinstance(given, dict) else ": give a YAML of key: value tv-train arguments"))
        cfg.update(checked(renamed(given), f" in recipe {recipe}"))
    cfg.update(checked(renamed(kwargs)))
    return cfg


def checked(args: dict, where: str = "") -> dict:
    """``args`` if every key is a tv-train argument, else a one-line error naming the unknown ones."""
    unknown = sorted(set(args) - set(ARGS) - set(FGD_KEYS))
    if unknown:
        hint = (" (the head-response term is the YOLO adapter's; tv-train runs the paper's FGD)"
                if set(unknown) & set(RESPONSE_KEYS) else "")
        raise FGDError(f"unknown tv-train argument(s) {unknown}{where}{hint}: see `yolo-fgd tv-train help`")
    return args


def train(**kwargs) -> dict:
    """Train a (distilled) torchvision student; returns the final COCO metrics. See ``ARGS`` for arguments."""
    cfg = config(**kwargs)
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device(cfg["device"] if not str(cfg["device"]).isdigit() else f"cuda:{cfg['device']}")
    if cfg["amp"] and device.type != "cuda":
        raise FGDError(f"amp=True needs a CUDA device (device={cfg['device']}): pass device=cuda or amp=False")
    if ddp and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if ddp and device.type == "cuda":
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    torch.manual_seed(cfg["seed"] + rank)
    random.seed(cfg["seed"] + rank)

    files = coco_files(cfg["data"])
    masks = cfg["arch"] == "mask_rcnn"
    train_set = CocoDataset(files["train_json"], files["train_images"], train=True, hflip=cfg["hflip"], masks=masks)
    val_set = CocoDataset(files["val_json"], files["val_images"])
    if masks and not train_set.has_masks():
        raise FGDError(f"arch=mask_rcnn needs instance masks, but data '{cfg['data']}' has box labels only: pass a "
                       "segmentation data set (YOLO polygons, e.g. `yolo-fgd data shapes task=segment`, or COCO json "
                       "with segmentation), or arch=faster_rcnn")
    nc = max((c["id"] for c in train_set.gt["categories"]), default=0) + 1
    save = Path(cfg["project"]) / cfg["name"]
    last = save / "last.pth"
    ck = torch.load(last, map_location="cpu", weights_only=True) if cfg["resume"] and last.is_file() else None
    student = build(cfg["arch"], cfg["student_backbone"], nc, cfg["student_weights"], cfg["min_size"], cfg["max_size"],
                    cfg["norm"], cfg["width"], cfg["anchor"], cfg["rois"])
    teacher, fgd_cfg, auto = None, None, False
    if cfg["fgd"]:
        if not cfg["teacher"]:
            raise FGDError("tv-train with fgd=True needs teacher=path/to/teacher.pth (or fgd=False for the baseline)")
        teacher = build(cfg["arch"], cfg["teacher_backbone"], nc, cfg["teacher"], cfg["min_size"], cfg["max_size"])
        if rank == 0:
            LOGGER.info("teacher: " + ", ".join(f"{k} {v}" for k, v in teacher.build_args.items()))
        auto = str(cfg.get("fgd_gain")).lower() == "auto"
        fgd_cfg = resolve({"distill_preset": cfg["distill_preset"] or ARCH_PRESET[cfg["arch"]],
                           **{k: cfg[k] for k in FGD_KEYS if k in cfg and not (auto and k == "fgd_gain")}})
        on = [k for k in YOLO_TERM_WEIGHTS if fgd_cfg[k]]
        if on:
            raise FGDError(f"{', '.join(on)} weigh terms of the YOLO distiller; the torchvision path runs the "
                           "paper's FGD only: pick a paper preset (distill_preset=anchor_based, anchor_free or "
                           "two_stage), or leave distill_preset unset for the architecture's own")
        teacher.to(device)
        if rank == 0 and cfg["check_teacher"] and ck is None:
            check_teacher(teacher, val_set, device, cfg["baseline"])
        if cfg["inherit"]:
            LOGGER.info(f"inherit: copied {len(inherit(student, teacher))} FPN/head tensors from the teacher")
    if teacher is not None and auto:
        saved = ck.get("fgd_gain") if ck else None  # a resumed run keeps the gain it was trained with
        gain = torch.tensor([saved if saved is not None else calibrated_gain(student, teacher, fgd_cfg, train_set,
                                                                             cfg["batch"], device)])
        if ddp:  # every rank trains with rank 0's gain
            dist.broadcast(gain, 0)
        fgd_cfg["gain"] = float(gain)
        cfg["fgd_gain"] = fgd_cfg["gain"]  # args.json records the gain the run used
    if rank == 0:
        save.mkdir(parents=True, exist_ok=True)
    model = Distiller(student, teacher, fgd_cfg).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    lr = cfg["lr"] * cfg["batch"] * (dist.get_world_size() if ddp else 1) / 16  # linear scaling from 16 images
    opt = torch.optim.SGD(params, lr=lr, momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    scaler = torch.amp.GradScaler(device.type) if cfg["amp"] else None
    start_epoch = 0
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        start_epoch = ck["epoch"] + 1
        LOGGER.info(f"resumed {last} at epoch {start_epoch + 1}")
        del ck  # its tensors are in the model and optimiser now
    net = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if ddp else model
    sampler = torch.utils.data.distributed.DistributedSampler(train_set, seed=cfg["seed"]) if ddp else None
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg["batch"], shuffle=sampler is None, sampler=sampler,
                                         collate_fn=collate, num_workers=cfg["workers"], drop_last=True)
    if rank == 0:
        (save / "args.json").write_text(json.dumps(cfg, indent=1, default=str))
    metrics, warned = {}, False
    for epoch in range(start_epoch, cfg["epochs"]):
        model.train()
        if teacher is not None:
            teacher.eval()
        if sampler is not None:
            sampler.set_epoch(epoch)
        t0 = time.time()
        means = train_one_epoch(net, opt, loader, device, epoch, cfg, lr, scaler, show=rank == 0)
        ratio = fgd_dominates(means)
        if rank == 0 and ratio and not warned:
            warned = True
            LOGGER.warning(f"FGD's loss is {ratio:.0f}x the detection losses in epoch {epoch + 1}: check "
                           "the teacher (`yolo-fgd tv-val model=...`; a weak one teaches noise) or lower fgd_gain=")
        if rank == 0:
            save_checkpoint(last, model, opt, scaler, epoch, fgd_cfg["gain"] if fgd_cfg else None)
            scored = {}  # this epoch's COCO figures, when it was evaluated (nan in results.csv otherwise)
            if epoch + 1 == cfg["epochs"] or (cfg["eval_every"] and (epoch + 1) % cfg["eval_every"] == 0):
                scored = metrics = evaluate(student, val_set, device)
                LOGGER.info("  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
            row = {"epoch": epoch + 1, "time": round(time.time() - t0, 2),
                   "lr": opt.param_groups[0]["lr"], **{k: round(v, 5) for k, v in means.items()},
                   **{k: round(scored.get(k, float("nan")), 5) for k in COLUMNS + (MASK_COLUMNS if masks else ())}}
            append_row(save / "results.csv", row)
        if ddp:
            dist.barrier()
    if rank == 0:
        weights = save / ("student.pth" if teacher is not None else "model.pth")  # distilled, or trained plainly
        save_model(student, weights)
        kind = "distilled student" if teacher is not None else "plainly trained model (a teacher or the plain baseline)"
        LOGGER.info(f"{kind} weights: {weights.resolve()}\n" + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    if ddp:
        dist.destroy_process_group()
    return metrics


def check_teacher(teacher: nn.Module, val_set, device, baseline=None) -> float:
    """The teacher's mAP on the val split, logged before any training; a one-line error when it does not beat the
    plain student's final mAP in ``baseline`` (a run folder or its results.csv: distilling from a weaker model only
    teaches noise), a loud warning when it is below 1 mAP without a baseline."""
    score = evaluate(teacher, val_set, device)["mAP"]
    LOGGER.info(f"teacher mAP50-95 on the val split: {100 * score:.1f}")
    if baseline:
        path = Path(baseline) / "results.csv" if Path(baseline).is_dir() else Path(baseline)
        try:
            with open(path) as f:
                plain = float(list(csv.DictReader(f))[-1]["mAP"])
        except (OSError, KeyError, ValueError, IndexError):
            raise FGDError(f"baseline={baseline} has no mAP in a results.csv: pass the folder of a finished plain "
                           "run (tv-train fgd=False)") from None
        if score <= plain:
            raise FGDError(f"the teacher scores {100 * score:.1f} mAP50-95, not above the plain student's "
                           f"{100 * plain:.1f} (baseline={baseline}): FGD would imitate a weaker model; train the "
                           "teacher longer or larger, or pass check_teacher=False to distil anyway")
    elif score < 0.01:
        LOGGER.warning(f"the teacher scores {100 * score:.1f} mAP50-95 on the val split: it has not learnt, and FGD "
                       "from it only adds noise; pass baseline=<plain run> to compare it with the plain student")
    return score


AUTO_BATCHES = 5  # batches fgd_gain=auto measures


def calibrated_gain(student: nn.Module, teacher: nn.Module, fgd_cfg: dict, train_set, batch: int, device) -> float:
    """``fgd_gain=auto``: the gain at which FGD's loss equals the sum of the detection losses at the start, i.e.
    1 / the median over the first :data:`AUTO_BATCHES` training batches of :func:`fgd_ratio` at gain 1, with the
    student as it starts (a copy, no update). The paper's weights were set for ImageNet-initialised features; from
    scratch the features' scale differs by orders of magnitude."""
    probe = Distiller(copy.deepcopy(student), teacher, {**fgd_cfg, "gain": 1.0}).to(device).train()
    teacher.eval()
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch, collate_fn=collate)
    ratios = []
    with torch.no_grad():
        for (imgs, tgts), _ in zip(loader, range(AUTO_BATCHES)):
            losses = probe(*to_device(imgs, tgts, device))
            ratios.append(fgd_ratio({k: float(v) for k, v in losses.items()}))
    ratio = sorted(ratios)[len(ratios) // 2]
    gain = 1.0 / max(ratio, 1e-12)
    LOGGER.info(f"fgd_gain=auto: at gain 1 FGD's loss is {ratio:.3g}x the detection losses (median of "
                f"{len(ratios)} batches); gain {gain:.3g}")
    return gain


def fgd_ratio(losses: dict) -> float:
    """``loss_fgd`` / the sum of the other (detection) losses of a loss dict of floats."""
    det = sum(v for k, v in losses.items() if k != "loss_fgd")
    return losses.get("loss_fgd", 0.0) / max(det, 1e-12)


def fgd_dominates(means: dict, limit: float = 10.0) -> float:
    """``loss_fgd`` / the sum of the detection losses of an epoch's means when above ``limit``, else 0. In the paper's
    runs FGD's loss is of the order of the detection losses; 70-160x was seen here with a teacher that had not learnt."""
    ratio = fgd_ratio(means)
    return ratio if ratio > limit else 0.0


def save_checkpoint(path: Path, model: nn.Module, opt, scaler, epoch: int, gain: float | None = None) -> None:
    """``last.pth`` (distiller state, optimiser, scaler, epoch, FGD's gain), written to a temporary name and
    renamed."""
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
             "scaler": scaler.state_dict() if scaler is not None else None, "fgd_gain": gain}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def append_row(path: Path, row: dict) -> None:
    """Append one epoch's row to ``results.csv`` (header on the first)."""
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def val(model: str, data="shapes", arch: str = "retinanet", backbone: str = "resnet50", device: str = "cpu",
        min_size=(800,), max_size: int = 1333) -> dict:
    """COCOeval of a torchvision student checkpoint on the val split; prints the paper's columns."""
    files = coco_files(data)
    ds = CocoDataset(files["val_json"], files["val_images"])
    nc = max((c["id"] for c in ds.gt["categories"]), default=0) + 1
    net = build(arch, backbone, nc, model, min_size, max_size)
    m = evaluate(net.to(device), ds, torch.device(device))
    cols = [k for k in COLUMNS + MASK_COLUMNS if k in m]
    console.result(" | ".join(cols) + "\n" + " | ".join(f"{100 * m[k]:.1f}" for k in cols))
    return m
