"""The FGD loss of one level (Eq. 5-13) in plain autograd, written to be read next to the paper (Yang et al., CVPR
2022) and the official ``FeatureLoss`` (yzd-v/FGD). This is the one definition of the loss: every path trains on it
(:class:`~yolo_fgd.core.fgd.FGDLoss`, the YOLO and torchvision distillers), eagerly or compiled by ``torch.compile``
(:mod:`.compiled`); nothing else computes Eq. 9-12.

Notation: F_t teacher feature, F_s' aligned student feature (N,C,H,W); M_fg / M_bg the masks of Eq. 2-4
(:func:`~yolo_fgd.core.masks.fgd_masks`); T the temperature. Every term is summed over the level and divided by N, as
the official code does (its ``loss_mse`` with ``reduction='sum'``, then ``/ N``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def attention(feat: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 5-8. G^S = mean_c |F| (N,H,W) and G^C = mean_hw |F| (N,C), then
    A_S = H W softmax(G^S / T) (Eq. 7) and A_C = C softmax(G^C / T) (Eq. 8)."""
    n, c, h, w = feat.shape
    value = feat.abs()
    g_s = value.mean(1)  # Eq. 5
    g_c = value.mean(2).mean(2)  # Eq. 6, mean over H then W as the official code
    a_s = h * w * F.softmax((g_s / temperature).view(n, -1), dim=1).view(n, h, w)
    a_c = c * F.softmax(g_c / temperature, dim=1)
    return a_s, a_c


def relation(block: nn.Module, feat: torch.Tensor) -> torch.Tensor:
    """Eq. 12, the GcBlock R(F) = F + W_v2(ReLU(LN(W_v1(sum_j softmax_j(W_k F_j) F_j)))), run through the block's
    own modules (``block.context`` = W_k, ``block.transform`` = W_v1, LN, ReLU, W_v2) as the official ``spatial_pool``
    and ``channel_add_conv`` do."""
    n, c, h, w = feat.shape
    attn = F.softmax(block.context(feat).view(n, 1, h * w), dim=2)  # (N,1,HW)
    context = torch.matmul(feat.view(n, 1, c, h * w), attn.view(n, 1, h * w, 1)).view(n, c, 1, 1)
    return feat + block.transform(context)


def pointwise(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv on flattened positions: W x + b, W (C_out,C_in) from the conv's weight, x (N,C_in,HW) ->
    (N,C_out,HW). The same map as ``conv(x.view(N,C_in,H,W))``, as a matmul Inductor compiles under dynamic sizes
    (its convolution layouts do not: a symbolic stride comparison fails on torch 2.14)."""
    return torch.matmul(conv.weight.flatten(1), x) + conv.bias.view(-1, 1)


def nonlocal_relation(block: nn.Module, feat: torch.Tensor) -> torch.Tensor:
    """The paper's Table 6 alternative to Eq. 12: the embedded-Gaussian Non-local block (Wang et al., CVPR 2018),
    R(F) = F + W_z(sum_j softmax_j(theta(F_i) . phi(F_j)) g(F_j)), theta, phi, g, W_z 1x1 convs (``block.theta``,
    ``block.phi``, ``block.g``, ``block.out``, applied by :func:`pointwise`), the softmax over the H W positions j for
    every position i. Computed transposed: y^T = g(F) softmax_j(phi(F)^T theta(F)) (C',HW) needs no transpose of
    the (HW,C') result."""
    n, c, h, w = feat.shape
    x = feat.flatten(2)  # (N,C,HW)
    theta, phi, g = (pointwise(conv, x) for conv in (block.theta, block.phi, block.g))  # (N,C',HW)
    attn = F.softmax(torch.matmul(phi.transpose(1, 2), theta), dim=1)  # (N,HW_j,HW_i), softmax over j
    return feat + pointwise(block.out, torch.matmul(g, attn)).view(n, c, h, w)


RELATIONS = {"gcblock": relation, "nonlocal": nonlocal_relation}  # a block's ``kind`` -> its R of Eq. 11


def terms(fs: torch.Tensor, ft: torch.Tensor, mask_fg: torch.Tensor, mask_bg: torch.Tensor, gc_s: nn.Module,
          gc_t: nn.Module, temperature: float = 0.5, spatial: bool = True, channel: bool = True) -> torch.Tensor:
    """The four unweighted terms (L_fg, L_bg, L_at, L_gl) (4,) of one level for aligned student features fs and
    teacher features ft (N,C,H,W), masks (N,H,W) and the two relation blocks (GcBlocks, or Non-local blocks for
    Table 6); ``spatial`` / ``channel`` False replace A_S / A_C by ones in Eq. 9 (the ablations of Table 5)."""
    n = ft.shape[0]
    ft = ft.detach()
    s_t, c_t = attention(ft, temperature)  # the teacher's attentions weigh Eq. 9
    s_s, c_s = attention(fs, temperature)
    a_s = s_t if spatial else torch.ones_like(s_t)
    a_c = c_t if channel else torch.ones_like(c_t)
    # Eq. 9: L_fg = sum M_fg A_S A_C (F_t - F_s')^2, L_bg the same with M_bg (the official code: an MSE of features
    # multiplied by the square roots of the masks and attentions)
    w_fg = (mask_fg * a_s).unsqueeze(1).sqrt() * a_c.view(n, -1, 1, 1).sqrt()
    w_bg = (mask_bg * a_s).unsqueeze(1).sqrt() * a_c.view(n, -1, 1, 1).sqrt()
    l_fg = F.mse_loss(fs * w_fg, ft * w_fg, reduction="sum") / n
    l_bg = F.mse_loss(fs * w_bg, ft * w_bg, reduction="sum") / n
    # Eq. 10: L_at = sum |A_C^t - A_C^s| + sum |A_S^t - A_S^s| (the paper's l1 loss over both attentions)
    l_at = (c_s - c_t).abs().sum() / n + (s_s - s_t).abs().sum() / n
    # Eq. 11: L_gl = sum (R(F_t) - R(F_s'))^2, R the GcBlock (Eq. 12) or, for Table 6, the Non-local block
    rel = RELATIONS[getattr(gc_s, "kind", "gcblock")]
    l_gl = F.mse_loss(rel(gc_s, fs), rel(gc_t, ft), reduction="sum") / n
    return torch.stack([l_fg, l_bg, l_at, l_gl])


def weighted(fs, ft, mask_fg, mask_bg, gc_s, gc_t, weights, temperature=0.5, spatial=True, channel=True):
    """Eq. 13: alpha L_fg + beta L_bg + gamma L_at + lambda L_gl as the (4,) weighted terms, ``weights`` the
    (alpha, beta, gamma, lambda) of :class:`~yolo_fgd.core.fgd.FGDLoss` (``fg``, ``bg``, ``at``, ``gl``)."""
    t = terms(fs, ft, mask_fg, mask_bg, gc_s, gc_t, temperature, spatial, channel)
    return t * t.new_tensor(list(weights))
