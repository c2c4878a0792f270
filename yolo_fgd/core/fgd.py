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
from torch.autograd.function import once_differentiable

from ..cfg.distill import TERMS
from . import kernels, reference
from .masks import level_masks

__all__ = ["FGDLoss", "FGDPyramid", "GcBlock", "TERMS", "attention", "feature_mse", "standardise", "term_dict"]



def _attn_softmax(abs_sums: torch.Tensor, count: int, temperature: float) -> torch.Tensor:
    """(..., K) sums of |F| over ``count`` values each -> softmax_K(mean |F| / T) (Eq. 5-6 without the factor K);
    ``abs_sums`` is scaled in place."""
    return F.softmax(abs_sums.mul_(1.0 / (count * temperature)), dim=-1)


def abs_sums(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N,C,P) -> (sum_c |x| (N,P), sum_p |x| (N,C)), each to ~1e-7 relative in fp32, the official code's accuracy.

    On CPU both come from one |x| temporary: ``linalg.vector_norm(x, 1)`` accumulates long sequential runs there
    (4e-6 relative over P = 6400 against 1.6e-7 for ``abs().sum()``), which the softmax of Eq. 6 turns into gradient
    error of 2e-3 at 80x80. CUDA reduces in a tree, so there the norms serve without the temporary."""
    if x.is_cuda:
        return torch.linalg.vector_norm(x, 1, dim=1), torch.linalg.vector_norm(x, 1, dim=2)
    a = x.abs()
    return a.sum(1), a.sum(2)


def attention(feat: torch.Tensor, temperature: float):
    """Spatial and channel attention of ``feat`` (N,C,H,W) (Eq. 5-8).

    Returns A_S (N,H,W) = H*W*softmax_hw(mean_c|F| / T), summing to H*W, and
    A_C (N,C) = C*softmax_c(mean_hw|F| / T), summing to C.
    """
    n, c, h, w = feat.shape
    s_hw, s_c = abs_sums(feat.reshape(n, c, -1))
    p_s = _attn_softmax(s_hw, c, temperature)
    p_c = _attn_softmax(s_c, h * w, temperature)
    return (h * w) * p_s.view(n, h, w), c * p_c


def term_dict(terms: torch.Tensor) -> dict:
    """(4,) weighted terms in :data:`TERMS` order -> dict of 0-d tensors, one per term, and their sum ``total``."""
    return {**dict(zip(TERMS, terms.unbind())), "total": terms.sum()}


# --- the private aten ops, in one place ------------------------------------------------------------------------
# Each is the backward (or forward with statistics) of a public op, written as one aten call because the public formula
# costs 2-4x the dispatched ops on these small tensors and the loss is dispatch-bound on a GPU. Their signatures have
# changed between PyTorch releases (``_softmax_backward_data`` took ``input_dtype`` from 1.11): ``tests/test_loss.py``
# checks each against its formula in public ops, so a change fails there, loudly, not in a wrong gradient.
def softmax_grad(g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Backward of p = softmax(z) over the last dim: dL/dz = p (g - <g, p>) for dL/dp = g."""
    return torch._softmax_backward_data(g, p, p.dim() - 1, p.dtype)


def relu_grad(g: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Backward of out = relu(x): g where out > 0, else 0."""
    return torch.ops.aten.threshold_backward(g, out, 0)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> tuple:
    """LayerNorm over the last dim of x (N,H): x_hat weight + bias, x_hat = (x - mean) / sqrt(var + eps), and the
    statistics its backward needs (mean, rstd: (N,1) each)."""
    out, mean, rstd = torch.native_layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return out, (mean, rstd)


def layer_norm_grad(g, x, mean, rstd, weight, bias) -> tuple:
    """Backward of :func:`layer_norm` for dL/dout = g (N,H): (dx (N,H), dweight (H,), dbias (H,)) with
    dx = rstd (g w - mean(g w) - x_hat mean(g w x_hat)), dweight = sum_n g x_hat, dbias = sum_n g."""
    return torch.ops.aten.native_layer_norm_backward(g, x, [x.shape[-1]], mean, rstd, weight, bias,
                                                     [True, True, True])


def _gc_forward(flat, w_k, b_k, w_1, b_1, ln_w, ln_b, w_2, b_2, eps):
    """GcBlock's context term (Eq. 12 without the residual F) from flat (N,C,P) and the block's 8 parameters as
    stored (:meth:`GcBlock.params`) -> (N,C) W_v2 ReLU(LN(W_v1 sum_p softmax_p(W_k F)_p F_p)), and what
    :func:`_gc_backward` needs (:data:`GC_SAVED` tensors). The 1x1 convs on a 1x1 map are the matrix products they are
    (a 1-channel conv is slow in oneDNN/cuDNN); b_k, added to every logit of a softmax, changes nothing and is left
    out."""
    n, c, _ = flat.shape
    h = b_1.shape[0]
    w_k, w_1, w_2 = w_k.view(1, 1, c), w_1.view(h, c), w_2.view(c, h)
    attn = F.softmax(torch.bmm(w_k.expand(n, 1, c), flat), dim=2)  # (N,1,P)
    pooled = torch.bmm(flat, attn.transpose(1, 2)).view(n, c)  # (N,C)
    x = F.linear(pooled, w_1, b_1)  # (N,H)
    normed, stats = layer_norm(x, ln_w.view(h), ln_b.view(h), eps)
    act = normed.relu_()
    return F.linear(act, w_2, b_2), (flat, attn, pooled, x, *stats, act, w_k, w_1, ln_w, ln_b, w_2)


GC_SAVED = 12  # tensors _gc_forward saves: flat, attn, pooled, x, LN's mean and rstd, act, w_k, w_1, ln_w, ln_b, w_2
GC_ATTN, GC_WK = 1, 7  # where attn (N,1,P) and w_k (1,1,C) stand among them


def _gc_backward(grad, saved):
    """Gradients of :func:`_gc_forward` from grad (N,C): the 8 parameters' (shaped as stored), and g_pooled (N,C),
    g_logits (N,1,P), whose rank-2 product g_pooled x attn + w_k x g_logits is the gradient of flat (left to the caller:
    :func:`_gc_flat_grad`, or the fused kernel). The gradient of b_k is exactly zero (softmax is shift-invariant)."""
    flat, attn, pooled, x, mean, rstd, act, w_k, w_1, ln_w, ln_b, w_2 = saved
    h = x.shape[1]
    g_norm = relu_grad(torch.mm(grad, w_2), act)  # (N,H)
    g_x, g_ln_w, g_ln_b = layer_norm_grad(g_norm, x, mean, rstd, ln_w.view(h), ln_b.view(h))
    g_pooled = torch.mm(g_x, w_1)  # (N,C)
    g_logits = softmax_grad(torch.bmm(g_pooled.unsqueeze(1), flat), attn)  # (N,1,P)
    g_w_k = torch.bmm(flat, g_logits.transpose(1, 2)).sum(0)  # (C,1)
    params = (g_w_k.view(1, -1, 1, 1), x.new_zeros(1), torch.mm(g_x.t(), pooled).view(*w_1.shape, 1, 1), g_x.sum(0),
              g_ln_w.view(ln_w.shape), g_ln_b.view(ln_b.shape), torch.mm(grad.t(), act).view(*w_2.shape, 1, 1),
              grad.sum(0))
    return params, g_pooled, g_logits


def _gc_flat_grad(g_flat, g_pooled, g_logits, saved):
    """Add the gradient of flat, g_pooled x attn + w_k x g_logits (N,C,P), to ``g_flat`` in place: one batched
    rank-2 product."""
    attn, w_k = saved[GC_ATTN], saved[GC_WK]
    n, c = g_pooled.shape
    left = torch.cat([g_pooled.unsqueeze(2), w_k.view(1, c, 1).expand(n, c, 1)], 2)  # (N,C,2)
    return g_flat.baddbmm_(left, torch.cat([attn, g_logits], 1))


class _GcDelta(torch.autograd.Function):
    """:func:`_gc_forward` with :func:`_gc_backward` as its backward."""

    @staticmethod
    def forward(ctx, flat, *params_eps):
        out, saved = _gc_forward(flat, *params_eps)
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        with torch.autocast(grad.device.type, enabled=False):  # as forward: fp32 even inside an autocast region
            params, g_pooled, g_logits = _gc_backward(grad.to(saved[0].dtype), saved)
            g_flat = _gc_flat_grad(torch.zeros_like(saved[0]), g_pooled, g_logits, saved) \
                if ctx.needs_input_grad[0] else None
        return (g_flat, *params, None)


class _Level(torch.autograd.Function):
    """The arithmetic of one FGD level after the align conv: the attentions (Eq. 5-8), L_fg and L_bg (Eq. 9), L_at
    (Eq. 10), both GcBlocks and L_gl (Eq. 11-12), with a hand-written backward (checked against the plain-autograd
    :mod:`.reference`). On CUDA (Triton) the full-size work is two fused kernels, one pass over F_s' and F_t each way
    (:mod:`.kernels`); elsewhere PyTorch ops that allocate few full-size tensors and work in place.

    forward(fs (N,C,P) F_s', ft (N,C,P) F_t, masks (N,2,P) M_fg / M_bg of Eq. 2-4, coef (4,5), coef_grad (5,4),
    opts (temperature, spatial, channel, gc_s eps, gc_t eps), then the 8 parameters of gc_s (:meth:`GcBlock.params`)
    and the 8 of gc_t) -> (4,) weighted fg, bg, at, gl = coef @ r, r the level's five raw sums: sum A_C D^2 A_S M_fg,
    the same with M_bg, sum|softmax_p - softmax_p'| and sum|softmax_c - softmax_c'| (student vs teacher, attentions
    over P and C), sum (D + delta)^2; coef folds in the weights, 1/N and the attentions' factors P and C
    (:meth:`FGDLoss.coef`). Gradients go to fs and both GcBlocks, never to ft.

    Eq. 11 per (n,c), with D = F_t - F_s' and delta = delta_t - delta_s (N,C): R(F_t) - R(F_s') is formed per position
    in the official code's order, (F_t + delta_t) - F_s' - delta_s, never stored, and it and its square are summed,
    so L_gl and its gradient keep their digits where the GcBlocks cancel the mean of D (the expanded sum D^2 +
    2 delta sum D + P delta^2 does not, nor does P (mean D + delta) from a separate sum of D). Backward runs with autocast off, so ``backward()`` inside an autocast region computes in fp32 as forward.
    """

    @staticmethod
    def forward(ctx, fs, ft, masks, coef, coef_grad, opts, *gc):
        temperature, spatial, channel, eps_s, eps_t = opts
        n, c, p = ft.shape
        delta_s, saved_s = _gc_forward(fs, *gc[:8], eps_s)
        delta_t, saved_t = _gc_forward(ft, *gc[8:], eps_t)
        delta = delta_t - delta_s
        fast = kernels.enabled(fs)
        sc = None
        if fast and fs.is_cuda:  # sums over C for A_S first (a tree reduction); the kernel gives those over P
            sp = torch.stack([torch.linalg.vector_norm(fs, 1, dim=1), torch.linalg.vector_norm(ft, 1, dim=1)])
        else:
            (sp_s, sc_s), (sp_t, sc_t) = abs_sums(fs), abs_sums(ft)
            sp, sc = torch.stack([sp_s, sp_t]), torch.stack([sc_s, sc_t])
        ps = _attn_softmax(sp, c, temperature)  # (2,N,P): A_S / P of student and teacher (Eq. 5)
        cols = masks * ps[1].unsqueeze(1) if spatial else masks  # (N,2,P): A_S M_fg, A_S M_bg over P
        sums = kernels.row_sums(fs, ft, cols, delta_s, delta_t) if fast else None
        d = None
        if sums is not None:  # (N,C,6) from one pass: the focal sums, sum (D+delta)^2, sum (D+delta), sum |F_s'|, |F_t|
            fg_bg, quad, e_sum, sc = sums[:, :, :2], sums[:, :, 2], sums[:, :, 3], sums[:, :, 4:].permute(2, 0, 1)
        else:
            if sc is None:  # the kernel failed: the PyTorch path's sums over P
                sc = torch.stack([abs_sums(fs)[1], abs_sums(ft)[1]])
            d = ft - fs  # D, kept for the backward
            buf = torch.mul(d, d)
            fg_bg = torch.bmm(buf, cols.transpose(1, 2))
            e = torch.add(ft, delta_t.unsqueeze(2), out=buf).sub_(fs).sub_(delta_s.unsqueeze(2))  # R(F_t) - R(F_s')
            e_sum = e.sum(2)  # sum_p (D + delta)
            quad = e.square_().sum(2)  # sum_p (D + delta)^2
            del buf, e
        pc = _attn_softmax(sc, p, temperature)  # (2,N,C): A_C / C of student and teacher (Eq. 6)
        wc = pc[1] if channel else torch.ones_like(pc[1])
        focal = torch.mm(wc.reshape(1, n * c), fg_bg.reshape(n * c, 2))  # (1,2) Eq. 9 over A_C / C
        err_s, err_c = ps[0] - ps[1], pc[0] - pc[1]
        raw = torch.cat([focal.view(2), torch.linalg.vector_norm(err_s, 1).view(1),  # Eq. 10 over the softmaxes
                         torch.linalg.vector_norm(err_c, 1).view(1), quad.clamp(min=0).sum().view(1)])
        ctx.save_for_backward(d, cols, wc, ps[0], pc[0], err_s, err_c, e_sum, delta, coef_grad, *saved_s, *saved_t)
        return torch.mv(coef, raw)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        with torch.autocast(grad.device.type, enabled=False):
            return _Level.gradients(ctx.saved_tensors, grad.float())

    @staticmethod
    def gradients(saved, grad):
        """The backward of :meth:`forward` from its saved tensors and dL/d(terms) (4,)."""
        d, cols, wc, ps_s, pc_s, err_s, err_c, e_sum, delta, coef_grad = saved[:10]
        saved_s, saved_t = saved[10:10 + GC_SAVED], saved[10 + GC_SAVED:]
        fs, ft = saved_s[0], saved_t[0]
        n, c, p = fs.shape
        # g (5,): dL/dr of the five raw sums times the chain factors of FGDLoss.coef (-2 for the squares of fg, bg
        # and gl; 1/(C T) and 1/(P T) for the attention logits)
        g = torch.mv(coef_grad, grad)
        g_fg_bg, g_at_s, g_at_c, g_gl = g[:2], g[2], g[3], g[4]
        # Eq. 10 through the softmaxes and |F|: d/dlogits = p (g - <g, p>), logits = sum |F| / (C T) or / (P T)
        g_s = softmax_grad(err_s.sign(), ps_s).mul_(g_at_s)  # (N,P)
        g_c = softmax_grad(err_c.sign(), pc_s).mul_(g_at_c)  # (N,C)
        # quad is a sum of squares: the forward's clamp only hides rounding below zero, the gradient is the true one
        g_delta_s = e_sum * g_gl  # (N,C): dL/d delta_s = -dL/d delta_t
        params_s, g_pooled, g_logits = _gc_backward(g_delta_s, saved_s)
        params_t = _gc_backward(g_delta_s.neg(), saved_t)[0]
        w_sp = torch.matmul(g_fg_bg, cols)  # (N,P): A_S M weighted by the fg/bg gradients
        # Eq. 9 and 11: dL/dF_s' = D (A_C w_sp + g_gl) + g_gl delta (the -2 is in g); Eq. 10: sign(F_s') (g_c + g_s);
        # Eq. 12: R_s
        e = delta * g_gl
        g_fs = None
        if kernels.enabled(fs):
            rows = torch.stack([g_gl.expand(n, c), wc, g_c, e, g_pooled, saved_s[GC_WK].view(1, c).expand(n, c)], 2)
            g_fs = kernels.level_grad(fs, ft, rows, torch.stack([w_sp, g_s, saved_s[GC_ATTN].view(n, p),
                                                                 g_logits.view(n, p)], 1))
        if g_fs is None:
            d = ft - fs if d is None else d
            g_fs = torch.baddbmm(g_gl.view(1, 1, 1), wc.unsqueeze(2), w_sp.unsqueeze(1)).mul_(d)  # (N,C,P)
            g_fs.add_(e.unsqueeze(2))
            sign = fs.sign()
            g_fs.addcmul_(sign, g_c.unsqueeze(2)).addcmul_(sign, g_s.unsqueeze(1))
            del sign
            _gc_flat_grad(g_fs, g_pooled, g_logits, saved_s)
        return g_fs, None, None, None, None, None, *params_s, *params_t


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

    def params(self) -> tuple:
        """The 8 parameters in the order :func:`_gc_forward` takes them: W_k, its bias, W_v1, its bias, the LayerNorm's
        weight and bias, W_v2, its bias."""
        conv1, norm, _, conv2 = self.transform
        return (self.context.weight, self.context.bias, conv1.weight, conv1.bias, norm.weight, norm.bias,
                conv2.weight, conv2.bias)

    def delta(self, feat: torch.Tensor) -> torch.Tensor:
        """(N,C,H,W) -> (N,C): the global context term that R adds to every position."""
        return _GcDelta.apply(feat.reshape(*feat.shape[:2], -1), *self.params(), self.transform[1].eps)

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
    ):
        super().__init__()
        self.temperature = float(temperature)
        self.weights = {"fg": float(fg), "bg": float(bg), "at": float(at), "gl": float(gl)}
        self._coef = {}  # (n, p, c, device, weights, T) -> coef, coef_grad (see coef)
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

    def coef(self, n: int, p: int, c: int, device) -> tuple:
        """(coef (4,5), coef_grad (5,4)) of :class:`_Level` for N images of P cells and C channels, cached per shape:
        coef maps the level's raw sums to the weighted terms (weights, 1/N, A_S = P softmax_p, A_C = C softmax_c);
        coef_grad = coef^T with the chain-rule factors of the backward folded in (-2 of the squares, 1/(C T) and
        1/(P T) of the attention logits)."""
        w, t = self.weights, self.temperature
        key = (n, p, c, str(device), *w.values(), t)
        if key not in self._coef:
            f = (p if self.spatial else 1) * (c if self.channel else 1) / n
            entries = {(0, 0): w["fg"] * f, (1, 1): w["bg"] * f, (2, 2): w["at"] * p / n, (2, 3): w["at"] * c / n,
                       (3, 4): w["gl"] / n}
            chain = (-2.0, -2.0, 1.0 / (c * t), 1.0 / (p * t), -2.0)
            coef, coef_grad = torch.zeros(4, 5, device=device), torch.zeros(5, 4, device=device)
            for (i, j), v in entries.items():  # element fills, no host-to-device copy: no sync on CUDA
                coef[i, j], coef_grad[j, i] = v, v * chain[j]
            if len(self._coef) >= 64:  # multi-scale training: a few sizes x levels
                self._coef.clear()
            self._coef[key] = (coef, coef_grad)
        return self._coef[key]

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
            if kernels.mode() == "reference":  # Eq. 9-13 in plain autograd (core/reference.py)
                m = masks.reshape(n, 2, h, w)
                return reference.weighted(fs, ft, m[:, 0], m[:, 1], self.gc_s, self.gc_t, self.weights.values(),
                                          self.temperature, self.spatial, self.channel)
            opts = (self.temperature, self.spatial, self.channel, self.gc_s.transform[1].eps, self.gc_t.transform[1].eps)
            return _Level.apply(fs.reshape(n, c, -1), ft.reshape(n, c, -1), masks, *self.coef(n, h * w, c, ft.device),
                                opts, *self.gc_s.params(), *self.gc_t.params())

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
