"""``yolo-fgd``: the command line on top of every layer, in Ultralytics' ``key=value`` style. Nothing imports it.

A newcomer's order: ``data`` -> teacher (``yolo train``) -> ``train`` (distil) -> ``export`` -> ``benchmark``.
``yolo-fgd help`` lists the commands, ``yolo-fgd COMMAND help`` shows one with its arguments and an example.
"""

from __future__ import annotations

import difflib
import inspect
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ultralytics import YOLO
from ultralytics.cfg import check_cfg
from ultralytics.cfg import entrypoint as yolo_cli
from ultralytics.utils import DEFAULT_CFG_DICT, LOGGER

from .cfg import parse_kv
from .core.presets import ARGS, RENAMED, presets, renamed, resolve
from .data import deepforest, resolve_data, shapes
from .deploy.benchmark import benchmark
from .deploy.export import export
from .errors import FGDError
from .lab.cost import benchmark_loss, benchmark_step, soak
from .lab.demo import demo
from .lab.probes import attention_maps, imitation
from .lab.study import study
from .tv.train import ARGS as TV_ARGS
from .tv.train import train as tv_train
from .tv.train import val as tv_val
from .yolo import trainer_for
from .yolo.model import checkpoint

HELP_WORDS = {"help", "-h", "--help"}


@dataclass
class Command:
    """One subcommand: what it does, its arguments (help text), an example, and the function that runs it."""

    name: str
    summary: str
    arguments: str
    example: str
    run: Callable[[list[str], dict], object]

    def help(self) -> str:
        return f"yolo-fgd {self.name}: {self.summary}\n\nArguments:\n{self.arguments}\nExample:\n    {self.example}\n"


def check_keys(kv: dict, known, command: str) -> None:
    """Unknown keys fail early with the closest known one."""
    for k in kv:
        if k not in known:
            close = difflib.get_close_matches(k, list(known), n=1)
            raise FGDError(f"unknown argument '{k}' for {command}" + (f": did you mean '{close[0]}'?" if close else
                                                                        f": see `yolo-fgd {command} help`"))


POSITIVE = {"imgsz", "epochs", "runs", "repeat", "steps", "images", "calib", "lanes", "boxes", "batch", "n_train",
            "n_val", "size", "tile", "teacher_epochs", "warmup_iters", "max_size"}


def check_types(kv: dict, defaults: dict) -> None:
    """Values of the wrong type for their default (a number, True/False), or not positive where they must be: one
    line each."""
    for k, v in kv.items():
        default = defaults.get(k)
        if isinstance(default, bool):
            if not isinstance(v, bool):
                raise FGDError(f"{k}={v} is not True/False: pass {k}=True or {k}=False")
        elif isinstance(default, (int, float)) and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise FGDError(f"{k}={v} is not a number: pass e.g. {k}={default}")
        if k in POSITIVE and isinstance(v, (int, float)) and not isinstance(v, bool) and v <= 0:
            raise FGDError(f"{k}={v} must be > 0: pass e.g. {k}={default if default else 1}")


def call(fn: Callable, kv: dict, command: str, required: tuple[str, ...] = ()):
    """Call ``fn(**kv)`` after checking the keys against its signature and the simple types of its defaults."""
    params = inspect.signature(fn).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        check_keys(kv, params, command)
    missing = [k for k in required if kv.get(k) in (None, "")]
    if missing:
        raise FGDError(f"{command} needs {', '.join(k + '=' for k in missing)}: see `yolo-fgd {command} help`")
    check_types(kv, {k: p.default for k, p in params.items()})
    return fn(**kv)


def check_train_args(kv: dict) -> None:
    """What Ultralytics would reject later (often with a traceback), as one line now."""
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
            raise FGDError(f"{k}={v} must be a whole number >= {1 if k == 'epochs' else 0}: e.g. "
                           f"{k}={DEFAULT_CFG_DICT[k]}")
    try:
        check_cfg({k: v for k, v in kv.items() if k in DEFAULT_CFG_DICT and k not in {"imgsz", "batch"}}, hard=True)
    except (TypeError, ValueError, SyntaxError) as e:
        raise FGDError(" ".join(str(e).split())) from None
    data = kv.get("data")
    if isinstance(data, str) and data.endswith((".yaml", ".yml")) and ("/" in data or os.sep in data) \
            and not Path(data).is_file():
        raise FGDError(f"data '{data}' not found: pass data=path/to/data.yaml, or data=shapes for the embedded set "
                       "(`yolo-fgd data shapes` prints its YAML)")


class Interrupted(Exception):
    """Ctrl-C during a run, with the checkpoint to resume from."""


def _renamed(kv: dict) -> dict:
    """``kv`` with the argument names of earlier releases replaced, each replacement logged once."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = renamed(kv)
    for w in caught:
        LOGGER.warning(f"yolo-fgd: {w.message}")
    return out


# --- the commands --------------------------------------------------------------------------------------------------
def _train(words: list[str], kv: dict):
    kv = _renamed(kv)
    check_keys(kv, {*DEFAULT_CFG_DICT, *ARGS}, "train")
    resume = "resume" in words or kv.get("resume") in (True, "True")
    model = kv.pop("model", None)
    kv.pop("resume", None)
    if resume:
        if not model:
            raise FGDError("resume needs the checkpoint: yolo-fgd train resume model=runs/detect/NAME/weights/last.pt")
        model = checkpoint(model, "last")
        if not os.path.isfile(str(model)):
            raise FGDError(f"resume checkpoint '{model}' not found: pass model=runs/detect/NAME/weights/last.pt")
        return _fit(YOLO(model), {"resume": True, **kv})
    model = model or "yolo11n.yaml"
    if str(model).endswith(".pt") and not os.path.isfile(str(model)) and os.sep in str(model):
        raise FGDError(f"student '{model}' not found: pass model=yolo11n.yaml (from scratch) or an existing .pt")
    check_train_args(kv)
    resolve({k: v for k, v in kv.items() if k in ARGS})  # bad distillation values fail here, before any work
    kv["data"] = resolve_data(kv.get("data"))
    student = YOLO(model)
    kv.setdefault("project", str(Path("runs", student.task).resolve()))  # ./runs/TASK/NAME, wherever yolo-fgd lives
    return _fit(student, kv)


def _fit(yolo: YOLO, kv: dict):
    """Train with the distillation trainer of the student's task; say where the run went, or how to resume it after
    Ctrl-C."""
    try:
        yolo.train(trainer=trainer_for(yolo.task), **kv)
    except KeyboardInterrupt:
        last = getattr(getattr(yolo, "trainer", None), "last", None)
        raise Interrupted(last if last is not None and Path(last).is_file() else None) from None
    save_dir = Path(yolo.trainer.save_dir).resolve()
    print(f"yolo-fgd: distilled student saved to {save_dir / 'weights' / 'best.pt'} (run folder {save_dir})")
    return save_dir


def _delegate(mode: str) -> Callable:
    def run(words: list[str], kv: dict):
        """Ultralytics' own ``yolo MODE ...`` with the same arguments."""
        if "data" in kv:
            kv["data"] = resolve_data(kv["data"])
        yolo_cli(" ".join([mode, *words, *(f"{k}={v}" for k, v in kv.items())]))

    return run


def _data(words: list[str], kv: dict):
    name = words[0] if words else "shapes"
    builders = {"shapes": shapes, "deepforest": deepforest}
    if name not in builders:
        raise FGDError(f"unknown data set '{name}': choose shapes or deepforest")
    print(call(builders[name], kv, "data"))


def _tv_train(words: list[str], kv: dict):
    check_types(kv, TV_ARGS)
    return tv_train(**kv)


PRESET_NAMES = " | ".join(presets())
TRAIN_ARGS = f"""    model=yolo11n.yaml     student: a model YAML (from scratch) or a .pt (fine-tuning)
    teacher=PATH           teacher YOLO checkpoint, same classes and Detect strides (required)
    data=shapes            data YAML (shapes / deepforest: the sets `yolo-fgd data` builds)
    fgd_preset=yolo        {PRESET_NAMES}
    fgd_fg= fgd_bg= fgd_at= fgd_gl=   FGD term weights (the paper's alpha, beta, gamma, lambda of Eq. 13)
    fgd_temperature=0.5    T of Eq. 5-6
    fgd_gain=              multiplies the four FGD weights (preset yolo: 0, FGD off; 0.05 turns it on)
    fgd_norm=              standardise features per image and channel before FGD
    fgd_warmup=            epochs of linear warm-up of every distillation term
    fgd_decay=             last epochs over which the distillation weight falls to 0 (cosine; 0: off)
    fgd_level_norm=True    weigh FGD levels equally (running mean of each level's term)
    fgd_share=             keep |grad FGD| / |grad detection| at this value (0: off), measured every 25 batches
    fgd_split= fgd_spatial= fgd_channel=   ablations: fg/bg split, spatial / channel attention (True/False)
    fgd_mse=True           plain feature MSE (paper Eq. 1) instead of FGD, e.g. with fgd_preset=mse
    kd_cls= kd_box=        weights of the head-response term (teacher class scores as soft labels, box-bin KL)
    kd_kpt= kd_angle= kd_mask=   the response term of a pose / OBB / segment head's keypoints, angles, masks
    kd_focal=True          weigh the response term per anchor by FGD's fg/bg masks and teacher attention
    crosskd=1.0            CrossKD: the student's Detect inputs through the teacher's head, to its outputs (on in
                           the shipped preset; crosskd=0 leaves the head response alone)
    fgd_mgd=True           masked generative distillation instead of FGD (fgd_preset=mgd; fgd_mgd_ratio=0.65)
    resume                 continue an interrupted run: yolo-fgd train resume model=<run>/weights/last.pt
    any Ultralytics train argument (epochs, imgsz, batch, device, project, name, ...)
    Renamed (still accepted, with a warning): {', '.join(f'{a} -> {b}' for a, b in RENAMED.items())}
"""

COMMANDS = {c.name: c for c in [
    Command("data", "build a data set offline and print its data YAML",
            "    shapes (default) | deepforest    which set\n    root=DIR   where to write it (default: Ultralytics' "
            "datasets_dir)\n    shapes: task=detect|segment|pose|obb n_train=480 n_val=120 size=256 seed=0\n    deepforest: tile=320 overlap=64 "
            "min_visible=0.4\n",
            "yolo-fgd data shapes", _data),
    Command("train", "distil a student (detect, segment, pose or obb, as its model says) from a teacher of the same "
                     "task", TRAIN_ARGS,
            "yolo-fgd train model=yolo11n.yaml teacher=runs/detect/teacher/weights/best.pt data=shapes epochs=30 "
            "imgsz=192 name=distilled", _train),
    Command("val", "Ultralytics' `yolo val` (data=shapes/deepforest resolved)", "    any `yolo val` argument\n",
            "yolo-fgd val model=runs/detect/distilled/weights/best.pt data=shapes imgsz=192", _delegate("val")),
    Command("predict", "Ultralytics' `yolo predict`", "    any `yolo predict` argument\n",
            "yolo-fgd predict model=runs/detect/distilled/weights/best.pt source=image.jpg", _delegate("predict")),
    Command("export", "ONNX export with a PyTorch-vs-ONNX Runtime parity check, optional INT8",
            "    model=PATH             a YOLO .pt, or a torchvision student .pth (with arch= backbone=) (required)\n"
            "    format=onnx imgsz=640 dynamic=False opset=\n    half=True              fp16 ONNX (no parity check)\n"
            "    int8=True|dynamic      INT8: static QDQ calibrated on data= train images, or dynamic\n"
            "    data=                  images for parity and calibration (default: the run's training data)\n"
            "    calib=64               calibration images\n",
            "yolo-fgd export model=runs/detect/distilled/weights/best.pt imgsz=192 int8=True",
            lambda w, kv: call(export, kv, "export", ("model",))),
    Command("benchmark", "size, latency and mAP of PyTorch fp32 / ONNX fp32 / ONNX int8 for one or more students",
            "    model=a.pt[,b.pt]      checkpoints (required)\n    data=shapes imgsz=640 runs=50 threads=0 int8=True\n"
            "    project=runs/benchmark name=bench   where the report goes\n",
            "yolo-fgd benchmark model=runs/detect/distilled/weights/best.pt data=shapes imgsz=192",
            lambda w, kv: call(benchmark, kv, "benchmark", ("model",))),
    Command("demo", "the whole workflow on the embedded data (what `make demo` runs)",
            "    recipe=demo project=runs name=demo lanes=2 epochs= teacher_epochs= imgsz= export=True\n",
            "yolo-fgd demo epochs=3 teacher_epochs=3", lambda w, kv: call(demo, kv, "demo")),
    Command("study", "the comparison of methods over seeds, resumable, with a report",
            "    recipe=study           a shipped recipe name or a recipe YAML\n    project=runs/study name= lanes=2\n"
            "    only=a,b               only these methods (and the teacher)\n    seeds=0,1              only these seeds\n"
            "    report_only=True       only write the "
            "report of finished runs\n    rescore=True           re-evaluate finished runs first\n",
            "yolo-fgd study recipe=study lanes=2", lambda w, kv: call(study, kv, "study")),
    Command("tv-train", "the paper-faithful torchvision path (RetinaNet/FCOS, FGD on P3-P7)",
            "    recipe=NAME            tv_retinanet_r101_r50 | tv_fcos_r101_r50 | tv_retinanet_r34_r18_cpu\n"
            + "".join(f"    {k}={v}\n" for k, v in TV_ARGS.items()) + "    fgd_* keys as for train (FGD only)\n",
            "yolo-fgd tv-train recipe=tv_retinanet_r34_r18_cpu teacher=runs/tv/teacher/student.pth name=fgd",
            _tv_train),
    Command("tv-val", "COCOeval of a torchvision student",
            "    model=PATH (required) data=shapes arch=retinanet backbone=resnet50 device=cpu min_size= max_size=\n",
            "yolo-fgd tv-val model=runs/tv/fgd/student.pth arch=retinanet backbone=resnet18",
            lambda w, kv: call(tv_val, kv, "tv-val", ("model",))),
    Command("attention", "spatial and channel attention maps of teacher, baseline and student (paper Fig. 1/5)",
            "    model=PATH teacher=PATH source=IMAGE (required) baseline= imgsz=640 temperature=0.5 out=\n",
            "yolo-fgd attention model=student.pt teacher=teacher.pt source=image.jpg",
            lambda w, kv: call(attention_maps, kv, "attention", ("model", "teacher", "source"))),
    Command("imitation", "held-out R^2 of the best linear map from a student's Detect inputs to the teacher's",
            "    model=a.pt[,b.pt] teacher=PATH (required) data=shapes imgsz=640 images=120\n",
            "yolo-fgd imitation model=student.pt teacher=teacher.pt",
            lambda w, kv: call(imitation, kv, "imitation", ("model", "teacher"))),
    Command("benchmark-loss", "cost of the FGD loss against a plain feature MSE (prints figures)",
            "    batch=16 imgsz=640 boxes=50 device=cpu repeat=5 step=True amp=False threads=0\n"
            "    pyramid=FILE           measure another version's FGDPyramid (e.g. yolo_fgd/loss.py of an old checkout)\n"
            "    prints ms, the FGD/MSE ratio and the aten ops / compute ops (and CUDA kernels) per fwd+bwd\n",
            "yolo-fgd benchmark-loss device=0 amp=True",
            lambda w, kv: call(benchmark_loss, kv, "benchmark-loss")),
    Command("benchmark-step", "ms per training iteration of each distillation method and its ratio to plain",
            "    teacher=PATH (required) data=shapes model=yolo11n.yaml imgsz=192 batch=16 fraction=0.5 device=cpu\n"
            "    amp=False workers=0 epochs=1 project=runs/benchmark-step\n"
            "    methods=plain,default,response,fgd,fgd_response,distill_model   (also: response_focal, mgd, fgd_tied)\n",
            "yolo-fgd benchmark-step teacher=runs/detect/teacher/weights/best.pt",
            lambda w, kv: call(benchmark_step, kv, "benchmark-step", ("teacher",))),
    Command("soak", "memory soak on odd labels (prints peak RSS)", "    steps=200 imgsz=64 batch=4 project=runs/soak\n",
            "yolo-fgd soak steps=200", lambda w, kv: call(soak, kv, "soak")),
]}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"    {c.name:<{width}}  {c.summary}" for c in COMMANDS.values()]
    return ("yolo-fgd: Focal and Global Knowledge Distillation for Ultralytics YOLO.\n\n"
            "Usage: yolo-fgd COMMAND key=value ...   (yolo-fgd COMMAND help: its arguments and an example)\n\n"
            "A first run, in order:\n"
            "    DATA=$(yolo-fgd data shapes)                          # embedded data set -> its data YAML\n"
            "    yolo train model=yolo11s.yaml data=$DATA epochs=30 imgsz=192 project=$PWD/runs/detect name=teacher\n"
            "    yolo-fgd train model=yolo11n.yaml teacher=runs/detect/teacher/weights/best.pt data=$DATA epochs=30 "
            "imgsz=192 name=distilled\n"
            "    yolo-fgd export model=runs/detect/distilled imgsz=192 int8=True\n"
            "    yolo-fgd benchmark model=runs/detect/distilled data=$DATA imgsz=192\n\n"
            "Outputs go under ./runs of the current directory (or project=); each command prints where it wrote.\n\n"
            "Commands:\n" + "\n".join(lines) + "\n\nAdd debug=True to see full tracebacks.\n")


def run(argv: list[str]):
    words, kv = parse_kv(argv)
    if not words or words[0] in HELP_WORDS:
        print(usage())
        return None
    cmd, rest = words[0], words[1:]
    if cmd not in COMMANDS:
        close = difflib.get_close_matches(cmd, list(COMMANDS), n=1)
        raise FGDError(f"unknown command '{cmd}'" + (f": did you mean '{close[0]}'?" if close else "")
                       + f" (commands: {', '.join(COMMANDS)})")
    if set(rest) & HELP_WORDS or any(a in HELP_WORDS for a in argv[1:]):
        print(COMMANDS[cmd].help())
        return None
    return COMMANDS[cmd].run(rest, kv)


def entrypoint(argv: list[str] | None = None) -> int:
    """Console script: one clear line and exit code 2 on bad input; ``debug=True`` re-raises with the traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = any(a.lower() in {"debug=true", "--debug"} for a in argv)
    argv = [a for a in argv if a.lower() not in {"debug=true", "debug=false", "--debug"}]
    try:
        run(argv)
    except (FGDError, FileNotFoundError, SyntaxError, RuntimeError) as e:
        if debug or (isinstance(e, RuntimeError) and not str(e).startswith("Dataset")):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"yolo-fgd: error: {msg}", file=sys.stderr)
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
    return 0


if __name__ == "__main__":
    sys.exit(entrypoint())
