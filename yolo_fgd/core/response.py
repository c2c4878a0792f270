"""Head-response distillation: the teacher's dense head outputs as targets for the student's (not part of FGD).

Pure PyTorch. Class scores are distilled as soft labels (Bernoulli KL per class and anchor), box sides as the KL of
their DFL bins (localisation distillation, Zheng et al. CVPR 2022) or, when the heads' bins differ, as the L1 of the
decoded side distances.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .fgd import attention
from .masks import fgd_masks_levels

__all__ = ["angle_kd", "box_kd", "focal_weights", "keypoint_kd", "mask_kd", "response_kd", "side_distances"]


def side_distances(dist: torch.Tensor, reg_max: int) -> torch.Tensor:
    """(N,4*reg_max,A) bin logits -> (N,4,A) expected distance per side (DFL decoding); reg_max 1: as given."""
    if reg_max == 1:
        return dist
    n, _, a = dist.shape
    bins = torch.arange(reg_max, device=dist.device, dtype=dist.dtype).view(1, 1, reg_max, 1)
    return (dist.view(n, 4, reg_max, a).softmax(2) * bins).sum(2)


def response_kd(s_scores, t_scores, s_dist, t_dist, s_reg: int, t_reg: int | None = None, temperature: float = 1.0,
                anchor_weight: torch.Tensor | None = None):
    """Head-response distillation on a dense head (not part of FGD; the YOLO adapter's companion term).

    Args:
        s_scores, t_scores: (N,K,A) class logits of student and teacher over the same A anchor points.
        s_dist, t_dist: (N,4*reg,A) box-side logits: DFL bins (reg > 1) or distances (reg 1, e.g. YOLO26).
        s_reg, t_reg: bins per side of student and teacher (t_reg defaults to s_reg).
        temperature: T of the bins' softmax.
        anchor_weight: (N,A) weights of the anchors (e.g. :func:`focal_weights`), 1 when None; they multiply each
            anchor's class and box terms while the normalisers stay those of the unweighted term.

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
        kl = F.binary_cross_entropy_with_logits(s, p, reduction="none") - entropy  # (N,K,A)
        aw = None if anchor_weight is None else anchor_weight.detach().float()
        cls = (kl.sum() if aw is None else (kl.sum(1) * aw).sum()) / p.sum().clamp(min=1.0)
        box = box_kd(s_dist, t_dist, s_reg, t_reg, p.amax(1), temperature, aw)
    return {"cls": cls, "box": box}


def box_kd(s_dist, t_dist, s_reg: int, t_reg: int, weight: torch.Tensor, temperature: float = 1.0,
           anchor_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The box side of :func:`response_kd` (LD, Zheng et al. CVPR 2022, when both heads have the same bins > 1):

        sum_a w_a u_a T^2 sum_{side} KL(softmax(t/T) || softmax(s/T)) / sum_a w_a

    with w (N,A) the anchors' weights (the teacher's top class score) and u (N,A) ``anchor_weight`` (1 when None);
    with other bins, the L1 distance of the decoded side distances (stride units) in place of the KL.
    s_dist, t_dist: (N,4*reg,A) logits. Returns a 0-d fp32 tensor."""
    with torch.autocast(device_type=s_dist.device.type, enabled=False):
        sd, td = s_dist.float(), t_dist.detach().float()
        n, a = sd.shape[0], sd.shape[-1]
        if s_reg == t_reg > 1:
            sd, td = sd.view(n, 4, s_reg, a), td.view(n, 4, t_reg, a)
            log_s, log_t = F.log_softmax(sd / temperature, 2), F.log_softmax(td / temperature, 2)
            per_anchor = (log_t.exp() * (log_t - log_s)).sum((1, 2)) * temperature**2  # (N,A)
        else:
            per_anchor = (side_distances(td, t_reg) - side_distances(sd, s_reg)).abs().sum(1)
        w = weight.detach().float()
        return (per_anchor * (w if anchor_weight is None else w * anchor_weight)).sum() / w.sum().clamp(min=1e-6)


def focal_weights(boxes: torch.Tensor, batch_idx: torch.Tensor, teacher_feats, temperature: float = 0.5,
                  bg: float = 0.5) -> torch.Tensor:
    """FGD's focal parts in prediction space: a weight per anchor of a dense head (not part of the paper).

    Per cell of each level: (M_fg + bg * M_bg) * A_S, with M_fg / M_bg the scaled foreground/background masks of
    Eq. 2-4 and A_S the teacher's spatial attention of Eq. 5, the cells of all levels laid end to end in the order a
    YOLO head lists its anchors; then divided by its mean over each image's anchors (mean 1: all ones would leave
    :func:`response_kd` unchanged). ``bg``: beta / alpha of the preset (0.5 in the paper's).

    Args: boxes (M,4) normalised xyxy, batch_idx (M,), teacher_feats [L x (N,C,H_l,W_l)]. Returns (N,A), detached.
    """
    with torch.no_grad():
        n = teacher_feats[0].shape[0]
        masks = fgd_masks_levels(boxes, batch_idx, n, [f.shape[-2:] for f in teacher_feats])
        w = torch.cat([((fg + bg * b) * attention(f.float(), temperature)[0]).view(n, -1)
                       for (fg, b), f in zip(masks, teacher_feats)], 1)
        return w / w.mean(1, keepdim=True).clamp(min=1e-12)


def _score_weighted(per_anchor: torch.Tensor, t_scores: torch.Tensor) -> torch.Tensor:
    """sum_a w_a x_a / sum_a w_a with w the teacher's top class score per anchor; per_anchor and result fp32."""
    w = t_scores.detach().float().sigmoid().amax(1)  # (N,A)
    return (per_anchor * w).sum() / w.sum().clamp(min=1e-6)


def keypoint_kd(s_kpts: torch.Tensor, t_kpts: torch.Tensor, t_scores: torch.Tensor, ndim: int) -> torch.Tensor:
    """Keypoints of a pose head: per anchor the L1 of the raw x, y outputs (both heads decode them alike, linearly,
    so this is the decoded distance over twice the stride) summed over keypoints, plus, with ``ndim`` 3, the
    Bernoulli KL of the visibility logits; weighted by the teacher's top class score (as the box term).

    s_kpts, t_kpts: (N,K*ndim,A) raw keypoint outputs; t_scores (N,C,A) teacher class logits. Returns a 0-d tensor."""
    with torch.autocast(device_type=s_kpts.device.type, enabled=False):
        n, _, a = s_kpts.shape
        s, t = s_kpts.float().view(n, -1, ndim, a), t_kpts.detach().float().view(n, -1, ndim, a)
        per_anchor = (s[:, :, :2] - t[:, :, :2]).abs().sum((1, 2))
        if ndim == 3:
            p = t[:, :, 2].sigmoid()
            kl = F.binary_cross_entropy_with_logits(s[:, :, 2], p, reduction="none") - \
                F.binary_cross_entropy_with_logits(t[:, :, 2], p, reduction="none")
            per_anchor = per_anchor + kl.sum(1)
        return _score_weighted(per_anchor, t_scores)


def angle_kd(s_angle: torch.Tensor, t_angle: torch.Tensor, t_scores: torch.Tensor) -> torch.Tensor:
    """Angles of an OBB head (radians, (N,1,A)): per anchor |s - t| wrapped to [-pi/2, pi/2) (a box turned by pi is
    the same box), weighted by the teacher's top class score. Returns a 0-d tensor."""
    with torch.autocast(device_type=s_angle.device.type, enabled=False):
        d = torch.remainder(s_angle.float() - t_angle.detach().float() + math.pi / 2, math.pi) - math.pi / 2
        return _score_weighted(d.abs().sum(1), t_scores)


def mask_kd(s_coef: torch.Tensor, s_proto: torch.Tensor, t_coef: torch.Tensor, t_proto: torch.Tensor,
            t_scores: torch.Tensor, k: int = 32) -> torch.Tensor:
    """Masks of a segmentation head: at each image's ``k`` anchors the teacher scores highest, the Bernoulli KL per
    pixel between the teacher's and the student's mask logits (coefficients x prototypes: each model's own, so the
    masks are comparable where the coefficients are not), mean over pixels, weighted by those teacher scores.

    s_coef, t_coef: (N,M,A) mask coefficients; s_proto, t_proto: (N,M,H,W) prototypes (same H, W);
    t_scores: (N,C,A). Returns a 0-d tensor."""
    with torch.autocast(device_type=s_coef.device.type, enabled=False):
        w, idx = t_scores.detach().float().sigmoid().amax(1).topk(min(k, t_scores.shape[-1]), dim=1)  # (N,k)
        gather = lambda c: c.float().gather(2, idx[:, None, :].expand(-1, c.shape[1], -1))  # (N,M,k)
        s = torch.einsum("nmk,nmhw->nkhw", gather(s_coef), s_proto.float())
        t = torch.einsum("nmk,nmhw->nkhw", gather(t_coef.detach()), t_proto.detach().float())
        p = t.sigmoid()
        kl = F.binary_cross_entropy_with_logits(s, p, reduction="none") - \
            F.binary_cross_entropy_with_logits(t, p, reduction="none")
        return (kl.mean((2, 3)) * w).sum() / w.sum().clamp(min=1e-6)
