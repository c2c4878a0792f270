#!/usr/bin/env python3
"""Torch-free edge runner for YOLO models: numpy + opencv-python + ONNX Runtime, or OpenVINO.

Copy this one file to the device. Handles YOLOv8/YOLO11 heads (output (1, 4+nc, A): cx, cy, w, h, class scores;
NMS here) and YOLO26 end-to-end heads (output (1, 300, 6): x1, y1, x2, y2, score, class; no NMS). The model is an
ONNX file (`yolo-fgd export`) run by ONNX Runtime, or with ``--backend openvino`` an OpenVINO IR (the
``*_openvino_model`` folder of `yolo-fgd export format=openvino`, or its .xml) or an ONNX file run by OpenVINO, which
is imported only then; ``--precision f32|bf16|f16`` sets OpenVINO's inference precision (its default on a CPU with
AMX or AVX512-BF16 is bf16).

    python edge.py model.onnx image.jpg|folder|video.mp4 [--conf 0.25] [--iou 0.7] [--save-dir runs/edge] [--exist-ok]
        [--json detections.jsonl] [--threads 2] [--backend onnxruntime|openvino] [--precision f32]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np

IMG_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
VID_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm"}


def letterbox(img: np.ndarray, size: tuple[int, int], color=(114, 114, 114)):
    """Resize keeping aspect ratio and pad to ``size`` (h, w), centred, as Ultralytics does.

    Returns (padded image, gain, (pad_x, pad_y)).
    """
    h0, w0 = img.shape[:2]
    gain = min(size[0] / h0, size[1] / w0)
    w1, h1 = round(w0 * gain), round(h0 * gain)
    dw, dh = (size[1] - w1) / 2, (size[0] - h1) / 2
    if (w1, h1) != (w0, h0):
        img = cv2.resize(img, (w1, h1), interpolation=cv2.INTER_LINEAR)
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=color)
    return img, gain, (left, top)


def blob(img: np.ndarray, size: tuple[int, int], dtype=np.float32):
    """BGR HWC uint8 image -> letterboxed RGB NCHW array in [0,1] of ``dtype``, with (gain, (pad_x, pad_y))."""
    x, gain, pad = letterbox(img, size)
    x = np.ascontiguousarray(x[:, :, ::-1].transpose(2, 0, 1)[None], dtype=dtype)
    return x / dtype(255), gain, pad


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy NMS on xyxy boxes (K,4) -> kept indices, highest score first."""
    order = scores.argsort()[::-1]
    x1, y1, x2, y2 = boxes.T
    area = (x2 - x1).clip(0) * (y2 - y1).clip(0)
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = (np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest])).clip(0)
        h = (np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest])).clip(0)
        inter = w * h
        order = rest[inter / (area[i] + area[rest] - inter + 1e-9) <= iou]
    return np.array(keep, dtype=np.int64)


BACKENDS = ("onnxruntime", "openvino")


class EdgeModel:
    """A YOLO detector on ONNX Runtime or OpenVINO (CPU).

    ``model(img_bgr)`` -> (K,6) float32 array of x1, y1, x2, y2 (original image pixels), score, class; the
    milliseconds of its three stages (letterbox, inference, decode + NMS) are in ``model.times`` afterwards.
    ``precision``: what the runtime computes in (ONNX Runtime: the file's type; OpenVINO: its inference precision
    hint, read back from the compiled model).
    """

    def __init__(self, path, conf: float = 0.25, iou: float = 0.7, max_det: int = 300, threads: int = 0,
                 providers=None, backend: str | None = None, precision: str | None = None):
        path = Path(path)
        backend = backend or ("openvino" if path.is_dir() or path.suffix == ".xml" else "onnxruntime")
        if backend not in BACKENDS:
            raise ValueError(f"backend '{backend}' is not one of {', '.join(BACKENDS)}")
        if not path.exists():
            raise FileNotFoundError(f"model '{path}' not found: export one with `yolo-fgd export format=onnx` (or "
                                    "format=openvino)")
        if backend == "onnxruntime" and (path.is_dir() or path.suffix == ".xml"):
            raise ValueError(f"'{path}' is an OpenVINO model: run it with --backend openvino (or leave --backend out), "
                             "or pass the .onnx file to --backend onnxruntime")
        if backend == "onnxruntime" and precision:
            raise ValueError(f"--precision {precision} is OpenVINO's inference precision; ONNX Runtime computes in "
                             "the file's own type: leave --precision out, or use --backend openvino")
        if backend == "openvino":
            meta, shape, out, self.dtype = self._openvino(path, threads, precision)
        else:
            meta, shape, out, self.dtype = self._onnxruntime(path, threads, providers)
        self.backend = backend
        self.names = self._parse_names(meta.get("names"))
        h, w = shape[2], shape[3]
        imgsz = meta["imgsz"] if isinstance(meta.get("imgsz"), list) else \
            json.loads(meta["imgsz"]) if "imgsz" in meta else [640, 640]
        self.imgsz = (h if isinstance(h, int) and h > 0 else imgsz[0], w if isinstance(w, int) and w > 0 else imgsz[1])
        self.conf, self.iou, self.max_det = conf, iou, max_det
        self.end2end = len(out) == 3 and out[-1] == 6 and str(meta.get("end2end", "")).lower() != "false"
        self.times = {"pre_ms": 0.0, "infer_ms": 0.0, "post_ms": 0.0}
        task = meta.get("task", "detect")
        if len(shape) != 4 or len(out) != 3 or task not in ("detect", None):
            raise ValueError(f"model '{path}' is not a YOLO detection model this runner handles (task {task}, "
                             f"input {shape}, output {out}): export a detect model with `yolo-fgd export`")

    @classmethod
    def wrap(cls, infer, imgsz: tuple[int, int], names: dict, end2end: bool = False, precision: str = "fp32",
             conf: float = 0.25, iou: float = 0.7, max_det: int = 300) -> "EdgeModel":
        """An EdgeModel around any ``infer`` (NCHW float32 array -> raw output), for example a PyTorch model, so it is
        measured and scored with the same pre- and post-processing."""
        self = cls.__new__(cls)
        self.infer, self.imgsz, self.names, self.end2end, self.precision = infer, tuple(imgsz), names, end2end, precision
        self.backend, self.dtype, self.conf, self.iou, self.max_det = "python", np.float32, conf, iou, max_det
        self.times = {"pre_ms": 0.0, "infer_ms": 0.0, "post_ms": 0.0}
        return self

    def _onnxruntime(self, path: Path, threads: int, providers):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])
        except Exception as e:
            raise ValueError(f"ONNX model '{path}' could not be loaded ({str(e).splitlines()[0][:200]}): re-export it")
        inp = self.session.get_inputs()[0]
        name = inp.name
        dtype = np.float16 if "float16" in inp.type else np.float32
        self.precision = "fp16" if dtype == np.float16 else "int8" if _quantized(self.session) else "fp32"
        self.infer = lambda x: self.session.run(None, {name: x})[0]
        return self.session.get_modelmeta().custom_metadata_map, inp.shape, self.session.get_outputs()[0].shape, dtype

    def _openvino(self, path: Path, threads: int, precision: str | None):
        try:
            import openvino as ov
        except ImportError:
            raise ValueError("--backend openvino needs OpenVINO: pip install openvino") from None
        xml = path if path.suffix in (".xml", ".onnx") else next(iter(sorted(path.glob("*.xml"))), None)
        if xml is None:
            raise FileNotFoundError(f"no OpenVINO IR (.xml) in '{path}': export one with `yolo-fgd export "
                                    "format=openvino`")
        config = {"PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if precision:
            config["INFERENCE_PRECISION_HINT"] = precision
        try:
            compiled = ov.Core().compile_model(str(xml), "CPU", config)
        except Exception as e:
            raise ValueError(f"OpenVINO model '{xml}' could not be compiled ({str(e).splitlines()[0][:200]})")
        request = compiled.create_infer_request()
        hint = str(compiled.get_property("INFERENCE_PRECISION_HINT"))  # e.g. "<Type: 'bfloat16'>" or "bf16"
        self.precision = next((k for k, v in {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.items()
                               if v in hint or k.replace("fp", "f") in hint), hint)
        if any(op.get_type_name() == "FakeQuantize" for op in compiled.get_runtime_model().get_ops()) or \
                "int8" in xml.parent.name:
            self.precision = f"int8+{self.precision}"  # quantised convs, the rest at the hint's precision
        out = compiled.output(0)
        self.infer = lambda x: request.infer({0: x})[out]
        meta = read_metadata(xml.with_name("metadata.yaml")) if xml.suffix == ".xml" else {}
        return meta, list(compiled.input(0).get_partial_shape().get_min_shape()), \
            list(out.get_partial_shape().get_min_shape()), np.float32

    @staticmethod
    def _parse_names(text):
        if isinstance(text, dict):
            return {int(k): str(v) for k, v in text.items()}
        if not text:
            return {}
        try:
            import ast

            return {int(k): str(v) for k, v in ast.literal_eval(text).items()}
        except Exception:
            return {}

    def preprocess(self, img: np.ndarray):
        return blob(img, self.imgsz, self.dtype)

    def postprocess(self, out: np.ndarray, gain: float, pad, shape) -> np.ndarray:
        out = out[0].astype(np.float32)
        if self.end2end:  # (300,6) x1,y1,x2,y2,score,cls
            det = out[out[:, 4] > self.conf]
        else:  # (4+nc, A) -> (A, 4+nc)
            p = out.T
            cls = p[:, 4:].argmax(1)
            score = p[np.arange(len(p)), 4 + cls]
            m = score > self.conf
            p, cls, score = p[m], cls[m], score[m]
            xy, wh = p[:, :2], p[:, 2:4]
            boxes = np.concatenate([xy - wh / 2, xy + wh / 2], 1)
            # class-aware NMS through a per-class offset, as Ultralytics does
            keep = nms(boxes + cls[:, None] * 7680.0, score, self.iou)[: self.max_det]
            det = np.concatenate([boxes[keep], score[keep, None], cls[keep, None].astype(np.float32)], 1)
        det = det[: self.max_det].copy()
        det[:, [0, 2]] = ((det[:, [0, 2]] - pad[0]) / gain).clip(0, shape[1])
        det[:, [1, 3]] = ((det[:, [1, 3]] - pad[1]) / gain).clip(0, shape[0])
        return det.astype(np.float32)

    def __call__(self, img: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        x, gain, pad = self.preprocess(img)
        t1 = time.perf_counter()
        y = self.infer(x)
        t2 = time.perf_counter()
        det = self.postprocess(y, gain, pad, img.shape[:2])
        t3 = time.perf_counter()
        self.times = {"pre_ms": 1e3 * (t1 - t0), "infer_ms": 1e3 * (t2 - t1), "post_ms": 1e3 * (t3 - t2)}
        return det


def _quantized(session) -> bool:
    """Whether an ONNX Runtime session's model holds quantised (QDQ or integer) nodes."""
    try:
        import onnx

        model = onnx.load(session._model_path, load_external_data=False)
        return any(n.op_type in ("QuantizeLinear", "QLinearConv", "ConvInteger") for n in model.graph.node)
    except Exception:
        return "int8" in Path(getattr(session, "_model_path", "")).name


def read_metadata(path: Path) -> dict:
    """Ultralytics' ``metadata.yaml`` beside an OpenVINO IR, for the keys this runner reads (names, imgsz, task,
    end2end): PyYAML when it is there, else a reader of that file's simple layout (``key: value``, an indented
    ``k: v`` block, a ``- v`` list)."""
    if not path.is_file():
        return {}
    text = path.read_text()
    try:
        import yaml

        return yaml.safe_load(text) or {}
    except ImportError:
        pass
    meta, key = {}, None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line.startswith((" ", "-")):
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            meta[key] = value.strip("'\"") if value else None
        elif line.lstrip().startswith("-") and key:
            meta[key] = (meta[key] if isinstance(meta[key], list) else []) + [int(line.lstrip()[1:].strip())]
        elif key:
            k, _, v = line.strip().partition(":")
            meta[key] = {**(meta[key] if isinstance(meta[key], dict) else {}), int(k): v.strip().strip("'\"")}
    return meta


def draw(img: np.ndarray, det: np.ndarray, names: dict) -> np.ndarray:
    img = img.copy()
    for x1, y1, x2, y2, s, c in det:
        color = tuple(int(v) for v in np.random.RandomState(int(c)).randint(60, 255, 3))
        cv2.rectangle(img, (int(x1), int(y1)), (int(x2), int(y2)), color, 2)
        label = f"{names.get(int(c), int(c))} {s:.2f}"
        cv2.putText(img, label, (int(x1), max(int(y1) - 4, 10)), cv2.FONT_HERSHEY_SIMPLEX, 0.45, color, 1, cv2.LINE_AA)
    return img


def sources(src: Path):
    if src.is_dir():
        yield from sorted(f for f in src.rglob("*") if f.suffix.lower() in IMG_SUFFIXES | VID_SUFFIXES)
    elif src.is_file():
        yield src
    else:
        raise FileNotFoundError(f"source '{src}' not found: pass an image, a folder or a video")


def record(f: Path, det: np.ndarray, names: dict, ms: float, times: dict | None = None) -> dict:
    """One image's detections as a JSON-ready record (boxes in original image pixels), with the latency and, from
    :attr:`EdgeModel.times`, its stages (letterbox, inference, decode + NMS) in ms."""
    return {"file": str(f), "latency_ms": round(ms, 3), **{k: round(v, 3) for k, v in (times or {}).items()},
            "detections": [
        {"box": [round(float(v), 2) for v in d[:4]], "score": round(float(d[4]), 5), "class": int(d[5]),
         "name": names.get(int(d[5]), str(int(d[5])))} for d in det]}


def free_dir(path: Path) -> Path:
    """``path`` if it does not exist yet, else the first of path-2, path-3... that does not (Ultralytics 8.4's
    numbering of run folders), so that no earlier run's files are overwritten."""
    if not path.exists():
        return path
    n = 2
    while path.with_name(f"{path.name}-{n}").exists():
        n += 1
    return path.with_name(f"{path.name}-{n}")


def claim_dir(path: Path) -> Path:
    """Make and return :func:`free_dir` of ``path``, atomically: a second process racing for the same name gets the
    next number, never the same folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        out = free_dir(path)
        try:
            out.mkdir()
            return out
        except FileExistsError:
            continue


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="YOLO ONNX model (yolo-fgd export)")
    ap.add_argument("source", help="an image, a folder of images/videos, or a video")
    ap.add_argument("--conf", type=float, default=0.25, help="score threshold")
    ap.add_argument("--iou", type=float, default=0.7, help="NMS IoU threshold")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    ap.add_argument("--save-dir", "--out", dest="save_dir", default="runs/edge",
                    help="where annotated files go; an existing folder is not reused: edge-2, edge-3... follow")
    ap.add_argument("--exist-ok", action="store_true", help="write into --save-dir even if it exists")
    ap.add_argument("--json", default=None, help="also write the detections here, one JSON record per image (JSONL)")
    ap.add_argument("--backend", choices=BACKENDS, default=None,
                    help="runtime (default: openvino for an IR folder or .xml, onnxruntime for an .onnx)")
    ap.add_argument("--precision", default=None, help="OpenVINO's inference precision: f32, bf16 or f16")
    a = ap.parse_args(argv)
    made, out = None, None
    try:
        model = EdgeModel(a.model, a.conf, a.iou, threads=a.threads, backend=a.backend, precision=a.precision)
        files = list(sources(Path(a.source)))
        out = Path(a.save_dir) if a.exist_ok else free_dir(Path(a.save_dir))
        made = out  # the folders this run makes: out and any missing parents, up to the first that exists
        while not made.parent.exists():
            made = made.parent
        made = None if out.exists() else made
        out.mkdir(parents=True, exist_ok=True)
        records = []
        for f in files:
            if f.suffix.lower() in VID_SUFFIXES:
                cap = cv2.VideoCapture(str(f))
                fps = cap.get(cv2.CAP_PROP_FPS) or 25
                writer, n, t0 = None, 0, time.perf_counter()
                while True:
                    ok, frame = cap.read()
                    if not ok:
                        break
                    vis = draw(frame, model(frame), model.names)
                    if writer is None:
                        writer = cv2.VideoWriter(str(out / f"{f.stem}.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), fps,
                                                 (vis.shape[1], vis.shape[0]))
                    writer.write(vis)
                    n += 1
                cap.release()
                if writer is not None:
                    writer.release()
                print(f"{f}: {n} frames, {n / max(time.perf_counter() - t0, 1e-9):.1f} FPS -> "
                      f"{(out / (f.stem + '.mp4')).resolve()}")
                continue
            img = cv2.imread(str(f))
            if img is None:
                if len(files) == 1:
                    raise ValueError(f"image '{f}' is not readable: pass a JPEG/PNG/... image, a folder or a video")
                print(f"{f}: not a readable image, skipped", file=sys.stderr)
                continue
            t0 = time.perf_counter()
            det = model(img)
            ms = 1e3 * (time.perf_counter() - t0)
            dst = out / f.name
            cv2.imwrite(str(dst), draw(img, det, model.names))
            counts = {}
            for c in det[:, 5].astype(int):
                counts[model.names.get(c, c)] = counts.get(model.names.get(c, c), 0) + 1
            print(f"{f}: {len(det)} detections {counts} in {ms:.1f} ms -> {dst.resolve()}")
            records.append(record(f, det, model.names, ms, model.times))
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text("".join(json.dumps(r) + "\n" for r in records))
            print(f"detections of {len(records)} images written to {Path(a.json).resolve()}")
        print(f"results saved to {out.resolve()}")
    except (FileNotFoundError, ValueError) as e:
        if made is not None and out.is_dir() and not any(out.rglob("*")):  # this run's folders, still empty
            for d in (out, *out.parents):
                try:
                    d.rmdir()  # fails, and stops, at a folder something else has written into meanwhile
                except OSError:
                    break
                if d == made:
                    break
        print(f"edge: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
