"""Reading Ultralytics YOLO models: the Detect head, its inputs (the FGD feature taps), its raw outputs, and loading
a checkpoint as a frozen network with one-line errors."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from ultralytics.nn.tasks import guess_model_task, load_checkpoint
from ultralytics.utils.tal import dist2bbox, make_anchors

from ..cfg import checkpoint  # a run folder or a .pt -> the .pt (the trainer imports it from here)
from ..core.response import side_distances
from ..errors import FGDError, first_line

TASKS = ("detect", "segment", "pose", "obb")


def detect_head(model: nn.Module):
    """The Detect head (last layer; Segment/Pose/OBB heads are Detect subclasses) of an Ultralytics model, or None."""
    layers = getattr(model, "model", None)
    head = layers[-1] if isinstance(layers, nn.Sequential) and len(layers) else None
    return head if head is not None and hasattr(head, "cv2") and hasattr(head, "nl") else None


def head_channels(model: nn.Module) -> list[int]:
    """Channels of each Detect input, read from the first conv of each box branch."""
    return [int(branch[0].conv.in_channels) for branch in detect_head(model).cv2]


def neck_features(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The Detect inputs (P3, P4, P5...) of a model on images ``x`` (N,3,H,W), through ``model.model[:-1]`` (the
    head is not run). Layer routing as in ``BaseModel._predict_once``."""
    y = []
    for m in model.model[:-1]:
        if m.f != -1:
            x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
        x = m(x)
        y.append(x if m.i in model.save else None)
    f = model.model[-1].f
    return [x if j == -1 else y[j] for j in ([f] if isinstance(f, int) else f)]


def train_outputs(preds) -> dict:
    """The student's raw training outputs ``{'boxes' (N,4*reg_max,A), 'scores' (N,nc,A), 'feats' [L x (N,C,H,W)]}``
    (under ``one2many`` for end-to-end heads such as YOLO26); ``feats`` are the Detect inputs."""
    preds = preds[1] if isinstance(preds, tuple) else preds
    return preds.get("one2many", preds)


def head_outputs(model: nn.Module, feats: list[torch.Tensor]) -> dict:
    """Raw ``{'boxes' (N,4*reg_max,A), 'scores' (N,nc,A)}`` of a model's Detect head on its inputs ``feats`` (the
    one-to-many branch, or one-to-one where fusion removed it)."""
    head = detect_head(model)
    out = head.forward_head(feats, **head.one2many)
    return out or head.forward_head(feats, **head.one2one)


def assigner_inputs(out: dict, feats: list[torch.Tensor], strides, reg_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What Ultralytics' task-aligned assigner reads of a head's predictions, from its raw outputs ``out``
    (``'scores'`` (N,K,A) logits, ``'boxes'`` (N,4*reg_max,A)) on the Detect inputs ``feats`` [L x (N,C,H,W)] of
    levels ``strides``: the class probabilities (N,A,K) and the boxes (N,A,4), xyxy in pixels, decoded as the
    detection loss decodes the student's own (expected DFL bin per side from the cell centre, times the stride)."""
    anchors, stride = make_anchors(feats, strides, 0.5)  # (A,2) cell centres in grid units, (A,1)
    sides = side_distances(out["boxes"].float(), reg_max).transpose(1, 2)  # (N,A,4) left, top, right, bottom
    return out["scores"].float().sigmoid().transpose(1, 2), dist2bbox(sides, anchors, xywh=False) * stride


def require_file(path, role: str = "teacher") -> Path:
    """``path`` as a Path, or a one-line error when it is not given or not a file (``role`` names it: "teacher")."""
    if not path:
        raise FGDError(f"no {role} given: pass {role}=path/to/best.pt (a trained YOLO checkpoint)")
    p = Path(path)
    if not p.is_file():
        raise FGDError(f"{role} '{path}' not found: pass {role}=path/to/best.pt of a trained YOLO model")
    return p


def checkpoint_file(path, role: str = "teacher") -> Path:
    """The .pt of ``path`` (a checkpoint or a run folder: its weights/best.pt), or a one-line FGDError naming ``role``
    when none is given or it does not exist."""
    return require_file(checkpoint(path) if path else path, role)


def load_model(path, device, role: str = "teacher") -> nn.Module:
    """A YOLO checkpoint (or a run folder: its weights/best.pt) of any task with a Detect-family head, as a frozen,
    fused, fp32 eval network on ``device``. ``role`` names the file in errors ("teacher", "model")."""
    p = checkpoint_file(path, role)
    try:
        model, _ = load_checkpoint(p, device="cpu")
    except Exception as e:  # corrupt zip, pickle error, foreign checkpoint format
        raise FGDError(
            f"{role} '{path}' could not be loaded ({first_line(e)}): pass an Ultralytics YOLO .pt checkpoint, "
            "re-export it if it is damaged"
        ) from None
    task = model_task(model)
    if task not in TASKS or detect_head(model) is None:
        raise FGDError(f"{role} '{path}' is a '{task}' model, not a detection model: distillation needs a YOLO "
                      f"{'/'.join(TASKS)} checkpoint")
    model = model.float().fuse(verbose=False).eval().to(device)  # Conv+BN fused: same outputs, faster
    for q in model.parameters():
        q.requires_grad_(False)
    return model


def model_task(model: nn.Module) -> str:
    """The task of an Ultralytics model ('detect', 'segment', ...)."""
    return getattr(model, "task", None) or guess_model_task(model)


def check_pair(student: nn.Module, teacher: nn.Module, names: dict, teacher_path) -> None:
    """Raise FGDError when teacher and student/data cannot be paired level by level."""
    check_names(teacher, names, teacher_path)
    if detect_head(student) is None:
        raise FGDError("student has no Detect head: use a YOLO detection model, e.g. model=yolo11n.yaml")
    check_task(teacher, model_task(student), teacher_path)
    s_stride = [int(s) for s in student.stride.tolist()]
    t_stride = [int(s) for s in teacher.stride.tolist()]
    if s_stride != t_stride:
        raise FGDError(
            f"teacher Detect levels have strides {t_stride} but the student's have {s_stride}: "
            "FGD pairs levels one to one, use models with the same levels (e.g. both P3-P5)"
        )


def check_task(teacher: nn.Module, s_task: str, teacher_path) -> None:
    """Raise FGDError when the teacher's task is not the student's ``s_task``."""
    t_task = model_task(teacher)
    if s_task != t_task:
        raise FGDError(
            f"teacher '{teacher_path}' is a '{t_task}' model but the student is '{s_task}': train a {s_task} teacher "
            f"(its head's extra outputs are distilled too)"
        )


def check_names(teacher: nn.Module, names, teacher_path) -> None:
    """Raise FGDError when the teacher's classes are not the data's ``names`` (a list or {index: name})."""
    t_names = getattr(teacher, "names", None)
    t_names = dict(enumerate(t_names)) if isinstance(t_names, (list, tuple)) else t_names
    data_names = dict(enumerate(names)) if isinstance(names, (list, tuple)) else dict(names)
    if t_names is not None and len(t_names) != len(data_names):
        raise FGDError(
            f"teacher '{teacher_path}' has {len(t_names)} classes but the data has {len(data_names)}: "
            "train the teacher on the same data (same class list)"
        )
    if t_names is not None and {int(k): str(v) for k, v in t_names.items()} != {
        int(k): str(v) for k, v in data_names.items()
    }:
        diff = [f"{k}:{t_names.get(k)}!={v}" for k, v in data_names.items() if str(t_names.get(k)) != str(v)][:3]
        raise FGDError(
            f"teacher '{teacher_path}' class names differ from the data's ({', '.join(diff)}): "
            "train the teacher on the same data (same class order)"
        )


def batch_boxes(bboxes: torch.Tensor, shape) -> torch.Tensor:
    """An Ultralytics batch's ``bboxes`` -> (M,4) normalised xyxy for FGD's masks (Eq. 2-3): (M,4) normalised xywh as
    is; (M,5) OBB xywhr (xywh normalised, r radians) as the rotated box's axis-aligned hull, rotated in pixels of the
    (H, W) ``shape`` (the paper uses boxes for Mask R-CNN too; the hull covers every cell the rotated box touches)."""
    if bboxes.shape[-1] == 5:
        h, w = float(shape[0]), float(shape[1])
        scale = bboxes.new_tensor([w, h])
        xy, wh, r = bboxes[:, :2] * scale, bboxes[:, 2:4] * scale, bboxes[:, 4]
        cos, sin = r.cos().abs(), r.sin().abs()
        half = torch.stack([wh[:, 0] * cos + wh[:, 1] * sin, wh[:, 0] * sin + wh[:, 1] * cos], 1) / 2
        return torch.cat([(xy - half) / scale, (xy + half) / scale], 1)
    return torch.cat([bboxes[:, :2] - bboxes[:, 2:] / 2, bboxes[:, :2] + bboxes[:, 2:] / 2], 1)
