"""COCO-format ground truth from YOLO data sets, and pycocotools evaluation with the paper's columns."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import cv2
import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from ultralytics.data.utils import check_det_dataset, img2label_paths
from ultralytics.utils.ops import segments2boxes

COLUMNS = ("mAP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "ARs", "ARm", "ARl")
_STAT_INDEX = {"mAP": 0, "AP50": 1, "AP75": 2, "APs": 3, "APm": 4, "APl": 5, "AR100": 8, "ARs": 9, "ARm": 10, "ARl": 11}
IMG_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def split_images(data_yaml, split: str = "val") -> tuple[list[Path], dict]:
    """Image paths of a split of an Ultralytics data YAML, and the class names."""
    files, data = _split(data_yaml, split)
    return files, data["names"]


def _split(data_yaml, split: str) -> tuple[list[Path], dict]:
    data = check_det_dataset(str(data_yaml), autodownload=False)
    src = data[split]
    files = []
    for s in src if isinstance(src, list) else [src]:
        p = Path(s)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMG_SUFFIXES)
        elif p.suffix == ".txt":
            root = p.parent
            files += [(root / ln.strip()).resolve() if not Path(ln.strip()).is_absolute() else Path(ln.strip())
                      for ln in p.read_text().splitlines() if ln.strip()]
    return files, data


def label_boxes(label_file, pose: bool = False) -> np.ndarray:
    """(K,5) class, x, y, w, h (normalised) of a YOLO label file of any task: a box row, a pose row (its box comes
    first) or a polygon row (segment, OBB corners: its axis-aligned bounding box, as Ultralytics' segments2boxes)."""
    rows = []
    for line in Path(label_file).read_text().splitlines():
        v = [float(x) for x in line.split()]
        if len(v) == 5 or (pose and len(v) > 5):
            rows.append(v[:5])
        elif len(v) > 5:
            xy = np.asarray(v[1:1 + (len(v) - 1) // 2 * 2]).reshape(-1, 2)
            rows.append([v[0], *segments2boxes([xy])[0]])
    return np.asarray(rows, dtype=float).reshape(-1, 5)


def label_polygons(label_file) -> list:
    """Per row of a YOLO label file, its polygon (P,2) normalised when the row is one (segment, OBB corners), else
    None (a box row)."""
    out = []
    for line in Path(label_file).read_text().splitlines():
        v = [float(x) for x in line.split()]
        out.append(np.asarray(v[1:1 + (len(v) - 1) // 2 * 2]).reshape(-1, 2) if len(v) > 5 else None)
    return out


def yolo_split_to_coco(data_yaml, split: str = "val") -> tuple[dict, list[tuple[int, str]]]:
    """COCO ground-truth dict (boxes in pixels, category ids = YOLO class ids) and [(image_id, path)]; the boxes of
    segment and OBB labels are their polygons' bounding boxes, and their polygons the annotations' ``segmentation``
    (COCO polygons in pixels: what Mask R-CNN trains on and segm COCOeval scores)."""
    files, data = _split(data_yaml, split)
    names, pose = data["names"], "kpt_shape" in data
    images, anns, index = [], [], []
    for image_id, (f, lf) in enumerate(zip(files, img2label_paths([str(f) for f in files]))):
        h, w = cv2.imread(str(f)).shape[:2]
        images.append({"id": image_id, "file_name": Path(f).name, "width": w, "height": h})
        index.append((image_id, str(f)))
        if Path(lf).is_file():
            polygons = [] if pose else label_polygons(lf)
            for i, (c, x, y, bw, bh) in enumerate(label_boxes(lf, pose)):
                box = [(x - bw / 2) * w, (y - bh / 2) * h, bw * w, bh * h]
                ann = {"id": len(anns) + 1, "image_id": image_id, "category_id": int(c), "bbox": box,
                       "area": box[2] * box[3], "iscrowd": 0}
                if polygons and polygons[i] is not None:  # a segment (or OBB) row: its outline in pixels
                    ann["segmentation"] = [(polygons[i] * [w, h]).round(2).flatten().tolist()]
                anns.append(ann)
    cats = [{"id": int(i), "name": str(n)} for i, n in (names.items() if isinstance(names, dict) else enumerate(names))]
    return {"images": images, "annotations": anns, "categories": cats}, index


def coco_results(image_id: int, rows) -> list[dict]:
    """COCO result dicts of one image's detections ``rows`` [(x1, y1, x2, y2, score, class), ...] in pixels."""
    return [{"image_id": image_id, "category_id": int(c), "score": float(s),
             "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]} for x1, y1, x2, y2, s, c in rows]


def evaluate_detections(gt: dict, dets: list[dict], iou_type: str = "bbox") -> dict:
    """COCOeval (``iou_type`` bbox, or segm for detections with an RLE ``segmentation``) of detections
    [{'image_id','category_id','bbox' xywh px,'score'}] -> the paper's columns."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        if not dets:
            return dict.fromkeys(COLUMNS, 0.0)
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: float(ev.stats[i]) if ev.stats[i] >= 0 else float("nan") for k, i in _STAT_INDEX.items()}  # -1: none
