"""Focal and Global Distillation loss (Yang et al., CVPR 2022, arXiv 2111.11837).

Pure PyTorch, no detector framework import. One :class:`FGDLoss` serves one feature level, :class:`FGDPyramid`
holds one per level; the YOLO and torchvision distillers each own a pyramid.

The four terms have one name each, from preset key to loss argument to ``results.csv`` column: ``fg`` (alpha, Eq. 9
foreground), ``bg`` (beta, Eq. 9 background), ``at`` (gamma, Eq. 10 attention), ``gl`` (lambda, Eq. 11 global).

Notation (paper): F_t teacher feature, F_s' aligned student feature, M foreground/background
mask (Eq. 2-4), A_S / A_C spatial / channel attention (Eq. 5-8), R GcBlock relation (Eq. 11-12).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .masks import fgd_masks, fgd_masks_levels

__all__ = ["FGDLoss", "FGDPyramid", "GcBlock", "TERMS", "attention", "feature_mse", "standardise"]

TERMS = ("fg", "bg", "at", "gl")  # Eq. 9 foreground, Eq. 9 background, Eq. 10 attention, Eq. 11 global


def _softmaxes(feat: torch.Tensor, temperature: float):
    """(N,C,H,W) -> softmax_hw(mean_c|F| / T) (N,HW) and softmax_c(mean_hw|F| / T) (N,C): A_S / HW and A_C / C."""
    n, c, h, w = feat.shape
    a = feat.abs().view(n, c, -1)
    return (F.softmax(a.sum(1) * (1.0 / (c * temperature)), dim=1),
            F.softmax(a.sum(2) * (1.0 / (h * w * temperature)), dim=1))


def attention(feat: torch.Tensor, temperature: float):
    """Spatial and channel attention of ``feat`` (N,C,H,W) (Eq. 5-8).

    Returns A_S (N,H,W) = H*W*softmax_hw(mean_c|F| / T), summing to H*W, and
    A_C (N,C) = C*softmax_c(mean_hw|F| / T), summing to C.
    """
    n, c, h, w = feat.shape
    p_s, p_c = _softmaxes(feat, temperature)
    return (h * w) * p_s.view(n, h, w), c * p_c


class GcBlock(nn.Module):
    """Global relation module R (Eq. 12): R(F) = F + W_v2(ReLU(LN(W_v1(sum_j softmax(W_k F)_j F_j)))).

    Only the last conv is zero-initialised, so R(F) = F at init and both convs still learn.
    :meth:`delta` returns the added term (N,C) so callers can avoid full-size temporaries.
    """

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

    def delta(self, feat: torch.Tensor) -> torch.Tensor:
        """(N,C,H,W) -> (N,C): the global context term that R adds to every position."""
        n, c = feat.shape[:2]
        flat = feat.reshape(n, c, -1)
        # W_k F + b: the C->1 context conv as one batched matrix-vector product with its bias (a 1-channel conv is
        # slow in oneDNN/cuDNN), (N,1,HW)
        logits = torch.baddbmm(self.context.bias.view(1, 1, 1), self.context.weight.view(1, 1, c).expand(n, 1, c), flat)
        ctx = torch.bmm(flat, F.softmax(logits, dim=2).transpose(1, 2)).view(n, c)  # (N,C)
        # the transform's 1x1 convs on a 1x1 map, as the matrix products they are (same parameters, fewer kernels)
        conv1, norm, _, conv2 = self.transform
        hidden = conv1.out_channels
        x = F.linear(ctx, conv1.weight.view(hidden, c), conv1.bias)
        x = F.relu(F.layer_norm(x, (hidden,), norm.weight.view(-1), norm.bias.view(-1), norm.eps))
        return F.linear(x, conv2.weight.view(c, hidden), conv2.bias)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        return feat + self.delta(feat)[:, :, None, None]


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

    forward(student_feat (N,Cs,H,W), teacher_feat (N,Ct,H,W), boxes (M,4) normalised xyxy, batch_idx (M,),
    masks=None) -> dict of 0-d fp32 tensors: the weighted terms ``fg``, ``bg``, ``at``, ``gl`` (each summed over the
    level and divided by N) and their sum ``total``. ``masks``: this level's (fg, bg) of Eq. 2-4 when the caller built
    them (:class:`FGDPyramid` builds every level's in one pass).
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
    ):
        super().__init__()
        self.temperature = float(temperature)
        self.weights = {"fg": float(fg), "bg": float(bg), "at": float(at), "gl": float(gl)}
        self.register_buffer("weight_vec", torch.tensor([self.weights[k] for k in TERMS]), persistent=False)
        self.official_rounding = official_rounding
        self.spatial, self.channel = spatial, channel
        self.split, self.norm, self.mse = split, norm, mse
        self.align = (
            nn.Conv2d(student_channels, teacher_channels, 1) if student_channels != teacher_channels else nn.Identity()
        )
        self.gc_s = GcBlock(teacher_channels)
        self.gc_t = GcBlock(teacher_channels)

    @property
    def needs_masks(self) -> bool:
        """Whether the box masks of Eq. 2-4 are used (the pyramid builds every level's in one pass)."""
        return self.split and not self.mse

    def extra_repr(self) -> str:
        return f"T={self.temperature}, " + ", ".join(f"{k}={v}" for k, v in self.weights.items())

    def forward(self, student_feat, teacher_feat, boxes, batch_idx, masks=None):
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
                zero = fs.new_zeros(())
                fg = self.weights["fg"] * feature_mse(fs, ft)
                return {"fg": fg, "bg": zero, "at": zero, "gl": zero, "total": fg}

            with torch.no_grad():
                ps_t, pc_t = _softmaxes(ft, self.temperature)  # A_S / HW, A_C / C of the teacher (Eq. 5-8)
                if self.split:
                    m_fg, m_bg = masks or fgd_masks(boxes.to(ft.device), batch_idx, n, h, w, self.official_rounding)
                    m = torch.stack([m_fg.view(n, -1), m_bg.view(n, -1)], 2)  # (N,HW,2)
                else:
                    m = torch.cat([ft.new_full((n, h * w, 1), 1.0 / (h * w)), ft.new_zeros(n, h * w, 1)], 2)
                ws = ps_t * (h * w) if self.spatial else torch.ones_like(ps_t)  # A_S
                wc = pc_t * c if self.channel else torch.ones_like(pc_t)  # A_C
                # (N,HW,3): spatial weights of fg, bg and the unweighted sum used by the global term
                spatial = torch.cat([m * ws.unsqueeze(2), ft.new_ones(n, h * w, 1)], 2)

            d = (ft - fs).view(n, c, -1)  # D = F_t - F_s', the one full-size temporary besides its square
            sums = torch.bmm(d.square(), spatial)  # (N,C,3): sum_hw of D^2 * {A_S M_fg, A_S M_bg, 1}
            focal = (sums[:, :, :2] * wc.unsqueeze(2)).sum((0, 1))  # (2,): Eq. 9 foreground, background

            ps_s, pc_s = _softmaxes(fs, self.temperature)
            at = (ps_s - ps_t).abs().sum() * (h * w) + (pc_s - pc_t).abs().sum() * c  # Eq. 10

            # Eq. 11: sum (R_t(F_t) - R_s(F_s'))^2 with R(F) = F + delta (N,C): expanded per (n,c) as
            # sum_hw D^2 + 2 delta sum_hw D + HW delta^2, D = F_t - F_s', delta = delta_t - delta_s.
            delta = self.gc_t.delta(ft) - self.gc_s.delta(fs)
            gl = (sums[:, :, 2] + (2 * d.sum(2) + (h * w) * delta) * delta).clamp(min=0).sum()

            terms = torch.cat([focal, at.view(1), gl.view(1)]) * (self.weight_vec / n)  # weighted, per image
            out = dict(zip(TERMS, terms.unbind()))
            out["total"] = terms.sum()
        return out


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
            sizes = [f.shape[-2:] for f in teacher_feats]
            masks = fgd_masks_levels(boxes.to(teacher_feats[0].device), batch_idx, teacher_feats[0].shape[0], sizes,
                                     first.official_rounding)
        outs = [level(fs, ft, boxes, batch_idx, m)
                for level, fs, ft, m in zip(self.levels, student_feats, teacher_feats, masks)]
        totals = torch.stack([o["total"] for o in outs])
        if self.level_norm:
            w = self.level_weights(totals)
            outs = [{k: wi * o[k] for k in TERMS} for wi, o in zip(w, outs)]
            totals = totals * w
        result = {k: sum(o[k] for o in outs) for k in TERMS}
        return {**result, "total": totals.sum(), "levels": totals.detach()}
