"""``yolo-fgd data deepforest``: real aerial imagery (NEON, Yellowstone) with tree-crown boxes, from the
``deepforest`` wheel's sample data, tiled into a YOLO data set. The wheel is fetched with
``pip download --no-deps deepforest`` (never installed) and read as a zip.

Train on tiles of ``2019_YELL_2_528000_4978000_image_crop2`` (574 crowns), validate on tiles of
``2019_YELL_2_541000_4977000_image_crop`` (279 crowns): two different scenes, so validation is honest.
"""

from __future__ import annotations

import glob
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import cv2
import numpy as np

from ..errors import FGDError
from .shapes import default_root

TRAIN = "2019_YELL_2_528000_4978000_image_crop2"
VAL = "2019_YELL_2_541000_4977000_image_crop"
VERSION = 1


def fetch_wheel(folder: Path) -> Path:
    """The deepforest wheel in ``folder``, downloaded (no deps, not installed) if missing."""
    folder.mkdir(parents=True, exist_ok=True)
    found = sorted(glob.glob(str(folder / "deepforest-*.whl")))
    if found:
        return Path(found[-1])
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "deepforest", "-d", str(folder)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(glob.glob(str(folder / "deepforest-*.whl")))
    if r.returncode or not found:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1][:200]
        raise FGDError(f"could not download the deepforest wheel ({last}): check access to PyPI, or put "
                       f"deepforest-*.whl into {folder}")
    return Path(found[-1])


def read_scene(z: zipfile.ZipFile, stem: str):
    """(BGR image, boxes (K,4) xyxy px) of one sample scene in the wheel."""
    img = cv2.imdecode(np.frombuffer(z.read(f"deepforest/data/{stem}.png"), np.uint8), cv2.IMREAD_COLOR)
    root = ET.fromstring(z.read(f"deepforest/data/{stem}.xml"))
    boxes = [[float(o.find("bndbox").find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")]
             for o in root.iter("object")]
    return img, np.array(boxes, dtype=np.float32).reshape(-1, 4)


def tile_scene(img, boxes, tile: int, overlap: int, min_visible: float):
    """Yield (tile image, boxes clipped to the tile in tile pixels): a box is kept when at least ``min_visible``
    of its area lies inside the tile."""
    h, w = img.shape[:2]
    step = tile - overlap
    ys = list(range(0, max(h - tile, 0) + 1, step)) + ([h - tile] if h > tile and (h - tile) % step else [])
    xs = list(range(0, max(w - tile, 0) + 1, step)) + ([w - tile] if w > tile and (w - tile) % step else [])
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    for y0 in ys:
        for x0 in xs:
            clip = boxes.copy()
            clip[:, [0, 2]] = (clip[:, [0, 2]] - x0).clip(0, tile)
            clip[:, [1, 3]] = (clip[:, [1, 3]] - y0).clip(0, tile)
            inside = (clip[:, 2] - clip[:, 0]) * (clip[:, 3] - clip[:, 1])
            keep = inside >= min_visible * np.maximum(area, 1e-9)
            yield img[y0 : y0 + tile, x0 : x0 + tile], clip[keep], (x0, y0)


def deepforest(root: str | Path | None = None, tile: int = 320, overlap: int = 64, min_visible: float = 0.4) -> Path:
    """Build (once) the tiled DeepForest YELL data set and return its data YAML path."""
    base = Path(root) if root else default_root().parent / "deepforest"
    folder = base / f"yell-v{VERSION}-t{tile}-o{overlap}"
    yaml_path = folder / "data.yaml"
    if yaml_path.is_file():
        return yaml_path
    with zipfile.ZipFile(fetch_wheel(base / "wheel")) as z:
        for split, stem in (("train", TRAIN), ("val", VAL)):
            img, boxes = read_scene(z, stem)
            (folder / "images" / split).mkdir(parents=True, exist_ok=True)
            (folder / "labels" / split).mkdir(parents=True, exist_ok=True)
            for t, b, (x0, y0) in tile_scene(img, boxes, tile, overlap, min_visible):
                name = f"{stem}_{y0:05d}_{x0:05d}"
                cv2.imwrite(str(folder / "images" / split / f"{name}.png"), t)
                th, tw = t.shape[:2]
                lines = "".join(f"0 {(x1 + x2) / 2 / tw:.6f} {(y1 + y2) / 2 / th:.6f} {(x2 - x1) / tw:.6f} "
                                f"{(y2 - y1) / th:.6f}\n" for x1, y1, x2, y2 in b)
                (folder / "labels" / split / f"{name}.txt").write_text(lines)
    text = (f"# DeepForest NEON YELL sample scenes, tiled {tile}px overlap {overlap}; train {TRAIN}, val {VAL}\n"
            f"path: {folder.resolve()}\ntrain: images/train\nval: images/val\nnames:\n  0: tree\n")
    tmp = yaml_path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(yaml_path)
    return yaml_path
