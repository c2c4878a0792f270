"""The distillation terms of the YOLO distiller, one class per row of :data:`~yolo_fgd.cfg.distill.TERM_TABLE`
(its ``impl``). A term is built when :meth:`Term.on` says its weight is non-zero and returns, per batch, its loss
(0-d fp32, before the schedule factor) and any values it logs beside it.

A new term is a subclass of :class:`Term` in a module under ``yolo_fgd/yolo/`` (or anywhere importable) and a row of
the table naming it; the distiller, the loss items, the CLI's help and the docs read the rest from the row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..cfg.distill import ROWS
from ..core import (
    TERMS,
    angle_kd,
    bckd_cls,
    box_kd,
    cwd_loss,
    focal_weights,
    keypoint_kd,
    linear_map,
    ltrb_giou_kd,
    mask_kd,
    moments,
    pkd_loss,
    response_kd,
    side_distances,
)
from ..core.presets import build_pyramid, cross_on, fgd_on, response_on
from .model import detect_head, head_outputs


@dataclass
class Batch:
    """What a term sees of one batch. Features are the Detect inputs [L x (N,C,H,W)] fp32, zeroed on a non-finite
    batch; head outputs are raw ``{'boxes' (N,4*reg_max,A), 'scores' (N,nc,A), ...}``; ``boxes`` (M,4) are
    normalised xyxy of the letterboxed images with their image index ``batch_idx`` (M,), when a built term asked."""

    student_out: dict
    student_feats: list
    teacher_feats: list
    teacher_out: dict | None
    boxes: torch.Tensor | None
    batch_idx: torch.Tensor | None


class Term:
    """One distillation term of a :class:`~yolo_fgd.yolo.distiller.Distiller` (``d``; its ``cfg`` is the resolved
    preset).

    ``module``: its trainable part, or None; optimised, all-reduced and saved in ``fgd_last.pt`` under ``state``.
    ``needs_head``: it reads the teacher's head outputs; ``needs_boxes``: the ground-truth boxes.
    """

    name = ""
    state: str | None = None
    needs_head = False
    needs_boxes = False

    def __init__(self, d, name: str):
        self.d, self.cfg, self.name = d, d.cfg, name
        self.module: nn.Module | None = None
        self.fitted = False  # its module was started from data (or restored from a sidecar)

    @classmethod
    def on(cls, cfg: dict, name: str, task: str) -> bool:
        """Whether the row ``name`` of this class has weight in ``cfg`` for a student of ``task``."""
        raise NotImplementedError

    @classmethod
    def logs(cls, name: str) -> tuple[str, ...]:
        """Loss items the row ``name`` logs beside its own."""
        return ()

    def __call__(self, b: Batch) -> tuple[torch.Tensor, dict]:
        """(loss 0-d fp32, {log item: 0-d detached}) of one batch."""
        raise NotImplementedError


class Feature(Term):
    """FGD (Eq. 2-13), or plain feature MSE (Eq. 1) or MGD in its place: one :class:`~yolo_fgd.core.FGDPyramid` on
    the Detect inputs. Its per-level values are kept in ``levels`` for the distiller's per-level columns, and its
    total is multiplied by the distiller's ``mult`` (``fgd_share`` balancing)."""

    state = "fgd"
    needs_boxes = True

    @classmethod
    def on(cls, cfg, name, task):
        return fgd_on(cfg) and name == ("mse" if cfg["mse"] else "mgd" if cfg["mgd"] else "fgd")

    def __init__(self, d, name):
        super().__init__(d, name)
        self.module = build_pyramid(d.student_channels, d.teacher_channels, self.cfg)
        self.levels = None

    @classmethod
    def logs(cls, name):
        return tuple(f"fgd_{k}" for k in TERMS) if name == "fgd" else ()

    def __call__(self, b):
        t = self.module(b.student_feats, b.teacher_feats, b.boxes, b.batch_idx)
        m = self.d.mult
        self.levels = t["levels"] * m
        return t["total"] * m, ({f"fgd_{k}": t[k].detach() * m for k in TERMS} if self.name == "fgd" else {})


class Response(Term):
    """The head response: teacher class scores as soft labels, box-side bins (KL), optionally weighted per anchor
    by FGD's focal weights (``kd_focal``)."""

    needs_head = True

    @classmethod
    def on(cls, cfg, name, task):
        return response_on(cfg)

    def __init__(self, d, name):
        super().__init__(d, name)
        self.needs_boxes = bool(self.cfg["kd_focal"])

    def __call__(self, b):
        cfg = self.cfg
        weights = focal_weights(b.boxes, b.batch_idx, b.teacher_feats, cfg["temperature"], cfg["bg"] / cfg["fg"]) \
            if cfg["kd_focal"] else None
        t = response_kd(b.student_out["scores"], b.teacher_out["scores"], b.student_out["boxes"],
                        b.teacher_out["boxes"], *self.d.box_bins, anchor_weight=weights)
        return cfg["kd_cls"] * t["cls"] + cfg["kd_box"] * t["box"], {}


class CrossKD(Term):
    """CrossKD: the student's Detect inputs through 1x1 convs (to the teacher's widths) and the frozen teacher head,
    its outputs to the teacher's; under the step's autocast, as the student's own head. Gradients reach the student
    and the 1x1 convs only."""

    state = "cross"
    needs_head = True

    @classmethod
    def on(cls, cfg, name, task):
        return cross_on(cfg)

    def __init__(self, d, name):
        super().__init__(d, name)
        self.module = nn.ModuleList(nn.Conv2d(a, b, 1) if a != b else nn.Identity()
                                    for a, b in zip(d.student_channels, d.teacher_channels))

    def __call__(self, b):
        d = self.d
        if self.cfg["crosskd_fit"] and not self.fitted and torch.is_grad_enabled():
            fit_adapters(self.module, b.student_feats, b.teacher_feats, d.world_size)
            self.fitted = True
        crossed = head_outputs(d.teacher, d.teacher_input([a(f) for a, f in zip(self.module, b.student_feats)]))
        t = response_kd(crossed["scores"], b.teacher_out["scores"], crossed["boxes"], b.teacher_out["boxes"],
                        d.box_bins[1])
        return self.cfg["crosskd"] * (t["cls"] + t["box"]), {}


def fit_adapters(adapters: nn.ModuleList, student_feats: list, teacher_feats: list, world_size: int = 1) -> None:
    """Set each 1x1 conv of ``adapters`` (one per level; an ``nn.Identity`` is left alone) to the least-squares map
    (:func:`~yolo_fgd.core.linear_map`) of the student's features (N,Cs,H,W) to the teacher's (N,Ct,H,W) of this
    batch, summed over every process first, so that every rank starts from the same map."""
    for conv, s, t in zip(adapters, student_feats, teacher_feats):
        if not isinstance(conv, nn.Conv2d):
            continue
        m = moments(s, t)
        if world_size > 1 and dist.is_initialized():
            for v in m.values():
                dist.all_reduce(v)
        w, bias = linear_map(m)
        with torch.no_grad():
            conv.weight.copy_(w[..., None, None].to(conv.weight.dtype))
            conv.bias.copy_(bias.to(conv.bias.dtype))


class Aligned(Term):
    """A feature-imitation term on the Detect inputs: per level a 1x1 conv from the student's width to the teacher's
    (an identity where they match), then :meth:`level` of the aligned student and the teacher, summed over levels
    and multiplied by the row's weight (its name)."""

    @classmethod
    def on(cls, cfg, name, task):
        return cfg[name] > 0

    def __init__(self, d, name):
        super().__init__(d, name)
        self.module = nn.ModuleList(nn.Conv2d(a, b, 1) if a != b else nn.Identity()
                                    for a, b in zip(d.student_channels, d.teacher_channels))

    def level(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, b):
        loss = sum(self.level(a(s), t) for a, s, t in zip(self.module, b.student_feats, b.teacher_feats))
        return self.cfg[self.name] * loss, {}


class CWD(Aligned):
    """Channel-wise distillation (CWD) of each level at temperature ``cwd_tau``."""

    state = "cwd"

    def level(self, s, t):
        return cwd_loss(s, t, self.cfg["cwd_tau"])


class PKD(Aligned):
    """Pearson-normalised feature imitation (PKD) of each level."""

    state = "pkd"

    def level(self, s, t):
        return pkd_loss(s, t)


class LD(Term):
    """Localisation distillation on the DFL bins at temperature ``ld_temperature`` (the head-response box term is
    the same KL at T = 1), weighted per anchor by the teacher's top class score."""

    needs_head = True

    @classmethod
    def on(cls, cfg, name, task):
        return cfg["ld"] > 0

    def __call__(self, b):
        t_out = b.teacher_out
        w = t_out["scores"].detach().float().sigmoid().amax(1)
        return self.cfg["ld"] * box_kd(b.student_out["boxes"], t_out["boxes"], *self.d.box_bins, w,
                                       self.cfg["ld_temperature"]), {}


class BCKD(Term):
    """BCKD: the class scores as binary soft labels with a quality-focal modulation (``bckd_beta``) plus 1 - GIoU of
    the decoded boxes, both at every anchor."""

    needs_head = True

    @classmethod
    def on(cls, cfg, name, task):
        return cfg["bckd"] > 0

    def __call__(self, b):
        s, t = b.student_out, b.teacher_out
        (s_reg, t_reg), cfg = self.d.box_bins, self.cfg
        cls_term = bckd_cls(s["scores"], t["scores"], cfg["bckd_beta"])
        box_term = ltrb_giou_kd(side_distances(s["boxes"].float(), s_reg), side_distances(t["boxes"].float(), t_reg),
                                t["scores"])
        return cfg["bckd"] * (cls_term + box_term), {}


class TaskTerm(Term):
    """The task's extra head output (keypoints, angles, masks), for a student of the row's ``task``; the row's
    name is its weight."""

    needs_head = True

    @classmethod
    def on(cls, cfg, name, task):
        return task == ROWS[name]["task"] and cfg[name] > 0

    def __call__(self, b):
        return self.cfg[self.name] * self.loss(b), {}


class Keypoints(TaskTerm):
    def loss(self, b):
        teacher = self.d.teacher
        return keypoint_kd(b.student_out["kpts"], b.teacher_out["kpts"], b.teacher_out["scores"],
                           detect_head(teacher).kpt_shape[1])


class Angle(TaskTerm):
    def loss(self, b):
        return angle_kd(b.student_out["angle"], b.teacher_out["angle"], b.teacher_out["scores"])


class Masks(TaskTerm):
    def loss(self, b):
        d = self.d
        with torch.no_grad():
            t_proto = detect_head(d.teacher).proto(d.teacher_input(b.teacher_feats[0])).float()
        return mask_kd(b.student_out["mask_coefficient"], b.student_out["proto"], b.teacher_out["mask_coefficient"],
                       t_proto, b.teacher_out["scores"])
