"""Masked Generative Distillation (MGD, Yang et al., ECCV 2022, arXiv 2205.01529), one feature level: FGD's authors'
follow-up, offered here as a candidate feature term next to FGD.

Pure PyTorch. The aligned student feature is masked at random positions and a small generator must regenerate the
teacher's full feature from what is left (Eq. 1-3 of the MGD paper).
"""

from __future__ import annotations

import torch
from torch import nn

from .fgd import standardise, term_dict

__all__ = ["MGDLoss"]


class MGDLoss(nn.Module):
    """fg * sum (F_t - G(M * F_s'))^2 / N, the keys of :class:`~yolo_fgd.core.fgd.FGDLoss` (only ``fg`` non-zero).

    Args:
        student_channels, teacher_channels: Cs, Ct; a 1x1 conv aligns Cs to Ct when they differ.
        fg: the loss weight (MGD's alpha; 2e-5 for detection in the paper).
        ratio: share of the positions masked out (MGD's lambda; 0.65 for detection in the paper), drawn per image
            and position on every call.
        norm: standardise F_t and F_s' per image and channel first (as the YOLO presets do for FGD).

    G is Conv3x3 -> ReLU -> Conv3x3 at the teacher's width. forward(student_feat (N,Cs,H,W), teacher_feat
    (N,Ct,H,W), *ignored) -> dict of 0-d fp32 tensors ``fg``, ``bg``, ``at``, ``gl`` (zeros), ``total``.
    """

    needs_masks = False  # the box masks of Eq. 2-4 are not used

    def __init__(self, student_channels: int, teacher_channels: int, fg: float = 2e-5, ratio: float = 0.65,
                 norm: bool = False, **_):
        super().__init__()
        if not 0.0 <= float(ratio) < 1.0:
            raise ValueError(f"MGD mask ratio must be in [0, 1), got {ratio}")
        self.weights = {"fg": float(fg)}
        self.ratio, self.norm = float(ratio), norm
        self.align = (
            nn.Conv2d(student_channels, teacher_channels, 1) if student_channels != teacher_channels else nn.Identity()
        )
        c = teacher_channels
        self.generator = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(c, c, 3, padding=1))

    def vector(self, student_feat, teacher_feat, *_, **__) -> torch.Tensor:
        """The terms as one (4,) fp32 tensor in :data:`~yolo_fgd.core.fgd.TERMS` order (only ``fg`` non-zero)."""
        n, _, h, w = student_feat.shape
        with torch.autocast(device_type=student_feat.device.type, enabled=False):
            fs = self.align(student_feat.float())
            ft = teacher_feat.detach().float()
            if self.norm:
                fs, ft = standardise(fs), standardise(ft)
            keep = (torch.rand(n, 1, h, w, device=fs.device) >= self.ratio).to(fs.dtype)  # 1 keeps, 0 masks
            fg = self.weights["fg"] * (self.generator(fs * keep) - ft).square().sum() / n
            return torch.cat([fg.view(1), fg.new_zeros(3)])

    def forward(self, student_feat, teacher_feat, *_, **__):
        return term_dict(self.vector(student_feat, teacher_feat))
