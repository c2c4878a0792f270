"""``yolo-fgd benchmark``: deployment figures per format for one or more students.

For each model: PyTorch fp32, ONNX fp32 and ONNX int8 (static QDQ per-channel) -> file size, parameters, GFLOPs,
latency p50/p95 of the model forward (batch 1, after warm-up, ``runs`` timed runs, threads stated), FPS, and
mAP50-95/mAP50 on the val split (pycocotools, one label per box as deployed; ONNX through the torch-free edge
runner). Writes
``benchmark.csv``, ``benchmark.md`` and ``benchmark.png`` (latency vs mAP) under the run folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from ultralytics.utils import TQDM
from ultralytics.utils.torch_utils import get_flops

from .. import console
from ..data import resolve_data
from ..errors import FGDError
from ..timing import percentile, times_ms
from ..yolo.model import checkpoint
from .edge import EdgeModel
from .evaluate import coco_ap, edge_ap
from .export import export, load_yolo

COLS = ("model", "format", "size_mb", "params_m", "gflops", "p50_ms", "p95_ms", "fps", "map50_95", "map50", "threads")


def latency(fn, runs: int) -> tuple[float, float]:
    """p50 and p95 milliseconds of ``fn()`` over ``runs`` timed calls after 10 warm-up calls."""
    t = times_ms(fn, runs, warmup=10)
    return percentile(t, 50), percentile(t, 95)


def benchmark(model: str, data: str | None = None, imgsz: int = 640, runs: int = 50, threads: int = 0,
              project: str = "runs/benchmark", name: str = "bench", int8: bool = True) -> list[dict]:
    """Benchmark each comma-separated ``model``; returns the rows written to the report."""
    data = resolve_data(data)
    threads = int(threads) or torch.get_num_threads()
    torch.set_num_threads(threads)
    out_dir = Path(project) / name
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    models = [m for m in str(model).split(",") if m]
    steps = TQDM(total=len(models) * (3 if int8 else 2), desc="benchmark")
    for m in models:
        m = checkpoint(m)
        if not Path(m).is_file():
            raise FGDError(f"model '{m}' not found: pass model=path/to/best.pt (comma-separate several)")
        label = Path(m).parent.parent.name if Path(m).stem in {"best", "last"} and Path(m).parent.name == "weights" \
            else Path(m).stem  # runs/NAME/weights/best.pt -> NAME
        yolo = load_yolo(m)
        net = yolo.model.float().eval().fuse(verbose=False)
        params = sum(p.numel() for p in net.parameters()) / 1e6
        flops = get_flops(net, imgsz)
        x = torch.rand(1, 3, imgsz, imgsz)
        with torch.inference_mode():
            p50, p95 = latency(lambda: net(x), runs)
        acc = coco_ap(m, data, imgsz, multi_label=False)  # one label per box, as the edge runner deploys it
        rows.append(dict(model=label, format="pytorch-fp32", size_mb=Path(m).stat().st_size / 2**20,
                         params_m=params, gflops=flops, p50_ms=p50, p95_ms=p95, fps=1e3 / p50,
                         map50_95=acc["map"], map50=acc["map50"], threads=threads))
        steps.update()
        res = exported(m, imgsz, int8, data, out_dir, label)
        for fmt, path in (("onnx-fp32", res["onnx"]), ("onnx-int8", res.get("int8"))):
            if not path:
                continue
            edge = EdgeModel(path, threads=threads)
            xin = np.random.rand(1, 3, imgsz, imgsz).astype(edge.dtype)
            p50, p95 = latency(lambda: edge.infer(xin), runs)
            acc = edge_ap(path, data, threads)
            rows.append(dict(model=label, format=fmt, size_mb=Path(path).stat().st_size / 2**20,
                             params_m=params, gflops=flops, p50_ms=p50, p95_ms=p95, fps=1e3 / p50,
                             map50_95=acc["map"], map50=acc["map50"], threads=threads))
            steps.update()
    steps.close()
    _write(out_dir, rows, imgsz, runs)
    print(f"yolo-fgd: benchmark saved to {out_dir.resolve()} (benchmark.csv, benchmark.md, benchmark.png)")
    return rows


def exported(model: str, imgsz: int, int8: bool, data, out_dir: Path, label: str) -> dict:
    """The ONNX (and INT8) files of ``model`` at ``imgsz``: an existing export beside it is reused when it matches
    (same image size, newer than the checkpoint, the INT8 file there when asked for); otherwise a new export is
    written, beside the checkpoint when nothing is there, else into ``out_dir`` so that no file is overwritten."""
    pt = Path(model)
    onnx, q = pt.with_suffix(".onnx"), pt.with_name(f"{pt.stem}-int8.onnx")
    if onnx.is_file():
        fresh = onnx.stat().st_mtime >= pt.stat().st_mtime and (not int8 or (q.is_file() and q.stat().st_mtime >=
                                                                            onnx.stat().st_mtime))
        size = EdgeModel(onnx).imgsz
        if fresh and tuple(size) == (imgsz, imgsz):
            print(f"yolo-fgd: benchmark reusing {onnx.resolve()}{f' and {q.name}' if int8 else ''} (imgsz {imgsz}, "
                        "newer than the checkpoint)")
            return {"onnx": str(onnx), "int8": str(q) if int8 else None}
        copy = out_dir / f"{label}.pt"
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(pt, copy)
        print(f"yolo-fgd: benchmark found {onnx.resolve()} for imgsz {size[0]} or older than the checkpoint: left as it is, "
                    f"exporting into {out_dir.resolve()}")
        pt = copy
    return export(str(pt), imgsz=imgsz, int8=int8, data=data)


def _write(out_dir: Path, rows: list[dict], imgsz: int, runs: int):
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    (out_dir / "benchmark.csv").write_text(
        ",".join(COLS) + "\n" + "".join(",".join(fmt(r[c]) for c in COLS) + "\n" for r in rows))
    md = [f"Batch 1, {imgsz} px, CPU, {rows[0]['threads'] if rows else '?'} threads, {runs} timed runs after 10 warm-up; "
          "latency = model forward only (no pre/post-processing); mAP = pycocotools on the val split, one label per "
          "box as deployed.", "",
          "| model | format | size (MB) | params (M) | GFLOPs | p50 (ms) | p95 (ms) | FPS | mAP50-95 | mAP50 |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['model']} | {r['format']} | {r['size_mb']:.2f} | {r['params_m']:.2f} | {r['gflops']:.1f} | "
                  f"{r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['fps']:.1f} | {100 * r['map50_95']:.1f} | "
                  f"{100 * r['map50']:.1f} |")
    text = "\n".join(md) + "\n"
    (out_dir / "benchmark.md").write_text(text)
    console.result(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4), tight_layout=True)
        for r in rows:
            ax.scatter(r["p50_ms"], 100 * r["map50_95"], s=40)
            ax.annotate(f"{r['model']}\n{r['format']}", (r["p50_ms"], 100 * r["map50_95"]), fontsize=7)
        ax.set_xlabel("latency p50 (ms, batch 1)")
        ax.set_ylabel("mAP50-95 (%)")
        ax.set_title("latency vs accuracy")
        fig.savefig(out_dir / "benchmark.png", dpi=120)
        plt.close(fig)
    except Exception:
        pass
