"""Head-response distillation: the teacher's dense head outputs as targets for the student's (not part of FGD).

Pure PyTorch. Class scores are distilled as soft labels (Bernoulli KL per class and anchor), box sides as the KL of
their DFL bins (localisation distillation, Zheng et al. CVPR 2022) or, when the heads' bins differ, as the L1 of the
decoded side distances.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["response_kd", "side_distances"]


def side_distances(dist: torch.Tensor, reg_max: int) -> torch.Tensor:
    """(N,4*reg_max,A) bin logits -> (N,4,A) expected distance per side (DFL decoding); reg_max 1: as given."""
    if reg_max == 1:
        return dist
    n, _, a = dist.shape
    bins = torch.arange(reg_max, device=dist.device, dtype=dist.dtype).view(1, 1, reg_max, 1)
    return (dist.view(n, 4, reg_max, a).softmax(2) * bins).sum(2)


def response_kd(s_scores, t_scores, s_dist, t_dist, s_reg: int, t_reg: int | None = None, temperature: float = 1.0):
    """Head-response distillation on a dense head (not part of FGD; the YOLO adapter's companion term).

    Args:
        s_scores, t_scores: (N,K,A) class logits of student and teacher over the same A anchor points.
        s_dist, t_dist: (N,4*reg,A) box-side logits: DFL bins (reg > 1) or distances (reg 1, e.g. YOLO26).
        s_reg, t_reg: bins per side of student and teacher (t_reg defaults to s_reg).
        temperature: T of the bins' softmax.

    Returns dict of 0-d fp32 tensors:
        'cls': sum over anchors and classes of KL(Bernoulli(sigmoid t) || Bernoulli(sigmoid s)) / sum sigmoid(t)
            (teacher scores as soft labels, normalised like the detection loss by the target score mass);
        'box': per anchor, T^2 * KL(softmax(t/T) || softmax(s/T)) summed over the 4 sides when both heads have the
            same bins > 1 (LD, Zheng et al. CVPR 2022), else the L1 distance of the decoded side distances (in stride
            units); weighted by the teacher's top class score and divided by the sum of those weights.
    """
    t_reg = s_reg if t_reg is None else t_reg
    with torch.autocast(device_type=s_scores.device.type, enabled=False):
        s, t = s_scores.float(), t_scores.detach().float()
        n = s.shape[0]
        p = t.sigmoid()
        entropy = F.binary_cross_entropy_with_logits(t, p, reduction="none")
        cls = (F.binary_cross_entropy_with_logits(s, p, reduction="none") - entropy).sum() / p.sum().clamp(min=1.0)
        weight = p.amax(1)  # (N,A)
        sd, td = s_dist.float(), t_dist.detach().float()
        a = sd.shape[-1]
        if s_reg == t_reg > 1:
            sd, td = sd.view(n, 4, s_reg, a), td.view(n, 4, t_reg, a)
            log_s, log_t = F.log_softmax(sd / temperature, 2), F.log_softmax(td / temperature, 2)
            per_anchor = (log_t.exp() * (log_t - log_s)).sum((1, 2)) * temperature**2  # (N,A)
        else:
            per_anchor = (side_distances(td, t_reg) - side_distances(sd, s_reg)).abs().sum(1)
        box = (per_anchor * weight).sum() / weight.sum().clamp(min=1e-6)
    return {"cls": cls, "box": box}
