"""COCOeval of deployed models on a data set's val split: YOLO checkpoints through the validator's protocol
(letterbox, conf 0.001, IoU 0.7, multi-label NMS) and ONNX models through the edge runner."""

from __future__ import annotations

import cv2
import numpy as np
import torch
from ultralytics import YOLO
from ultralytics.utils.nms import non_max_suppression

from ..data.coco import coco_results, evaluate_detections, yolo_split_to_coco
from .edge import EdgeModel, blob


def detect(model_path, files, imgsz: int, batch: int = 16, multi_label: bool = True) -> list[list]:
    """Detections per image as Ultralytics' validator makes them: letterbox to ``imgsz``, conf 0.001, IoU 0.7,
    **multi-label** NMS (a box may count for several classes, as in RetinaNet/FCOS evaluation), max 300 -> per file a
    list of (x1, y1, x2, y2, score, cls) in original pixels. ``multi_label=False``: one label per box, as
    ``YOLO.predict`` and the edge runner deploy it (students with more class confusion score lower that way)."""
    net = YOLO(model_path).model.float().fuse().eval()
    nc = len(net.names)  # channels past the classes (mask coefficients, keypoints) are not classes
    out = []
    for i in range(0, len(files), batch):
        ims = [blob(cv2.imread(str(f)), (imgsz, imgsz)) for f in files[i : i + batch]]
        with torch.no_grad():
            preds = net(torch.from_numpy(np.concatenate([x for x, _, _ in ims])))
        while isinstance(preds, (list, tuple)):  # (y, raw) and, for segmentation, ((y, proto), raw)
            preds = preds[0]
        if getattr(net, "end2end", False):  # YOLO26 end-to-end head: already (N, max_det, 6)
            dets = [p[p[:, 4] > 0.001] for p in preds]
        else:
            dets = non_max_suppression(preds, 0.001, 0.7, multi_label=multi_label, max_det=300, nc=nc)
        for d, (_, gain, (px, py)) in zip(dets, ims):
            d = d.clone()
            d[:, [0, 2]] = (d[:, [0, 2]] - px) / gain
            d[:, [1, 3]] = (d[:, [1, 3]] - py) / gain
            out.append(d[:, :6].tolist())
    return out


def coco_ap(model_path, data_yaml, imgsz, batch=16, multi_label: bool = True) -> dict:
    """mAP50-95, mAP50 and APs/APm/APl of a YOLO checkpoint on the val split (pycocotools, COCO area ranges), on
    detections made by :func:`detect`."""
    gt, files = yolo_split_to_coco(data_yaml, "val")
    found = detect(model_path, [f for _, f in files], imgsz, batch, multi_label)
    dets = [d for (image_id, _), rows in zip(files, found) for d in coco_results(image_id, rows)]
    return summary(evaluate_detections(gt, dets))


def edge_ap(model, data_yaml, threads: int = 0) -> dict:
    """The same figures for a model run by the edge runner (an ONNX path, or an :class:`EdgeModel` of any backend;
    conf 0.001, IoU 0.7, one label per box)."""
    gt, files = yolo_split_to_coco(data_yaml, "val")
    if isinstance(model, EdgeModel):
        model.conf, model.iou = 0.001, 0.7
    else:
        model = EdgeModel(model, conf=0.001, iou=0.7, threads=threads)
    dets = [d for image_id, f in files for d in coco_results(image_id, model(cv2.imread(f)))]
    return summary(evaluate_detections(gt, dets))


def summary(stats: dict) -> dict:
    """The study's and benchmark's figures from COCOeval's columns."""
    return {"map": stats["mAP"], "map50": stats["AP50"], "aps": stats["APs"], "apm": stats["APm"], "apl": stats["APl"]}
