"""Foreground and background masks of FGD (Eq. 2-4): which feature cells each box covers, and their weights.

Pure PyTorch. Boxes are normalised xyxy of the input image, so one set of boxes serves every pyramid level: the masks
of all levels are built in one pass (a handful of kernels whatever the number of boxes or levels).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

__all__ = ["fgd_masks", "fgd_masks_levels", "fgd_masks_loop", "level_masks"]


def _box_cells(boxes: torch.Tensor, sizes: torch.Tensor, official_rounding: bool = False):
    """Integer cell ranges of normalised xyxy ``boxes`` (M,4) on maps of ``sizes`` (L,2) rows x cols.

    Returns ``r0, r1, c0, c1`` (M,L) as exclusive-end row/column ranges clamped to each map, ``area`` (M,L), the cell
    count that sets each box's weight 1/area (Eq. 2-3), and ``valid`` (M,) for boxes of positive size.
    Default: columns floor(x1*W) ... ceil(x2*W)-1. ``official_rounding``: yzd-v/FGD's inclusive ceil, columns
    floor(x1*W) ... ceil(x2*W), with the area counted before clamping.
    """
    b = boxes.float().clamp(0.0, 1.0)
    scale = sizes.float()[:, [1, 0, 1, 0]]  # (L,4): W, H, W, H
    xy = b[:, None, :] * scale[None]  # (M,L,4)
    c0, r0 = xy[..., 0].floor(), xy[..., 1].floor()
    c1, r1 = xy[..., 2].ceil(), xy[..., 3].ceil()
    if official_rounding:
        c1, r1 = c1 + 1, r1 + 1
    area = (r1 - r0) * (c1 - c0)
    if official_rounding:
        c1, r1 = torch.minimum(c1, scale[None, :, 0]), torch.minimum(r1, scale[None, :, 1])
    valid = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    return r0, r1, c0, c1, area.clamp(min=1.0), valid


@lru_cache(maxsize=32)
def _lines(sizes: tuple, device: str):
    """Row coordinates of all levels laid end to end with their level (2 x (sum H,)), the same for columns
    (2 x (sum W,)), the one-hot level of every cell of all maps laid end to end (sum H*W, L) and the sizes (L,2);
    cached per device, so a batch copies nothing to the device."""
    def coords(k):
        return (torch.cat([torch.arange(s[k], dtype=torch.float32) for s in sizes]),
                torch.cat([torch.full((s[k],), i, dtype=torch.long) for i, s in enumerate(sizes)]))

    cell_level = torch.cat([torch.full((h * w,), i, dtype=torch.long) for i, (h, w) in enumerate(sizes)])
    out = (*coords(0), *coords(1), torch.nn.functional.one_hot(cell_level, len(sizes)).float(), torch.tensor(sizes))
    return tuple(t.to(device) for t in out)


def level_masks(boxes: torch.Tensor, batch_idx: torch.Tensor, n: int, sizes, official_rounding: bool = False):
    """Foreground and background masks (Eq. 2-4) of every level, vectorised, no host sync, no loop over boxes.

    Args:
        boxes: (M,4) normalised xyxy of the input image; zero-area rows are padding and ignored.
        batch_idx: (M,) image index of each box; rows outside [0, n) are ignored.
        n: batch size. sizes: the maps' (H,W), one per level.

    Returns:
        one (N,2,H*W) tensor per level, row 0 M_fg, row 1 M_bg (views into one buffer): M_fg is 1/(cells of the box)
        where covered, the smallest box winning on overlaps; M_bg is 1/N_bg on each image's uncovered cells (zero
        where an image has none).

    All levels are one raster of sum(H*W) cells: each box's weighted coverage of a level's cells is the outer product
    of its row and column coverage, written in place into one (M, sum H*W) buffer, and one scatter-max puts every
    level into the images; the background counts of all levels are one matrix product.
    """
    with torch.autocast(boxes.device.type, enabled=False):  # under AMP the matmul would come back in half precision
        return _masks_levels(boxes.float(), batch_idx, n, sizes, official_rounding)


def fgd_masks_levels(boxes: torch.Tensor, batch_idx: torch.Tensor, n: int, sizes, official_rounding: bool = False):
    """:func:`level_masks` as a list of (fg (N,H,W), bg (N,H,W)) per level."""
    sizes = [(int(h), int(w)) for h, w in sizes]
    return [(m[:, 0].view(n, h, w), m[:, 1].view(n, h, w))
            for m, (h, w) in zip(level_masks(boxes, batch_idx, n, sizes, official_rounding), sizes)]


def _masks_levels(boxes, batch_idx, n, sizes, official_rounding):
    sizes = tuple((int(h), int(w)) for h, w in sizes)
    device = boxes.device
    rows, row_level, cols, col_level, one_hot, size_t = _lines(sizes, str(device))
    cells = [h * w for h, w in sizes]
    out = torch.zeros(n, 2, sum(cells), device=device)  # row 0 M_fg, row 1 M_bg of every level laid end to end
    fg = out[:, 0]
    if boxes.numel():
        r0, r1, c0, c1, area, valid = _box_cells(boxes, size_t, official_rounding)  # (M,L)
        bi = batch_idx.to(device=device, dtype=torch.long).view(-1)
        weight = (valid & (bi >= 0) & (bi < n))[:, None].float() / area  # (M,L)
        in_r = ((rows >= r0[:, row_level]) & (rows < r1[:, row_level])) * weight[:, row_level]  # (M,sum H), weighted
        in_c = ((cols >= c0[:, col_level]) & (cols < c1[:, col_level])).float()  # (M,sum W)
        m = in_r.shape[0]
        per_box = in_r.new_empty(m, sum(cells))  # (M,sum H*W): each box's weight on the cells it covers
        for r, c, dst, (h, w) in zip(in_r.split([h for h, _ in sizes], 1), in_c.split([w for _, w in sizes], 1),
                                     per_box.split(cells, 1), sizes):
            torch.mul(r[:, :, None], c[:, None, :], out=dst.view(m, h, w))  # the outer product of rows and columns
        fg.scatter_reduce_(0, bi.clamp(0, n - 1)[:, None].expand_as(per_box), per_box, reduce="amax", include_self=True)
    is_bg = (fg == 0).float()
    counts = (is_bg @ one_hot).clamp_(min=1.0)  # (N,L): background cells per image and level (N_bg of Eq. 4)
    torch.div(is_bg, counts @ one_hot.t(), out=out[:, 1])
    return list(out.split(cells, 2))


def fgd_masks(boxes: torch.Tensor, batch_idx: torch.Tensor, n: int, h: int, w: int, official_rounding: bool = False):
    """Foreground and background masks (Eq. 2-4) of one (H,W) level: :func:`fgd_masks_levels` of that level."""
    return fgd_masks_levels(boxes, batch_idx, n, [(h, w)], official_rounding)[0]


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
            r1, c1 = min(r1, h), min(c1, w)
            fg[i, r0:r1, c0:c1] = torch.clamp(fg[i, r0:r1, c0:c1], min=1.0 / max(area, 1))
    bg = torch.zeros(n, h, w)
    for i in range(n):
        cells = fg[i] == 0
        if cells.any():
            bg[i][cells] = 1.0 / cells.sum()
    return fg, bg
