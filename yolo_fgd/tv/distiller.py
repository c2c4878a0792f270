"""The torchvision distiller: student + FGD pyramid, the teacher held outside the module tree."""

from __future__ import annotations

import torch
from torch import nn

from ..core.presets import build_pyramid, fgd_on, schedule_scale


class Distiller(nn.Module):
    """Student + FGD modules (one :class:`FGDLoss` per FPN level); the teacher is held outside the module tree.

    ``forward(images, targets)`` -> the student's loss dict plus ``loss_fgd``, FGD's loss times ``scale`` (the
    schedule of ``distill_warmup`` / ``distill_decay``, set per iteration by :meth:`progress`). Boxes are taken from
    the student's transformed targets and normalised by the padded batch tensor (what the FPN maps cover), not each
    image.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None, fgd_cfg: dict | None):
        super().__init__()
        self.student = student
        self._teacher = [teacher]  # a list: not a submodule (not in state_dict, DDP or the optimiser)
        self.fgd = None
        self.cfg = fgd_cfg or {}
        self.scale = 1.0
        if teacher is not None and fgd_cfg and fgd_on(fgd_cfg):
            self.fgd = build_pyramid([student.backbone.out_channels] * 5, [teacher.backbone.out_channels] * 5, fgd_cfg)
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        self._seen = {}
        student.transform.register_forward_hook(lambda m, i, o: self._seen.__setitem__("transform", o))
        student.backbone.register_forward_hook(lambda m, i, o: self._seen.__setitem__("feats", o))

    def progress(self, pos: float, epochs: int) -> float:
        """Set ``scale`` for ``pos`` epochs done (fractional) of ``epochs`` -> it."""
        self.scale = schedule_scale(pos, epochs, self.cfg)
        return self.scale

    @property
    def teacher(self):
        return self._teacher[0]

    def forward(self, images, targets):
        losses = self.student(images, targets)
        if self.fgd is None:
            return losses
        image_list, tgts = self._seen["transform"]
        x = image_list.tensors
        with torch.no_grad():
            t_feats = list(self.teacher.backbone(x).values())
        s_feats = list(self._seen["feats"].values())
        hp, wp = x.shape[-2:]
        boxes = torch.cat([t["boxes"] for t in tgts]) / x.new_tensor([wp, hp, wp, hp])
        bi = torch.cat([torch.full((len(t["boxes"]),), i, device=x.device) for i, t in enumerate(tgts)])
        out = self.fgd(s_feats, t_feats, boxes, bi)
        losses["loss_fgd"] = out["total"] * self.scale
        return losses
