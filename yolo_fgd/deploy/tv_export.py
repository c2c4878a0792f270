"""ONNX export of a torchvision student (``yolo-fgd export model=student.pth ...``) with the shared parity check."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from ..data import resolve_data
from ..errors import FGDError
from ..tv.coco_utils import coco_files
from ..tv.models import build
from .edge import blob
from .parity import check, max_diff, sample_images


def detections_diff(onnx_out, ref) -> float:
    """Max difference between ONNX and PyTorch detections, insensitive to the order of equal scores: sorted scores,
    and for each ONNX box the closest PyTorch box of the same label and score."""
    ob, osc, ol = (np.asarray(a) for a in onnx_out[:3])
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
    with a parity check against PyTorch on real images of the data (error above :data:`PARITY_TOL`)."""
    if int(opset) < 17:
        raise FGDError(f"opset={opset}: torchvision detectors need opset>=17 here")
    data = resolve_data(data) if isinstance(data, str) else data
    if nc is None:
        gt = json.loads(Path(coco_files(data)["val_json"]).read_text())
        nc = max((c["id"] for c in gt["categories"]), default=0) + 1
    net = build(arch, backbone, int(nc), model, [imgsz], imgsz).eval()
    post = getattr(net, "roi_heads", net)  # a two-stage model's post-processing lives in its RoI heads
    post.score_thresh, post.detections_per_img = 0.0, int(max_det)  # fixed-size outputs make parity exact
    out = Path(model).with_suffix(".onnx")
    x = torch.rand(3, imgsz, imgsz)
    outputs = ["boxes", "scores", "labels"] + (["masks"] if getattr(getattr(net, "roi_heads", None), "has_mask",
                                                                  lambda: False)() else [])
    torch.onnx.export(net, ([x],), str(out), opset_version=int(opset), input_names=["images"],
                      output_names=outputs, dynamo=False)
    # Parity of the network numerics: the same graph without post-processing (transform + backbone + head raw
    # outputs), since top-k/NMS over near-equal scores may legitimately pick different boxes.
    raw, head = out.with_name(f"{out.stem}-raw.onnx"), RawHead(net).eval()
    torch.onnx.export(head, (x[None],), str(raw), opset_version=int(opset), input_names=["images"], dynamo=False)
    session = ort.InferenceSession(str(raw), providers=["CPUExecutionProvider"])
    full = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    images = sample_images(data, "val")
    if not images:
        raise FGDError(f"no validation images in '{data}' for the parity check: pass data=your.yaml")
    with torch.no_grad():
        worst = max_diff(lambda a: head(torch.from_numpy(a)).numpy(), lambda a: session.run(None, {"images": a})[0],
                         images, imgsz)
        det = 0.0
        for f in images:
            t = torch.from_numpy(blob(cv2.imread(str(f)), (imgsz, imgsz))[0][0])
            det = max(det, detections_diff(full.run(None, {"images": t.numpy()}), net([t])[0]))
    raw.unlink(missing_ok=True)
    check(worst, len(images), data)
    return {"onnx": str(out.resolve()), "parity": worst, "detections_max_diff": det}


class RawHead(nn.Module):
    """(1,3,H,W) in [0,1] -> the dense raw outputs: a one-stage head's (1, anchors, classes + 4 [+1 centerness]); a
    two-stage model's RPN (1, anchors, 1 objectness + 4 deltas) over every FPN level (its RoI heads work on proposals
    chosen by top-k and NMS, which the detections' own comparison covers)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        images, _ = self.net.transform(list(x))
        feats = list(self.net.backbone(images.tensors).values())
        if hasattr(self.net, "rpn"):
            objectness, deltas = self.net.rpn.head(feats)
            per_level = [torch.cat([o.flatten(2), d.flatten(2)], 1) for o, d in zip(objectness, deltas)]
            return torch.cat(per_level, -1).transpose(1, 2)
        return torch.cat([v for v in self.net.head(feats).values()], dim=-1)
