"""What a resolved preset builds: which terms are on and the FGD pyramid it describes. The arguments and their
resolution against ``presets.yaml`` are configuration (:mod:`yolo_fgd.cfg.distill`) and re-exported here."""

from __future__ import annotations

import math

from ..cfg.distill import (  # noqa: F401  (re-exported: the core's view of the distillation arguments)
    ARGS,
    BOOL_KEYS,
    FLOAT_KEYS,
    KEYS,
    PRESET_DEFAULTS,
    RENAMED,
    RESPONSE_KEYS,
    YOLO_TERM_WEIGHTS,
    TERMS,
    arg_name,
    presets,
    renamed,
    resolve,
)
from .fgd import FGDPyramid
from .mgd import MGDLoss


def fgd_on(cfg: dict) -> bool:
    """Whether FGD has any weight (gain and one of fg, bg, at, gl > 0)."""
    return cfg["gain"] > 0 and any(cfg[k] > 0 for k in TERMS)


def response_on(cfg: dict) -> bool:
    """Whether the head-response term has any weight."""
    return cfg["kd_cls"] > 0 or cfg["kd_box"] > 0


def cross_on(cfg: dict) -> bool:
    """Whether CrossKD (the student's features through the teacher's head) has any weight."""
    return cfg["crosskd"] > 0


def schedule_scale(pos: float, epochs: int, cfg: dict) -> float:
    """The factor on every distillation term at ``pos`` epochs done (fractional) of ``epochs``: linear 0 -> 1 over
    the first ``cfg["warmup"]`` epochs, cosine 1 -> 0 over the last ``cfg["decay"]`` (0: either off)."""
    warmup, decay = float(cfg.get("warmup") or 0), float(cfg.get("decay") or 0)
    scale = min(1.0, pos / warmup) if warmup > 0 else 1.0
    if decay > 0:
        t = min(max((pos - (epochs - decay)) / decay, 0.0), 1.0)
        scale *= 0.5 * (1.0 + math.cos(math.pi * t))
    return scale


def build_pyramid(student_channels, teacher_channels, cfg: dict) -> FGDPyramid:
    """The :class:`FGDPyramid` a resolved config describes (weights of Eq. 13 times the gain; MGD levels with
    ``mgd``)."""
    g = cfg["gain"]
    if cfg["mgd"]:
        return FGDPyramid(student_channels, teacher_channels, loss=MGDLoss, fg=cfg["fg"] * g, ratio=cfg["mgd_ratio"],
                          norm=cfg["norm"], level_norm=cfg["level_norm"])
    return FGDPyramid(student_channels, teacher_channels, temperature=cfg["temperature"],
                      **{k: cfg[k] * g for k in TERMS}, norm=cfg["norm"], split=cfg["split"], spatial=cfg["spatial"],
                      channel=cfg["channel"], mse=cfg["mse"], level_norm=cfg["level_norm"], relation=cfg["relation"])
