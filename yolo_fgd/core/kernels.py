"""Fused Triton kernels of one FGD level (the two full-size passes of :class:`~yolo_fgd.core.fgd._Level`).

Where they run: on CUDA tensors when Triton imports, automatically; everywhere else the PyTorch code of ``_Level``
runs (the fallback, same values). ``YOLO_FGD_KERNEL=torch`` forces the fallback, ``YOLO_FGD_KERNEL=triton`` forces the
kernels (on CPU only under ``TRITON_INTERPRET=1``, Triton's interpreter: how the tests check kernel against fallback
on a machine without GPU), ``YOLO_FGD_KERNEL=reference`` runs the plain-autograd loss of :mod:`.reference`. A kernel
that fails (a Triton or driver it cannot compile for) logs one warning and the fallback takes over for the rest of the
run; so does one whose first output for a shape differs from PyTorch's on a slice of the live inputs (a self-check,
once per shape and process), so a wrong kernel cannot pass silently.

- :func:`row_sums`: one read of F_s' and F_t (N,C,P) -> (N,C,6): sum_p D^2 A_S M_fg, sum_p D^2 A_S M_bg,
  sum_p e^2, sum_p e, sum_p |F_s'| and sum_p |F_t| (D = F_t - F_s', e = (F_t + delta_t) - F_s' - delta_s = R(F_t) -
  R(F_s') with delta_s, delta_t (N,C) the GcBlocks' terms), the sums of Eq. 9-11 and of Eq. 6's channel attentions.
- :func:`level_grad`: one read of F_s' and F_t -> dL/dF_s' (N,C,P), every term of Eq. 9-12 at once from per-row
  (N,C) and per-position (N,P) factors computed by the caller.
"""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from functools import lru_cache

import torch

__all__ = ["enabled", "level_grad", "row_sums"]

LOG = logging.getLogger("ultralytics")  # Ultralytics' LOGGER, without importing Ultralytics into the core
MODES = ("auto", "torch", "triton", "reference")
_failed: list[str] = []  # the first failure, if a kernel failed: the fallback runs from then on


@lru_cache(maxsize=1)
def _kernels():
    """The jitted kernels, built at first use (so ``TRITON_INTERPRET`` set before the first call is honoured)."""
    import triton
    import triton.language as tl

    @triton.jit
    def row_sums_kernel(fs_ptr, ft_ptr, cols_ptr, ds_ptr, dt_ptr, out_ptr, C, P, cols_sn, cols_sk,
                        BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # n * C + c
        n = row // C
        delta_s = tl.load(ds_ptr + row)
        delta_t = tl.load(dt_ptr + row)
        acc = tl.zeros([BLOCK], tl.float32)
        fg, bg, e_sq, e_sum, abs_s, abs_t = acc, acc, acc, acc, acc, acc
        for start in range(0, P, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < P
            s = tl.load(fs_ptr + row * P + offs, mask=m, other=0.0)
            t = tl.load(ft_ptr + row * P + offs, mask=m, other=0.0)
            d = t - s
            sq = d * d
            fg += sq * tl.load(cols_ptr + n * cols_sn + offs, mask=m, other=0.0)
            bg += sq * tl.load(cols_ptr + n * cols_sn + cols_sk + offs, mask=m, other=0.0)
            e = tl.where(m, (t + delta_t) - s - delta_s, 0.0)  # R(F_t) - R(F_s') of Eq. 11, the official order
            e_sq += e * e
            e_sum += e
            abs_s += tl.abs(s)
            abs_t += tl.abs(t)
        tl.store(out_ptr + row * 6, tl.sum(fg, 0))
        tl.store(out_ptr + row * 6 + 1, tl.sum(bg, 0))
        tl.store(out_ptr + row * 6 + 2, tl.sum(e_sq, 0))
        tl.store(out_ptr + row * 6 + 3, tl.sum(e_sum, 0))
        tl.store(out_ptr + row * 6 + 4, tl.sum(abs_s, 0))
        tl.store(out_ptr + row * 6 + 5, tl.sum(abs_t, 0))

    @triton.jit
    def level_grad_kernel(fs_ptr, ft_ptr, rows_ptr, pos_ptr, out_ptr, C, P, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        n = row // C
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = offs < P
        s = tl.load(fs_ptr + row * P + offs, mask=m, other=0.0)
        d = tl.load(ft_ptr + row * P + offs, mask=m, other=0.0) - s
        a = tl.load(rows_ptr + row * 6)  # the per-row factors: see level_grad
        b = tl.load(rows_ptr + row * 6 + 1)
        g_c = tl.load(rows_ptr + row * 6 + 2)
        e = tl.load(rows_ptr + row * 6 + 3)
        g_pooled = tl.load(rows_ptr + row * 6 + 4)
        w_k = tl.load(rows_ptr + row * 6 + 5)
        base = n * 4 * P + offs
        w_sp = tl.load(pos_ptr + base, mask=m, other=0.0)
        g_s = tl.load(pos_ptr + base + P, mask=m, other=0.0)
        attn = tl.load(pos_ptr + base + 2 * P, mask=m, other=0.0)
        g_logits = tl.load(pos_ptr + base + 3 * P, mask=m, other=0.0)
        sign = tl.where(s > 0, 1.0, tl.where(s < 0, -1.0, 0.0))
        g = d * (a + b * w_sp) + sign * (g_c + g_s) + e + g_pooled * attn + w_k * g_logits
        tl.store(out_ptr + row * P + offs, g, mask=m)

    return triton, row_sums_kernel, level_grad_kernel


def mode() -> str:
    """``YOLO_FGD_KERNEL``: auto, torch, triton, or reference (the plain-autograd loss of :mod:`.reference`); an
    unknown value warns once and reads as auto."""
    value = os.environ.get("YOLO_FGD_KERNEL", "auto").lower()
    if value not in MODES:
        _warn_mode(value)
        return "auto"
    return value


def enabled(t: torch.Tensor) -> bool:
    """Whether the fused kernels serve tensors like ``t`` (see the module docstring)."""
    mode_ = mode()
    if _failed or mode_ in {"torch", "reference"} or (mode_ != "triton" and not t.is_cuda):
        return False
    try:
        _kernels()
    except Exception as e:  # no Triton (CPU-only builds, some platforms)
        return _fail(e)
    return True


@lru_cache(maxsize=8)
def _warn_mode(mode: str) -> None:
    LOG.warning(f"yolo-fgd: YOLO_FGD_KERNEL={mode} is not one of {', '.join(MODES)}; using auto")


def _on(t: torch.Tensor):
    """Launch on ``t``'s GPU (Triton launches on the current device), or nowhere in particular on CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else nullcontext()


def _fail(e: Exception) -> bool:
    if not _failed:
        _failed.append(f"{type(e).__name__}: {e}".splitlines()[0][:200])
        LOG.warning(f"yolo-fgd: fused FGD kernels unavailable ({_failed[0]}); using the PyTorch path (same values)")
    return False


def row_sums(fs: torch.Tensor, ft: torch.Tensor, cols: torch.Tensor, delta_s: torch.Tensor,
             delta_t: torch.Tensor) -> torch.Tensor | None:
    """fs, ft (N,C,P), cols (N,2,P) fp32 (any strides between rows), delta_s, delta_t (N,C) the GcBlocks' terms ->
    (N,C,6) sums (see the module docstring); None if the kernel failed or gave other numbers than PyTorch
    (:func:`_verified`)."""
    n, c, p = fs.shape
    out = torch.empty(n, c, 6, device=fs.device, dtype=torch.float32)
    if cols.stride(2) != 1:
        cols = cols.contiguous()
    try:
        triton, kernel, _ = _kernels()
        with _on(fs):
            kernel[(n * c,)](fs.contiguous(), ft.contiguous(), cols, delta_s.contiguous(), delta_t.contiguous(), out,
                             c, p, cols.stride(0), cols.stride(1), BLOCK=512)
    except Exception as e:
        return _fail(e) or None
    return out if _verified("row_sums", out, lambda k: _row_sums_torch(
        fs[:1, :k], ft[:1, :k], cols[:1], delta_s[:1, :k], delta_t[:1, :k]), c, p) else None


def _row_sums_torch(fs, ft, cols, delta_s, delta_t) -> torch.Tensor:
    """:func:`row_sums` in plain PyTorch, fp64 (the self-check's reference on a slice)."""
    fs, ft, cols = fs.double(), ft.double(), cols.double()
    d = ft - fs
    e = d + (delta_t - delta_s).double().unsqueeze(2)
    return torch.stack([(d * d * cols[:, :1]).sum(2), (d * d * cols[:, 1:]).sum(2), (e * e).sum(2), e.sum(2),
                        fs.abs().sum(2), ft.abs().sum(2)], 2)


def level_grad(fs: torch.Tensor, ft: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor | None:
    """dL/dF_s' (N,C,P) = D (a + b w_sp) + sign(F_s') (g_c + g_s) + e + g_pooled attn + w_k g_logits, D = F_t - F_s',
    from rows (N,C,6) = (a, b, g_c, e, g_pooled, w_k) and pos (N,4,P) = (w_sp, g_s, attn, g_logits); None if the kernel
    failed."""
    n, c, p = fs.shape
    out = torch.empty_like(fs)
    try:
        triton, _, kernel = _kernels()
        block = 1024
        with _on(fs):
            kernel[(n * c, triton.cdiv(p, block))](fs.contiguous(), ft.contiguous(), rows.contiguous(),
                                                  pos.contiguous(), out, c, p, BLOCK=block)
    except Exception as e:
        return _fail(e) or None
    return out if _verified("level_grad", out, lambda k: _level_grad_torch(fs[:1, :k], ft[:1, :k], rows[:1, :k],
                                                                           pos[:1]), c, p) else None


def _level_grad_torch(fs, ft, rows, pos) -> torch.Tensor:
    """:func:`level_grad` in plain PyTorch, fp64 (the self-check's reference on a slice)."""
    fs, ft, rows, pos = fs.double(), ft.double(), rows.double(), pos.double()
    a, b, g_c, e, g_pooled, w_k = (rows[:, :, i:i + 1] for i in range(6))
    w_sp, g_s, attn, g_logits = (pos[:, i:i + 1] for i in range(4))
    return (ft - fs) * (a + b * w_sp) + fs.sign() * (g_c + g_s) + e + g_pooled * attn + w_k * g_logits


CHECK_ROWS = 8  # channels of the first image that the self-check recomputes
_checked: dict = {}  # (kernel, C, P, device) -> passed


def _verified(name: str, out: torch.Tensor, reference, channels: int, positions: int) -> bool:
    """On a kernel's first call for a shape (per process), compare its output on the first image's first
    :data:`CHECK_ROWS` channels with ``reference(k)`` (PyTorch, fp64); a mismatch logs one warning and turns the
    kernels off for the rest of the run (the PyTorch path takes over), so a kernel that returns wrong numbers without
    raising cannot go unnoticed."""
    key = (name, channels, positions, str(out.device))
    if key not in _checked:
        k = min(CHECK_ROWS, channels)
        want = reference(k)
        got = out[:1, :k].double()
        err = ((got - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()  # one sync per shape, once
        _checked[key] = err <= 1e-4
        if not _checked[key]:
            _fail(RuntimeError(f"{name} kernel differs from PyTorch by {err:.1e} (relative) at C={channels}, "
                               f"P={positions}"))
    return _checked[key]
