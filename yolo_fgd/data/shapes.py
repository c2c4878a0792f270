"""Embedded default data: a deterministic procedural detection set in YOLO format (numpy + OpenCV, offline).

Six shape classes told apart by outline only (colour is random), at sizes from a few pixels to a third of the
image, randomly rotated, on textured backgrounds with unlabeled clutter (lines, arcs, blobs) and overlapping
objects. Small capacity students confuse ring/circle and star/cross at small sizes; a larger teacher does not,
which is what makes distillation matter here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
from ultralytics.utils import SETTINGS

from ..errors import FGDError

NAMES = ["circle", "ring", "triangle", "square", "star", "cross"]
VERSION = 1


def _background(rng: np.random.RandomState, size: int) -> np.ndarray:
    """Textured background: low-frequency colour noise + gradient + fine grain, (size,size,3) uint8."""
    base = rng.uniform(40, 215, 3)
    grid = rng.uniform(-60, 60, (rng.randint(3, 9), rng.randint(3, 9), 3)).astype(np.float32)
    low = cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, 2 * np.pi)
    grad = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None] * rng.uniform(-50, 50, 3)
    grain = rng.normal(0, rng.uniform(4, 14), (size, size, 3))
    return np.clip(base + low + grad + grain, 0, 255).astype(np.uint8)


def _polygon(cls: str, cx: float, cy: float, r: float, theta: float) -> np.ndarray:
    """Outline points (K,2) of a shape of radius r centred at (cx,cy), rotated by theta."""
    if cls in {"circle", "ring"}:
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif cls == "triangle":
        t = np.array([0, 2, 4]) * np.pi / 3 - np.pi / 2
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif cls == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * 0.75
    elif cls == "star":
        t = np.arange(10) * np.pi / 5 - np.pi / 2
        rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        pts = np.stack([np.cos(t) * rad, np.sin(t) * rad], 1)
    else:  # cross
        a, b = 1.0, 0.3
        pts = np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a], [-b, b], [-a, b],
                        [-a, -b], [-b, -b]])
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    return pts @ rot.T * r + np.array([cx, cy])


def _colour(rng, img, pts) -> tuple:
    """A random colour with enough contrast to the local background."""
    x0, y0 = np.clip(pts.min(0).astype(int), 0, img.shape[1] - 1)
    x1, y1 = np.clip(pts.max(0).astype(int) + 1, 1, img.shape[1])
    local = img[y0:y1, x0:x1].reshape(-1, 3).mean(0) if (x1 > x0 and y1 > y0) else np.full(3, 128.0)
    for _ in range(20):
        c = rng.uniform(0, 255, 3)
        if np.abs(c - local).sum() > 150:
            break
    return tuple(float(v) for v in c)


def _clutter(rng, img, size):
    """Unlabeled distractors: lines, arcs and soft blobs."""
    for _ in range(rng.randint(3, 12)):
        c = tuple(float(v) for v in rng.uniform(0, 255, 3))
        kind = rng.randint(3)
        if kind == 0:
            p1, p2 = rng.randint(0, size, 2), rng.randint(0, size, 2)
            cv2.line(img, tuple(int(v) for v in p1), tuple(int(v) for v in p2), c, int(rng.randint(1, 3)), cv2.LINE_AA)
        elif kind == 1:
            ctr = tuple(int(v) for v in rng.randint(0, size, 2))
            axes = tuple(int(v) for v in rng.randint(5, size // 3, 2))
            cv2.ellipse(img, ctr, axes, float(rng.uniform(0, 360)), 0, float(rng.uniform(40, 200)), c, 1, cv2.LINE_AA)
        else:
            ctr = tuple(int(v) for v in rng.randint(0, size, 2))
            blob = img.copy()
            cv2.ellipse(blob, ctr, tuple(int(v) for v in rng.randint(3, 14, 2)), float(rng.uniform(0, 180)), 0, 360, c, -1)
            cv2.addWeighted(blob, 0.35, img, 0.65, 0, dst=img)


def render(index: int, size: int = 256, seed: int = 0):
    """Image ``index`` of the set: (BGR uint8 image, labels (K,5) of class, cx, cy, w, h normalised)."""
    img, labels, _ = render_outlines(index, size, seed)
    return img, labels


def render_outlines(index: int, size: int = 256, seed: int = 0):
    """:func:`render` plus each object's outline (K_i,2) in pixels (a ring's outer edge): what the segmentation, OBB
    and pose labels are made from."""
    rng = np.random.RandomState((seed * 1_000_003 + index) % (2**31))
    img = _background(rng, size)
    _clutter(rng, img, size)
    labels, boxes, outlines = [], [], []
    for _ in range(rng.randint(1, 9)):
        cls = int(rng.randint(len(NAMES)))
        # log-uniform radius: many small objects, some large ones
        r = float(np.exp(rng.uniform(np.log(0.018 * size), np.log(0.17 * size))))
        cx, cy = rng.uniform(-0.3 * r, size + 0.3 * r, 2)
        pts = _polygon(NAMES[cls], cx, cy, r, rng.uniform(0, 2 * np.pi))
        thick = max(1, int(round(r * 0.28)))  # ring stroke, centred on the outline
        outer = _polygon(NAMES[cls], cx, cy, r + thick / 2, 0.0) if NAMES[cls] == "ring" else pts
        x0, y0 = np.clip(outer.min(0), 0, size)
        x1, y1 = np.clip(outer.max(0), 0, size)
        if (x1 - x0) < 3 or (y1 - y0) < 3:
            continue
        box = np.array([x0, y0, x1, y1])
        if boxes:  # allow occlusion, not near-duplicates
            b = np.array(boxes)
            iw = np.clip(np.minimum(b[:, 2], x1) - np.maximum(b[:, 0], x0), 0, None)
            ih = np.clip(np.minimum(b[:, 3], y1) - np.maximum(b[:, 1], y0), 0, None)
            inter = iw * ih
            union = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) + (x1 - x0) * (y1 - y0) - inter
            if (inter / union).max() > 0.45:
                continue
        colour = _colour(rng, img, pts)
        poly = np.round(pts * 16).astype(np.int32)  # 4 fractional bits for anti-aliased sub-pixel outlines
        if NAMES[cls] == "ring":
            cv2.polylines(img, [poly], True, colour, thick, cv2.LINE_AA, shift=4)
        else:
            cv2.fillPoly(img, [poly], colour, cv2.LINE_AA, shift=4)
        boxes.append(box)
        outlines.append(outer)
        labels.append([cls, (x0 + x1) / 2 / size, (y0 + y1) / 2 / size, (x1 - x0) / size, (y1 - y0) / size])
    img = cv2.GaussianBlur(img, (3, 3), rng.uniform(0.3, 0.9))
    return img, np.array(labels, dtype=np.float32).reshape(-1, 5), outlines


TASKS = ("detect", "segment", "pose", "obb")
KPT_SHAPE = (5, 3)  # pose: top-, bottom-, left-, right-most outline points and the centre, each x, y, visibility
FLIP_IDX = (0, 1, 3, 2, 4)  # a horizontal flip swaps the left- and right-most points


def label_line(task: str, row, outline: np.ndarray, size: int) -> str:
    """One label line of ``task`` for an object: ``row`` (class, cx, cy, w, h normalised), its outline in pixels."""
    c, x, y, w, h = row
    fmt = lambda v: " ".join(f"{float(a):.6f}" for a in v)
    if task == "detect":
        return f"{int(c)} {fmt((x, y, w, h))}\n"
    if task == "segment":
        return f"{int(c)} {fmt((outline / size).clip(0, 1).ravel())}\n"
    if task == "obb":
        corners = cv2.boxPoints(cv2.minAreaRect(outline.astype(np.float32)))
        return f"{int(c)} {fmt((corners / size).clip(0, 1).ravel())}\n"
    pts = [outline[outline[:, 1].argmin()], outline[outline[:, 1].argmax()], outline[outline[:, 0].argmin()],
           outline[outline[:, 0].argmax()], outline.mean(0)]
    kpts = []
    for px, py in pts:
        inside = 0 <= px < size and 0 <= py < size
        kpts += [px / size, py / size, 2.0] if inside else [0.0, 0.0, 0.0]
    return f"{int(c)} {fmt((x, y, w, h))} {fmt(kpts)}\n"


def default_root() -> Path:
    """Cache folder for generated data: Ultralytics' datasets_dir (settings) / fgd-shapes."""
    return Path(SETTINGS["datasets_dir"]) / "fgd-shapes"


def shapes(root: str | Path | None = None, n_train: int = 480, n_val: int = 120, size: int = 256, seed: int = 0,
           task: str = "detect") -> Path:
    """Generate (once) the embedded data set for ``task`` (detect, segment: the outlines as polygons, obb: their
    minimum-area rectangles, pose: 5 keypoints, see :data:`KPT_SHAPE`) and return its data YAML path. The images are
    the same for every task.

    Layout: ``root/<key>/images/{train,val}/*.jpg``, ``labels/{train,val}/*.txt`` and ``data.yaml``; ``key`` encodes the
    generator version and parameters, so a changed generator never reuses stale files.
    """
    if task not in TASKS:
        raise FGDError(f"unknown task '{task}' for the shapes data: choose {', '.join(TASKS)}")
    params = {"v": VERSION, "n_train": n_train, "n_val": n_val, "size": size, "seed": seed}
    if task != "detect":  # the detection set keeps the key (and cache) it always had
        params["task"] = task
    key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]
    folder = Path(root or default_root()) / f"shapes-{key}"
    yaml_path = folder / "data.yaml"
    if yaml_path.is_file():
        return yaml_path
    for split, n, offset in (("train", n_train, 0), ("val", n_val, 10_000_000)):
        (folder / "images" / split).mkdir(parents=True, exist_ok=True)
        (folder / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, labels, outlines = render_outlines(offset + i, size, seed)
            cv2.imwrite(str(folder / "images" / split / f"{split}_{i:05d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 92])
            lines = "".join(label_line(task, row, o, size) for row, o in zip(labels, outlines))
            (folder / "labels" / split / f"{split}_{i:05d}.txt").write_text(lines)
    text = (
        f"# yolo-fgd embedded data (generator v{VERSION}, {json.dumps(params)})\n"
        f"path: {folder.resolve()}\ntrain: images/train\nval: images/val\n"
        f"names:\n" + "".join(f"  {i}: {n}\n" for i, n in enumerate(NAMES))
        + (f"kpt_shape: {list(KPT_SHAPE)}\nflip_idx: {list(FLIP_IDX)}\n" if task == "pose" else "")
    )
    tmp = yaml_path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(yaml_path)  # written last and atomically: its presence means the set is complete
    return yaml_path
