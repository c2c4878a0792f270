"""CUDA check of the FGD loss (needs a GPU): FGDPyramid on CUDA in fp32 and under fp16 / bf16 autocast against the
same module on CPU fp32 (terms and input gradients, relative errors), the compiled loss (Inductor's Triton kernels)
against the eager definition on CUDA (same three precisions; then time and dispatched ops of one fwd+bwd each), and
the masks on CUDA against CPU.

    python -m yolo_fgd.lab.cuda_check      (the inputs of ``yolo-fgd benchmark-loss``: b16, 640 px, 50 boxes/image)
"""

import sys

import torch

from ..core import compiled
from ..core.fgd import TERMS, FGDPyramid
from ..core.masks import fgd_masks_levels
from .cost import CS, CT, dispatch_counts, median_s, synthetic_inputs

BATCH = 16


def run(model, bx, bi, fs, ft, device, dtype=torch.float32, autocast=None):
    """One forward+backward of ``model`` with the features cast to ``dtype`` on ``device`` -> (terms as floats,
    the students' input gradients as CPU fp64)."""
    s = [f.to(device, dtype).clone().requires_grad_() for f in fs]
    t = [f.to(device, dtype) for f in ft]
    with torch.autocast("cuda", dtype=autocast, enabled=autocast is not None):
        out = model(s, t, bx.to(device), bi.to(device))
    out["total"].backward()
    return {k: float(out[k].detach()) for k in (*TERMS, "total")}, [x.grad.double().cpu() for x in s]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("help", "-h", "--help"):
        print(__doc__.strip())
        return
    if argv:
        print(f"cuda_check: takes no arguments, got {' '.join(argv)}: run `python -m yolo_fgd.lab.cuda_check`",
              file=sys.stderr)
        sys.exit(2)
    if not torch.cuda.is_available():
        print("cuda_check: no CUDA GPU here; run it on a machine with one", file=sys.stderr)
        sys.exit(2)
    dev = torch.device("cuda")
    bx, bi, fs, ft = synthetic_inputs(BATCH)
    sizes = [(f.shape[-2], f.shape[-1]) for f in fs]
    torch.manual_seed(0)
    ref = FGDPyramid(CS, CT)
    for lv in ref.levels:  # non-zero GcBlock output so the global term's gradient is exercised
        for gc in (lv.gc_s, lv.gc_t):
            torch.nn.init.normal_(gc.transform[-1].weight, std=0.01)
    r_out, r_grad = run(ref, bx, bi, fs, ft, "cpu")
    for name, ac in (("fp32", None), ("fp16 autocast", torch.float16), ("bf16 autocast", torch.bfloat16)):
        m = FGDPyramid(CS, CT).to(dev)
        m.load_state_dict(ref.state_dict())
        o, grad = run(m, bx, bi, fs, ft, dev, ac or torch.float32, ac)  # AMP features arrive in the autocast dtype
        rel = {k: abs(o[k] - r_out[k]) / max(abs(r_out[k]), 1e-12) for k in o}
        g_rel = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(grad, r_grad))
        print(f"{name:14s} rel err vs CPU fp32: " + " ".join(f"{k} {v:.1e}" for k, v in rel.items())
              + f"  grad {g_rel:.1e}")
    on_cpu = fgd_masks_levels(bx, bi, BATCH, sizes)
    on_gpu = fgd_masks_levels(bx.to(dev), bi.to(dev), BATCH, sizes)
    print("masks CUDA vs CPU max diff:",
          max(float((a.cpu() - b).abs().max()) for p, q in zip(on_gpu, on_cpu) for a, b in zip(p, q)))

    # the compiled loss (the default) against the eager definition (YOLO_FGD_KERNEL=eager)
    m = FGDPyramid(CS, CT).to(dev)
    m.load_state_dict(ref.state_dict())
    for name, ac in (("fp32", None), ("fp16 autocast", torch.float16), ("bf16 autocast", torch.bfloat16)):
        (o_k, g_k), (o_t, g_t) = (kernel_mode(mode, run, m, bx, bi, fs, ft, dev, ac or torch.float32, ac)
                                  for mode in ("compile", "eager"))
        rel = {k: abs(o_k[k] - o_t[k]) / max(abs(o_t[k]), 1e-12) for k in o_k}
        g_rel = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(g_k, g_t))
        print(f"{name:14s} compiled vs eager: " + " ".join(f"{k} {v:.1e}" for k, v in rel.items())
              + f"  grad {g_rel:.1e}")
    s = [f.to(dev).requires_grad_() for f in fs]
    t = [f.to(dev) for f in ft]
    b2, i2 = bx.to(dev), bi.to(dev)

    def step():
        for x in s:
            x.grad = None
        m(s, t, b2, i2)["total"].backward()

    for mode in ("compile", "eager"):
        ms = 1e3 * kernel_mode(mode, median_s, step, dev, 20, warmup=3)
        print(f"{mode:7s} fwd+bwd {ms:.2f} ms  {kernel_mode(mode, dispatch_counts, step, dev)}")


def kernel_mode(mode: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with ``YOLO_FGD_KERNEL=mode``."""
    with compiled.using(mode):
        return fn(*args, **kwargs)


if __name__ == "__main__":
    main()
