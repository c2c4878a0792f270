"""One training epoch and the COCO evaluation of the torchvision path (as ``references/detection/engine.py``)."""

from __future__ import annotations

import torch
from torch import nn
from ultralytics.utils import TQDM

from ..data.coco import coco_results, evaluate_detections
from ..errors import FGDError
from .coco_utils import CocoDataset, collate


def lr_factor(it: int, epoch: float, cfg: dict) -> float:
    """Linear warm-up over ``warmup_iters`` then the paper's step schedule (x0.1 at 16/24 and 22/24 of the epochs)."""
    warm = 1.0
    if it < cfg["warmup_iters"]:
        a = it / max(cfg["warmup_iters"], 1)
        warm = cfg["warmup_factor"] * (1 - a) + a
    steps = [round(cfg["epochs"] * 16 / 24), round(cfg["epochs"] * 22 / 24)]
    return warm * 0.1 ** sum(epoch >= s for s in steps)


def to_device(imgs, tgts, device) -> tuple[list, list]:
    """A collated batch (images, target dicts) on ``device``."""
    return [im.to(device) for im in imgs], [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()}
                                            for t in tgts]


def train_one_epoch(net: nn.Module, opt: torch.optim.Optimizer, loader, device, epoch: int, cfg: dict, base_lr: float,
                    scaler: torch.amp.GradScaler | None = None, show: bool = True) -> dict:
    """One epoch of SGD on ``net`` (a :class:`~yolo_fgd.tv.distiller.Distiller`, maybe DDP-wrapped) -> the mean of
    each loss over the epoch. With ``scaler`` the forward runs under fp16 autocast (FGD's terms stay fp32)."""
    nb = len(loader)
    params = [p for g in opt.param_groups for p in g["params"]]
    sums = {}
    bar = TQDM(loader, total=nb, desc=f"{epoch + 1}/{cfg['epochs']}") if show else loader
    for i, (imgs, tgts) in enumerate(bar):
        it = epoch * nb + i
        for g in opt.param_groups:
            g["lr"] = base_lr * lr_factor(it, epoch, cfg)
        getattr(net, "module", net).progress(epoch + (i + 1) / nb, cfg["epochs"])  # the distillation schedule
        imgs, tgts = to_device(imgs, tgts, device)
        with torch.autocast(device.type, enabled=scaler is not None):
            losses = net(imgs, tgts)
        loss = sum(v.float() for v in losses.values())
        if not torch.isfinite(loss):
            raise FGDError(f"non-finite loss {dict((k, float(v)) for k, v in losses.items())} at epoch "
                           f"{epoch + 1}: lower lr= or the FGD weights")
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(params, cfg["clip"])
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            nn.utils.clip_grad_norm_(params, cfg["clip"])
            opt.step()
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        if show:
            bar.set_description(f"{epoch + 1}/{cfg['epochs']} " + " ".join(
                f"{k.removeprefix('loss_')}={v / (i + 1):.3f}" for k, v in sums.items()))
    return {k: v / max(nb, 1) for k, v in sums.items()}


MASK_COLUMNS = ("mask_mAP", "mask_AP50", "mask_AP75", "mask_APs", "mask_APm", "mask_APl")  # segm COCOeval


@torch.no_grad()
def evaluate(model: nn.Module, dataset: CocoDataset, device, batch: int = 4) -> dict:
    """COCOeval bbox -> the paper's columns (mAP, AP50, AP75, APs, APm, APl, AR100, ARs, ARm, ARl); for a model that
    predicts masks (Mask R-CNN) also segm COCOeval of its masks at 0.5 -> :data:`MASK_COLUMNS`."""
    from pycocotools import mask as mask_util

    model.eval()
    dets, segs = [], []
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, collate_fn=collate)
    for imgs, tgts in loader:
        outs = model([i.to(device) for i in imgs])
        for o, t in zip(outs, tgts):
            rows = torch.cat([o["boxes"], o["scores"][:, None], o["labels"][:, None].float()], 1).tolist()
            found = coco_results(t["image_id"], rows)
            dets += found
            if "masks" in o:  # (K,1,H,W) probabilities
                binary = (o["masks"][:, 0] > 0.5).cpu().numpy().astype("uint8")
                for d, m in zip(found, binary):
                    rle = mask_util.encode(m.copy(order="F"))
                    rle["counts"] = rle["counts"].decode()
                    segs.append({**d, "segmentation": rle})
    metrics = evaluate_detections(dataset.gt, dets)
    if getattr(model, "roi_heads", None) is not None and getattr(model.roi_heads, "has_mask", lambda: False)():
        masked = evaluate_detections(dataset.gt, segs, "segm")
        metrics.update({f"mask_{k}": masked[k] for k in ("mAP", "AP50", "AP75", "APs", "APm", "APl")})
    return metrics
