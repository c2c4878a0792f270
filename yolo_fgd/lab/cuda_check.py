"""CUDA check of the FGD loss (needs a GPU): FGDPyramid on CUDA in fp32 and under fp16 / bf16 autocast against the
same module on CPU fp32 (terms and input gradients, relative errors), the masks on CUDA against CPU, and what
``torch.compile`` of the per-level arithmetic (masks given, fixed shapes) buys in time and dispatched ops.

    python -m yolo_fgd.lab.cuda_check      (b16, 640 px, 3 levels 64/128/256 -> 128/256/512 ch, 50 boxes/image)
"""
import sys
import time

import torch

from ..core.fgd import FGDPyramid
from ..core.masks import fgd_masks_levels
from .cost import dispatch_counts


def main() -> None:
    if not torch.cuda.is_available():
        print("cuda_check: no CUDA GPU here; run it on a machine with one", file=sys.stderr)
        sys.exit(2)
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    B, imgsz, nb = 16, 640, 50
    cs, ct, sizes = (64, 128, 256), (128, 256, 512), [imgsz // s for s in (8, 16, 32)]
    xy = torch.rand(B * nb, 2, generator=g) * 0.9; wh = torch.rand(B * nb, 2, generator=g) * 0.3 + 0.01
    bx = torch.cat([xy, (xy + wh).clamp(max=1)], 1); bi = torch.arange(B).repeat_interleave(nb)
    fs = [torch.randn(B, c, s, s, generator=g) for c, s in zip(cs, sizes)]
    ft = [torch.randn(B, c, s, s, generator=g) for c, s in zip(ct, sizes)]
    torch.manual_seed(0)
    ref = FGDPyramid(cs, ct)
    for lv in ref.levels:  # non-zero GcBlock output so the global term's gradient is exercised
        torch.nn.init.normal_(lv.gc_s.transform[-1].weight, std=0.01); torch.nn.init.normal_(lv.gc_t.transform[-1].weight, std=0.01)
    def run(model, dev, dtype_in, autocast=None):
        s = [f.to(dev, dtype_in).clone().requires_grad_() for f in fs]; t = [f.to(dev, dtype_in) for f in ft]
        with torch.autocast("cuda", dtype=autocast, enabled=autocast is not None):
            out = model(s, t, bx.to(dev), bi.to(dev))
        out["total"].backward()
        return {k: float(out[k]) for k in ("fg", "bg", "at", "gl", "total")}, [x.grad.double().cpu() for x in s]
    r_out, r_g = run(ref, "cpu", torch.float32)
    for name, ac in (("fp32", None), ("fp16 autocast", torch.float16), ("bf16 autocast", torch.bfloat16)):
        m = FGDPyramid(cs, ct).to(dev); m.load_state_dict(ref.state_dict())
        o, gr = run(m, dev, torch.float32 if ac is None else ac, ac)  # AMP features arrive in the autocast dtype
        rel = {k: abs(o[k] - r_out[k]) / max(abs(r_out[k]), 1e-12) for k in o}
        grel = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(gr, r_g))
        print(f"{name:14s} rel err vs CPU fp32: " + " ".join(f"{k} {v:.1e}" for k, v in rel.items()) + f"  grad {grel:.1e}")
    # masks on CUDA vs CPU
    mc = fgd_masks_levels(bx, bi, B, [(s, s) for s in sizes]); mg = fgd_masks_levels(bx.to(dev), bi.to(dev), B, [(s, s) for s in sizes])
    print("masks CUDA vs CPU max diff:", max(float((a.cpu() - b).abs().max()) for p, q in zip(mg, mc) for a, b in zip(p, q)))
    # torch.compile of the per-level arithmetic with the masks given (fixed shapes per level): what fusion would buy
    pyr = FGDPyramid(cs, ct).to(dev)
    s = [f.to(dev).requires_grad_() for f in fs]; t = [f.to(dev) for f in ft]; b2, i2 = bx.to(dev), bi.to(dev)
    comp = [torch.compile(lv) for lv in pyr.levels]
    def step_eager():
        for x in s: x.grad = None
        pyr(s, t, b2, i2)["total"].backward()
    def step_comp():
        for x in s: x.grad = None
        masks = fgd_masks_levels(b2, i2, B, [(h, h) for h in sizes])
        sum(c(a, b, b2, i2, m)["total"] for c, a, b, m in zip(comp, s, t, masks)).backward()
    def timeit(fn, n=20):
        for _ in range(3): fn()
        torch.cuda.synchronize(); ts = []
        for _ in range(n):
            t0 = time.perf_counter(); fn(); torch.cuda.synchronize(); ts.append(time.perf_counter() - t0)
        return 1e3 * sorted(ts)[n // 2]
    t0 = time.perf_counter(); step_comp(); torch.cuda.synchronize(); print(f"compile first call {time.perf_counter()-t0:.1f} s")
    print(f"eager {timeit(step_eager):.2f} ms  compiled levels {timeit(step_comp):.2f} ms")
    print("eager counts", dispatch_counts(step_eager, dev)); print("compiled counts", dispatch_counts(step_comp, dev))


if __name__ == "__main__":
    main()
