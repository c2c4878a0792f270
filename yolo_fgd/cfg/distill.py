"""The distillation arguments a trainer adds to Ultralytics' and their resolution against the loss presets
(``presets.yaml``); pure configuration, so the CLI checks them before it imports torch.

One name per idea: a preset key ``k`` is the train argument ``<prefix>k`` of its row of :data:`TERM_TABLE`:
``fgd_fg`` (FGD's own), ``kd_cls`` (the head-response family, which is not FGD), ``distill_warmup`` (the schedule of
every term). The FGD term weights are named after the terms they weigh: ``fg``, ``bg``, ``at``, ``gl`` (the paper's
alpha, beta, gamma, lambda of Eq. 13).
"""

from __future__ import annotations

import difflib
import warnings
from functools import lru_cache

import yaml

from ..errors import FGDError
from . import PRESETS

TERMS = ("fg", "bg", "at", "gl")  # Eq. 9 foreground, Eq. 9 background, Eq. 10 attention, Eq. 11 global

# --- the table of terms -------------------------------------------------------------------------------------------
# One row per distillation term, and everything else is read from it: the train arguments and their checks, the
# preset defaults, the CLI's help, the docs' argument table (written by the docs build) and, through ``impl``, what
# the YOLO distiller builds and runs.
#   name     the term's loss item and results.csv column (train/NAME)
#   impl     its implementation, "module:Class" under yolo_fgd.yolo (or a full dotted module path); None: no term of
#            its own (the schedule)
#   prefix   of its train arguments: fgd_ (FGD and its feature-loss variants), none (the head-response family, which
#            is not FGD), distill_ (the schedule of every term)
#   keys     preset key -> (default, kind, help); default None: every preset sets it; kind: weight (>= 0), positive
#            (> 0), fraction (in [0, 1)), bool, or the choices "a|b|..." of a word
#   task     only for students of this task;  modules: its trainable parts (optimised, saved in weights/fgd_last.pt)
#   tv       its keys are tv-train's too (the torchvision path's FGD), but those in yolo_only
TERM_TABLE = (
    {"name": "fgd", "impl": "terms:Feature", "prefix": "fgd_", "tv": True, "yolo_only": ("level_norm", "share"),
     "keys": {"fg": (None, "weight", "weight of the foreground term (alpha of Eq. 13)"),
              "bg": (None, "weight", "weight of the background term (beta)"),
              "at": (None, "weight", "weight of the attention term (gamma)"),
              "gl": (None, "weight", "weight of the global term (lambda)"),
              "temperature": (None, "positive", "T of Eq. 5-6 (the paper uses 0.5)"),
              "gain": (None, "weight", "multiplies the four FGD weights; 0 turns FGD off, 0.05 is the calibrated scale"),
              "norm": (None, "bool", "standardise teacher and aligned student features per image and channel first"),
              "level_norm": (False, "bool", "weigh the levels equally (each level's term over its running mean; the "
                                            "sum keeps its scale)"),
              "share": (0.0, "weight", "instead of a fixed weight, hold |grad FGD| / |grad detection| on the student "
                                       "at this value (one process only)"),
              "split": (True, "bool", "ablation: separate foreground / background masks (paper Table 1)"),
              "spatial": (True, "bool", "ablation: spatial attention A_S in Eq. 9 (paper Table 5)"),
              "channel": (True, "bool", "ablation: channel attention A_C in Eq. 9 (paper Table 5)"),
              "relation": ("gcblock", "gcblock|nonlocal", "global relation R of Eq. 11: gcblock (the paper's) or "
                                                          "nonlocal (Table 6: embedded-Gaussian Non-local block)")},
     "what": "FGD (Eq. 2-13) on the Detect inputs: focal (fg, bg), attention (at) and global (gl) terms",
     "modules": "per level: 1x1 align conv, two GcBlocks", "columns": "fgd, fgd_fg, fgd_bg, fgd_at, fgd_gl, fgd/P3..."},
    {"name": "mse", "impl": "terms:Feature", "prefix": "fgd_", "tv": True,
     "keys": {"mse": (False, "bool", "plain feature MSE (paper Eq. 1) instead of FGD (distill_preset=mse sets it)")},
     "what": "plain feature MSE (Eq. 1) with the align conv, instead of FGD",
     "modules": "per level: 1x1 align conv", "columns": "mse"},
    {"name": "mgd", "impl": "terms:Feature", "prefix": "fgd_",
     "keys": {"mgd": (False, "bool", "MGD instead of FGD's feature loss (distill_preset=mgd sets it with the response "
                                     "term)"),
              "mgd_ratio": (0.65, "fraction", "share of positions MGD masks out")},
     "what": "masked generative distillation (MGD, ECCV 2022) instead of FGD: random spatial mask, generator",
     "modules": "per level: align conv, Conv3x3-ReLU-Conv3x3 generator", "columns": "mgd"},
    {"name": "kd", "impl": "terms:Response", "prefix": "",
     "keys": {"kd_cls": (0.0, "weight", "weight of the head response's class term"),
              "kd_box": (0.0, "weight", "weight of the head response's box term (L1 of decoded distances when the "
                                        "heads' bins differ)"),
              "kd_focal": (False, "bool", "weigh the response term per anchor by FGD's (M_fg + beta/alpha M_bg) A_S "
                                          "(Eq. 2-5; needs fgd_fg > 0)")},
     "what": "head response: teacher class scores as soft labels (KL), box-side bins (KL, weighted by the teacher's "
             "top score)", "modules": "none", "columns": "kd"},
    {"name": "crosskd", "impl": "terms:CrossKD", "prefix": "",
     "keys": {"crosskd": (0.0, "weight", "weight of CrossKD (crosskd=0 leaves the head response alone)"),
              "crosskd_fit": (False, "bool", "start CrossKD's 1x1 convs at the least-squares map of the student's "
                                             "features to the teacher's on the first batch (False: random)")},
     "what": "CrossKD: the student's Detect inputs through 1x1 convs and the frozen teacher head, its outputs to the "
             "teacher's", "modules": "per level: 1x1 conv to the teacher's width", "columns": "crosskd"},
    {"name": "cwd", "impl": "terms:CWD", "prefix": "",
     "keys": {"cwd": (0.0, "weight", "weight of channel-wise distillation (CWD) on the Detect inputs"),
              "cwd_tau": (1.0, "positive", "CWD's temperature tau of each channel's spatial softmax")},
     "what": "CWD (Shu et al. 2021; mmrazor, DAMO-YOLO): each channel's map a spatial softmax at tau, KL to the "
             "teacher's", "modules": "per level: 1x1 align conv", "columns": "cwd"},
    {"name": "pkd", "impl": "terms:PKD", "prefix": "",
     "keys": {"pkd": (0.0, "weight", "weight of PKD: feature MSE after per-channel standardisation (Pearson)")},
     "what": "PKD (Cao et al. 2022): MSE of the Detect inputs standardised per channel over batch and positions, / 2",
     "modules": "per level: 1x1 align conv", "columns": "pkd"},
    {"name": "ld", "impl": "terms:LD", "prefix": "",
     "keys": {"ld": (0.0, "weight", "weight of localisation distillation (LD) on the DFL bins at ld_temperature"),
              "ld_temperature": (10.0, "positive", "LD's temperature T (the head response's box term is LD at T=1)")},
     "what": "LD (Zheng et al. 2022): KL of the DFL bins at temperature T, x T^2, weighted by the teacher's top score",
     "modules": "none", "columns": "ld"},
    {"name": "bckd", "impl": "terms:BCKD", "prefix": "",
     "keys": {"bckd": (0.0, "weight", "weight of BCKD: binary class soft labels (quality-focal) + box 1 - GIoU"),
              "bckd_beta": (1.0, "positive", "BCKD's modulation |p_s - p_t|^beta of the class term")},
     "what": "BCKD (Yang et al. 2023): per class and anchor Bernoulli KL x |p_s - p_t|^beta, and 1 - GIoU of the "
             "decoded boxes weighted by the teacher's top score", "modules": "none", "columns": "bckd"},
    {"name": "lad", "impl": None, "prefix": "",
     "keys": {"lad": (False, "bool", "label assignment distillation: the detection loss assigns anchors by the "
                                     "teacher's scores and boxes, not the student's own (detect, segment, pose)")},
     "what": "LAD (Nguyen et al., WACV 2022): the student's task-aligned assigner reads the teacher's class "
             "probabilities and decoded boxes in place of its own", "modules": "none", "columns": "none"},
    {"name": "kd_kpt", "impl": "terms:Keypoints", "prefix": "", "task": "pose",
     "keys": {"kd_kpt": (0.0, "weight", "weight of the pose keypoint term")},
     "what": "pose: L1 of the raw keypoints + visibility KL", "modules": "none", "columns": "kd_kpt"},
    {"name": "kd_angle", "impl": "terms:Angle", "prefix": "", "task": "obb",
     "keys": {"kd_angle": (0.0, "weight", "weight of the OBB angle term")},
     "what": "OBB: wrapped |angle difference|", "modules": "none", "columns": "kd_angle"},
    {"name": "kd_mask", "impl": "terms:Masks", "prefix": "", "task": "segment",
     "keys": {"kd_mask": (0.0, "weight", "weight of the segmentation mask term")},
     "what": "segment: KL of the mask logits at the teacher's top anchors", "modules": "none", "columns": "kd_mask"},
    {"name": "schedule", "impl": None, "prefix": "distill_", "tv": True,
     "keys": {"warmup": (None, "weight", "epochs of linear ramp of every distillation term from 0"),
              "decay": (0.0, "weight", "last epochs over which every distillation term falls to 0 (cosine; 0: off)")},
     "what": "every term's weight over training", "modules": "none", "columns": "distill/scale"},
)
KEY_SPEC = {k: spec for term in TERM_TABLE for k, spec in term["keys"].items()}  # preset key -> (default, kind, help)
PREFIX = {k: term["prefix"] for term in TERM_TABLE for k in term["keys"]}
KEY_HELP = {k: spec[2] for k, spec in KEY_SPEC.items()}
KEYS = tuple(KEY_SPEC)
BOOL_KEYS = tuple(k for k in KEYS if KEY_SPEC[k][1] == "bool")
CHOICE_KEYS = tuple(k for k in KEYS if "|" in KEY_SPEC[k][1])
FLOAT_KEYS = tuple(k for k in KEYS if k not in BOOL_KEYS and k not in CHOICE_KEYS)
PRESET_DEFAULTS = {k: spec[0] for k, spec in KEY_SPEC.items() if spec[0] is not None}  # what presets may leave out
# the head-response family (not FGD, so no fgd_ prefix): weights of the term, its FGD-style anchor weighting, CrossKD
RESPONSE_KEYS = tuple(k for k in KEYS if PREFIX[k] == "")
ROWS = {term["name"]: term for term in TERM_TABLE}
# the weights of the YOLO distiller's terms that the torchvision path does not run (a preset giving one is refused there)
YOLO_TERM_WEIGHTS = tuple(k for term in TERM_TABLE if term.get("impl") and not term.get("tv")
                          for k, spec in term["keys"].items() if spec[1] == "weight")
# Names of earlier releases, accepted with a warning.
RENAMED = {"fgd_alpha": "fgd_fg", "fgd_beta": "fgd_bg", "fgd_gamma": "fgd_at", "fgd_lambda": "fgd_gl",
           "fgd_kd_cls": "kd_cls", "fgd_kd_box": "kd_box", "fgd_preset": "distill_preset",
           "fgd_warmup": "distill_warmup", "fgd_decay": "distill_decay"}


def arg_name(key: str) -> str:
    """The train argument of preset key ``key``: its term's prefix + the key (``fgd_fg``, ``kd_cls``,
    ``distill_warmup``)."""
    return PREFIX[key] + key


# the FGD arguments tv-train takes beside its own (cfg/tv.py)
TV_KEYS = tuple(arg_name(k) for term in TERM_TABLE if term.get("tv") for k in term["keys"]
                if k not in term.get("yolo_only", ()))


# Extra train args (merged into Ultralytics' cfg). None means "take it from the preset".
ARGS = {
    "teacher": None,  # (str) path to the teacher checkpoint or its run folder (required)
    "distill_preset": "yolo",  # (str) preset name in presets.yaml
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


def _as_choice(key, v) -> str:
    choices = KEY_SPEC[key][1].split("|")
    if str(v).lower() not in choices:
        raise FGDError(f"{arg_name(key)}={v} is not one of {', '.join(choices)}: e.g. {arg_name(key)}={choices[0]}")
    return str(v).lower()


def _as_float(key, v) -> float:
    if isinstance(v, bool):
        raise FGDError(f"{arg_name(key)}={v} is not a number: pass e.g. {arg_name(key)}=0.5")
    try:
        return float(v)
    except (TypeError, ValueError):
        raise FGDError(f"{arg_name(key)}={v} is not a number: pass e.g. {arg_name(key)}=0.5") from None


def check(key: str, v: float) -> None:
    """A one-line FGDError when ``v`` is outside the range of ``key``'s kind (:data:`TERM_TABLE`)."""
    kind, arg = KEY_SPEC[key][1], arg_name(key)
    if kind == "weight" and v < 0:
        raise FGDError(f"{arg}={v} is negative: distillation weights, warm-up and decay must be >= 0")
    if kind == "positive" and v <= 0:
        raise FGDError(f"{arg}={v} must be > 0: {KEY_HELP[key]}")
    if kind == "fraction" and not 0 <= v < 1:
        raise FGDError(f"{arg}={v} must be in [0, 1): {KEY_HELP[key]}")


def resolve(args) -> dict:
    """Preset values overridden by any distillation argument given (``args``: namespace or dict; names of earlier
    releases are read too) -> dict of preset keys. Every value a run could not use is a one-line FGDError here."""
    raw = dict(args) if isinstance(args, dict) else dict(vars(args))
    raw = renamed({k: v for k, v in raw.items() if v is not None})
    name = raw.get("distill_preset") or "yolo"
    table = presets()
    if name not in table:
        close = difflib.get_close_matches(str(name), table, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise FGDError(f"unknown distill_preset '{name}': {hint}choose one of {', '.join(table)}")
    cfg = {**PRESET_DEFAULTS, **table[name]}
    for k in KEYS:
        v = raw.get(arg_name(k))
        if v is not None:
            cfg[k] = _as_bool(k, v) if k in BOOL_KEYS else _as_choice(k, v) if k in CHOICE_KEYS else _as_float(k, v)
    for k in FLOAT_KEYS:
        check(k, float(cfg[k]))
    if cfg["kd_focal"] and cfg["fg"] <= 0:
        raise FGDError(f"kd_focal=True weighs background anchors by fgd_bg / fgd_fg, but fgd_fg={cfg['fg']}: pass "
                       "fgd_fg > 0 (e.g. fgd_fg=2e-3) or kd_focal=False")
    return cfg


def argument_rows() -> list[tuple[str, str, str, str]]:
    """(argument, default of the shipped preset, meaning, term) for ``teacher``, ``distill_preset`` and every key of
    :data:`TERM_TABLE`, in its order: what the CLI's help and the docs' table print."""
    shipped = {**PRESET_DEFAULTS, **presets()["yolo"]}
    rows = [("teacher", "required", "teacher: a YOLO run folder or its .pt of the student's task, classes and Detect "
                                    "strides (channels may differ)", ""),
            ("distill_preset", "yolo", "preset of presets.yaml: " + ", ".join(presets()), "")]
    for term in TERM_TABLE:
        rows += [(arg_name(k), str(shipped.get(k)), KEY_HELP[k], term["name"]) for k in term["keys"]]
    return rows
