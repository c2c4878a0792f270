"""``yolo-fgd`` console script, in Ultralytics' ``key=value`` style.

    yolo-fgd train model=yolo11n.yaml teacher=runs/detect/teacher/weights/best.pt data=data.yaml epochs=100
    yolo-fgd train resume model=runs/detect/train/weights/last.pt [teacher=new/path.pt]
    yolo-fgd export model=best.pt format=onnx imgsz=640 [dynamic=True half=True int8=True|dynamic data=data.yaml]
    yolo-fgd val|predict ...               (delegated to Ultralytics' `yolo`)
    yolo-fgd data [shapes|deepforest]      (build a data set, print its data YAML)
    yolo-fgd demo [epochs=.. teacher_epochs=.. imgsz=..]
    yolo-fgd study recipe=cfg/study.yaml [lanes=2 only=baseline,fgd report_only=True rescore=True]
    yolo-fgd tv-train recipe=cfg/tv_retinanet_r101_r50.yaml [key=value]   (torchvision RetinaNet/FCOS, paper setup)
    yolo-fgd tv-val model=student.pth data=... arch=retinanet backbone=resnet50
    yolo-fgd attention model=fgd.pt teacher=teacher.pt source=image.jpg [baseline=plain.pt imgsz=640]
    yolo-fgd imitation model=a.pt[,b.pt] teacher=teacher.pt [data=shapes imgsz=640]   (linear reach of the teacher)
    yolo-fgd benchmark model=a.pt[,b.pt] data=data.yaml imgsz=640 [runs=50 threads=2]
    yolo-fgd benchmark-loss [batch=16 imgsz=640 device=cpu]
    yolo-fgd benchmark-step teacher=t.pt [data=shapes imgsz=192 batch=16]   (s/step of plain, default, FGD,
                                                                            FGD+response, distill_model=)
    yolo-fgd soak [steps=200]              (memory soak on odd labels, prints peak RSS)
    yolo-fgd help
"""

from __future__ import annotations

import os
import sys

from .errors import FGDError

HELP = __doc__ + """
FGD arguments (defaults from cfg/fgd.yaml, preset 'yolo': head-response term on, FGD weight 0):
    teacher=PATH           teacher YOLO detection checkpoint (required for train)
    fgd_preset=yolo        yolo | yolox | two_stage | anchor_based | anchor_free
    fgd_alpha= fgd_beta= fgd_gamma= fgd_lambda=   weights of Eq. 13 (fg, bg, attention, global)
    fgd_temperature=0.5    T of Eq. 5-6
    fgd_gain=              multiplies all four weights (shipped preset: 0, FGD off; 0.05 turns it on)
    fgd_norm=              standardise features per image and channel before the loss
    fgd_warmup=            epochs of linear warm-up of the FGD weight
    fgd_decay=             last epochs over which the FGD weight falls to 0 (cosine; 0: off)
    fgd_level_norm=True    weigh FGD levels equally (running mean of each level's term)
    fgd_share=             keep |grad FGD| / |grad detection| at this value (0: off), measured every 25 batches
    fgd_kd_cls= fgd_kd_box=   weights of the head-response term (teacher class scores as soft labels, box-bin KL)
    fgd_split= fgd_spatial= fgd_channel=   ablations: fg/bg split, spatial / channel attention (True/False)
    fgd_mse=True           plain feature MSE (paper Eq. 1) instead of FGD, e.g. with fgd_preset=mse
Any other key is an Ultralytics train argument (epochs, imgsz, batch, device, ...). data=shapes (the default)
uses the embedded procedural data set. Add debug=True to see full tracebacks.
"""


def parse(argv: list[str]) -> tuple[list[str], dict]:
    """Split ``argv`` into positional words and a ``key=value`` dict (values parsed like Ultralytics does)."""
    from ultralytics.cfg import smart_value

    words, kv = [], {}
    for a in argv:
        if "=" in a:
            k, v = a.split("=", 1)
            if not k or v == "":
                raise FGDError(f"'{a}' is not key=value: write arguments as key=value, e.g. epochs=10")
            kv[k.strip()] = smart_value(v.strip())
        else:
            words.append(a)
    return words, kv


def resolve_data(data):
    """``data=shapes`` (or none) -> the embedded data set's YAML, ``data=deepforest`` -> the tiled DeepForest set;
    anything else is passed through."""
    if data in (None, "", "shapes", "fgd-shapes"):
        from .data import shapes

        return str(shapes())
    if data == "deepforest":
        from .deepforest import deepforest

        return str(deepforest())
    return data


def check_train_keys(kv: dict) -> None:
    """Unknown keys fail early with the closest known one (Ultralytics' own error is a page of help)."""
    import difflib

    from ultralytics.utils import DEFAULT_CFG_DICT

    from .presets import FGD_ARGS

    known = {*DEFAULT_CFG_DICT, *FGD_ARGS}
    for k in kv:
        if k not in known:
            close = difflib.get_close_matches(k, known, n=1)
            raise FGDError(f"unknown argument '{k}'" + (f": did you mean '{close[0]}'?" if close else ""))


def train(words: list[str], kv: dict):
    from ultralytics import YOLO

    from .trainer import FGDTrainer

    check_train_keys(kv)
    resume = "resume" in words or kv.get("resume") in (True, "True")
    model = kv.pop("model", None)
    kv.pop("resume", None)
    if resume:
        if not model:
            raise FGDError("resume needs the checkpoint: yolo-fgd train resume model=runs/detect/NAME/weights/last.pt")
        if not os.path.isfile(str(model)):
            raise FGDError(f"resume checkpoint '{model}' not found: pass model=runs/detect/NAME/weights/last.pt")
        return YOLO(model).train(trainer=FGDTrainer, resume=True, **kv)
    model = model or "yolo11n.yaml"
    if str(model).endswith(".pt") and not os.path.isfile(str(model)) and os.sep in str(model):
        raise FGDError(f"student '{model}' not found: pass model=yolo11n.yaml (from scratch) or an existing .pt")
    kv["data"] = resolve_data(kv.get("data"))
    return YOLO(model).train(trainer=FGDTrainer, **kv)


def delegate(mode: str, words: list[str], kv: dict):
    """Run Ultralytics' own ``yolo MODE ...`` with the same arguments."""
    from ultralytics.cfg import entrypoint as yolo

    if "data" in kv:
        kv["data"] = resolve_data(kv["data"])
    yolo(" ".join([mode, *words, *(f"{k}={v}" for k, v in kv.items())]))


def run(argv: list[str]):
    words, kv = parse(argv)
    if not words or words[0] in {"help", "-h", "--help"}:
        print(HELP)
        return None
    cmd, rest = words[0], words[1:]
    if cmd == "train":
        return train(rest, kv)
    if cmd == "export":
        from .export import export

        if "model" not in kv:
            raise FGDError("export needs model=path/to/best.pt")
        return export(**kv)
    if cmd in {"val", "predict"}:
        return delegate(cmd, rest, kv)
    if cmd == "data":
        name = rest[0] if rest else "shapes"
        if name == "shapes":
            from .data import shapes

            print(shapes(**kv))
            return None
        if name == "deepforest":
            from .deepforest import deepforest

            print(deepforest(**kv))
            return None
        raise FGDError(f"unknown data set '{name}': choose shapes or deepforest")
    if cmd == "demo":
        from .demo import demo

        return demo(**kv)
    if cmd == "tv-train":
        from .tv import train as tv_train

        return tv_train(**kv)
    if cmd == "tv-val":
        from .tv import val as tv_val

        if "model" not in kv:
            raise FGDError("tv-val needs model=path/to/student.pth (and arch=, backbone=, data=)")
        return tv_val(**kv)
    if cmd == "attention":
        from .attention_maps import attention_maps

        missing = [k for k in ("model", "teacher", "source") if k not in kv]
        if missing:
            raise FGDError(f"attention needs {', '.join(k + '=' for k in missing)} (baseline= is optional)")
        return attention_maps(**kv)
    if cmd == "imitation":
        from .attention_maps import imitation

        if "model" not in kv or "teacher" not in kv:
            raise FGDError("imitation needs model=student.pt[,other.pt] and teacher=teacher.pt (data= for images)")
        return imitation(**kv)
    if cmd == "study":
        from .study import study

        return study(**kv)
    if cmd == "benchmark":
        from .benchmark import benchmark

        if "model" not in kv:
            raise FGDError("benchmark needs model=a.pt[,b.pt] (and data=your.yaml for mAP)")
        return benchmark(**kv)
    if cmd == "benchmark-step":
        from .bench import benchmark_step

        return benchmark_step(**kv)
    if cmd == "soak":
        from .bench import soak

        return soak(**kv)
    if cmd == "benchmark-loss":
        from .bench import benchmark_loss

        return benchmark_loss(**kv)
    raise FGDError(f"unknown command '{cmd}': use train, val, predict, export, benchmark, data, demo, study, attention, imitation, tv-train, tv-val, benchmark-loss, benchmark-step, soak or help")


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
    except KeyboardInterrupt:
        print("yolo-fgd: interrupted; resume with: yolo-fgd train resume model=<run>/weights/last.pt", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(entrypoint())
