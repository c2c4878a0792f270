"""FGD presets (``cfg/fgd.yaml``) and the extra train args of :class:`~yolo_fgd.trainer.FGDTrainer`."""

from __future__ import annotations

import difflib
from functools import lru_cache
from pathlib import Path

import yaml

from .errors import FGDError

PRESETS_FILE = Path(__file__).resolve().parent / "cfg" / "fgd.yaml"
KEYS = ("alpha", "beta", "gamma", "lambda", "temperature", "gain", "norm", "warmup", "decay", "share", "split",
        "spatial", "channel", "mse", "level_norm", "kd_cls", "kd_box")
BOOL_KEYS = {"norm", "split", "spatial", "channel", "mse", "level_norm"}
DEFAULTS = {"kd_cls": 0.0, "kd_box": 0.0, "decay": 0.0, "share": 0.0, "split": True, "spatial": True, "channel": True,
            "mse": False, "level_norm": False}

# Extra train args (merged into Ultralytics' cfg). None means "take it from the preset".
FGD_ARGS = {
    "teacher": None,  # (str) path to the teacher checkpoint (required)
    "fgd_preset": "yolo",  # (str) preset name in cfg/fgd.yaml
    **{f"fgd_{k}": None for k in KEYS},
}


@lru_cache
def presets() -> dict:
    """All presets by name."""
    return yaml.safe_load(PRESETS_FILE.read_text())


def _as_bool(key, v) -> bool:
    if isinstance(v, bool):
        return v
    if str(v).lower() in {"true", "1", "yes"}:
        return True
    if str(v).lower() in {"false", "0", "no"}:
        return False
    raise FGDError(f"fgd_{key}={v} is not a boolean: use fgd_{key}=True or fgd_{key}=False")


def resolve_fgd(args) -> dict:
    """Preset values overridden by any ``fgd_*`` argument given (args: namespace or dict)."""
    get = args.get if isinstance(args, dict) else lambda k, d=None: getattr(args, k, d)
    name = get("fgd_preset") or "yolo"
    table = presets()
    if name not in table:
        close = difflib.get_close_matches(str(name), table, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise FGDError(f"unknown fgd_preset '{name}': {hint}choose one of {', '.join(table)}")
    cfg = {**DEFAULTS, **table[name]}
    for k in KEYS:
        v = get(f"fgd_{k}")
        if v is not None:
            cfg[k] = _as_bool(k, v) if k in BOOL_KEYS else float(v)
    for k in ("alpha", "beta", "gamma", "lambda", "gain", "warmup", "decay", "share", "kd_cls", "kd_box"):
        if float(cfg[k]) < 0:
            raise FGDError(f"fgd_{k}={cfg[k]} is negative: FGD weights, warm-up and decay must be >= 0")
    if float(cfg["temperature"]) <= 0:
        raise FGDError(f"fgd_temperature={cfg['temperature']} must be > 0 (the paper uses 0.5)")
    return cfg


def build_pyramid(student_channels, teacher_channels, cfg: dict):
    """The :class:`~yolo_fgd.loss.FGDPyramid` a resolved FGD config describes (weights of Eq. 13 times the gain)."""
    from .loss import FGDPyramid

    g = cfg["gain"]
    return FGDPyramid(student_channels, teacher_channels, temperature=cfg["temperature"], alpha=cfg["alpha"] * g,
                      beta=cfg["beta"] * g, gamma=cfg["gamma"] * g, lambda_=cfg["lambda"] * g, norm=cfg["norm"],
                      split=cfg["split"], spatial_attention=cfg["spatial"], channel_attention=cfg["channel"],
                      mse=cfg["mse"], level_norm=cfg["level_norm"])
