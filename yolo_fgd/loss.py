"""Focal and Global Distillation loss (Yang et al., CVPR 2022, arXiv 2111.11837).

Pure PyTorch, no detector framework import. One :class:`FGDLoss` serves one feature level; the
YOLO trainer and the torchvision path each hold one per level (``nn.ModuleList``).

Notation (paper): F_t teacher feature, F_s' aligned student feature, M foreground/background
mask (Eq. 2-4), A_S / A_C spatial / channel attention (Eq. 5-8), R GcBlock relation (Eq. 11-12).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FGDLoss", "FGDPyramid", "GcBlock", "attention", "fgd_masks", "fgd_masks_loop", "feature_mse", "head_kd"]


def _box_cells(boxes: torch.Tensor, h: int, w: int, official_rounding: bool = False):
    """Integer cell ranges of normalised xyxy ``boxes`` (M,4) on an HxW map.

    Returns ``r0, r1, c0, c1`` (M,) as exclusive-end row/column ranges clamped to the map and
    ``area`` (M,), the cell count that sets each box's weight 1/area (Eq. 2-3).
    Default: columns floor(x1*W) ... ceil(x2*W)-1. ``official_rounding``: yzd-v/FGD's inclusive
    ceil, columns floor(x1*W) ... ceil(x2*W), with the area counted before clamping.
    """
    b = boxes.float().clamp(0.0, 1.0)
    scale = b.new_tensor([w, h, w, h])
    xy = b * scale
    c0, r0 = xy[:, 0].floor(), xy[:, 1].floor()
    c1, r1 = xy[:, 2].ceil(), xy[:, 3].ceil()
    if official_rounding:
        c1, r1 = c1 + 1, r1 + 1
        area = (r1 - r0) * (c1 - c0)
        c1, r1 = c1.clamp(max=w), r1.clamp(max=h)
    else:
        area = (r1 - r0) * (c1 - c0)
    valid = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    return r0, r1, c0, c1, area.clamp(min=1.0), valid


def fgd_masks(boxes: torch.Tensor, batch_idx: torch.Tensor, n: int, h: int, w: int, official_rounding: bool = False):
    """Foreground and background masks (Eq. 2-4), vectorised, no host sync.

    Args:
        boxes: (M,4) normalised xyxy of the input image; zero-area rows are padding and ignored.
        batch_idx: (M,) image index of each box; rows outside [0, n) are ignored.
        n, h, w: batch size and map size.

    Returns:
        fg (N,H,W): 1/(cells of the box) where covered, the smallest box winning on overlaps.
        bg (N,H,W): 1/N_bg on each image's uncovered cells (zero where an image has none).
    """
    device = boxes.device
    fg = torch.zeros(n, h, w, device=device, dtype=torch.float32)
    if boxes.numel():
        r0, r1, c0, c1, area, valid = _box_cells(boxes, h, w, official_rounding)
        bi = batch_idx.to(device=device, dtype=torch.long).view(-1)
        valid = valid & (bi >= 0) & (bi < n)
        weight = valid.float() / area  # (M,)
        rows = torch.arange(h, device=device, dtype=torch.float32)
        cols = torch.arange(w, device=device, dtype=torch.float32)
        in_r = ((rows[None] >= r0[:, None]) & (rows[None] < r1[:, None])).float() * weight[:, None]  # (M,H)
        in_c = ((cols[None] >= c0[:, None]) & (cols[None] < c1[:, None])).float()  # (M,W)
        index = bi.clamp(0, n - 1)
        step = max(1, (1 << 17) // (h * w))  # boxes per chunk: keep the (chunk,H,W) block cache-sized
        for i in range(0, index.shape[0], step):  # chunks of boxes, a shape-only loop (no sync)
            per_box = torch.bmm(in_r[i : i + step, :, None], in_c[i : i + step, None, :])  # outer products
            idx = index[i : i + step, None, None].expand(-1, h, w)
            fg = fg.scatter_reduce(0, idx, per_box, reduce="amax", include_self=True)
    is_bg = (fg == 0).float()
    n_bg = is_bg.sum((1, 2), keepdim=True)
    bg = is_bg / n_bg.clamp(min=1.0)
    return fg, bg


def fgd_masks_loop(boxes: torch.Tensor, batch_idx: torch.Tensor, n: int, h: int, w: int, official_rounding: bool = False):
    """Per-image, per-box Python reference of :func:`fgd_masks` (tests and benchmarks only)."""
    fg = torch.zeros(n, h, w)
    boxes, batch_idx = boxes.detach().float().cpu(), batch_idx.detach().long().cpu().view(-1)
    for i in range(n):
        for box in boxes[batch_idx == i]:
            x1, y1, x2, y2 = (min(max(float(v), 0.0), 1.0) for v in box)
            if x2 <= x1 or y2 <= y1:
                continue
            c0, r0 = math.floor(x1 * w), math.floor(y1 * h)
            c1, r1 = math.ceil(x2 * w), math.ceil(y2 * h)
            if official_rounding:
                c1, r1 = c1 + 1, r1 + 1
                area = (r1 - r0) * (c1 - c0)
            else:
                area = (r1 - r0) * (c1 - c0)
            r1, c1 = min(r1, h), min(c1, w)
            fg[i, r0:r1, c0:c1] = torch.clamp(fg[i, r0:r1, c0:c1], min=1.0 / max(area, 1))
    bg = torch.zeros(n, h, w)
    for i in range(n):
        cells = fg[i] == 0
        if cells.any():
            bg[i][cells] = 1.0 / cells.sum()
    return fg, bg


def attention(feat: torch.Tensor, temperature: float):
    """Spatial and channel attention of ``feat`` (N,C,H,W) (Eq. 5-8).

    Returns A_S (N,H,W) = H*W*softmax_hw(mean_c|F| / T), summing to H*W, and
    A_C (N,C) = C*softmax_c(mean_hw|F| / T), summing to C.
    """
    n, c, h, w = feat.shape
    a = feat.abs()
    spatial = a.mean(1).view(n, -1)
    channel = a.mean((2, 3))
    a_s = (h * w) * F.softmax(spatial / temperature, dim=1)
    a_c = c * F.softmax(channel / temperature, dim=1)
    return a_s.view(n, h, w), a_c


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
        # W_k F: the C->1 context conv as a matrix-vector product (a 1-channel conv is slow in oneDNN/cuDNN)
        logits = torch.matmul(self.context.weight.view(1, 1, c), flat).view(n, -1) + self.context.bias
        ctx = torch.bmm(flat, F.softmax(logits, dim=1).unsqueeze(2))  # (N,C,1)
        return self.transform(ctx.view(n, c, 1, 1)).view(n, c)

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


def _side_distances(dist: torch.Tensor, reg_max: int) -> torch.Tensor:
    """(N,4*reg_max,A) bin logits -> (N,4,A) expected distance per side (DFL decoding); reg_max 1: as given."""
    if reg_max == 1:
        return dist
    n, _, a = dist.shape
    bins = torch.arange(reg_max, device=dist.device, dtype=dist.dtype).view(1, 1, reg_max, 1)
    return (dist.view(n, 4, reg_max, a).softmax(2) * bins).sum(2)


def head_kd(s_scores, t_scores, s_dist, t_dist, s_reg: int, t_reg: int | None = None, temperature: float = 1.0):
    """Response distillation on a dense head (not part of FGD; the YOLO adapter's companion term).

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
            per_anchor = (_side_distances(td, t_reg) - _side_distances(sd, s_reg)).abs().sum(1)
        box = (per_anchor * weight).sum() / weight.sum().clamp(min=1e-6)
    return {"cls": cls, "box": box}


class FGDLoss(nn.Module):
    """FGD for one feature level: alpha*L_fg + beta*L_bg + gamma*L_at + lambda*L_global (Eq. 9-13).

    Args:
        student_channels, teacher_channels: Cs, Ct. A 1x1 conv (with bias) aligns Cs to Ct when they differ.
        temperature: T of Eq. 5-6.
        alpha, beta, gamma, lambda_: weights of the four terms in ``total``.
        official_rounding: box-to-cell mapping of the official code (inclusive ceil).
        spatial_attention, channel_attention: use A_S / A_C in Eq. 9 (ablations, paper Table 5);
            when off the map is replaced by ones.
        split: separate fg/bg masks (paper Table 1). False puts every cell at weight 1/(H*W) in ``fg``
            and leaves ``bg`` zero.
        norm: standardise F_t and F_s' per image and channel over H*W before every term
            (the feature normalisation PaddleDetection's FGD offers; off in the paper).
        mse: plain feature distillation instead (Eq. 1, the paper's baseline): ``fg`` = sum (F_t - F_s')^2 / N,
            ``total`` = alpha * fg, the other terms zero (no attention, no GcBlock work).

    forward(student_feat (N,Cs,H,W), teacher_feat (N,Ct,H,W), boxes (M,4) normalised xyxy,
    batch_idx (M,)) -> dict of 0-d fp32 tensors 'fg', 'bg', 'attention', 'global' (unweighted,
    each summed and divided by N) and 'total'.
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        temperature: float = 0.5,
        alpha: float = 2e-3,
        beta: float = 1e-3,
        gamma: float = 1e-3,
        lambda_: float = 1e-5,
        official_rounding: bool = False,
        spatial_attention: bool = True,
        channel_attention: bool = True,
        split: bool = True,
        norm: bool = False,
        mse: bool = False,
    ):
        super().__init__()
        self.temperature = float(temperature)
        self.alpha, self.beta, self.gamma, self.lambda_ = float(alpha), float(beta), float(gamma), float(lambda_)
        self.official_rounding = official_rounding
        self.spatial_attention, self.channel_attention = spatial_attention, channel_attention
        self.split, self.norm, self.mse = split, norm, mse
        self.align = (
            nn.Conv2d(student_channels, teacher_channels, 1) if student_channels != teacher_channels else nn.Identity()
        )
        self.gc_s = GcBlock(teacher_channels)
        self.gc_t = GcBlock(teacher_channels)

    def extra_repr(self) -> str:
        return (
            f"T={self.temperature}, alpha={self.alpha}, beta={self.beta}, gamma={self.gamma}, lambda_={self.lambda_}"
        )

    def forward(self, student_feat, teacher_feat, boxes, batch_idx):
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
                mse, zero = feature_mse(fs, ft), fs.new_zeros(())
                return {"fg": mse, "bg": zero, "attention": zero, "global": zero, "total": self.alpha * mse}

            with torch.no_grad():
                as_t, ac_t = attention(ft, self.temperature)
                if self.split:
                    m_fg, m_bg = fgd_masks(boxes.to(ft.device), batch_idx, n, h, w, self.official_rounding)
                else:
                    m_fg, m_bg = ft.new_full((n, h, w), 1.0 / (h * w)), ft.new_zeros(n, h, w)
                ws_ = as_t if self.spatial_attention else torch.ones_like(as_t)
                wc_ = ac_t if self.channel_attention else torch.ones_like(ac_t)
                # (N,HW,3): spatial weights of fg, bg and the unweighted sum used by the global term
                spatial = torch.stack(
                    [(ws_ * m_fg).view(n, -1), (ws_ * m_bg).view(n, -1), ft.new_ones(n, h * w)], dim=2
                )

            diff = ft - fs  # (N,C,H,W), the one full-size temporary besides its square
            d = diff.view(n, c, -1)
            sums = torch.bmm(d.square(), spatial)  # (N,C,3): sum_hw of D^2 * {A_S M_fg, A_S M_bg, 1}
            fg = (wc_ * sums[:, :, 0]).sum() / n  # Eq. 9, foreground
            bg = (wc_ * sums[:, :, 1]).sum() / n  # Eq. 9, background

            as_s, ac_s = attention(fs, self.temperature)
            at = ((as_s - as_t).abs().sum() + (ac_s - ac_t).abs().sum()) / n  # Eq. 10

            # Eq. 11: sum (R_t(F_t) - R_s(F_s'))^2 with R(F) = F + delta (N,C): expanded per (n,c) as
            # sum_hw D^2 + 2 delta sum_hw D + HW delta^2, D = F_t - F_s', delta = delta_t - delta_s.
            delta = self.gc_t.delta(ft) - self.gc_s.delta(fs)
            per_nc = sums[:, :, 2] + 2 * delta * d.sum(2) + (h * w) * delta.square()
            glob = per_nc.clamp(min=0).sum() / n

            total = self.alpha * fg + self.beta * bg + self.gamma * at + self.lambda_ * glob
        return {"fg": fg, "bg": bg, "attention": at, "global": glob, "total": total}


class FGDPyramid(nn.Module):
    """FGD over a feature pyramid: one :class:`FGDLoss` per level, summed (the paper distils every FPN level).

    Args:
        student_channels, teacher_channels: per-level channel counts, same length.
        level_norm: weight level l by mean_k(m_k) / m_l, m_l a running mean (momentum 0.99, detached) of its weighted
            total, so every level contributes alike while the sum keeps its scale (the paper weighs levels equally by
            their raw sums, where the largest map dominates).
        **kwargs: forwarded to every :class:`FGDLoss` (weights, temperature, ablation switches).

    forward(student_feats [L x (N,Cs_l,H_l,W_l)], teacher_feats [L x (N,Ct_l,H_l,W_l)], boxes (M,4), batch_idx (M,))
    -> dict with 'total' (sum over levels of each level's weighted total), the weighted terms summed over levels
    'fg', 'bg', 'attention', 'global', and 'levels' (L,) each level's weighted total (detached).
    """

    def __init__(self, student_channels, teacher_channels, level_norm: bool = False, **kwargs):
        super().__init__()
        if len(student_channels) != len(teacher_channels):
            raise ValueError(
                f"FGD needs the same number of levels in student ({len(student_channels)}) and teacher "
                f"({len(teacher_channels)})"
            )
        self.levels = nn.ModuleList(FGDLoss(cs, ct, **kwargs) for cs, ct in zip(student_channels, teacher_channels))
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
        outs = [level(fs, ft, boxes, batch_idx) for level, fs, ft in zip(self.levels, student_feats, teacher_feats)]
        totals = torch.stack([o["total"] for o in outs])
        w = self.level_weights(totals)
        terms = {}
        for k, attr in (("fg", "alpha"), ("bg", "beta"), ("attention", "gamma"), ("global", "lambda_")):
            terms[k] = sum(wi * getattr(level, attr) * o[k].detach() for wi, level, o in zip(w, self.levels, outs))
        totals = totals * w
        return {"total": totals.sum(), **terms, "levels": totals.detach()}
