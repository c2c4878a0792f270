"""Loss presets (``yolo_fgd/cfg/presets.yaml``) and the distillation arguments a trainer adds to Ultralytics'.

One name per idea: a preset key ``k`` is the train argument ``fgd_k`` (FGD's terms and schedule) or ``k`` itself
(``kd_cls``, ``kd_box``: the head-response term, which is not FGD). The FGD term weights are named after the terms
they weigh: ``fg``, ``bg``, ``at``, ``gl`` (the paper's alpha, beta, gamma, lambda of Eq. 13).
"""

from __future__ import annotations

import difflib
import warnings
from functools import lru_cache

import yaml

from ..cfg import PRESETS
from ..errors import FGDError
from .fgd import TERMS, FGDPyramid
from .mgd import MGDLoss

FLOAT_KEYS = (*TERMS, "temperature", "gain", "warmup", "decay", "share", "mgd_ratio", "kd_cls", "kd_box", "crosskd",
              "kd_kpt", "kd_angle", "kd_mask")
BOOL_KEYS = ("norm", "split", "spatial", "channel", "mse", "mgd", "level_norm", "kd_focal")
KEYS = FLOAT_KEYS + BOOL_KEYS
# the head-response family (not FGD, so no fgd_ prefix): weights of the term, its FGD-style anchor weighting, CrossKD
RESPONSE_KEYS = ("kd_cls", "kd_box", "kd_focal", "crosskd", "kd_kpt", "kd_angle", "kd_mask")
TASK_KEYS = {"pose": "kd_kpt", "obb": "kd_angle", "segment": "kd_mask"}  # the extra head output each distils
PRESET_DEFAULTS = {"kd_cls": 0.0, "kd_box": 0.0, "kd_focal": False, "crosskd": 0.0, "kd_kpt": 0.0, "kd_angle": 0.0,
                   "kd_mask": 0.0, "decay": 0.0, "share": 0.0,
                   "split": True, "spatial": True, "channel": True, "mse": False, "mgd": False, "mgd_ratio": 0.65,
                   "level_norm": False}
# Names of earlier releases, accepted with a warning.
RENAMED = {"fgd_alpha": "fgd_fg", "fgd_beta": "fgd_bg", "fgd_gamma": "fgd_at", "fgd_lambda": "fgd_gl",
           "fgd_kd_cls": "kd_cls", "fgd_kd_box": "kd_box"}


def arg_name(key: str) -> str:
    """The train argument of preset key ``key``."""
    return key if key in RESPONSE_KEYS else f"fgd_{key}"


# Extra train args (merged into Ultralytics' cfg). None means "take it from the preset".
ARGS = {
    "teacher": None,  # (str) path to the teacher checkpoint (required)
    "fgd_preset": "yolo",  # (str) preset name in presets.yaml
    **{arg_name(k): None for k in KEYS},
}


def renamed(kv: dict) -> dict:
    """``kv`` with the argument names of earlier releases replaced by today's, warning once per name."""
    out = dict(kv)
    for old, new in RENAMED.items():
        if old in out:
            value = out.pop(old)
            warnings.warn(f"'{old}' is deprecated, use '{new}'", FutureWarning, stacklevel=2)
            if out.get(new) is None:
                out[new] = value
    return out


@lru_cache
def presets() -> dict:
    """All presets by name."""
    return yaml.safe_load(PRESETS.read_text())


def _as_bool(key, v) -> bool:
    if isinstance(v, bool):
        return v
    if str(v).lower() in {"true", "1", "yes"}:
        return True
    if str(v).lower() in {"false", "0", "no"}:
        return False
    raise FGDError(f"{arg_name(key)}={v} is not a boolean: use {arg_name(key)}=True or {arg_name(key)}=False")


def _as_float(key, v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        raise FGDError(f"{arg_name(key)}={v} is not a number: pass e.g. {arg_name(key)}=0.5") from None


def resolve(args) -> dict:
    """Preset values overridden by any distillation argument given (``args``: namespace or dict; names of earlier
    releases are read too) -> dict of preset keys."""
    raw = dict(args) if isinstance(args, dict) else dict(vars(args))
    raw = renamed({k: v for k, v in raw.items() if v is not None})
    name = raw.get("fgd_preset") or "yolo"
    table = presets()
    if name not in table:
        close = difflib.get_close_matches(str(name), table, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise FGDError(f"unknown fgd_preset '{name}': {hint}choose one of {', '.join(table)}")
    cfg = {**PRESET_DEFAULTS, **table[name]}
    for k in KEYS:
        v = raw.get(arg_name(k))
        if v is not None:
            cfg[k] = _as_bool(k, v) if k in BOOL_KEYS else _as_float(k, v)
    for k in (*TERMS, "gain", "warmup", "decay", "share", "kd_cls", "kd_box", "crosskd", *TASK_KEYS.values()):
        if float(cfg[k]) < 0:
            raise FGDError(f"{arg_name(k)}={cfg[k]} is negative: distillation weights, warm-up and decay must be >= 0")
    if not 0 <= float(cfg["mgd_ratio"]) < 1:
        raise FGDError(f"fgd_mgd_ratio={cfg['mgd_ratio']} must be in [0, 1) (the share of positions MGD masks out)")
    if float(cfg["temperature"]) <= 0:
        raise FGDError(f"fgd_temperature={cfg['temperature']} must be > 0 (the paper uses 0.5)")
    return cfg


def fgd_on(cfg: dict) -> bool:
    """Whether FGD has any weight (gain and one of fg, bg, at, gl > 0)."""
    return cfg["gain"] > 0 and any(cfg[k] > 0 for k in TERMS)


def response_on(cfg: dict) -> bool:
    """Whether the head-response term has any weight."""
    return cfg["kd_cls"] > 0 or cfg["kd_box"] > 0


def cross_on(cfg: dict) -> bool:
    """Whether CrossKD (the student's features through the teacher's head) has any weight."""
    return cfg["crosskd"] > 0


def build_pyramid(student_channels, teacher_channels, cfg: dict) -> FGDPyramid:
    """The :class:`FGDPyramid` a resolved config describes (weights of Eq. 13 times the gain; MGD levels with
    ``mgd``)."""
    g = cfg["gain"]
    if cfg["mgd"]:
        return FGDPyramid(student_channels, teacher_channels, loss=MGDLoss, fg=cfg["fg"] * g, ratio=cfg["mgd_ratio"],
                          norm=cfg["norm"], level_norm=cfg["level_norm"])
    return FGDPyramid(student_channels, teacher_channels, temperature=cfg["temperature"],
                      **{k: cfg[k] * g for k in TERMS}, norm=cfg["norm"], split=cfg["split"], spatial=cfg["spatial"],
                      channel=cfg["channel"], mse=cfg["mse"], level_norm=cfg["level_norm"])
