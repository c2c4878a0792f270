"""Focal and Global Distillation loss (Yang et al., CVPR 2022, arXiv 2111.11837).

Pure PyTorch, no detector framework import. One :class:`FGDLoss` serves one feature level, :class:`FGDPyramid`
holds one per level; the YOLO and torchvision distillers each own a pyramid. Eq. 5-13 are written once, in
:mod:`.reference`, in plain autograd; :mod:`.compiled` runs them through ``torch.compile`` where it can.

The four terms have one name each, from preset key to loss argument to ``results.csv`` column: ``fg`` (alpha, Eq. 9
foreground), ``bg`` (beta, Eq. 9 background), ``at`` (gamma, Eq. 10 attention), ``gl`` (lambda, Eq. 11 global).

Notation (paper): F_t teacher feature, F_s' aligned student feature, M foreground/background
mask (Eq. 2-4), A_S / A_C spatial / channel attention (Eq. 5-8), R GcBlock relation (Eq. 11-12).
"""

from __future__ import annotations

import torch
from torch import nn

from ..cfg.distill import TERMS
from . import reference
from .compiled import level_terms
from .masks import level_masks
from .reference import attention

__all__ = ["FGDLoss", "FGDPyramid", "GcBlock", "NonLocal", "TERMS", "attention", "feature_mse", "standardise", "term_dict"]


def term_dict(terms: torch.Tensor) -> dict:
    """(4,) weighted terms in :data:`TERMS` order -> dict of 0-d tensors, one per term, and their sum ``total``."""
    return {**dict(zip(TERMS, terms.unbind())), "total": terms.sum()}


class GcBlock(nn.Module):
    """Global relation module R (Eq. 12): R(F) = F + W_v2(ReLU(LN(W_v1(sum_j softmax(W_k F)_j F_j)))).

    Only the last conv is zero-initialised, so R(F) = F at init and both convs still learn. ``context`` is W_k,
    ``transform`` W_v1, LN, ReLU, W_v2 (the official ``spatial_pool`` and ``channel_add_conv``).
    """

    kind = "gcblock"

    def __init__(self, channels: int):
        super().__init__()
        hidden = max(channels // 2, 1)
        self.context = nn.Conv2d(channels, 1, 1)
        self.transform = nn.Sequential(
            nn.Conv2d(channels, hidden, 1),
            nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
        )
        nn.init.kaiming_normal_(self.context.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.context.bias)
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        return reference.relation(self, feat)


class NonLocal(nn.Module):
    """The embedded-Gaussian Non-local block (Wang et al., CVPR 2018) as the global relation R of Eq. 11 (the paper's
    Table 6; :func:`.reference.nonlocal_relation`): theta, phi, g 1x1 convs to C/2, ``out`` back to C, zero-initialised
    so R(F) = F at init, as the GcBlock. Its attention is (H W)^2 per image: affordable at small maps only."""

    kind = "nonlocal"

    def __init__(self, channels: int):
        super().__init__()
        hidden = max(channels // 2, 1)
        self.theta, self.phi, self.g = (nn.Conv2d(channels, hidden, 1) for _ in range(3))
        self.out = nn.Conv2d(hidden, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        return reference.nonlocal_relation(self, feat)


def standardise(feat: torch.Tensor) -> torch.Tensor:
    """(N,C,H,W) -> zero mean, unit std per image and channel over H*W (a 1x1 map only centred)."""
    mean = feat.mean((2, 3), keepdim=True)
    std = feat.std((2, 3), keepdim=True) if feat.shape[2] * feat.shape[3] > 1 else torch.ones_like(mean)
    return (feat - mean) / (std + 1e-6)


def feature_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Plain feature distillation (Eq. 1): sum (F_t - F_s')^2 / N, on already aligned features."""
    return (teacher.float() - student.float()).square().sum() / student.shape[0]


class FGDLoss(nn.Module):
    """FGD for one feature level: fg*L_fg + bg*L_bg + at*L_at + gl*L_gl (Eq. 9-13, the paper's alpha, beta, gamma,
    lambda).

    Args:
        student_channels, teacher_channels: Cs, Ct. A 1x1 conv (with bias) aligns Cs to Ct when they differ.
        temperature: T of Eq. 5-6.
        fg, bg, at, gl: weights of the four terms (alpha, beta, gamma, lambda of Eq. 13).
        official_rounding: box-to-cell mapping of the official code (inclusive ceil).
        spatial, channel: use A_S / A_C in Eq. 9 (ablations, paper Table 5); when off the map is replaced by ones.
        split: separate fg/bg masks (paper Table 1). False puts every cell at weight 1/(H*W) in ``fg``
            and leaves ``bg`` zero.
        norm: standardise F_t and F_s' per image and channel over H*W before every term
            (the feature normalisation PaddleDetection's FGD offers; off in the paper).
        mse: plain feature distillation instead (Eq. 1, the paper's baseline): ``fg`` = fg * sum (F_t - F_s')^2 / N,
            the other terms zero (no attention, no GcBlock work).
        relation: R of Eq. 11, ``gcblock`` (Eq. 12, the paper's) or ``nonlocal`` (:class:`NonLocal`, Table 6).

    forward(student_feat (N,Cs,H,W), teacher_feat (N,Ct,H,W), boxes (M,4) normalised xyxy, batch_idx (M,),
    masks=None) -> dict of 0-d fp32 tensors: the weighted terms ``fg``, ``bg``, ``at``, ``gl`` (each summed over the
    level and divided by N) and their sum ``total``. ``masks``: this level's M_fg / M_bg of Eq. 2-4 (N,2,H*W) when the
    caller built them (:class:`FGDPyramid` builds every level's in one pass); :meth:`vector` gives the terms as one
    (4,) tensor.
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        temperature: float = 0.5,
        fg: float = 2e-3,
        bg: float = 1e-3,
        at: float = 1e-3,
        gl: float = 1e-5,
        official_rounding: bool = False,
        spatial: bool = True,
        channel: bool = True,
        split: bool = True,
        norm: bool = False,
        mse: bool = False,
        relation: str = "gcblock",
    ):
        super().__init__()
        self.temperature = float(temperature)
        self.weights = {"fg": float(fg), "bg": float(bg), "at": float(at), "gl": float(gl)}
        self.official_rounding = official_rounding
        self.spatial, self.channel = spatial, channel
        self.split, self.norm, self.mse = split, norm, mse
        self.align = (
            nn.Conv2d(student_channels, teacher_channels, 1) if student_channels != teacher_channels else nn.Identity()
        )
        block = {"gcblock": GcBlock, "nonlocal": NonLocal}[relation]
        self.gc_s = block(teacher_channels)  # R of Eq. 11 on the student's and on the teacher's features
        self.gc_t = block(teacher_channels)

    @property
    def needs_masks(self) -> bool:
        """Whether the box masks of Eq. 2-4 are used (the pyramid builds every level's in one pass)."""
        return self.split and not self.mse

    def extra_repr(self) -> str:
        return f"T={self.temperature}, " + ", ".join(f"{k}={v}" for k, v in self.weights.items())

    def vector(self, student_feat, teacher_feat, boxes, batch_idx, masks=None) -> torch.Tensor:
        """The weighted terms as one (4,) fp32 tensor in :data:`TERMS` order (the arguments of :meth:`forward`;
        ``masks``: this level's (N,2,H*W) of :func:`~yolo_fgd.core.masks.level_masks`)."""
        if student_feat.dim() != 4 or teacher_feat.dim() != 4:
            raise ValueError(
                f"FGDLoss expects 4-D (N,C,H,W) features, got student {tuple(student_feat.shape)} "
                f"and teacher {tuple(teacher_feat.shape)}"
            )
        ns, _, hs, ws = student_feat.shape
        nt, ct, ht, wt = teacher_feat.shape
        if (ns, hs, ws) != (nt, ht, wt):
            raise ValueError(
                f"FGDLoss: student {tuple(student_feat.shape)} and teacher {tuple(teacher_feat.shape)} features "
                "must share N, H and W; pair levels of equal stride and feed both models the same batch"
            )
        n, c, h, w = nt, ct, ht, wt
        with torch.autocast(device_type=student_feat.device.type, enabled=False):
            fs = self.align(student_feat.float())
            ft = teacher_feat.detach().float()
            if self.norm:
                fs, ft = standardise(fs), standardise(ft)
            if self.mse:
                return torch.cat([(self.weights["fg"] * feature_mse(fs, ft)).view(1), fs.new_zeros(3)])
            if not self.split:
                masks = torch.cat([ft.new_full((n, 1, h * w), 1.0 / (h * w)), ft.new_zeros(n, 1, h * w)], 1)
            elif masks is None:
                masks = level_masks(boxes.to(ft.device), batch_idx, n, [(h, w)], self.official_rounding)[0]
            m = masks.reshape(n, 2, h, w)
            return level_terms(fs, ft, m[:, 0], m[:, 1], self.gc_s, self.gc_t, tuple(self.weights.values()),
                               self.temperature, self.spatial, self.channel)

    def forward(self, student_feat, teacher_feat, boxes, batch_idx, masks=None):
        return term_dict(self.vector(student_feat, teacher_feat, boxes, batch_idx, masks))


class FGDPyramid(nn.Module):
    """FGD over a feature pyramid: one :class:`FGDLoss` per level, summed (the paper distils every FPN level).

    Args:
        student_channels, teacher_channels: per-level channel counts, same length.
        level_norm: weight level l by mean_k(m_k) / m_l, m_l a running mean (momentum 0.99, detached) of its weighted
            total, so every level contributes alike while the sum keeps its scale (the paper weighs levels equally by
            their raw sums, where the largest map dominates).
        loss: the per-level loss class, :class:`FGDLoss` by default (or :class:`~yolo_fgd.core.mgd.MGDLoss`).
        **kwargs: forwarded to every level's loss (weights, temperature, ablation switches).

    forward(student_feats [L x (N,Cs_l,H_l,W_l)], teacher_feats [L x (N,Ct_l,H_l,W_l)], boxes (M,4), batch_idx (M,))
    -> dict of the same keys as :class:`FGDLoss` (``fg``, ``bg``, ``at``, ``gl``, ``total``; each the sum over levels
    of the level's weighted term times its level weight) and ``levels`` (L,), each level's weighted total (detached).
    """

    def __init__(self, student_channels, teacher_channels, level_norm: bool = False, loss: type = None, **kwargs):
        super().__init__()
        if len(student_channels) != len(teacher_channels):
            raise ValueError(
                f"FGD needs the same number of levels in student ({len(student_channels)}) and teacher "
                f"({len(teacher_channels)})"
            )
        loss = loss or FGDLoss
        self.levels = nn.ModuleList(loss(cs, ct, **kwargs) for cs, ct in zip(student_channels, teacher_channels))
        self.level_norm = level_norm
        if level_norm:  # running mean of each level's total; 0 = not yet seen
            self.register_buffer("level_mean", torch.zeros(len(self.levels)))

    def level_weights(self, totals: torch.Tensor) -> torch.Tensor:
        """(L,) per-level factors: ones, or mean(m)/m_l with m the running means updated from ``totals`` (L,)."""
        if not self.level_norm:
            return torch.ones_like(totals)
        t = totals.detach().float()
        if self.training:
            seen = self.level_mean.gt(0).all()
            self.level_mean.copy_(torch.where(seen, 0.99 * self.level_mean + 0.01 * t, t))
        m = torch.where(self.level_mean.gt(0), self.level_mean, t).clamp(min=1e-12)
        return (m.mean() / m).to(totals.dtype)

    def forward(self, student_feats, teacher_feats, boxes, batch_idx):
        first = self.levels[0]
        masks = [None] * len(self.levels)
        if first.needs_masks:  # every level's masks in one pass
            masks = level_masks(boxes.to(teacher_feats[0].device), batch_idx, teacher_feats[0].shape[0],
                                [f.shape[-2:] for f in teacher_feats], first.official_rounding)
        terms = torch.stack([level.vector(fs, ft, boxes, batch_idx, m)
                             for level, fs, ft, m in zip(self.levels, student_feats, teacher_feats, masks)])  # (L,4)
        if self.level_norm:
            terms = terms * self.level_weights(terms.sum(1)).unsqueeze(1)
        return {**term_dict(terms.sum(0)), "levels": terms.sum(1).detach()}
