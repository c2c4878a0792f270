"""Distillation terms of the anchors FGD is compared with, beside it in the loss core (pure PyTorch):

- :func:`cwd_loss`: channel-wise distillation (Shu et al., ICCV 2021; mmrazor's and DAMO-YOLO's neck term): each
  channel's map as a distribution over positions, KL(teacher || student) at temperature tau;
- :func:`pkd_loss`: Pearson-correlation feature imitation (Cao et al., NeurIPS 2022, PKD): MSE of the features after
  standardising each channel over the batch and positions;
- :func:`bckd_cls` and :func:`ltrb_giou_kd`: the two parts of BCKD (Yang et al., ICCV 2023): the class scores as
  binary soft labels with a quality-focal modulation, and the boxes by their IoU, both at every anchor of a dense
  head;
- :func:`moments` and :func:`linear_map`: the least-squares 1x1 map (with bias) from a student's features to the
  teacher's, which starts an adapter where the student already imitates the teacher linearly.

Features are (N,C,H,W) of equal shape for student (already aligned to the teacher's width) and teacher; every loss is
computed in fp32 and returns a 0-d tensor; the teacher side is detached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["bckd_cls", "cwd_loss", "linear_map", "ltrb_giou_kd", "moments", "pearson_standardise", "pkd_loss"]


def cwd_loss(s: torch.Tensor, t: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Channel-wise distillation of one level:

        tau^2 / (N C) * sum_{n,c} sum_hw softmax(t_nc / tau)_hw * (log softmax(t_nc / tau) - log softmax(s_nc / tau))_hw

    (the KL of each channel's spatial distribution, summed over positions, averaged over images and channels).
    s, t: (N,C,H,W)."""
    with torch.autocast(device_type=s.device.type, enabled=False):
        n, c = s.shape[:2]
        log_s = F.log_softmax(s.float().flatten(2) / tau, dim=2)
        log_t = F.log_softmax(t.detach().float().flatten(2) / tau, dim=2)
        return (log_t.exp() * (log_t - log_s)).sum() * tau**2 / (n * c)


def pearson_standardise(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(N,C,H,W) -> each channel minus its mean over (N,H,W), over its std (unbiased) + eps."""
    mean = x.mean((0, 2, 3), keepdim=True)
    std = x.std((0, 2, 3), keepdim=True)
    return (x - mean) / (std + eps)


def pkd_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """PKD of one level: mean over elements of (z(s) - z(t))^2 / 2 with z :func:`pearson_standardise` (= 1 - the mean
    Pearson correlation of each channel's values, up to the (M-1)/M of the unbiased std). s, t: (N,C,H,W)."""
    with torch.autocast(device_type=s.device.type, enabled=False):
        return F.mse_loss(pearson_standardise(s.float()), pearson_standardise(t.detach().float())) / 2


def bckd_cls(s_scores: torch.Tensor, t_scores: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """BCKD's classification term: every class of every anchor a binary task with the teacher's probability as its
    soft label, the Bernoulli KL modulated like Quality Focal Loss,

        sum_{n,k,a} |sigmoid(s) - p|^beta * KL(Bern(p) || Bern(sigmoid(s))) / sum p,   p = sigmoid(t),

    normalised as the head-response class term (by the teacher's score mass). s_scores, t_scores: (N,K,A) logits."""
    with torch.autocast(device_type=s_scores.device.type, enabled=False):
        s, t = s_scores.float(), t_scores.detach().float()
        p = t.sigmoid()
        kl = F.binary_cross_entropy_with_logits(s, p, reduction="none") - \
            F.binary_cross_entropy_with_logits(t, p, reduction="none")
        return ((s.sigmoid() - p).abs().pow(beta) * kl).sum() / p.sum().clamp(min=1.0)


def ltrb_giou_kd(s_ltrb: torch.Tensor, t_ltrb: torch.Tensor, t_scores: torch.Tensor) -> torch.Tensor:
    """BCKD's localisation term: per anchor 1 - GIoU of the student's and the teacher's boxes, weighted by the
    teacher's top class score. The boxes are distances (left, top, right, bottom) from the same anchor point, so
    their IoU needs neither the point nor the stride.

    s_ltrb, t_ltrb: (N,4,A) non-negative side distances; t_scores: (N,K,A) teacher logits. Returns a 0-d tensor."""
    with torch.autocast(device_type=s_ltrb.device.type, enabled=False):
        s, t = s_ltrb.float(), t_ltrb.detach().float()
        area = lambda b: (b[:, 0] + b[:, 2]) * (b[:, 1] + b[:, 3])
        lo, hi = torch.minimum(s, t), torch.maximum(s, t)
        inter = (lo[:, 0] + lo[:, 2]) * (lo[:, 1] + lo[:, 3])
        union = area(s) + area(t) - inter
        hull = (hi[:, 0] + hi[:, 2]) * (hi[:, 1] + hi[:, 3])
        giou = inter / union.clamp(min=1e-9) - (hull - union) / hull.clamp(min=1e-9)
        w = t_scores.detach().float().sigmoid().amax(1)
        return ((1 - giou) * w).sum() / w.sum().clamp(min=1e-6)


def moments(s: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums over every image and position of a level's student features s (N,Cs,H,W) and teacher features t
    (N,Ct,H,W), in fp64: ``n`` (0-d), ``s`` (Cs,), ``t`` (Ct,), ``ss`` = sum s s^T (Cs,Cs), ``st`` = sum s t^T
    (Cs,Ct). Sums, so that processes can add theirs (all-reduce) before :func:`linear_map`."""
    x = s.detach().double().permute(0, 2, 3, 1).flatten(0, 2)
    y = t.detach().double().permute(0, 2, 3, 1).flatten(0, 2)
    return {"n": torch.tensor(float(len(x)), dtype=torch.float64, device=x.device), "s": x.sum(0), "t": y.sum(0),
            "ss": x.T @ x, "st": x.T @ y}


def linear_map(m: dict[str, torch.Tensor], ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1x1 map t ~ W s + b of least squares over the pixels summed in ``m`` (:func:`moments`), with a ridge of
    ``ridge`` x the mean variance of the student's channels (a channel that never varies gets weight 0, not inf):

        W = (C_ss + ridge tr(C_ss)/Cs I)^-1 C_st,   b = mean_t - W^T mean_s,   C = centred second moments.

    Returns (W (Ct,Cs), b (Ct,)) in fp64: the weight of a ``Conv2d(Cs, Ct, 1)`` is ``W[..., None, None]``."""
    n = m["n"].clamp(min=1.0)
    mean_s, mean_t = m["s"] / n, m["t"] / n
    c_ss = m["ss"] / n - torch.outer(mean_s, mean_s)
    c_st = m["st"] / n - torch.outer(mean_s, mean_t)
    cs = c_ss.shape[0]
    lam = ridge * torch.diagonal(c_ss).sum().clamp(min=1e-12) / cs
    w = torch.linalg.solve(c_ss + lam * torch.eye(cs, dtype=c_ss.dtype, device=c_ss.device), c_st)  # (Cs,Ct)
    return w.T, mean_t - w.T @ mean_s
