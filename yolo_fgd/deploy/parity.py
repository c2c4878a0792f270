"""PyTorch-vs-ONNX Runtime parity, one check for every exported model (YOLO and torchvision)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from ..data.coco import split_images
from ..errors import FGDError
from .edge import blob

PARITY_TOL = 1e-3  # max |PyTorch - ONNX Runtime| on the raw output tensors


def sample_images(data, split: str = "val", n: int = 4) -> list[Path]:
    """Up to ``n`` image paths of a data YAML split (evenly spread), or [] without data."""
    if not data or not Path(str(data)).is_file():
        return []
    files, _ = split_images(data, split)
    if not files:
        return []
    idx = np.linspace(0, len(files) - 1, min(n, len(files))).round().astype(int)
    return [files[i] for i in sorted(set(idx))]


def max_diff(reference: Callable[[np.ndarray], np.ndarray], candidate: Callable[[np.ndarray], np.ndarray],
             images: list[Path], imgsz: int, rows_unordered: bool = False) -> float:
    """Max |reference(x) - candidate(x)| over ``images`` letterboxed to ``imgsz`` (x: (1,3,imgsz,imgsz) fp32 in
    [0,1]); ``rows_unordered``: outputs (1,K,D) whose row order may differ (top-k over near-equal scores)."""
    worst = 0.0
    for f in images:
        x = blob(cv2.imread(str(f)), (imgsz, imgsz))[0]
        a, b = np.asarray(reference(x), np.float32), np.asarray(candidate(x), np.float32)
        if a.shape != b.shape:
            raise FGDError(f"ONNX output shape {b.shape} differs from PyTorch {a.shape}: re-export with default options")
        if rows_unordered:
            a, b = a[0][np.lexsort(a[0].T[::-1])], b[0][np.lexsort(b[0].T[::-1])]
        worst = max(worst, float(np.abs(a - b).max()) if a.size else 0.0)
    return worst


def check(worst: float, images: int, data) -> None:
    """One-line error when ``worst`` is above :data:`PARITY_TOL`."""
    if worst > PARITY_TOL:
        raise FGDError(f"ONNX output differs from PyTorch by {worst:.2e} > {PARITY_TOL} on {images} images of {data}: "
                       "export with opset>=17, or report the model to the maintainers")
