"""``yolo-fgd export``: Ultralytics ONNX export (onnxslim on), a PyTorch-vs-ONNX Runtime parity check on real images
of the data, and ONNX Runtime INT8 quantisation (static QDQ per-channel calibrated on training images, or dynamic)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from ultralytics import YOLO
from ultralytics.utils import LOGGER

from ..data import resolve_data
from ..errors import FGDError, first_line
from ..yolo.model import checkpoint
from .edge import blob
from .parity import check, max_diff, sample_images
from .tv_export import export_onnx


def load_yolo(path):
    """Ultralytics YOLO from a .pt path with one-line errors for missing or damaged files."""
    p = Path(str(path))
    if p.suffix == ".pt" and not p.is_file():
        raise FGDError(f"model '{path}' not found: pass model=runs/detect/NAME/weights/best.pt")
    try:
        return YOLO(str(path))
    except Exception as e:
        raise FGDError(f"model '{path}' could not be loaded ({first_line(e)}): pass an Ultralytics YOLO checkpoint") from None


class _Calib:
    """ONNX Runtime CalibrationDataReader over letterboxed images."""

    def __init__(self, files, name, imgsz):
        self.files, self.name, self.imgsz, self.i = list(files), name, imgsz, 0

    def get_next(self):
        while self.i < len(self.files):
            img = cv2.imread(str(self.files[self.i]))
            self.i += 1
            if img is None:
                continue
            return {self.name: blob(img, (self.imgsz, self.imgsz))[0]}
        return None

    def rewind(self):
        self.i = 0


def head_tail(onnx_path) -> list[str]:
    """Nodes of the Detect head after its conv branches (DFL, box decode, concat of pixel boxes with [0,1] scores):
    kept in float, since one int8 scale cannot hold both ranges (the scores would round to 0)."""
    nodes = onnx.load(str(onnx_path)).graph.node
    heads = [n.name.split("/")[1] for n in nodes if n.name.count("/") > 1 and n.name.split("/")[1].startswith("model.")]
    if not heads:
        return []
    head = f"/{max(heads, key=lambda h: int(h.split('.')[1]) if h.split('.')[1].isdigit() else -1)}/"
    return [n.name for n in nodes if n.name.startswith(head) and not any(b in n.name for b in ("cv2", "cv3", "cv4"))]


def calibration_images(data, calib: int) -> list[Path]:
    """The training images INT8 calibration reads, or a one-line error naming what is missing (checked before any
    file is written)."""
    files = sample_images(data, "train", calib)
    if not files:
        if not data:
            raise FGDError("int8=True needs calibration images: pass data=your.yaml (its train split is used), or "
                           "int8=dynamic (no calibration)")
        raise FGDError(f"int8=True needs calibration images but data '{data}' has no readable train images: point "
                       "data= at a YAML whose train folder holds images, or use int8=dynamic (no calibration)")
    return files


def quantize(onnx_path, data=None, imgsz=640, mode="static", calib: int = 64) -> Path:
    """INT8 model next to ``onnx_path``: ``static`` QDQ per-channel (calibrated on ``calib`` training images) or
    ``dynamic`` (weights only). The pre-processed intermediate is removed whatever happens."""
    src = Path(onnx_path)
    files = calibration_images(data, calib) if mode != "dynamic" else []
    pre = src.with_name(f"{src.stem}-pre.onnx")
    out = src.with_name(f"{src.stem}-int8{'-dynamic' if mode == 'dynamic' else ''}.onnx")
    try:
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        if mode == "dynamic":
            quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8, per_channel=True)
        else:
            name = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).get_inputs()[0].name
            quantize_static(str(pre), str(out), _Calib(files, name, imgsz), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=head_tail(pre),
                            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    finally:
        pre.unlink(missing_ok=True)
    _copy_metadata(src, out)
    return out


def _copy_metadata(src: Path, dst: Path):
    """Keep Ultralytics' metadata (names, imgsz, stride...) on the quantised model."""
    a, b = onnx.load(str(src)), onnx.load(str(dst))
    have = {p.key for p in b.metadata_props}
    for p in a.metadata_props:
        if p.key not in have:
            b.metadata_props.add(key=p.key, value=p.value)
    onnx.save(b, str(dst))


def first_output(net):
    """(1,3,H,W) float32 array -> the first raw output of a YOLO network of any task, as an array (the detections; a
    segmentation model's prototypes are a second output): the PyTorch side of every parity check and benchmark."""
    def run(x):
        with torch.inference_mode():
            y = net(torch.from_numpy(x))
        while isinstance(y, (list, tuple)):  # (y, raw) and, for segmentation, ((y, proto), raw)
            y = y[0]
        return y.numpy()

    return run


def parity(pt_model, candidate, images: list[Path], imgsz: int) -> float:
    """Max |PyTorch - candidate| over the first raw output of a YOLO model for ``images``; ``candidate``: an ONNX
    path (run by ONNX Runtime) or a function of the input array (e.g. an OpenVINO model's ``infer``)."""
    model = pt_model.model.float().eval()
    if not callable(candidate):
        session = ort.InferenceSession(str(candidate), providers=["CPUExecutionProvider"])
        inp = session.get_inputs()[0]
        dtype = np.float16 if "float16" in inp.type else np.float32
        candidate = lambda x: session.run(None, {inp.name: x.astype(dtype)})[0]  # noqa: E731
    return max_diff(first_output(model), candidate, images, imgsz, rows_unordered=getattr(model, "end2end", False))


def export(model: str, format: str = "onnx", imgsz: int = 640, dynamic: bool = False, half: bool = False,
           int8: bool | str = False, data: str | None = None, opset: int | None = None, device: str = "cpu",
           calib: int = 64, **kwargs) -> dict:
    """Export, check parity, optionally quantise. Returns {'onnx': path, 'int8': path|None, 'parity': max_abs} (for
    OpenVINO {'openvino': dir, ...}, for another ``format``: {'format': path}); ``yolo-fgd export`` prints it as JSON.

    The ONNX route works in a hidden folder beside the checkpoint and moves its files into place only once export,
    parity and quantisation all succeeded: a failed export leaves the files it found as they were."""
    if str(model).endswith(".pth"):  # a torchvision student from `yolo-fgd tv-train`
        if format != "onnx":
            raise FGDError(f"format={format}: torchvision students export to onnx only")
        return export_onnx(model, data=data or "shapes", imgsz=imgsz, opset=opset or 17, **kwargs)
    check_opset(opset)
    model = checkpoint(model)
    yolo_model = load_yolo(model)
    if format == "openvino":
        return export_openvino(model, yolo_model, imgsz, int8, data, calib, **kwargs)
    if format != "onnx":  # Ultralytics' exporter through its Python API (the mode is kept)
        path = yolo_model.export(format=format, imgsz=imgsz, dynamic=dynamic, half=half, int8=bool(int8), data=data,
                                 device=device, **kwargs)
        result = {format: str(Path(path).resolve())}
        result_line(result)
        return result
    data = run_data(yolo_model, data)
    mode = "dynamic" if str(int8).lower() == "dynamic" else "static"
    if int8 and mode == "static":
        calibration_images(data, calib)  # before anything is written
    if half:  # Ultralytics' name for fp16 export is quantize=16 (half= is deprecated there)
        kwargs["quantize"] = 16
    pt = Path(model).resolve()
    with staged(pt) as (copy, place):
        path = Path(load_yolo(copy).export(format="onnx", imgsz=imgsz, dynamic=dynamic, simplify=True, opset=opset,
                                           device=device, **kwargs))
        images = sample_images(data, "val")
        diff = None
        if images and not half:
            diff = parity(load_yolo(copy), path, images, imgsz)
            LOGGER.info(f"parity: max |PyTorch - ONNX Runtime| = {diff:.2e} on {len(images)} images of {data}")
            check(diff, len(images), data)
        elif not images:
            LOGGER.warning("parity check skipped: no data images (pass data=your.yaml)")
        q = quantize(path, data, imgsz, mode, calib) if int8 else None
        place((path, q))
    result = {"onnx": str(pt.parent / path.name), "int8": str(pt.parent / q.name) if q else None, "parity": diff}
    if q:
        LOGGER.info(f"INT8 ({mode}) model: {result['int8']}")
    result_line(result)
    return result


def check_opset(opset) -> None:
    """An ``opset=`` the exporter cannot write (below 9, which YOLO's ops need, or above what onnx knows): one line."""
    if opset is None:
        return
    top = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not 9 <= opset <= top:
        raise FGDError(f"opset={opset} cannot be exported: pass an ONNX opset from 9 to {top} (e.g. opset=17), or "
                       "leave opset= out")


def run_data(yolo_model, data):
    """``data`` as a data YAML path, or by default the data the checkpoint was trained on (None without either)."""
    data = data or (getattr(yolo_model, "ckpt", None) or {}).get("train_args", {}).get("data")
    return resolve_data(data) if data else None  # shapes / deepforest -> their YAML; a path passes through


STAGE, ASIDE = ".export-", ".aside-"  # a staged export's folder; an earlier output moved aside while its new one lands


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep(folder: Path) -> None:
    """Tidy what an export killed mid-way left in ``folder``: the staging folders of dead processes (each holds a
    checkpoint copy) are removed; an earlier output moved aside by a dead process goes back where it was if no new
    one took its place, else it is removed."""
    for d in folder.glob(f"{STAGE}*"):
        owner = d / "pid"
        try:
            pid = int(owner.read_text())
        except (OSError, ValueError):
            pid = None
        if pid is None or not _alive(pid):
            shutil.rmtree(d, ignore_errors=True)
    for old in folder.glob(f"{ASIDE}*"):
        pid, _, name = old.name[len(ASIDE):].partition("-")
        if pid.isdigit() and _alive(int(pid)):
            continue
        dest = folder / name
        if dest.exists():
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        else:
            os.replace(old, dest)


def place_over(made: Path, dest: Path) -> None:
    """Move ``made`` (a file or folder) to ``dest``: a file by one atomic rename; a folder by moving the earlier one
    aside first, so that a kill at any point leaves the earlier output either in place or aside, where the next export
    (:func:`sweep`) puts it back."""
    if not dest.is_dir():
        os.replace(made, dest)
        return
    aside = dest.with_name(f"{ASIDE}{os.getpid()}-{dest.name}")
    os.replace(dest, aside)
    os.replace(made, dest)
    shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def staged(pt: Path):
    """A copy of checkpoint ``pt`` in a hidden folder beside it, to export from; yields (the copy, ``place``):
    ``place(made)`` moves the files or folders it made into ``pt``'s folder, over earlier ones of the same name, once
    everything succeeded. The folder is removed whatever happens (and, after a kill, by the next export), so a failed
    export leaves what it found as it was."""
    sweep(pt.parent)
    stage = Path(tempfile.mkdtemp(prefix=STAGE, dir=pt.parent))
    (stage / "pid").write_text(str(os.getpid()))

    def place(made):
        for f in made:
            if f is not None:
                place_over(f, pt.parent / f.name)

    try:
        shutil.copy2(pt, stage / pt.name)
        yield stage / pt.name, place
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def export_openvino(model: str, yolo_model, imgsz: int, int8, data, calib: int, **kwargs) -> dict:
    """OpenVINO IR through Ultralytics' exporter (``*_openvino_model/`` beside the checkpoint), the same parity check
    against PyTorch on the fp32 IR (run at f32 precision), and with ``int8=True`` an INT8 IR quantised by NNCF on
    ``calib`` training images of ``data`` (``*_int8_openvino_model/``). Staged as the ONNX export: files move into
    place only once everything succeeded. Returns {'openvino': dir, 'int8': dir|None, 'parity': max_abs}."""
    try:
        import openvino  # noqa: F401  (Ultralytics would try to install it)
        if int8:
            import nncf  # noqa: F401
    except ImportError as e:
        raise FGDError(f"format=openvino needs {e.name}: pip install 'yolo-fgd[openvino]' (openvino, nncf)") from None
    if str(int8).lower() == "dynamic":
        raise FGDError("int8=dynamic is ONNX Runtime's: for OpenVINO use int8=True (NNCF, calibrated on data=)")
    data = run_data(yolo_model, data)
    files = calibration_images(data, calib) if int8 else []
    pt = Path(model).resolve()
    with staged(pt) as (copy, place):
        ir = Path(load_yolo(copy).export(format="openvino", imgsz=imgsz, device="cpu", **kwargs))
        images = sample_images(data, "val")
        diff = None
        if images:
            from .edge import EdgeModel

            diff = parity(load_yolo(copy), EdgeModel(ir, backend="openvino", precision="f32").infer, images, imgsz)
            LOGGER.info(f"parity: max |PyTorch - OpenVINO f32| = {diff:.2e} on {len(images)} images of {data}")
            check(diff, len(images), data)
        else:
            LOGGER.warning("parity check skipped: no data images (pass data=your.yaml)")
        q = None
        if int8:
            n_train = len(sample_images(data, "train", 10**9))
            q = Path(load_yolo(copy).export(format="openvino", imgsz=imgsz, device="cpu", int8=True, data=data,
                                            split="train", fraction=min(1.0, len(files) / max(n_train, 1)), **kwargs))
        place((ir, q))
    result = {"openvino": str(pt.parent / ir.name), "int8": str(pt.parent / q.name) if q else None, "parity": diff}
    result_line(result)
    return result


def result_line(result: dict) -> None:
    """The files an export wrote, in words on stderr (``yolo-fgd export`` prints the JSON of ``result`` on stdout)."""
    print(f"yolo-fgd: exported {', '.join(v for k, v in result.items() if k != 'parity' and v)}", file=sys.stderr)
