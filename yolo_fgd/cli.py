"""``yolo-fgd``: the command line on top of every layer, in Ultralytics' ``key=value`` style. Nothing imports it.

A newcomer's order: ``data`` -> teacher (``yolo train``) -> ``train`` (distil) -> ``export`` -> ``benchmark``.
``yolo-fgd help`` lists the commands, ``yolo-fgd COMMAND help`` shows one with its arguments and an example.

Start-up is cheap: this module imports configuration only (YAML, the argument tables), so ``help``, typos and bad
values answer before torch, torchvision or Ultralytics load; each command imports what it runs when it runs. While a
command runs, its result (a path, a JSON record, a table) is the only thing on stdout (:mod:`yolo_fgd.console`).
"""

from __future__ import annotations

import difflib
import os
import shutil
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import console
from .cfg import checkpoint, parse_kv, smart_value, ultralytics_defaults, ultralytics_deprecated
from .cfg.distill import ARGS as DISTILL_ARGS
from .cfg.distill import RENAMED, argument_rows, renamed, resolve
from .cfg.tv import ARGS as TV_ARGS
from .cfg.tv import FGD_KEYS as TV_FGD_KEYS
from .cfg.tv import HELP as TV_HELP
from .errors import FGDError, first_line

HELP_WORDS = {"help", "-h", "--help"}


@dataclass
class Command:
    """One subcommand: what it does, its arguments as ``(key, default, help)`` rows (the help text, the key and type
    checks), the positional words it takes, an example, and the function that runs it (it imports what it needs)."""

    name: str
    summary: str
    args: tuple
    example: str
    run: Callable[[list[str], dict], object]
    words: tuple = ()  # positional words the command takes (at most one)
    required: tuple = ()
    more: str = ""  # help lines after the rows
    ultralytics: bool = False  # also takes every Ultralytics argument (checked by Ultralytics once it is imported)
    also: tuple = ()  # more keys it takes, whose values a later step checks (the distillation arguments: resolve())

    @property
    def defaults(self) -> dict:
        return {k: d for k, d, _ in self.args}

    def help(self) -> str:
        rows = "".join(f"    {f'{k}={_show(d)}':<24} {h}\n" for k, d, h in self.args)
        return (f"yolo-fgd {self.name}: {self.summary}\n\nArguments:\n{rows}{self.more}\nExample:\n"
                f"    {self.example}\n")

    def check(self, words: list[str], kv: dict) -> None:
        """Positional words, keys, required keys and the simple types of the defaults: one line each, no import."""
        if len(words) > 1 and all(w in self.words for w in words):
            raise FGDError(f"{self.name} takes one of {' | '.join(self.words)}, not {' and '.join(words)}: see "
                           f"`yolo-fgd {self.name} help`")
        extra = [w for w in words if w not in self.words] + words[1:]
        if extra:
            takes = f"it takes {' | '.join(self.words)} or key=value" if self.words else "it takes key=value only"
            raise FGDError(f"'{extra[0]}' is not an argument of {self.name} ({takes}): see `yolo-fgd {self.name} help`")
        known = {*self.defaults, *self.also, *(ultralytics_defaults() if self.ultralytics else ())}
        for k in kv:
            if k not in known and not (self.ultralytics and k in ultralytics_deprecated()):  # Ultralytics maps it
                close = difflib.get_close_matches(k, list(known), n=1)
                raise FGDError(f"unknown {self.name} argument '{k}'" + (
                    f": did you mean '{close[0]}'?" if close else f": see `yolo-fgd {self.name} help`"))
        missing = [k for k in self.required if kv.get(k) in (None, "")]
        if missing:
            raise FGDError(f"{self.name} needs {', '.join(k + '=' for k in missing)}: see `yolo-fgd {self.name} help`")
        check_types(kv, self.defaults)


def _show(default) -> str:
    return "" if default is None else ",".join(map(str, default)) if isinstance(default, (list, tuple)) else \
        str(default)


POSITIVE = {"imgsz", "epochs", "batches", "runs", "repeat", "steps", "images", "calib", "lanes", "boxes", "batch", "n_train",
            "n_val", "size", "tile", "teacher_epochs", "warmup_iters", "max_size", "start"}
CHOICES = {"int8": (True, False, "dynamic"), "openvino": (True, False)}  # the values a key takes beyond its default's


def check_types(kv: dict, defaults: dict) -> None:
    """Values of the wrong type for their default (a number, True/False), or not positive where they must be: one
    line each."""
    for k, v in kv.items():
        default = defaults.get(k)
        if k in CHOICES:
            if not any(v is c or (isinstance(c, str) and str(v).lower() == c) for c in CHOICES[k]):
                raise FGDError(f"{k}={v} is not one of {', '.join(map(str, CHOICES[k]))}: e.g. {k}={CHOICES[k][0]}")
        elif isinstance(default, bool):
            if not isinstance(v, bool):
                raise FGDError(f"{k}={v} is not True/False: pass {k}=True or {k}=False")
        elif isinstance(default, (int, float)) and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise FGDError(f"{k}={v} is not a number: pass e.g. {k}={default}")
        if k in POSITIVE and k in defaults and isinstance(v, (int, float)) and not isinstance(v, bool) and v <= 0:
            raise FGDError(f"{k}={v} must be > 0: pass e.g. {k}={default if default else 1}")


def check_train_args(kv: dict) -> None:
    """What Ultralytics would reject later (often with a traceback), as one line now, without importing it."""
    defaults = ultralytics_defaults()
    for k in ("epochs", "batch", "imgsz", "workers", "patience", "seed"):
        v = kv.get(k)
        if v is None:
            continue
        if k == "imgsz":
            sizes = v if isinstance(v, (list, tuple)) else [v]
            if not sizes or len(sizes) > 2 or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0
                                                      for x in sizes):
                raise FGDError(f"imgsz={v} is not an image size: pass a whole number of pixels, e.g. imgsz=640")
        elif k == "batch":
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v == -1 or v >= 1 or 0 < v < 1):
                raise FGDError(f"batch={v} is not a batch size: pass a whole number >= 1, batch=-1 (auto) or a "
                               "fraction of GPU memory in (0, 1)")
        elif isinstance(v, bool) or not isinstance(v, int) or v < (1 if k == "epochs" else 0):
            raise FGDError(f"{k}={v} must be a whole number >= {1 if k == 'epochs' else 0}: e.g. {k}={defaults[k]}")
    data = kv.get("data")
    if isinstance(data, str) and data.endswith((".yaml", ".yml")) and ("/" in data or os.sep in data) \
            and not Path(data).is_file():
        raise FGDError(f"data '{data}' not found: pass data=path/to/data.yaml, or data=shapes for the embedded set "
                       "(`yolo-fgd data shapes` prints its YAML)")


def check_ultralytics(kv: dict) -> None:
    """Ultralytics' own value checks (types of its keys), as one line; imports Ultralytics."""
    from ultralytics.cfg import check_cfg

    try:
        check_cfg({k: v for k, v in kv.items() if k in ultralytics_defaults() and k not in {"imgsz", "batch"}},
                  hard=True)
    except (TypeError, ValueError, SyntaxError) as e:
        raise FGDError(" ".join(str(e).split())) from None


def device_ids(device) -> list[str]:
    """The CUDA devices a ``device=`` value asks for ('0', '1', or '-1' for "an idle one"): [] for the CPU, MPS or
    auto; a one-line error for a value Ultralytics would not take on this machine (imports torch)."""
    text = "" if device is None else str(device).strip().lower().replace("cuda:", "").replace(" ", "")
    if text in {"", "cpu", "mps", "none"}:
        if text == "mps":
            import torch

            if not torch.backends.mps.is_available():
                raise FGDError("device=mps asks for Apple's GPU, which this machine does not have: pass device=cpu")
        return []
    ids = text.split(",")
    if text == "cuda":
        ids = ["0"]
    if not all(i.isdigit() or i == "-1" for i in ids):
        raise FGDError(f"device={device} is not a device: pass device=cpu, device=0 (first CUDA GPU), device=0,1 or "
                       "device=mps")
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        raise FGDError(f"device={device} asks for a CUDA GPU but this machine has none: pass device=cpu (or leave "
                       "device= out)")
    bad = [i for i in ids if i != "-1" and int(i) >= n]
    if bad or len(ids) > n:
        raise FGDError(f"device={device} asks for CUDA GPU {bad[0] if bad else len(ids)} but this machine has {n} "
                       f"(0-{n - 1}): pass device=0" + (f" ... device={','.join(map(str, range(n)))}" if n > 1 else ""))
    return ids


def check_project(project) -> None:
    """A ``project=`` folder that exists and is writable, or can be created: a one-line error otherwise (nothing is
    created)."""
    p = Path(project).expanduser().resolve()
    base = p
    while not base.exists():
        base = base.parent
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK) or (base != p and _pseudo(base)):
        raise FGDError(f"project={project} cannot be written ({base} is not a writable folder): pass project= a "
                       "folder you can write to, e.g. project=$PWD/runs/detect")


def _pseudo(path: Path) -> bool:
    """Whether ``path`` is on a kernel file system where new folders cannot be made (/proc, /sys)."""
    return path.parts[1:2] in (("proc",), ("sys",))


class Interrupted(Exception):
    """Ctrl-C during a run, with the checkpoint to resume from."""


def _renamed(kv: dict) -> dict:
    """``kv`` with the argument names of earlier releases replaced, each replacement said once on stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = renamed(kv)
    for w in caught:
        print(f"yolo-fgd: warning: {w.message}", file=sys.stderr)
    return out


def _resolve_model(kv: dict, key: str = "model", which: str = "best") -> None:
    """``kv[key]``: a run folder -> its weights/{which}.pt; a missing .pt (for the teacher: any missing file) is a
    one-line error."""
    if kv.get(key) in (None, ""):
        return
    kv[key] = checkpoint(kv[key], which)
    if (key == "teacher" or str(kv[key]).endswith(".pt")) and not Path(kv[key]).is_file():
        raise FGDError(f"{key} '{kv[key]}' not found: pass {key}=runs/detect/NAME (a run folder) or its "
                       "weights/best.pt")


# --- the commands --------------------------------------------------------------------------------------------------
def _train(words: list[str], kv: dict):
    """Distil: every argument checked first (no import), then the device, then Ultralytics' own checks; the run
    folder is made by Ultralytics only once all of them passed."""
    resume = bool(words) or kv.pop("resume", None) in (True, "True")
    model = kv.pop("model", None)
    if resume:
        if not model:
            raise FGDError("resume needs the checkpoint: yolo-fgd train resume model=runs/detect/NAME/weights/last.pt")
        model = checkpoint(model, "last")
        if not os.path.isfile(str(model)):
            raise FGDError(f"resume checkpoint '{model}' not found: pass model=runs/detect/NAME/weights/last.pt")
        _check_resumable(str(model))
    else:
        model = checkpoint(model or "yolo11n.yaml", "best")  # a run folder: its best.pt, as every command takes it
        if str(model).endswith(".pt") and not os.path.isfile(str(model)) and os.sep in str(model):
            raise FGDError(f"student '{model}' not found: pass model=yolo11n.yaml (from scratch) or an existing .pt")
        check_train_args(kv)
    cfg = resolve({k: v for k, v in kv.items() if k in DISTILL_ARGS})  # bad distillation values fail here
    ids = device_ids(kv.get("device"))
    if cfg["share"] > 0 and len(ids) > 1:
        raise FGDError(f"fgd_share={cfg['share']} balances gradient norms measured on one process, not under DDP "
                       f"(device={kv['device']}): train on one device or leave fgd_share out")
    if "project" in kv:
        check_project(kv["project"])
    if not resume:
        check_student_name(str(model))  # imports Ultralytics, as the next line does
    check_ultralytics(kv)
    if kv.get("teacher") not in (None, ""):
        _resolve_model(kv, "teacher")
    elif not resume:
        raise FGDError("no teacher given: pass teacher=runs/detect/NAME (a trained YOLO run folder) or its "
                       "weights/best.pt")
    from ultralytics import YOLO

    if resume:
        return _fit(YOLO(model), {"resume": True, **kv})
    from .data import resolve_data

    kv["data"] = resolve_data(kv.get("data"))
    student = _student(model)
    kv.setdefault("project", str(Path("runs", student.task).resolve()))  # ./runs/TASK/NAME, wherever yolo-fgd lives
    return _fit(student, kv)


def _check_resumable(last: str) -> None:
    """A one-line error when ``last`` is not an unfinished training checkpoint (Ultralytics would start a new default
    training from it instead: coco8.yaml, 100 epochs)."""
    try:
        ckpt = _torch_load(last)
    except Exception as e:
        raise FGDError(f"resume checkpoint '{last}' cannot be read ({type(e).__name__}): pass the last.pt of an "
                       "unfinished run") from None
    if not isinstance(ckpt, dict) or ckpt.get("optimizer") is None or ckpt.get("epoch", -1) < 0:
        run = Path(last).resolve().parent.parent
        args = _yaml(run / "args.yaml")  # the finished checkpoint keeps Ultralytics' own arguments only
        teacher = f" teacher={args['teacher']}" if args.get("teacher") else " teacher=..."
        raise FGDError(f"run {run} has finished its training ({Path(last).name} holds no optimizer state): nothing to "
                       f"resume; to train it further start a new run from it: yolo-fgd train model={run}/weights/"
                       f"best.pt{teacher} epochs=N")


def _yaml(path: Path) -> dict:
    import yaml

    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _torch_load(path: str):
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


STUDENT_FIX = ("pass a YOLO detect, segment, pose or obb model: model=yolo11n.yaml (from scratch), yolo11n-seg.yaml, "
               "yolo11n-pose.yaml, yolo11n-obb.yaml, or the path of a .pt or run folder")


def check_student_name(model: str) -> None:
    """One line for a student no distillation trainer takes: RT-DETR (a transformer decoder, not a Detect-family
    head), a classifier, SAM, a model YAML Ultralytics does not know (this last check imports Ultralytics)."""
    stem = Path(model).stem.lower()
    if stem.startswith("rtdetr") or "-cls" in stem or stem.startswith(("sam", "mobile_sam", "fastsam")):
        kind = "an RT-DETR" if stem.startswith("rtdetr") else "a classification" if "-cls" in stem else "a SAM"
        raise FGDError(f"student '{model}' is {kind} model, which yolo-fgd cannot distil (it needs a YOLO Detect-family "
                       f"head): {STUDENT_FIX}")
    if model.endswith((".yaml", ".yml")) and not Path(model).is_file():
        from ultralytics.nn.tasks import yaml_model_load

        try:
            yaml_model_load(model)
        except FileNotFoundError:
            raise FGDError(f"student '{model}' is neither a file nor a model YAML Ultralytics knows: {STUDENT_FIX}") \
                from None


def _student(model: str):
    """``YOLO(model)``, with a hub name that cannot be downloaded (offline) or a model no trainer takes as one line."""
    from ultralytics import YOLO

    try:
        student = YOLO(model)
    except ConnectionError:
        raise FGDError(f"student '{model}' is not a file here and could not be downloaded (offline?): pass "
                       f"model={Path(model).stem}.yaml to train from scratch, or the path of a local .pt") from None
    except (NotImplementedError, KeyError, TypeError) as e:
        raise FGDError(f"student '{model}' cannot be distilled ({first_line(e, 160)}): {STUDENT_FIX}") from None
    from .yolo.model import detect_head

    if detect_head(student.model) is None:
        raise FGDError(f"student '{model}' has no YOLO Detect-family head: {STUDENT_FIX}")
    return student


def _fit(yolo, kv: dict):
    """Train with the distillation trainer of the student's task; print where the run went (its best.pt on stdout),
    or how to resume after Ctrl-C. A run that fails before writing a checkpoint leaves no folder behind: the folder
    its own trainer made is removed (never one predicted from the name, which a second run of that name may be
    using)."""
    from .yolo import trainer_for
    from .yolo.trainer import discard_run

    before = getattr(yolo, "trainer", None)
    try:
        yolo.train(trainer=trainer_for(yolo.task), **kv)
    except BaseException as e:
        trainer = getattr(yolo, "trainer", None)
        save_dir = getattr(trainer, "save_dir", None) if trainer is not before else None  # this run's own trainer
        if save_dir is not None and not kv.get("resume"):
            discard_run(save_dir)  # made by this run; removed when it wrote no checkpoint
        if isinstance(e, KeyboardInterrupt):
            last = getattr(trainer, "last", None)
            raise Interrupted(last if last is not None and Path(last).is_file() else None) from None
        raise
    save_dir = Path(yolo.trainer.save_dir).resolve()
    best = save_dir / "weights" / "best.pt"
    print(f"yolo-fgd: distilled student saved to {best} (run folder {save_dir})")
    console.result(str(best))
    return save_dir


def _mode(mode: str) -> Callable:
    def run(words: list[str], kv: dict):
        """Ultralytics' ``YOLO(model).MODE(**kv)`` (the Python API keeps the mode), data=shapes/deepforest and run
        folders resolved; val prints its metrics as JSON on stdout, predict the folder it saved to."""
        _resolve_model(kv)
        if mode == "predict":
            check_source(kv.get("source"))
        device_ids(kv.get("device"))
        check_ultralytics(kv)
        from ultralytics import YOLO

        from .data import resolve_data

        if "data" in kv:
            kv["data"] = resolve_data(kv["data"])
            check_data(kv["data"])
        model = YOLO(kv.pop("model"))
        kv.setdefault("project", str(Path("runs", model.task).resolve()))  # ./runs/TASK/MODE, as train
        if mode == "predict":
            kv.setdefault("save", True)  # as `yolo predict` (the Python API's default is not to save)
        with removed_if_empty(Path(kv["project"])):
            out = getattr(model, mode)(**kv)
        if mode == "val":
            import json

            console.result(json.dumps({k: round(float(v), 5) for k, v in out.results_dict.items()}))
        else:
            save_dir = getattr(getattr(model, "predictor", None), "save_dir", None)
            print(f"yolo-fgd: {len(out)} image(s) predicted" + (f", saved to {Path(save_dir).resolve()}" if save_dir
                                                                  and kv["save"] else ""))
            if save_dir and kv["save"]:
                console.result(str(Path(save_dir).resolve()))

    return run


STREAMS = ("http://", "https://", "rtsp://", "rtmp://", "tcp://", "screen")


def check_source(source) -> None:
    """A predict ``source=`` that is missing or names no file, folder, glob, stream or camera: one line."""
    if source in (None, ""):
        raise FGDError("predict needs source=: pass source=image.jpg, a folder of images or a video")
    text = str(source)
    if isinstance(source, str) and not text.isdigit() and not text.lower().startswith(STREAMS) and \
            not any(c in text for c in "*?[") and not Path(text).exists():
        raise FGDError(f"source '{text}' not found: pass source= an image, a folder of images, a video, a glob such as "
                       "'images/*.jpg', a URL or a camera index (source=0)")


def _probe(name: str) -> Callable:
    """A runner of ``yolo_fgd.lab.probes.<name>`` whose ``data=`` is checked first (one line with the fix)."""
    def run(words: list[str], kv: dict):
        check_data(kv.get("data"))
        return _lazy("lab.probes", name)(words, kv)

    return run


def check_data(data) -> None:
    """A ``data=`` YAML that is neither a file nor a data set Ultralytics knows (``coco8.yaml``): one line, before any
    folder is made (imports Ultralytics)."""
    if not isinstance(data, str) or not data.endswith((".yaml", ".yml")) or Path(data).is_file():
        return
    from ultralytics.utils.checks import check_yaml

    try:
        check_yaml(data)
    except FileNotFoundError:
        raise FGDError(f"data '{data}' not found: pass data=path/to/data.yaml, data=shapes (the embedded set) or a "
                       "data set YAML Ultralytics knows, e.g. coco8.yaml") from None


@contextmanager
def removed_if_empty(project: Path):
    """On failure, remove the folders the block made under ``project`` (and ``project`` and its parents, if it made
    them) that hold nothing: a failed val or predict leaves no empty ``val-N`` or ``runs/``; folders that existed
    before, or hold any file, are left as they are."""
    project = project.resolve()
    before = set(project.iterdir()) if project.is_dir() else set()
    top = project
    while not top.exists():
        top = top.parent
    try:
        yield
    except BaseException:
        if project.is_dir():
            for d in set(project.iterdir()) - before:
                if d.is_dir() and not any(p.is_file() for p in d.rglob("*")):
                    shutil.rmtree(d, ignore_errors=True)
        d = project
        while d != top and d.is_dir() and not any(d.iterdir()):
            d.rmdir()
            d = d.parent
        raise


def _data(words: list[str], kv: dict):
    from .data import deepforest, shapes

    console.result(str({"shapes": shapes, "deepforest": deepforest}[words[0] if words else "shapes"](**kv)))


def _export(words: list[str], kv: dict):
    device_ids(kv.get("device"))
    extra = {k: v for k, v in kv.items() if k not in COMMANDS["export"].defaults}
    if extra:
        check_ultralytics(extra)
    import json

    from .deploy.export import export

    result = export(**kv)
    console.result(json.dumps(result))
    return result


def _lazy(module: str, name: str, device: bool = False) -> Callable:
    """A runner calling ``yolo_fgd.<module>.<name>(**kv)``, imported when the command runs."""
    def run(words: list[str], kv: dict):
        import importlib

        if device:
            device_ids(kv.get("device"))
        return getattr(importlib.import_module(f".{module}", __package__), name)(**kv)

    return run


TRAIN_ARGS = (
    ("model", "yolo11n.yaml", "student: a model YAML (from scratch) or a .pt (fine-tuning)"),
    ("data", "shapes", "data YAML (shapes / deepforest: the sets `yolo-fgd data` builds)"),
    *((arg, None if default in ("None", "required") else default, text) for arg, default, text, _ in argument_rows()),
)
TRAIN_MORE = f"""    resume                 continue an interrupted run: yolo-fgd train resume model=<run>/weights/last.pt
    any Ultralytics train argument (epochs, imgsz, batch, device, project, name, ...)
    Defaults are the shipped preset's (yolo): head response + CrossKD, FGD off (fgd_gain=0.05 turns it on).
    Renamed (still accepted, with a warning): {', '.join(f'{a} -> {b}' for a, b in RENAMED.items())}
    Prints the distilled student's best.pt on stdout (logs go to stderr).
"""
EXPORT_ARGS = (
    ("model", None, "a YOLO .pt or run folder, or a torchvision student .pth (with arch= backbone=) (required)"),
    ("format", "onnx", "onnx or openvino (parity check, INT8), or any other Ultralytics export format"),
    ("imgsz", 640, "input size"),
    ("dynamic", False, "dynamic batch and size"),
    ("half", False, "fp16 ONNX (no parity check)"),
    ("int8", False, "True: static QDQ INT8 calibrated on data= train images; dynamic: weights only"),
    ("data", None, "images for parity and calibration (default: the run's training data)"),
    ("opset", None, "ONNX opset"),
    ("device", "cpu", "device to export on"),
    ("calib", 64, "calibration images"),
)
BENCH_ARGS = (
    ("model", None, "checkpoints a.pt[,b.pt] or run folders (required)"),
    ("data", None, "data for mAP (default: shapes)"),
    ("imgsz", 640, "input size"),
    ("runs", 50, "timed runs per format"),
    ("threads", 0, "CPU threads (0: all)"),
    ("project", "runs/benchmark", "where the report goes"),
    ("name", "bench", "report folder name"),
    ("int8", True, "add the INT8 rows (ONNX Runtime QDQ; OpenVINO NNCF)"),
    ("openvino", None, "add the OpenVINO f32 / bf16 / INT8 rows (default: when OpenVINO is installed)"),
)
TV_VAL_ARGS = (("model", None, "a torchvision student .pth (required)"), ("data", "shapes", "data"),
               ("arch", "retinanet", "retinanet | fcos | faster_rcnn | mask_rcnn"), ("backbone", "resnet50", "student backbone"),
               ("device", "cpu", "device"), ("min_size", [800], "shorter side"), ("max_size", 1333, "longer side cap"))


def _rows(spec: str) -> tuple:
    """``"key=default help; ..."`` -> rows; for the commands whose arguments are all simple."""
    out = []
    for item in spec.split(";"):
        head, _, text = item.strip().partition(" ")
        k, _, v = head.partition("=")
        out.append((k, smart_value(v) if v else None, text.strip()))
    return tuple(out)


COMMANDS = {c.name: c for c in [
    Command("data", "build a data set offline and print its data YAML (the path alone on stdout)",
            _rows("root= where to write it (default: Ultralytics' datasets_dir); task=detect detect|segment|pose|obb "
                  "(shapes); n_train=480 training images (shapes); n_val=120 validation images (shapes); size=256 "
                  "image size (shapes); seed=0 (shapes); tile=320 tile size (deepforest); overlap=64 tile overlap "
                  "(deepforest); min_visible=0.4 share of a crown inside a tile to keep it (deepforest)"),
            "DATA=$(yolo-fgd data shapes)", _data, words=("shapes", "deepforest"),
            more="    shapes | deepforest    which set (default shapes)\n"),
    Command("train", "distil a student (detect, segment, pose or obb, as its model says) from a teacher of the same "
                     "task", TRAIN_ARGS,
            "yolo-fgd train model=yolo11n.yaml teacher=runs/detect/teacher data=shapes epochs=30 imgsz=192 "
            "name=distilled", _train, words=("resume",), more=TRAIN_MORE, ultralytics=True, also=tuple(DISTILL_ARGS)),
    Command("val", "Ultralytics' validation of a checkpoint or run folder (data=shapes/deepforest resolved); "
                   "its metrics as JSON on stdout", (("model", None, "a .pt or a run folder (required)"),),
            "yolo-fgd val model=runs/detect/distilled data=shapes imgsz=192", _mode("val"), required=("model",),
            more="    any Ultralytics val argument (data, imgsz, batch, device, conf, iou, split, ...)\n",
            ultralytics=True),
    Command("predict", "Ultralytics' prediction with a checkpoint or run folder; the folder it saved to on stdout",
            (("model", None, "a .pt or a run folder (required)"), ("source", None, "image, folder or video (required)")),
            "yolo-fgd predict model=runs/detect/distilled source=image.jpg", _mode("predict"),
            required=("model", "source"),
            more="    any Ultralytics predict argument (imgsz, conf, iou, save, project, name, ...)\n",
            ultralytics=True),
    Command("export", "ONNX export with a PyTorch-vs-ONNX Runtime parity check, optional INT8 (its JSON on stdout); "
                      "a failed export leaves earlier files as they were", EXPORT_ARGS,
            "yolo-fgd export model=runs/detect/distilled imgsz=192 int8=True", _export, required=("model",),
            more="    any other Ultralytics export argument (with format=)\n", ultralytics=True),
    Command("benchmark", "size, model and end-to-end latency, mAP of PyTorch, ONNX Runtime and OpenVINO at every "
                         "precision, and the format to ship on this machine",
            BENCH_ARGS, "yolo-fgd benchmark model=runs/detect/distilled data=shapes imgsz=192",
            _lazy("deploy.benchmark", "benchmark"), required=("model",)),
    Command("demo", "the whole workflow on the embedded data (what `make demo` runs)",
            _rows("recipe=demo recipe name or YAML; project=runs where runs go; name=demo folder; lanes=2 runs at "
                  "once; epochs= student epochs; teacher_epochs= teacher epochs; imgsz= image size; export=True "
                  "export and benchmark the student"),
            "yolo-fgd demo epochs=3 teacher_epochs=3", _lazy("lab.demo", "demo")),
    Command("study", "the comparison of methods over seeds, resumable, with a report",
            _rows("recipe=study a shipped recipe name or a recipe YAML; project=runs/study where runs go; name= "
                  "study folder (default: the recipe's name); lanes=2 runs at once; only= train only these methods "
                  "a,b and the teacher (the report keeps every finished run); seeds= train only these seeds 0,1; threads= threads per run (default: the cores / lanes, 1 for a second study beside another); report_only=False only write the report of "
                  "finished runs; rescore=False re-evaluate finished runs first"),
            "yolo-fgd study recipe=study lanes=2", _lazy("lab.study", "study")),
    Command("curves", "two training runs compared epoch by epoch: epochs ahead and behind, mean difference (prints a "
                      "table)",
            _rows("run= run folders or results.csv a[,b] (required); control= the run they are compared with "
                  "(required); start=1 first epoch compared; stop= last epoch compared (default: the last both have); metric=metrics/mAP50-95(B) the results.csv column"),
            "yolo-fgd curves run=runs/study/converged/shapes/full_cwd-s0 control=runs/study/converged/shapes/full_fit-s0 "
            "start=40", _lazy("lab.curves", "curves"), required=("run", "control"),
            more="    points (x100) of run - control over their common epochs from start= to stop=, at the last one "
                 "and between their best epochs there\n"),
    Command("tv-train", "the paper-faithful torchvision path (RetinaNet/FCOS on P3-P7, Faster/Mask R-CNN on P2-P6)",
            (("recipe", None, "tv_retinanet_r101_r50 | tv_fcos_r101_r50 | tv_retinanet_r34_r18_cpu (or any recipe YAML of tv-train arguments)"),
             *((k, v, TV_HELP.get(k, "")) for k, v in TV_ARGS.items()), *((k, None, "FGD, as for train") for k in TV_FGD_KEYS)),
            "yolo-fgd tv-train recipe=tv_retinanet_r34_r18_cpu teacher=runs/tv/teacher/model.pth name=fgd",
            _lazy("tv.train", "train", device=True), more="    fgd_* keys as for train (FGD only); fgd_gain=auto: the gain at which FGD's loss equals the "
                 "detection losses at the start (measured on the first batches)\n"),
    Command("tv-val", "COCOeval of a torchvision student", TV_VAL_ARGS,
            "yolo-fgd tv-val model=runs/tv/fgd/student.pth arch=retinanet backbone=resnet18",
            _lazy("tv.train", "val", device=True), required=("model",)),
    Command("attention", "spatial and channel attention maps of teacher, baseline and student (paper Fig. 1/5)",
            _rows("model= student .pt (required); teacher= teacher .pt (required); source= image (required); "
                  "baseline= a plainly trained student .pt; imgsz=640 input size; temperature=0.5 T of Eq. 5-6; "
                  "out= output image"),
            "yolo-fgd attention model=student.pt teacher=teacher.pt source=image.jpg",
            _lazy("lab.probes", "attention_maps"), required=("model", "teacher", "source")),
    Command("imitation", "held-out R^2 of the best linear map from a student's Detect inputs to the teacher's",
            _rows("model= a.pt[,b.pt] (required); teacher= teacher .pt (required); data=shapes data; imgsz=640 input "
                  "size; images=120 images"),
            "yolo-fgd imitation model=student.pt teacher=teacher.pt", _probe("imitation"),
            required=("model", "teacher")),
    Command("gradients", "where each distillation term pulls a student: its gradient against the detection loss's",
            _rows("model= student .pt or run folder (required); teacher= teacher .pt or run folder (required); "
                  "data=shapes data; imgsz=640 input size; batch=16 images per batch; batches=8 training batches; "
                  "seed=0 which batches"),
            "yolo-fgd gradients model=runs/detect/plain teacher=runs/detect/teacher imgsz=160",
            _probe("gradients"),
            required=("model", "teacher"), also=tuple(k for k in DISTILL_ARGS if k != "teacher"),
            more="    any distillation argument (kd_cls=0 leaves a term out; default: every term at weight 1, "
                 "fgd_gain=0.05)\n    prints per term |g_k|/|g_det|, cos(g_k, g_det) and cos(g_k, g_val) (held-out "
                 "images) as JSON on stdout\n"),
    Command("benchmark-loss", "cost of the FGD loss against a plain feature MSE (prints figures)",
            _rows("batch=16 images; imgsz=640 image size; boxes=50 boxes per image; device=cpu device; repeat=5 timed "
                  "runs; step=True also a YOLO11n training step; amp=False fp16 autocast features; threads=0 CPU "
                  "threads (0: all); pyramid= another version's FGDPyramid file (e.g. an old checkout's loss); "
                  "compile=True also the compiled loss (its first call is the compile); relation=gcblock gcblock | nonlocal "
                  "(Table 6, small imgsz only)"),
            "yolo-fgd benchmark-loss device=0 amp=True", _lazy("lab.cost", "benchmark_loss", device=True),
            more="    prints the first call's seconds (the compile), ms of the compiled and the eager loss, the FGD/MSE "
                 "ratio and the aten ops / compute ops (and CUDA kernels) per fwd+bwd\n"),
    Command("benchmark-step", "ms per training iteration of each distillation method and its ratio to plain",
            _rows("teacher= teacher .pt (required); data=shapes data; model=yolo11n.yaml student; imgsz=192 image "
                  "size; batch=16 batch; fraction=0.5 share of the data; device=cpu device; amp=False AMP; workers=0 "
                  "data workers; epochs=1 epochs per method; methods=plain,default,response,fgd,fgd_response,mgd,"
                  "distill_model methods (also: response_focal, fgd_tied, lad, cwd); repeat=3 alternating rounds of every "
                  "method; project=runs/benchmark-step where runs go"),
            "yolo-fgd benchmark-step teacher=runs/detect/teacher/weights/best.pt",
            _lazy("lab.cost", "benchmark_step", device=True), required=("teacher",)),
    Command("benchmark-accuracy", "error of the compiled FGD loss and of the official code's fp32 against the fp64 "
                                  "definition at 80x80 (prints figures)",
            _rows("size=80 map size; seed=0 random seed; threads=0 CPU threads (0: all)"),
            "yolo-fgd benchmark-accuracy", _lazy("lab.accuracy", "loss_accuracy")),
    Command("benchmark-startup", "how fast help, COMMAND help and a typo answer, beside `yolo help` (prints figures)",
            _rows("repeat=5 alternating runs of each"), "yolo-fgd benchmark-startup", _lazy("lab.startup", "startup")),
    Command("soak", "memory soak on odd labels, FGD on (prints peak RSS)",
            _rows("steps=200 training steps; imgsz=64 image size; batch=4 batch; project=runs/soak where runs go"),
            "yolo-fgd soak steps=200", _lazy("lab.cost", "soak")),
]}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"    {c.name:<{width}}  {c.summary}" for c in COMMANDS.values()]
    return ("yolo-fgd: Focal and Global Knowledge Distillation for Ultralytics YOLO.\n\n"
            "Usage: yolo-fgd COMMAND key=value ...   (yolo-fgd COMMAND help: its arguments and an example)\n\n"
            "A first run, in order:\n"
            "    DATA=$(yolo-fgd data shapes)                          # embedded data set -> its data YAML\n"
            "    yolo train model=yolo11s.yaml data=$DATA epochs=30 imgsz=192 project=$PWD/runs/detect name=teacher\n"
            "    yolo-fgd train model=yolo11n.yaml teacher=runs/detect/teacher data=$DATA epochs=30 imgsz=192 "
            "name=distilled\n"
            "    yolo-fgd export model=runs/detect/distilled imgsz=192 int8=True\n"
            "    yolo-fgd benchmark model=runs/detect/distilled data=$DATA imgsz=192\n\n"
            "Outputs go under ./runs of the current directory (or project=); each command prints where it wrote, and\n"
            "its result (a path, JSON, a table) is the only thing on stdout.\n\n"
            "Commands:\n" + "\n".join(lines) + "\n\nAdd debug=True to see full tracebacks.\n")


def run(argv: list[str]):
    words, kv = parse_kv(argv)
    if not words or words[0] in HELP_WORDS:
        if words[1:]:
            raise FGDError(f"'{words[1]}' after help: run `yolo-fgd help` or `yolo-fgd COMMAND help`")
        console.result(usage())
        return None
    cmd, rest = words[0], words[1:]
    if cmd not in COMMANDS:
        close = difflib.get_close_matches(cmd, list(COMMANDS), n=1)
        raise FGDError(f"unknown command '{cmd}'" + (f": did you mean '{close[0]}'?" if close else "")
                       + f" (commands: {', '.join(COMMANDS)})")
    command = COMMANDS[cmd]
    if isinstance(kv.get("device"), (list, tuple)):  # device=0,1 reads as a tuple
        kv["device"] = ",".join(map(str, kv["device"]))
    if any(w in HELP_WORDS for w in rest):
        console.result(command.help())
        return None
    kv = _renamed(kv) if cmd in {"train", "tv-train"} else kv
    command.check(rest, kv)
    return command.run(rest, kv)


def entrypoint(argv: list[str] | None = None) -> int:
    """Console script: one clear line and exit code 2 on bad input; ``debug=True`` re-raises with the traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = any(a.lower() in {"debug=true", "--debug"} for a in argv)
    argv = [a for a in argv if a.lower() not in {"debug=true", "debug=false", "--debug"}]
    try:
        with console.results_only():
            run(argv)
    except (FGDError, FileNotFoundError, SyntaxError, RuntimeError) as e:
        if debug or (isinstance(e, RuntimeError) and not str(e).startswith("Dataset")):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"yolo-fgd: error: {msg}", file=sys.stderr)
        return 2
    except ConnectionError as e:  # a hub name (weights, data set) that must be downloaded, on a machine offline
        if debug:
            raise
        msg = " ".join(str(e).split()).replace("❌", "").strip().rstrip(".")
        print(f"yolo-fgd: error: {msg}: this machine cannot download it; pass local files (a .pt or run folder, a data "
              "YAML whose images are here; data=shapes builds the embedded set offline)", file=sys.stderr)
        return 2
    except Interrupted as e:
        last = e.args[0] if e.args else None
        hint = f"resume with: yolo-fgd train resume model={Path(last).resolve()}" if last else \
            "no checkpoint was written yet: start the run again"
        print(f"yolo-fgd: interrupted; {hint}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("yolo-fgd: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`yolo-fgd help | head`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(entrypoint())
