"""FGD loss core: hand values, mask semantics, invariances, gradients (paper Eq. 2-12)."""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from yolo_fgd import FGDLoss, FGDPyramid
from yolo_fgd.core import GcBlock, attention, fgd_masks, fgd_masks_loop


def px(*xyxy, size=64):
    return torch.tensor([[v / size for v in xyxy]])


def test_hand_mask_values():
    fg, bg = fgd_masks(px(8, 8, 24, 24), torch.tensor([0]), 1, 8, 8)
    expect = torch.zeros(8, 8)
    expect[1:3, 1:3] = 0.25
    assert torch.equal(fg[0], expect)
    assert torch.allclose(bg[0][fg[0] == 0], torch.full((60,), 1 / 60))
    assert (bg[0][fg[0] > 0] == 0).all()


@pytest.mark.parametrize("box", [(8, 8, 24, 24), (0, 0, 64, 64), (3, 5, 40, 17), (1, 1, 2, 2)])
def test_hand_loss_values(box):
    c = 4
    loss = FGDLoss(c, c, fg=1, bg=1, at=1, gl=1)  # unit weights: the terms are the paper's L_fg, L_bg, L_at, L_gl
    fs, ft = torch.ones(2, c, 8, 8), torch.zeros(2, c, 8, 8)
    boxes = torch.cat([px(*box), px(*box)])
    out = loss(fs, ft, boxes, torch.tensor([0, 1]))
    # teacher attention is uniform (F_t = 0): A_S = 1, A_C = 1, so fg = C per image whatever the box
    assert out["fg"].item() == pytest.approx(c, rel=1e-6)
    bg_expect = 0.0 if box == (0, 0, 64, 64) else c
    assert out["bg"].item() == pytest.approx(bg_expect, rel=1e-6)
    assert out["gl"].item() == pytest.approx(c * 8 * 8, rel=1e-6)
    assert out["at"].item() == pytest.approx(0.0, abs=1e-5)
    assert torch.allclose(out["total"], out["fg"] + out["bg"] + out["at"] + out["gl"])
    # the terms come out weighted: the default weights scale each one
    weighted = FGDLoss(c, c)
    weighted.load_state_dict(loss.state_dict())
    w = weighted(fs, ft, boxes, torch.tensor([0, 1]))
    for k in ("fg", "bg", "at", "gl"):
        assert w[k].item() == pytest.approx(weighted.weights[k] * out[k].item(), rel=1e-5, abs=1e-9)


def test_level_constants_follow_batch_size_weights_and_temperature():
    """The per-shape constants of a level are cached: a new batch size, map size, changed weight or temperature on the
    same instance gives what a fresh instance gives."""
    torch.manual_seed(0)
    loss = FGDLoss(4, 6, fg=1, bg=1, at=1, gl=1)
    with torch.no_grad():
        loss.gc_s.transform[-1].weight.normal_()  # a non-zero global term
    boxes, bi = torch.tensor([[0.1, 0.1, 0.6, 0.6], [0.3, 0.2, 0.9, 0.7], [0.0, 0.5, 0.4, 1.0]]), torch.tensor([0, 1, 2])

    def fresh():
        f = FGDLoss(4, 6, temperature=loss.temperature, **loss.weights)
        f.load_state_dict(loss.state_dict())
        return f

    for n, h, w in ((2, 8, 8), (3, 8, 8), (3, 5, 7)):
        fs, ft = torch.randn(n, 4, h, w), torch.randn(n, 6, h, w)
        terms = loss.vector(fs, ft, boxes, bi)
        torch.testing.assert_close(terms, fresh().vector(fs, ft, boxes, bi))
    loss.weights["at"], loss.temperature = 3.0, 0.25
    fs.requires_grad_()
    got, want = loss.vector(fs, ft, boxes, bi), fresh().vector(fs, ft, boxes, bi)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), fs)[0], torch.autograd.grad(want.sum(), fs)[0])
    assert got[2] != terms[2]


def test_overlap_smallest_box_wins():
    boxes = torch.cat([px(0, 0, 64, 64), px(8, 8, 24, 24)])
    fg, bg = fgd_masks(boxes, torch.tensor([0, 0]), 1, 8, 8)
    assert fg[0, 1, 1] == 0.25 and fg[0, 0, 0] == 1 / 64
    assert bg.sum() == 0  # fully covered: no background cells, all zeros


def test_empty_image_all_background():
    fg, bg = fgd_masks(px(8, 8, 24, 24), torch.tensor([1]), 2, 8, 8)
    assert fg[0].sum() == 0 and torch.allclose(bg[0], torch.full((8, 8), 1 / 64))
    fg, bg = fgd_masks(torch.zeros(0, 4), torch.zeros(0), 2, 4, 4)
    assert fg.sum() == 0 and torch.allclose(bg.sum((1, 2)), torch.ones(2))


def test_padded_zero_rows_ignored():
    boxes = torch.cat([px(8, 8, 24, 24), torch.zeros(3, 4)])
    fg, bg = fgd_masks(boxes, torch.tensor([0, 0, 0, -1]), 1, 8, 8)
    ref, _ = fgd_masks(px(8, 8, 24, 24), torch.tensor([0]), 1, 8, 8)
    assert torch.equal(fg, ref)


def test_boxes_partly_outside_are_clipped_not_dropped():
    box = torch.tensor([[-0.5, -0.2, 0.25, 0.25]])
    fg, _ = fgd_masks(box, torch.tensor([0]), 1, 8, 8)
    expect = torch.zeros(8, 8)
    expect[0:2, 0:2] = 0.25
    assert torch.equal(fg[0], expect)
    fg, _ = fgd_masks(torch.tensor([[1.2, 1.2, 1.5, 1.5]]), torch.tensor([0]), 1, 8, 8)
    assert fg.sum() == 0  # wholly outside: zero area after clipping


def test_official_rounding_inclusive_ceil():
    fg, _ = fgd_masks(px(8, 8, 24, 24), torch.tensor([0]), 1, 8, 8, official_rounding=True)
    expect = torch.zeros(8, 8)
    expect[1:4, 1:4] = 1 / 9
    assert torch.allclose(fg[0], expect)


def test_attention_sums():
    f = torch.randn(3, 5, 6, 7)
    a_s, a_c = attention(f, 0.5)
    assert torch.allclose(a_s.sum((1, 2)), torch.full((3,), 42.0))
    assert torch.allclose(a_c.sum(1), torch.full((3,), 5.0))


def test_zero_when_equal_at_init():
    loss = FGDLoss(8, 8)
    f = torch.randn(2, 8, 6, 6)
    out = loss(f.clone(), f, torch.rand(3, 4).sort(1).values[:, [0, 1, 2, 3]], torch.tensor([0, 1, 1]))
    for k in ("fg", "bg", "at", "gl", "total"):
        assert out[k].item() == pytest.approx(0.0, abs=1e-5), k


def random_boxes(m, gen):
    xy = torch.rand(m, 2, generator=gen) * 1.2 - 0.1
    wh = torch.rand(m, 2, generator=gen) * 0.5
    return torch.cat([xy, xy + wh], 1)


def test_vectorised_masks_equal_loop_reference():
    gen = torch.Generator().manual_seed(0)
    for official in (False, True):
        for h, w in ((8, 8), (5, 13), (20, 10)):
            boxes = random_boxes(40, gen)
            bi = torch.randint(0, 4, (40,), generator=gen)
            fg, bg = fgd_masks(boxes, bi, 4, h, w, official)
            rfg, rbg = fgd_masks_loop(boxes, bi, 4, h, w, official)
            assert torch.allclose(fg, rfg) and torch.allclose(bg, rbg)


def test_batch_permutation_and_duplication_invariance():
    torch.manual_seed(0)
    loss = FGDLoss(4, 6)
    fs, ft = torch.randn(3, 4, 8, 8), torch.randn(3, 6, 8, 8)
    gen = torch.Generator().manual_seed(1)
    boxes, bi = random_boxes(7, gen), torch.tensor([0, 0, 1, 2, 2, 2, 1])
    base = loss(fs, ft, boxes, bi)
    perm = torch.tensor([2, 0, 1])
    inv = torch.argsort(perm)
    out = loss(fs[perm], ft[perm], boxes, inv[bi])
    dup = loss(torch.cat([fs, fs]), torch.cat([ft, ft]), torch.cat([boxes, boxes]), torch.cat([bi, bi + 3]))
    for k in base:
        assert torch.allclose(base[k], out[k], rtol=1e-5), k
        assert torch.allclose(base[k], dup[k], rtol=1e-5), k


def test_gradients_reach_student_align_and_gcblocks_not_teacher():
    torch.manual_seed(0)
    loss = FGDLoss(4, 6, fg=1, bg=1, at=1, gl=1)
    fs = torch.randn(2, 4, 8, 8, requires_grad=True)
    ft = torch.randn(2, 6, 8, 8, requires_grad=True)
    boxes, bi = torch.tensor([[0.1, 0.1, 0.5, 0.6]]), torch.tensor([0])
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    opt = torch.optim.SGD(loss.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        loss(fs, ft, boxes, bi)["total"].backward()
        assert ft.grad is None
        assert fs.grad is not None and fs.grad.abs().sum() > 0
        opt.step()
    after = loss.state_dict()
    for name in ("align.weight", "align.bias", "gc_s.context.weight", "gc_t.context.weight",
                 "gc_s.transform.0.weight", "gc_t.transform.3.weight"):
        assert not torch.equal(before[name], after[name]), name


def test_gcblock_identity_at_init_and_only_last_conv_zero():
    block = GcBlock(8)
    f = torch.randn(2, 8, 5, 5)
    assert torch.equal(block(f), f)
    assert block.transform[0].weight.abs().sum() > 0 and block.context.weight.abs().sum() > 0
    assert block.transform[3].weight.abs().sum() == 0


def test_global_matches_direct_formula():
    torch.manual_seed(0)
    loss = FGDLoss(6, 6)
    for p in loss.parameters():
        torch.nn.init.normal_(p, std=0.3)
    fs, ft = torch.randn(2, 6, 5, 7), torch.randn(2, 6, 5, 7)
    out = loss(fs, ft, torch.zeros(0, 4), torch.zeros(0))
    direct = (loss.gc_t(ft) - loss.gc_s(fs)).square().sum() / 2
    assert out["gl"].item() == pytest.approx(loss.weights["gl"] * direct.item(), rel=1e-4)


def test_state_dict_round_trip():
    a, b = FGDLoss(4, 8), FGDLoss(4, 8)
    for p in a.parameters():
        torch.nn.init.normal_(p)
    b.load_state_dict(a.state_dict())
    fs, ft = torch.randn(1, 4, 4, 4), torch.randn(1, 8, 4, 4)
    box, bi = torch.tensor([[0.1, 0.1, 0.6, 0.6]]), torch.tensor([0])
    assert torch.equal(a(fs, ft, box, bi)["total"], b(fs, ft, box, bi)["total"])


def test_fp16_inputs_give_finite_fp32_loss():
    loss = FGDLoss(4, 8)
    fs, ft = torch.randn(2, 4, 8, 8).half(), torch.randn(2, 8, 8, 8).half()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(fs, ft, torch.tensor([[0.1, 0.1, 0.6, 0.6]]), torch.tensor([1]))
    for v in out.values():
        assert v.dtype == torch.float32 and torch.isfinite(v)


def test_pyramid_under_autocast_equals_fp32():
    """AMP: the pyramid builds every level's masks before the levels turn autocast off; they must stay exact fp32
    (a matmul under autocast would come back in half precision and fail the scatter into the fp32 maps)."""
    from yolo_fgd.core import FGDPyramid

    torch.manual_seed(0)
    pyr = FGDPyramid([4, 8], [8, 16])
    fs = [torch.randn(2, 4, 8, 8), torch.randn(2, 8, 4, 4)]
    ft = [torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4)]
    boxes, idx = torch.tensor([[0.1, 0.1, 0.6, 0.6], [0.3, 0.2, 0.9, 0.7]]), torch.tensor([0, 1])
    ref = pyr(fs, ft, boxes, idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pyr([f.bfloat16().float() for f in fs], [f.bfloat16().float() for f in ft], boxes, idx)
    low = pyr([f.bfloat16().float() for f in fs], [f.bfloat16().float() for f in ft], boxes, idx)
    assert out["total"].dtype == torch.float32
    torch.testing.assert_close(out["total"], low["total"])  # same inputs: autocast changes nothing in the loss
    torch.testing.assert_close(out["total"], ref["total"], rtol=2e-2, atol=0)  # only the inputs' rounding


@pytest.mark.parametrize("ft_shape", [(3, 8, 8, 8), (2, 8, 4, 8), (2, 8, 8, 4)])
def test_mismatched_shapes_raise_clear_error(ft_shape):
    with pytest.raises(ValueError, match="must share N, H and W"):
        FGDLoss(4, 8)(torch.randn(2, 4, 8, 8), torch.randn(*ft_shape), torch.zeros(0, 4), torch.zeros(0))


class HostSync(AssertionError):
    pass


def no_host_sync(monkeypatch):
    """Make every Python-level way of reading a tensor's value on the host raise (``.item()``, ``.tolist()``,
    ``bool()``, ``int()``, ``float()``, ``.cpu()``, ``.numpy()``, ``.nonzero()``): on CUDA each is a stream sync."""
    def refuse(name):
        def f(*a, **k):
            raise HostSync(f"Tensor.{name} called: a host sync on CUDA")
        return f

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, refuse(name))
    monkeypatch.setattr(torch, "nonzero", refuse("nonzero"))


@pytest.mark.parametrize("kw", [{}, {"spatial": False, "level_norm": True}, {"norm": True, "split": False}],
                         ids=["paper", "no-spatial+level-norm", "norm+no-split"])
def test_no_host_sync_in_forward_and_backward(monkeypatch, kw):
    """The pyramid's forward and backward read no tensor value on the host (observed on the running code)."""
    from yolo_fgd.lab.cost import synthetic_inputs

    bx, bi, fs, ft = synthetic_inputs(batch=2, imgsz=128, boxes=5)
    pyr = FGDPyramid([f.shape[1] for f in fs], [f.shape[1] for f in ft], **kw).train()
    fs = [f.requires_grad_() for f in fs]
    pyr(fs, ft, bx, bi)  # first call: the per-shape constants are built (element fills, still no sync)
    no_host_sync(monkeypatch)
    out = pyr(fs, ft, bx, bi)
    out["total"].backward()
    monkeypatch.undo()
    assert all(f.grad is not None and torch.isfinite(f.grad).all() for f in fs)


def test_host_sync_guard_catches_a_sync(monkeypatch):
    """The guard above is live: a loss that reads a value on the host raises under it."""
    x = torch.randn(4, requires_grad=True)
    no_host_sync(monkeypatch)
    with pytest.raises(HostSync):
        (x * float(x.sum())).sum().backward()


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9), m=st.integers(0, 12),
    official=st.booleans(), seed=st.integers(0, 2**16),
)
def test_property_finite_nonnegative_and_reference(n, h, w, m, official, seed):
    gen = torch.Generator().manual_seed(seed)
    boxes = random_boxes(m, gen)
    bi = torch.randint(0, n, (m,), generator=gen)
    fg, bg = fgd_masks(boxes, bi, n, h, w, official)
    rfg, rbg = fgd_masks_loop(boxes, bi, n, h, w, official)
    assert torch.allclose(fg, rfg) and torch.allclose(bg, rbg)
    loss = FGDLoss(3, 5, official_rounding=official)
    out = loss(torch.randn(n, 3, h, w, generator=gen), torch.randn(n, 5, h, w, generator=gen), boxes, bi)
    for k, v in out.items():
        assert torch.isfinite(v) and v >= 0, k


def test_mse_option_is_eq1():
    loss = FGDLoss(4, 6, fg=0.5, mse=True)
    fs, ft = torch.randn(2, 4, 5, 5), torch.randn(2, 6, 5, 5)
    out = loss(fs, ft, torch.zeros(0, 4), torch.zeros(0))
    ref = (ft - loss.align(fs)).square().sum() / 2
    assert out["fg"].item() == pytest.approx(0.5 * ref.item(), rel=1e-5)
    assert out["total"].item() == pytest.approx(0.5 * ref.item(), rel=1e-5)
    assert out["bg"] == 0 and out["gl"] == 0


def test_ablation_switches():
    torch.manual_seed(0)
    fs, ft = torch.randn(1, 4, 6, 6), torch.randn(1, 4, 6, 6)
    box, bi = torch.tensor([[0.1, 0.1, 0.5, 0.5]]), torch.tensor([0])
    plain = FGDLoss(4, 4, fg=1, bg=1, spatial=False, channel=False)(fs, ft, box, bi)
    fg, bg = fgd_masks(box, bi, 1, 6, 6)
    d2 = (ft - fs).square().sum(1)
    assert plain["fg"].item() == pytest.approx((d2 * fg).sum().item(), rel=1e-5)
    assert plain["bg"].item() == pytest.approx((d2 * bg).sum().item(), rel=1e-5)
    nosplit = FGDLoss(4, 4, fg=1, bg=1, split=False, spatial=False, channel=False)(fs, ft, box, bi)
    assert nosplit["fg"].item() == pytest.approx(d2.sum().item() / 36, rel=1e-5) and nosplit["bg"] == 0


def test_level_norm_equalises_levels_and_keeps_the_sum():
    from yolo_fgd.core import FGDPyramid

    gen = torch.Generator().manual_seed(0)
    shapes = [(16, 16), (8, 8), (4, 4)]
    fs = [torch.randn(2, 4, h, w, generator=gen, requires_grad=True) for h, w in shapes]
    ft = [torch.randn(2, 8, h, w, generator=gen) * (3 - i) for i, (h, w) in enumerate(shapes)]
    boxes, idx = torch.tensor([[0.1, 0.1, 0.6, 0.5], [0.3, 0.2, 0.9, 0.9]]), torch.tensor([0, 1])
    plain, normed = FGDPyramid([4] * 3, [8] * 3), FGDPyramid([4] * 3, [8] * 3, level_norm=True)
    normed.load_state_dict(plain.state_dict(), strict=False)  # same align/GcBlock weights
    a, b = plain(fs, ft, boxes, idx), normed(fs, ft, boxes, idx)
    assert a["levels"].max() > 2 * a["levels"].min()  # unequal raw levels ...
    torch.testing.assert_close(b["levels"], b["levels"].mean().expand(3))  # ... equal after the first update
    torch.testing.assert_close(b["total"], a["total"])  # and the sum keeps its scale
    torch.testing.assert_close((b["fg"] + b["bg"] + b["at"] + b["gl"]).detach(), b["total"].detach())
    b["total"].backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in fs)
    m = normed.level_mean.clone()
    normed(fs, [2 * f for f in ft], boxes, idx)  # training: running mean moves by 1%
    assert not torch.equal(m, normed.level_mean) and "level_mean" in normed.state_dict()
    m = normed.level_mean.clone()
    normed.eval()(fs, [2 * f for f in ft], boxes, idx)  # eval: frozen
    assert torch.equal(m, normed.level_mean)


def test_response_kd_zero_at_match_positive_otherwise_student_only_gradient():
    from yolo_fgd.core import response_kd

    g = torch.Generator().manual_seed(0)
    t_s, t_d = torch.randn(2, 6, 40, generator=g), torch.randn(2, 64, 40, generator=g)
    same = response_kd(t_s.clone(), t_s, t_d.clone(), t_d, 16)
    assert same["cls"].abs() < 1e-5 and same["box"].abs() < 1e-5
    s_s = torch.randn(2, 6, 40, generator=g, requires_grad=True)
    s_d = torch.randn(2, 64, 40, generator=g, requires_grad=True)
    t_s.requires_grad_(True)
    out = response_kd(s_s, t_s, s_d, t_d, 16)
    assert out["cls"] > 0 and out["box"] > 0
    (out["cls"] + out["box"]).backward()
    assert s_s.grad.abs().sum() > 0 and s_d.grad.abs().sum() > 0 and t_s.grad is None
    d1 = response_kd(s_s.detach(), t_s.detach(), s_d.detach()[:, :4], t_d[:, :4], 1)  # distance heads (YOLO26): L1
    assert d1["box"] > 0
    # mixed heads (DFL teacher, distance student): L1 of decoded distances, 0 when the student outputs the expectation
    expected = (t_d.view(2, 4, 16, 40).softmax(2) * torch.arange(16.0).view(1, 1, 16, 1)).sum(2)
    assert response_kd(t_s.detach(), t_s.detach(), expected, t_d, 1, 16)["box"] < 1e-5
    assert response_kd(t_s.detach(), t_s.detach(), expected + 1, t_d, 1, 16)["box"] > 0.5


def test_response_kd_box_term_weighted_by_teacher_confidence():
    """A box mismatch where the teacher sees background costs (almost) nothing; where it sees an object, it costs."""
    from yolo_fgd.core import response_kd

    t_s = torch.full((1, 2, 2), -20.0)
    t_s[0, 0, 0] = 5.0  # anchor 0: confident object; anchor 1: background
    t_d = torch.zeros(1, 64, 2)
    s_d = t_d.clone()
    s_d[0, :16, 1] = torch.linspace(-5, 5, 16)  # wrong box only at the background anchor
    assert response_kd(t_s, t_s, s_d, t_d, 16)["box"] < 1e-6
    s_d = t_d.clone()
    s_d[0, :16, 0] = torch.linspace(-5, 5, 16)  # wrong box at the object
    assert response_kd(t_s, t_s, s_d, t_d, 16)["box"] > 0.1


def reference_terms(loss, fs_raw, ft, fg, bg):
    """The four unweighted terms, summed over the batch and divided by N, of the package's plain-autograd reference
    (core/reference.py: the official FeatureLoss' structure) on the loss' own align conv and GcBlocks."""
    from yolo_fgd.core import reference

    return reference.terms(loss.align(fs_raw), ft, fg, bg, loss.gc_s, loss.gc_t, loss.temperature)


@pytest.mark.parametrize("cs,norm", [(4, False), (6, False), (4, True)])
def test_terms_and_gradients_equal_official_structure_by_autograd(cs, norm):
    """Every term and every gradient (student, align conv, both GcBlocks) equals plain autograd through the official
    loss' structure (sqrt-weighted MSEs, GcBlocks as convs): the one-pass arithmetic of Eq. 9-12 is exact."""
    from yolo_fgd.core.fgd import standardise

    g = torch.Generator().manual_seed(cs)
    loss = FGDLoss(cs, 6, fg=1, bg=1, at=1, gl=1, norm=norm)
    with torch.no_grad():
        for p in loss.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)  # non-zero GcBlock outputs: every path carries gradient
        for block in (loss.gc_s, loss.gc_t):
            block.transform[1].bias.fill_(1.0)  # the ReLU after the LayerNorm open, so its inputs get gradient
    fs = torch.randn(3, cs, 7, 9, generator=g, requires_grad=True)
    ft = torch.randn(3, 6, 7, 9, generator=g)
    boxes, bi = random_boxes(6, g), torch.tensor([0, 0, 1, 1, 1, 2])
    fg, bg = fgd_masks(boxes, bi, 3, 7, 9)
    out = loss(fs, ft, boxes, bi)
    got = torch.stack([out[k] for k in ("fg", "bg", "at", "gl")]) * 3  # unweighted, summed over the batch
    params = [fs, *loss.parameters()]
    grads = torch.autograd.grad((got * torch.tensor([1.0, 2.0, 3.0, 0.5])).sum(), params)
    if norm:
        s_fs, s_ft = standardise(loss.align(fs)), standardise(ft)
        ident = FGDLoss(6, 6, temperature=loss.temperature)
        ident.gc_s, ident.gc_t = loss.gc_s, loss.gc_t
        ref = reference_terms(ident, s_fs, s_ft, fg, bg) * 3
    else:
        ref = reference_terms(loss, fs, ft, fg, bg) * 3
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    want = torch.autograd.grad((ref * torch.tensor([1.0, 2.0, 3.0, 0.5])).sum(), params, allow_unused=True)
    for (name, _), a, b in zip([("student", None), *loss.named_parameters()], grads, want):
        if name.endswith("context.bias") or (norm and name == "align.bias"):  # zero: softmax and standardise are
            # shift-invariant, so both are rounding noise
            assert a.abs().max() < 1e-4 and b.abs().max() < 1e-4, name
            continue
        assert b is not None and b.abs().sum() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")



DISPATCH = r"""
import json, torch
from yolo_fgd.core import FGDPyramid
from yolo_fgd.lab.cost import CS, CT, dispatch_counts
g = torch.Generator().manual_seed(0)
pyr = FGDPyramid(CS, CT)
fs = [torch.randn(2, c, s, s, generator=g, requires_grad=True) for c, s in zip(CS, (8, 4, 2))]
ft = [torch.randn(2, c, s, s, generator=g) for c, s in zip(CT, (8, 4, 2))]
boxes = torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.3, 0.2, 0.9, 0.7], [0.0, 0.5, 0.4, 1.0]])
bi = torch.tensor([0, 1, 1])

def step():
    for p in [*fs, *pyr.parameters()]:
        p.grad = None
    pyr(fs, ft, boxes, bi)["total"].backward()

print(json.dumps(dispatch_counts(step, torch.device("cpu"))))
"""


def test_pyramid_dispatch_budget():
    """A regression guard on what one 3-level fwd+bwd of the eager definition dispatches (torch.profiler counts, torch
    pinned), in a fresh process at one thread (a training lane's; PyTorch dispatches other ops at two: 2052 / 476):
    the path of the fallback and of the tests; the compiled loss dispatches fewer (`yolo-fgd benchmark-loss` prints
    both). 2332 aten / 596 computing ops at these shapes when the hand-written path was removed for the one
    definition; raise the budget only for a reason written here."""
    import json
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", DISPATCH], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "YOLO_FGD_KERNEL": "eager", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    counts = json.loads(r.stdout.strip().splitlines()[-1])
    assert counts["aten_ops"] <= 2400 and counts["compute_ops"] <= 615, counts


@pytest.mark.slow
@pytest.mark.parametrize("threads", [2, 1])
def test_compiled_loss_as_accurate_as_the_official_fp32_at_80x80(threads):
    """80x80, features x1, x10, x30, and L_gl with the GcBlocks cancelling a mean of D 30x and 300x its spread: every
    gradient of the compiled loss within max(1 %, 2x the official fp32's own error) of the fp64 definition, per
    tensor, elementwise (`yolo-fgd benchmark-accuracy` prints the figures). Below 1 % which fp32 code is ahead on a
    tensor depends on how the CPU splits its reductions: on a 2-core AVX2 EPYC the x1 case's worst gradient is
    official 8.1e-3 / compiled 1.9e-3 at one thread and 2.4e-3 / 6.5e-3 at two, so a bound of 2x the official
    code's error alone held at one thread and failed at two (3.4 on one tensor); docs/performance.md."""
    from yolo_fgd.lab.accuracy import loss_accuracy

    before = torch.get_num_threads()
    try:
        res = loss_accuracy(threads=threads)
    finally:
        torch.set_num_threads(before)
    assert all(row["budget"] <= 1 for row in res.values()), {k: row["budget"] for k, row in res.items()}
    assert all(row["compiled_fp32"][t] < 1e-5 for row in res.values() for t in ("fg", "bg", "at", "gl")), res


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backward_inside_and_outside_an_autocast_region(dtype):
    """Features in half precision, forward under autocast, backward inside it (where the official code works) and
    outside: the fp32 gradients of a plain fp32 run, to the inputs' rounding."""
    g = torch.Generator().manual_seed(3)
    pyr = FGDPyramid([4, 8], [8, 8], fg=1, bg=1, at=1, gl=1)
    with torch.no_grad():
        for level in pyr.levels:
            for block in (level.gc_s, level.gc_t):
                block.transform[3].weight.normal_(0, 0.3, generator=g)
    fs = [torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 8, 4, 4, generator=g)]
    ft = [torch.randn(2, 8, 8, 8, generator=g), torch.randn(2, 8, 4, 4, generator=g)]
    boxes, bi = torch.tensor([[0.1, 0.1, 0.6, 0.7], [0.3, 0.2, 0.9, 0.9]]), torch.tensor([0, 1])

    def run(inside: bool, half: bool):
        x = [f.to(dtype).float().requires_grad_() if half else f.clone().requires_grad_() for f in fs]
        t = [f.to(dtype) if half else f for f in ft]
        # the GcBlocks' context.bias gets a zero gradient (softmax is shift-invariant): rounding noise, left out
        params = [*x, *(v for k, v in pyr.named_parameters() if not k.endswith("context.bias"))]
        with torch.autocast("cpu", dtype=dtype, enabled=half):
            total = pyr([f.to(dtype) if half else f for f in x], t, boxes, bi)["total"]
            if inside:
                return total, torch.autograd.grad(total, params, allow_unused=True)
        return total, torch.autograd.grad(total, params, allow_unused=True)

    ref_total, ref = run(False, False)
    for inside in (True, False):
        total, grads = run(inside, True)
        assert total.dtype == torch.float32
        torch.testing.assert_close(total, ref_total, rtol=3e-2, atol=0)
        for a, b in zip(grads, ref):
            if b is None or b.abs().max() == 0:
                continue
            assert a.dtype == torch.float32 and torch.isfinite(a).all()
            assert ((a - b).abs().max() / b.abs().max()) < 5e-2


def test_nonlocal_relation_against_a_direct_formula():
    """Table 6's Non-local block (fgd_relation=nonlocal) against its formula written position by position: z_i = x_i +
    W_z sum_j softmax_j(theta(x_i) . phi(x_j)) g(x_j); L_gl is the squared difference of the teacher's and the
    student's; identity at init (W_z zero), as the GcBlock; a bad value of fgd_relation is one line."""
    from yolo_fgd.core import NonLocal
    from yolo_fgd.core.presets import resolve
    from yolo_fgd.errors import FGDError

    g = torch.Generator().manual_seed(0)
    block = NonLocal(6)
    f = torch.randn(2, 6, 3, 4, generator=g, dtype=torch.float64)
    assert torch.equal(block.double()(f), f)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)

    def direct(x):
        n, c, h, w = x.shape
        conv = lambda m, v: m.weight[:, :, 0, 0] @ v + m.bias  # a 1x1 conv on one position's vector
        out = x.clone()
        for b in range(n):
            cols = [x[b, :, i, j] for i in range(h) for j in range(w)]
            th, ph, gg = ([conv(m, v) for v in cols] for m in (block.theta, block.phi, block.g))
            for k, v in enumerate(cols):
                logits = torch.stack([th[k] @ ph[j] for j in range(len(cols))])
                y = sum(a * gg[j] for j, a in enumerate(torch.softmax(logits, 0)))
                out[b, :, k // w, k % w] = v + conv(block.out, y)
        return out

    with torch.no_grad():
        torch.testing.assert_close(block(f), direct(f), rtol=1e-10, atol=1e-10)
    loss = FGDLoss(6, 6, fg=0, bg=0, at=0, gl=1, relation="nonlocal")  # computes in fp32, as it trains
    loss.gc_s.load_state_dict(block.state_dict())
    loss.gc_t.load_state_dict(block.state_dict())
    fs, ft = f, torch.randn(2, 6, 3, 4, generator=g, dtype=torch.float64)
    with torch.no_grad():
        gl = loss(fs.float(), ft.float(), torch.zeros(0, 4), torch.zeros(0))["gl"].double()
        torch.testing.assert_close(gl, (direct(ft) - direct(fs)).square().sum() / 2, rtol=1e-5, atol=0)
    assert resolve({"fgd_relation": "NonLocal"})["relation"] == "nonlocal"
    with pytest.raises(FGDError, match="fgd_relation=attention is not one of gcblock, nonlocal"):
        resolve({"fgd_relation": "attention"})
