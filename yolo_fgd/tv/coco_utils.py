"""COCO data for the torchvision path (as ``references/detection/coco_utils.py``): a COCO-json dataset, the
conversion of YOLO data sets to COCO files, and the batch collation."""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path

import cv2
import numpy as np
import torch

from ..data import resolve_data
from ..data.coco import yolo_split_to_coco
from ..errors import FGDError


class CocoDataset(torch.utils.data.Dataset):
    """COCO-format detection set -> (image float CHW in [0,1], {'boxes' xyxy px, 'labels', 'image_id'} and, with
    ``masks``, 'masks' (N,H,W) uint8 rasterised from the annotations' polygons)."""

    def __init__(self, ann_file, image_root, train: bool = False, hflip: float = 0.5, masks: bool = False):
        d = json.loads(Path(ann_file).read_text())
        self.root, self.train, self.hflip, self.masks = Path(image_root), train, hflip, masks
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
        target = {"boxes": boxes, "labels": labels, "image_id": info["id"]}
        if self.masks:
            target["masks"] = rasterise(anns, *img.shape[-2:])
        if self.train and random.random() < self.hflip:
            img = img.flip(-1)
            w = img.shape[-1]
            target["boxes"] = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
            if self.masks:
                target["masks"] = target["masks"].flip(-1)
        return img, target

    def has_masks(self) -> bool:
        """Whether every annotation has a polygon (what Mask R-CNN needs)."""
        anns = self.gt["annotations"]
        return bool(anns) and all(a.get("segmentation") for a in anns)


def rasterise(anns: list[dict], h: int, w: int) -> torch.Tensor:
    """(N,H,W) uint8 masks of the annotations' COCO polygons (pixels)."""
    out = np.zeros((len(anns), h, w), np.uint8)
    for i, a in enumerate(anns):
        for poly in a.get("segmentation") or []:
            pts = np.asarray(poly, np.float32).reshape(-1, 2)
            cv2.fillPoly(out[i], [np.round(pts).astype(np.int32)], 1)
    return torch.from_numpy(out)


COCO_KEYS = ("train_json", "train_images", "val_json", "val_images")


def coco_files(data) -> dict:
    """Resolve ``data`` (a YOLO data YAML / 'shapes' / 'deepforest' / a dict ``{kind: shapes, ...}``, or a dict with
    train_json/train_images/val_json/val_images) to COCO files, converting YOLO sets once
    (``annotations/instances_{split}.json`` beside the YAML)."""
    if isinstance(data, dict) and data.get("kind") != "shapes":
        missing = [k for k in COCO_KEYS if k not in data]
        if missing:
            raise FGDError(f"data={data} lacks {', '.join(missing)}: give COCO files as {{train_json, train_images, "
                           "val_json, val_images}, a YOLO data YAML, shapes, or {kind: shapes, task: segment, ...}")
        return data
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
            tmp = ann.with_suffix(f".{uuid.uuid4().hex}.tmp")  # its own name: runs converting at once all finish
            tmp.write_text(json.dumps(gt))
            tmp.replace(ann)
        out[f"{split}_json"], out[f"{split}_images"] = str(ann), "/"
    return out


def collate(batch):
    return tuple(zip(*batch))
