"""Data sets the project makes or converts, and their resolution from a ``data=`` value.

``shapes`` (embedded procedural set), ``deepforest`` (real aerial tiles), ``coco`` (YOLO -> COCO ground truth,
detections -> COCO results, COCOeval with the paper's columns).
"""

from __future__ import annotations

from .deepforest import deepforest
from .shapes import shapes

NAMED = ("shapes", "deepforest")


def resolve_data(data) -> str:
    """``data=shapes`` (or none) -> the embedded data set's YAML, ``data=deepforest`` -> the tiled DeepForest set;
    a dict ``{kind: shapes, ...}`` -> a shapes set with those parameters; anything else is passed through (a path,
    or a name Ultralytics resolves such as ``coco.yaml``)."""
    if data in (None, "", "shapes", "fgd-shapes"):
        return str(shapes())
    if data == "deepforest":
        return str(deepforest())
    if isinstance(data, dict) and data.get("kind") == "shapes":
        return str(shapes(**{k: v for k, v in data.items() if k != "kind"}))
    return str(data)


__all__ = ["NAMED", "resolve_data", "shapes", "deepforest"]
