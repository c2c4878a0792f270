"""``yolo-fgd benchmark``: deployment figures per format for one or more students, every precision stated.

For each model: PyTorch fp32, ONNX Runtime fp32 and INT8 (static QDQ per-channel) and, with OpenVINO installed,
OpenVINO f32, bf16 (where the CPU computes it) and INT8 (NNCF) -> file size, parameters, GFLOPs, the precision the
runtime reports, latency p50/p95 of the model alone and end to end per image (read -> letterbox -> inference ->
decode -> NMS; batch 1, after warm-up, ``runs`` timed runs, threads fixed and stated), the pre/post-processing share,
FPS end to end, and mAP50-95/mAP50 of every format through the same evaluation (the edge runner's decode and NMS,
one label per box, pycocotools) with its cost against PyTorch fp32. The CPU's instruction sets are printed with the
table, since they decide the ranking, and the fastest format within 1.0 mAP50-95 of fp32 is recommended. Writes
``benchmark.csv``, ``benchmark.md`` and ``benchmark.png`` (latency vs mAP) under the run folder.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import cv2
import numpy as np
import torch
from ultralytics.utils import TQDM
from ultralytics.utils.torch_utils import get_flops

from .. import console
from ..data import resolve_data
from ..data.coco import split_images
from ..errors import FGDError
from ..timing import percentile, times_ms
from ..yolo.model import checkpoint
from .edge import EdgeModel, claim_dir
from .evaluate import edge_ap
from .export import calibration_images, export, export_openvino, first_output, load_yolo

COLS = ("model", "format", "precision", "size_mb", "params_m", "gflops", "p50_ms", "p95_ms", "e2e_p50_ms",
        "e2e_p95_ms", "pre_post_ms", "fps", "map50_95", "map50", "d_map50_95", "threads")
ISA = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def latency(fn, runs: int) -> tuple[float, float]:
    """p50 and p95 milliseconds of ``fn()`` over ``runs`` timed calls after 10 warm-up calls."""
    t = times_ms(fn, runs, warmup=10)
    return percentile(t, 50), percentile(t, 95)


def cpu_isa() -> str:
    """The instruction sets of this CPU that decide the runtimes' kernels (from /proc/cpuinfo)."""
    try:
        flags = next((ln.split(":", 1)[1].split() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("flags")), [])
    except OSError:
        flags = []
    return ", ".join(f for f in ISA if f in flags) or "unknown"


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def torch_model(net, imgsz: int, names: dict) -> EdgeModel:
    """The PyTorch model behind the edge runner's pre- and post-processing (one evaluation and one end-to-end
    pipeline for every format)."""
    return EdgeModel.wrap(first_output(net), (imgsz, imgsz), names, end2end=bool(getattr(net, "end2end", False)),
                          precision="fp32")


def end_to_end(model: EdgeModel, files: list, runs: int) -> tuple[float, float, float]:
    """p50, p95 ms per image of read -> letterbox -> inference -> decode -> NMS over ``files`` (cycled), and the
    median ms of the pre- plus post-processing alone."""
    it = {"i": 0, "pp": []}

    def one():
        model(cv2.imread(str(files[it["i"] % len(files)])))
        it["i"] += 1
        it["pp"].append(model.times["pre_ms"] + model.times["post_ms"])

    t = times_ms(one, runs, warmup=10)
    return percentile(t, 50), percentile(t, 95), percentile(it["pp"][10:] or it["pp"], 50)


def benchmark(model: str, data: str | None = None, imgsz: int = 640, runs: int = 50, threads: int = 0,
              project: str = "runs/benchmark", name: str = "bench", int8: bool = True,
              openvino: bool | None = None) -> list[dict]:
    """Benchmark each comma-separated ``model``; returns the rows written to the report. ``openvino``: add the
    OpenVINO rows (default: when it is installed)."""
    data = resolve_data(data)
    asked = openvino
    openvino = openvino_available() if openvino is None else bool(openvino)
    if openvino and not openvino_available():
        raise FGDError("openvino=True needs OpenVINO: pip install 'yolo-fgd[openvino]'")
    if asked is None and not openvino:
        print("yolo-fgd: benchmark without the OpenVINO rows: OpenVINO is not installed (pip install "
              "'yolo-fgd[openvino]' adds them)")
    threads = int(threads) or torch.get_num_threads()
    torch.set_num_threads(threads)
    cv2.setNumThreads(1)  # pre/post-processing on one core, the same for every format
    models = [checkpoint(m) for m in str(model).split(",") if m]
    missing = [m for m in models if not Path(m).is_file()]
    if missing:  # every model checked before anything is written
        raise FGDError(f"model '{missing[0]}' not found: pass model=path/to/best.pt or a run folder (comma-separate "
                       "several)")
    files, _ = split_images(data, "val")
    if int8:
        calibration_images(data, 64)  # an empty calibration split fails here, before the report folder is made
    out_dir = claim_dir(Path(project) / name)  # a new folder (NAME-2 when NAME exists): no report is overwritten
    try:
        rows = _measure(models, data, files, imgsz, runs, threads, int8, openvino, out_dir)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)  # this run's own folder: checkpoint copies, exports, no report
        raise
    _write(out_dir, rows, imgsz, runs)
    print(f"yolo-fgd: benchmark saved to {out_dir.resolve()} (benchmark.csv, benchmark.md, benchmark.png)")
    return rows


def _measure(models, data, files, imgsz, runs, threads, int8, openvino, out_dir) -> list[dict]:
    """The report's rows: every format of every model timed and scored."""
    rows = []
    per_model = 3 + (1 if int8 else 0) + (3 if openvino else 0)
    steps = TQDM(total=len(models) * per_model, desc="benchmark")
    for m in models:
        label = Path(m).parent.parent.name if Path(m).stem in {"best", "last"} and Path(m).parent.name == "weights" \
            else Path(m).stem  # runs/NAME/weights/best.pt -> NAME
        yolo = load_yolo(m)
        net = yolo.model.float().eval().fuse(verbose=False)
        params = sum(p.numel() for p in net.parameters()) / 1e6
        flops = get_flops(net, imgsz)
        names = dict(getattr(net, "names", {}) or {})
        formats = [("pytorch-fp32", torch_model(net, imgsz, names), Path(m))]
        res = exported(m, imgsz, int8, data, out_dir, label)
        formats.append(("onnxruntime-fp32", EdgeModel(res["onnx"], threads=threads), Path(res["onnx"])))
        if res.get("int8"):
            formats.append(("onnxruntime-int8", EdgeModel(res["int8"], threads=threads), Path(res["int8"])))
        if openvino:
            ov = exported_openvino(m, imgsz, int8, data, out_dir, label)
            formats.append(("openvino-f32", EdgeModel(ov["openvino"], threads=threads, precision="f32"),
                            Path(ov["openvino"])))
            bf16 = EdgeModel(ov["openvino"], threads=threads, precision="bf16")
            if bf16.precision == "bf16":  # the CPU computes bf16 (AMX, AVX512-BF16): a format of its own
                formats.append(("openvino-bf16", bf16, Path(ov["openvino"])))
            if ov.get("int8"):
                formats.append(("openvino-int8", EdgeModel(ov["int8"], threads=threads), Path(ov["int8"])))
        base = None
        for fmt, edge, path in formats:
            xin = np.random.rand(1, 3, *edge.imgsz).astype(edge.dtype)
            p50, p95 = latency(lambda: edge.infer(xin), runs)
            e50, e95, pp = end_to_end(edge, files, runs)
            acc = edge_ap(edge, data, threads)
            base = acc["map"] if base is None else base
            size = sum(f.stat().st_size for f in path.rglob("*")) if path.is_dir() else path.stat().st_size
            rows.append(dict(model=label, format=fmt, precision=edge.precision, size_mb=size / 2**20, params_m=params,
                             gflops=flops, p50_ms=p50, p95_ms=p95, e2e_p50_ms=e50, e2e_p95_ms=e95, pre_post_ms=pp,
                             fps=1e3 / e50, map50_95=acc["map"], map50=acc["map50"], d_map50_95=acc["map"] - base,
                             threads=threads))
            steps.update()
    steps.close()
    return rows


def recommend(rows: list[dict]) -> dict | None:
    """The fastest format end to end whose mAP50-95 is within 1.0 of PyTorch fp32's, per model (the first model's
    when there are several)."""
    first = [r for r in rows if r["model"] == rows[0]["model"]] if rows else []
    ok = [r for r in first if r["d_map50_95"] >= -0.01]
    return min(ok, key=lambda r: r["e2e_p50_ms"]) if ok else None


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


def exported_openvino(model: str, imgsz: int, int8: bool, data, out_dir: Path, label: str) -> dict:
    """The OpenVINO IRs (f32, and INT8 when asked for) of ``model``: those beside it (``yolo-fgd export
    format=openvino``) when they match (same image size, newer than the checkpoint, the INT8 IR there when asked for),
    else exported from a copy in the report folder (never over the user's files)."""
    pt = Path(model)
    ir, q = pt.with_name(f"{pt.stem}_openvino_model"), pt.with_name(f"{pt.stem}_int8_openvino_model")
    if ir.is_dir() and ir.stat().st_mtime >= pt.stat().st_mtime and (not int8 or q.is_dir()) and \
            EdgeModel(ir, backend="openvino").imgsz == (imgsz, imgsz):
        print(f"yolo-fgd: benchmark reusing {ir.resolve()}{f' and {q.name}' if int8 else ''} (imgsz {imgsz}, newer "
              "than the checkpoint)")
        return {"openvino": str(ir), "int8": str(q) if int8 else None}
    copy = out_dir / f"{label}.pt"
    if not copy.is_file():
        shutil.copy2(model, copy)
    ir, q = out_dir / f"{label}_openvino_model", out_dir / f"{label}_int8_openvino_model"
    if ir.is_dir() and (not int8 or q.is_dir()) and EdgeModel(ir, backend="openvino").imgsz == (imgsz, imgsz):
        return {"openvino": str(ir), "int8": str(q) if int8 else None}
    return export_openvino(str(copy), load_yolo(copy), imgsz, int8, data, 64)


def _write(out_dir: Path, rows: list[dict], imgsz: int, runs: int):
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    (out_dir / "benchmark.csv").write_text(
        ",".join(COLS) + "\n" + "".join(",".join(fmt(r[c]) for c in COLS) + "\n" for r in rows))
    best = recommend(rows)
    md = [f"Batch 1, {imgsz} px, CPU ({cpu_isa()}), {rows[0]['threads'] if rows else '?'} threads, {runs} timed runs "
          "after 10 warm-up. model: the forward alone; end to end: read -> letterbox -> inference -> decode -> NMS per "
          "image (pre/post: letterbox + decode + NMS, one core); mAP: pycocotools on the val split through the edge "
          "runner's decode and NMS for every format (one label per box, as deployed); d mAP against PyTorch fp32; "
          "precision: what the runtime reports.", "",
          "| model | format | precision | size (MB) | model p50 (ms) | model p95 | end-to-end p50 (ms) | e2e p95 | "
          "pre/post (ms) | FPS (e2e) | mAP50-95 | d mAP50-95 | mAP50 |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['model']} | {r['format']} | {r['precision']} | {r['size_mb']:.2f} | {r['p50_ms']:.1f} | "
                  f"{r['p95_ms']:.1f} | {r['e2e_p50_ms']:.1f} | {r['e2e_p95_ms']:.1f} | {r['pre_post_ms']:.1f} | "
                  f"{r['fps']:.1f} | {100 * r['map50_95']:.1f} | {100 * r['d_map50_95']:+.1f} | {100 * r['map50']:.1f} |")
    if best:
        ort = next((r for r in rows if r["model"] == best["model"] and r["format"] == "onnxruntime-fp32"), None)
        speed = f", {ort['e2e_p50_ms'] / best['e2e_p50_ms']:.2f}x ONNX Runtime fp32 end to end" if ort else ""
        md += ["", f"Recommended on this machine: **{best['format']}** ({best['precision']}), the fastest end to end "
                   f"within 1.0 mAP50-95 of fp32: {best['e2e_p50_ms']:.1f} ms per image{speed}."]
    text = "\n".join(md) + "\n"
    (out_dir / "benchmark.md").write_text(text)
    console.result(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4), tight_layout=True)
        for r in rows:
            ax.scatter(r["e2e_p50_ms"], 100 * r["map50_95"], s=40)
            ax.annotate(f"{r['model']}\n{r['format']}", (r["e2e_p50_ms"], 100 * r["map50_95"]), fontsize=7)
        ax.set_xlabel("end-to-end latency p50 (ms per image, batch 1)")
        ax.set_ylabel("mAP50-95 (%)")
        ax.set_title("latency vs accuracy")
        fig.savefig(out_dir / "benchmark.png", dpi=120)
        plt.close(fig)
    except Exception:
        pass
