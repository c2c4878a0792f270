"""``yolo-fgd benchmark-loss``: cost of the FGD loss on YOLO-like shapes (prints figures; not a test).

(a) mask construction, vectorised vs the per-image, per-box loop reference;
(b) FGD forward+backward, compiled (with its first call: the compile) and eager, vs plain feature MSE (Eq. 1) with the
    same align layer on the same tensors;
(c) FGD's share of a YOLO11n training step (forward+backward) at the same batch.
"""

from __future__ import annotations

import importlib.util
import os
import resource
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from ultralytics import YOLO
from ultralytics.nn.tasks import DetectionModel

from .. import console
from ..core import FGDPyramid, compiled, feature_mse, fgd_masks, fgd_masks_loop
from ..core.reference import RELATIONS
from ..data import resolve_data, shapes
from ..errors import FGDError, first_line
from ..timing import times_ms
from ..yolo import DistillTrainer, trainer_for
from ..yolo.model import checkpoint_file


def median_s(fn, device, repeat: int, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` over ``repeat`` runs after ``warmup``."""
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    t = sorted(times_ms(fn, repeat, warmup, sync))
    return t[len(t) // 2] / 1e3


CS, CT, STRIDES = (64, 128, 256), (128, 256, 512), (8, 16, 32)  # YOLO11n -> YOLO11s-like P3-P5 channels


def synthetic_inputs(batch: int = 16, imgsz: int = 640, boxes: int = 50, g: torch.Generator | None = None):
    """The benchmarks' inputs, on CPU, drawn from ``g`` (default: seed 0): boxes (batch*boxes,4) normalised xyxy, their batch_idx, student
    features [(batch,CS_l,imgsz/stride_l,...)] and teacher features [(batch,CT_l,...)]."""
    g = g or torch.Generator().manual_seed(0)
    sizes = [imgsz // s for s in STRIDES]
    xy = torch.rand(batch * boxes, 2, generator=g) * 0.9
    wh = torch.rand(batch * boxes, 2, generator=g) * 0.3 + 0.01
    bx = torch.cat([xy, (xy + wh).clamp(max=1)], 1)
    bi = torch.arange(batch).repeat_interleave(boxes)
    fs = [torch.randn(batch, c, s, s, generator=g) for c, s in zip(CS, sizes)]
    ft = [torch.randn(batch, c, s, s, generator=g) for c, s in zip(CT, sizes)]
    return bx, bi, fs, ft


NO_KERNEL = {"as_strided", "view", "reshape", "_reshape_alias", "transpose", "t", "unsqueeze", "squeeze", "expand",
             "select", "slice", "split", "split_with_sizes", "unbind", "chunk", "narrow", "permute", "resolve_conj",
             "resolve_neg", "empty", "empty_strided", "empty_like", "to", "detach", "alias", "lift_fresh", "result_type",
             "_unsafe_view", "contiguous", "new_empty", "as_strided_", "is_nonzero", "item", "_local_scalar_dense",
             "resize_", "set_", "numpy_T"}
LAUNCHES = {"cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaLaunchCooperativeKernel"}


@contextmanager
def _native_stderr_quiet():
    """Send file descriptor 2 to /dev/null for the block: the profiler's C++ side (Kineto) writes start/stop lines
    there that look like errors in a report."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def dispatch_counts(fn, device: torch.device) -> dict:
    """What one call of ``fn`` dispatches, as ``torch.profiler`` counts it: ``aten_ops`` (every ``aten::`` op, nested
    ones included), ``compute_ops`` (leaf ops that compute: views, allocations and wrapped-scalar casts left out, the
    CPU-side proxy of kernel launches) and, on CUDA, ``kernels`` (kernel launches)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()  # warm: lazy initialisation is not counted
    with _native_stderr_quiet(), profile(activities=acts, record_shapes=True) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.events()
    aten = [e for e in events if e.name.startswith("aten::")]
    children = {}
    for e in aten:
        if e.cpu_parent is not None:
            children.setdefault(id(e.cpu_parent), []).append(e)

    def computes(e) -> bool:  # an op that launches work itself: not a view/allocation, no computing child
        kids = [k for k in children.get(id(e), []) if computes(k)]
        scalar = e.name in ("aten::copy_", "aten::_to_copy") and all(not s for s in (e.input_shapes or [[]]))
        return not kids and e.name.split("::")[1] not in NO_KERNEL and not scalar

    out = {"aten_ops": len(aten), "compute_ops": sum(computes(e) for e in aten)}
    if device.type == "cuda":
        out["kernels"] = sum(e.name in LAUNCHES for e in events)
    return out


def pyramid_class(path: str | None) -> type:
    """This version's :class:`FGDPyramid`, or the one defined in the Python file ``path`` (a self-contained loss module
    of another version, e.g. ``yolo_fgd/loss.py`` of a checkout of 2c875fc), to measure both with one harness."""
    if not path:
        return FGDPyramid
    try:
        spec = importlib.util.spec_from_file_location("fgd_other_version", str(path))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.FGDPyramid
    except Exception as e:  # not a file, not Python, relative imports, no FGDPyramid
        raise FGDError(f"pyramid={path} has no loadable FGDPyramid ({first_line(e, 160)}): pass a self-contained loss .py file, "
                       "e.g. yolo_fgd/loss.py of an older checkout") from None


def benchmark_loss(batch: int = 16, imgsz: int = 640, boxes: int = 50, device: str = "cpu", repeat: int = 5,
                   step: bool = True, amp: bool = False, threads: int = 0, pyramid: str | None = None,
                   compile: bool = True, relation: str = "gcblock") -> dict:
    """Print and return timings (ms), ratios and dispatch counts for the shapes in the module docstring; ``amp``: the
    features come in under fp16 autocast as in AMP training (FGD computes in fp32 either way); ``threads``: CPU
    threads (0: all cores); ``pyramid``: measure the FGDPyramid of another version's loss file instead
    (:func:`pyramid_class`); ``compile=False``: the eager definition only (no compile: seconds instead of a
    minute); ``relation``: R of Eq. 11, ``gcblock`` or ``nonlocal`` (Table 6; its attention is (HW)^2 per image:
    small images only)."""
    pyramid_cls = pyramid_class(pyramid)  # a bad file fails before any work
    if relation not in RELATIONS:
        raise FGDError(f"relation={relation} is not one of {', '.join(RELATIONS)}: e.g. relation=nonlocal")
    torch.set_num_threads(int(threads) or os.cpu_count() or 1)
    dev = torch.device(device if device not in ("", None) else "cpu")
    if dev.type == "cpu" and str(device).isdigit():
        dev = torch.device(f"cuda:{device}")
    g = torch.Generator().manual_seed(0)
    bx, bi, fs, ft = synthetic_inputs(batch, imgsz, boxes, g)  # g goes on to the step's image
    bx, bi = bx.to(dev), bi.to(dev)
    fs = [f.to(dev).requires_grad_() for f in fs]
    ft = [f.to(dev) for f in ft]
    cs, ct, sizes = CS, CT, [f.shape[-1] for f in fs]

    h = sizes[0]
    t_vec = median_s(lambda: fgd_masks(bx, bi, batch, h, h), dev, repeat)
    t_loop = median_s(lambda: fgd_masks_loop(bx, bi, batch, h, h), dev, max(1, repeat // 2), warmup=1)

    # relation= only when asked for: another version's FGDPyramid (pyramid=) may not take it
    fgd = (pyramid_cls(cs, ct, relation=relation) if relation != "gcblock" else pyramid_cls(cs, ct)).to(dev)
    align = torch.nn.ModuleList(torch.nn.Conv2d(a, b, 1) for a, b in zip(cs, ct)).to(dev)

    amp = bool(amp) and dev.type == "cuda"

    def fresh_grads(*modules):  # as after optimizer.zero_grad(): the first backward writes, nothing accumulates
        for p in [*fs, *(q for m in modules for q in m.parameters())]:
            p.grad = None

    def fgd_step():
        fresh_grads(fgd)
        with torch.autocast(dev.type, enabled=amp):
            total = fgd(fs, ft, bx, bi)["total"]
        total.backward()

    def mse_step():
        fresh_grads(align)
        with torch.autocast(dev.type, enabled=amp):
            total = sum(feature_mse(a(s), t) for a, s, t in zip(align, fs, ft))
        total.backward()

    t_mse = median_s(mse_step, dev, repeat)
    n_mse = dispatch_counts(mse_step, dev)
    with compiled.using("eager"):
        t_eager = median_s(fgd_step, dev, repeat)
        n_eager = dispatch_counts(fgd_step, dev)
    t_first, t_fgd, n_fgd = float("nan"), t_eager, n_eager
    if compile:
        with compiled.using("compile"):  # the first call compiles (Inductor), later ones reuse the compiled code
            t0 = time.perf_counter()
            fgd_step()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t_first = time.perf_counter() - t0
            t_fgd = median_s(fgd_step, dev, repeat)
            n_fgd = dispatch_counts(fgd_step, dev)
    path = "eager" if not compile else "eager (the compiler failed)" if compiled._failed else "compiled"
    res = {
        "device": str(dev), "batch": batch, "imgsz": imgsz, "boxes_per_image": boxes, "threads": torch.get_num_threads(),
        "amp": amp, "fgd_path": pyramid or path,
        "masks_vectorised_ms": 1e3 * t_vec, "masks_loop_ms": 1e3 * t_loop, "masks_speedup": t_loop / t_vec,
        "fgd_first_call_s": t_first, "fgd_fwd_bwd_ms": 1e3 * t_fgd, "fgd_eager_fwd_bwd_ms": 1e3 * t_eager,
        "eager_over_compiled": t_eager / t_fgd, "mse_fwd_bwd_ms": 1e3 * t_mse, "fgd_over_mse": t_fgd / t_mse,
        **{f"fgd_{k}": v for k, v in n_fgd.items()}, **{f"fgd_eager_{k}": v for k, v in n_eager.items()},
        **{f"mse_{k}": v for k, v in n_mse.items()},
    }
    if step:
        model = DetectionModel("yolo11n.yaml", nc=80, verbose=False).to(dev).train()
        img = torch.rand(batch, 3, imgsz, imgsz, generator=g).to(dev)

        def yolo_step():
            out = model(img)  # training output: raw box/score maps (the assigner and IoU loss are not timed)
            (out["boxes"].float().mean() + out["scores"].float().mean()).backward()
            model.zero_grad(set_to_none=True)

        t_step = median_s(yolo_step, dev, max(1, repeat // 2), warmup=1)
        res.update({"yolo11n_step_ms": 1e3 * t_step, "fgd_share_of_step": t_fgd / (t_step + t_fgd)})
    lines = [f"FGD loss benchmark ({res['device']}, {res['threads']} threads, batch {batch}, {imgsz} px, "
             f"P3-P5 {list(cs)} -> {list(ct)} ch, {boxes} boxes/image, median of {repeat})"]
    lines += [f"  {k:<22} {v:10.3f}" if isinstance(v, float) else f"  {k:<22} {v}" for k, v in res.items()]
    console.result("\n".join(lines))
    return res


STEP_METHODS = {  # method -> extra train args (teacher/trainer added for the distillers)
    "plain": None, "default": {}, "response": {"crosskd": 0},
    "fgd": {"fgd_gain": 0.05, "kd_cls": 0, "kd_box": 0, "crosskd": 0}, "fgd_response": {"fgd_gain": 0.05, "crosskd": 0},
    "distill_model": None, "response_focal": {"kd_focal": True, "crosskd": 0}, "mgd": {"distill_preset": "mgd"},
    "fgd_tied": {"fgd_gain": 0.05, "fgd_share": 0.3, "crosskd": 0}, "lad": {"lad": True},
    "cwd": {"cwd": 5.0},
}


def benchmark_step(teacher: str, data: str = "shapes", model: str = "yolo11n.yaml", imgsz: int = 192, batch: int = 16,
                   fraction: float = 0.5, device: str = "cpu", amp: bool = False, workers: int = 0, epochs: int = 1,
                   methods: str = "plain,default,response,fgd,fgd_response,mgd,distill_model", repeat: int = 3,
                   project: str = "runs/benchmark-step") -> dict:
    """Milliseconds per training iteration of each method (``methods``: comma-separated keys of
    :data:`STEP_METHODS`; same teacher, data, batch, device, AMP and workers): ``repeat`` rounds, each running every
    method once in turn, so that machine noise hits all alike; per run the median over the last epoch's iterations
    after its first 3, the device synchronised at each; validation not timed. Each method's ratio to plain is taken
    within a round, then its median and range over the rounds. Prints a table and writes ``step.csv``."""
    teacher = str(checkpoint_file(teacher, "teacher"))  # a run folder: its best.pt
    names = [m for m in str(methods).split(",") if m]
    unknown = [m for m in names if m not in STEP_METHODS]
    if unknown:
        raise FGDError(f"unknown method(s) {unknown} for benchmark-step: choose from {', '.join(STEP_METHODS)}")
    if "plain" not in names:
        names.insert(0, "plain")  # every ratio is to plain training of the same round
    data = resolve_data(data)
    out_dir = Path(project).resolve()
    common = dict(data=data, imgsz=imgsz, batch=batch, epochs=int(epochs), fraction=fraction, workers=workers,
                  plots=False, val=False, project=str(out_dir), exist_ok=True, amp=amp, device=device, seed=0)
    rounds = []
    for _ in range(max(int(repeat), 1)):
        rounds.append({name: _step_ms(name, model, teacher, common) for name in names})
    med = lambda v: sorted(v)[len(v) // 2]
    res = {name: {"ms": med([r[name] for r in rounds]),
                  "x_plain": med(ratios := [r[name] / r["plain"] for r in rounds]),
                  "x_min": min(ratios), "x_max": max(ratios)} for name in names}
    lines = [f"ms per training iteration ({device}, amp={amp}, batch {batch}, {imgsz} px, workers {workers}, {model}, "
             f"teacher {teacher}, {torch.get_num_threads()} CPU threads; {len(rounds)} alternating rounds, medians):",
             "| method | ms/iter | x plain | x plain range |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['ms']:.1f} | {v['x_plain']:.2f} | {v['x_min']:.2f}-{v['x_max']:.2f} |" for k, v in res.items()]
    console.result("\n".join(lines))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "step.csv").write_text("method,ms_per_iter,x_plain,x_plain_min,x_plain_max\n" + "".join(
        f"{k},{v['ms']:.3f},{v['x_plain']:.4f},{v['x_min']:.4f},{v['x_max']:.4f}\n" for k, v in res.items()))
    print(f"yolo-fgd: step costs saved to {out_dir / 'step.csv'}")
    return res


def _step_ms(name: str, model: str, teacher: str, common: dict) -> float:
    """One run of method ``name``: the median ms of the last epoch's iterations after its first 3."""
    extra = STEP_METHODS[name]
    if name == "distill_model":
        extra = {"distill_model": teacher}
    elif extra is not None:
        extra = {"trainer": trainer_for(YOLO(model).task), "teacher": teacher, **extra}
    stamps = []

    def tick(trainer):
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        stamps.append((trainer.epoch, time.perf_counter()))

    m = YOLO(model)
    m.add_callback("on_train_batch_end", tick)
    m.train(name=name, **common, **(extra or {}))
    last = [t for e, t in stamps if e == stamps[-1][0]]
    gaps = sorted(b - a for a, b in zip(last[3:], last[4:])) or sorted(b - a for a, b in zip(last, last[1:]))
    return 1e3 * gaps[len(gaps) // 2]


def soak(steps: int = 200, imgsz: int = 64, batch: int = 4, project: str = "runs/soak") -> dict:
    """Short soak: ``steps`` FGD training steps at tiny size on data with random empty and odd labels (empty images,
    zero-area and border boxes, 300-box images); prints peak RSS (MB) at step 50 and at the end."""
    root = Path(project)
    src = shapes(root / "data", n_train=32, n_val=8, size=96).parent
    rng = np.random.RandomState(0)
    for i, lab in enumerate(sorted((src / "labels" / "train").glob("*.txt"))):
        kind = i % 4
        if kind == 0:
            lab.write_text("")
        elif kind == 1:
            lab.write_text("0 0.5 0.5 0.0 0.3\n1 0.01 0.99 0.02 0.02\n2 0.5 0.5 1.0 1.0\n")
        elif kind == 2:
            xy = rng.uniform(0.05, 0.95, (300, 2))
            lab.write_text("".join(f"{j % 6} {x:.4f} {y:.4f} 0.04 0.04\n" for j, (x, y) in enumerate(xy)))
    for cache in src.glob("labels/*.cache"):
        cache.unlink()
    data = str(src / "data.yaml")
    teacher = root / "teacher" / "weights" / "best.pt"
    if not teacher.is_file():
        YOLO("yolov8n.yaml").train(data=data, epochs=1, imgsz=imgsz, batch=batch, workers=0, plots=False,
                                   project=str(root), name="teacher", exist_ok=True, val=False)
    rss, count, early = {}, {"n": 0, "fgd": 0}, min(50, max(steps // 4, 1))

    def start(trainer):  # count the batches FGD really ran on (its pyramid's forward), not only the steps
        if trainer.distiller.fgd is None:
            raise FGDError("soak: the distiller built no FGD pyramid: FGD has no weight")
        trainer.distiller.fgd.register_forward_hook(lambda *_: count.__setitem__("fgd", count["fgd"] + 1))

    def step(trainer):
        count["n"] += 1
        if count["n"] in (early, steps):
            rss[count["n"]] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if count["n"] >= steps:
            trainer.stop = True

    per_epoch = -(-len(list((src / "images" / "train").glob("*.jpg"))) // batch)  # batches per epoch
    m = YOLO("yolo11n.yaml")
    m.add_callback("on_train_start", start)
    m.add_callback("on_train_batch_end", step)
    shutil.rmtree(root / "fgd", ignore_errors=True)
    m.train(trainer=DistillTrainer, teacher=str(teacher), data=data, epochs=-(-steps // per_epoch), imgsz=imgsz,
            batch=batch, workers=0, plots=False, val=False, project=str(root), name="fgd", exist_ok=True,
            distill_warmup=0, fgd_gain=0.05)
    console.result(f"soak: {count['n']} steps, FGD on {count['fgd']}; peak RSS {rss.get(early, 0):.0f} MB at step "
                   f"{early}, {rss.get(steps, 0):.0f} MB at step {steps}")
    return {"steps": count["n"], "fgd_steps": count["fgd"], "rss_mb": rss}

