"""Foreground and background masks of FGD (Eq. 2-4): which feature cells each box covers, and their weights.

Pure PyTorch. Boxes are normalised xyxy of the input image, so one set of boxes serves every pyramid level.
"""

from __future__ import annotations

import math

import torch

__all__ = ["fgd_masks", "fgd_masks_loop"]


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
