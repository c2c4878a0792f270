"""``yolo-fgd study recipe=study``: the same budget for every method and seed, resumable, with a report.

Each (dataset, method, seed) is one Ultralytics run in ``<project>/<name>/<dataset>/<method>-s<seed>`` trained in its
own process (``lanes`` of them at once, the CPU threads split between them); a finished run leaves ``summary.json``
and is skipped when the study is started again, an unfinished one resumes from its ``last.pt``. The report
(``results.csv``, ``results.md``, ``results.png``; of every finished run of the recipe, whatever ``only=`` and
``seeds=`` chose to train; ``results_<recipe>.*`` for a recipe run under another's name) holds mean ± std over seeds of mAP50-95, mAP50, APs/APm/APl
(COCO area ranges, pycocotools on the val split), the mAP50-95 gained over each run's last 20 epochs (the plateau
rule: below 0.3) and seconds per epoch; ``results_curves.png`` the val curve of every run.
"""

from __future__ import annotations

import difflib
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from ultralytics import YOLO
from ultralytics.data import YOLODataset
from ultralytics.data.utils import check_det_dataset
from ultralytics.nn.tasks import guess_model_task, yaml_model_load
from ultralytics.utils import DEFAULT_CFG, LOGGER, torch_utils

from .. import console
from ..cfg import load_recipe, model_path, ultralytics_defaults, ultralytics_deprecated
from ..cfg.distill import ARGS as DISTILL_ARGS
from ..cfg.distill import resolve
from ..cfg.tv import ARGS as TV_ARGS
from ..cfg.tv import FGD_KEYS as TV_FGD_KEYS
from ..data import resolve_data
from ..deploy.evaluate import coco_ap
from ..errors import FGDError
from ..tv.coco_utils import coco_files
from ..yolo import trainer_for
from .curves import results_rows

# report columns (header -> summary key) of a YOLO study and of a torchvision one (the paper's COCO columns)
YOLO_REPORT = {"mAP50-95": "map", "mAP50": "map50", "APs": "aps", "APm": "apm", "APl": "apl",
               "Ultralytics val": "ul_map", "task mAP50-95": "task_map", "gain, last 20 ep": "gain20"}
PLATEAU_EPOCHS = 20  # the plateau rule's window: a run gained less than 0.3 mAP50-95 over its last 20 epochs
TV_COLUMNS = {"mAP": "map", "AP50": "map50", "AP75": "ap75", "APs": "aps", "APm": "apm", "APl": "apl",
              "AR100": "ar100"}  # header (tv-train's results.csv column) -> summary key
TV_MASK_COLUMNS = {"mask_mAP": "mask_map", "mask_AP50": "mask_map50"}  # Mask R-CNN's segm COCOeval, the same way
# the task's own metric in Ultralytics' results.csv (masks, keypoints; OBB's box metric uses rotated IoU)
TASK_METRIC = {"detect": "metrics/mAP50-95(B)", "segment": "metrics/mAP50-95(M)", "pose": "metrics/mAP50-95(P)",
               "obb": "metrics/mAP50-95(B)"}


def warm_label_cache(data) -> None:
    """Build Ultralytics' label caches of a data YAML's train and val splits once, in this process."""
    d = check_det_dataset(str(data), autodownload=False)
    for split in ("train", "val"):
        YOLODataset(img_path=d[split], data=d, imgsz=64, augment=False, hyp=DEFAULT_CFG, prefix=f"{split}: ")


def holder(run_dir: Path) -> int | None:
    """The live process other than this one that holds ``run_dir/.lock`` (trains the run), or None."""
    try:
        pid = int((Path(run_dir) / ".lock").read_text())
        os.kill(pid, 0)  # PermissionError: alive, someone else's
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    except PermissionError:
        pass
    return None if pid == os.getpid() else pid


def claim(run_dir: Path) -> Path:
    """Take ``run_dir/.lock`` for this process, or raise if a live process holds it (two writers would interleave
    results.csv and last.pt). A lock left by a dead process is taken over."""
    pid = holder(run_dir)
    if pid is not None:
        raise FGDError(f"run {run_dir} is being trained by process {pid}: stop it first, or wait for it")
    lock = run_dir / ".lock"
    lock.write_text(str(os.getpid()))
    return lock


def run_one(spec: dict) -> dict:
    """Train one (method, seed) run as described by ``spec`` and write its summary.json (a run another study process
    finished meanwhile is kept, not retrained)."""
    out = Path(spec["dir"])
    lock = claim(out)
    try:
        if (out / "summary.json").is_file():
            return json.loads((out / "summary.json").read_text())
        return _train_one(spec, out)
    finally:
        lock.unlink(missing_ok=True)


def _train_one(spec: dict, out: Path) -> dict:
    if spec.get("tv"):
        return _train_tv(spec, out)
    kwargs = dict(spec["train"])
    kwargs.update(project=str(out.parent), name=out.name, exist_ok=True, seed=spec["seed"], data=spec["data"])
    kwargs.update(spec.get("args") or {})
    last = out / "weights" / "last.pt"
    t0 = time.time()
    trainer = trainer_for(YOLO(spec["model"]).task) if spec.get("distill") else None
    if last.is_file():
        ckpt_epoch = _ckpt_epoch(last)
        if ckpt_epoch is not None:  # unfinished: resume
            YOLO(str(last)).train(trainer=trainer, resume=True)
    else:
        YOLO(spec["model"]).train(trainer=trainer, **kwargs)
    return summarise(spec, fallback_s=time.time() - t0, threads=torch.get_num_threads())


def _train_tv(spec: dict, out: Path) -> dict:
    """One torchvision run (``tv-train`` with ``resume=True``: an interrupted one continues from its last.pth)."""
    from ..tv.train import train as tv_train

    tv_train(**spec["train"], **(spec.get("args") or {}), data=spec["data"], seed=spec["seed"],
             project=str(out.parent), name=out.name, resume=True)
    return summarise_tv(spec, torch.get_num_threads())


def summarise_tv(spec: dict, threads: int | None = None) -> dict:
    """Write ``summary.json`` of a finished torchvision run from its results.csv: the last epoch's COCO columns
    (tv-train evaluates its final model there; Mask R-CNN's mask AP beside the box one), training seconds and the
    threads it trained with."""
    out = Path(spec["dir"])
    rows = results_rows(out / "results.csv")
    wall = sum(float(r["time"]) for r in rows)
    summary = {"method": spec["method"], "seed": spec["seed"], "epochs": len(rows), "wall_s": wall,
               "threads": threads, "epoch_s": wall / max(len(rows), 1),
               **{k: float(rows[-1][c]) for c, k in {**TV_COLUMNS, **TV_MASK_COLUMNS}.items() if c in rows[-1]}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def summarise(spec: dict, fallback_s: float = 0.0, threads: int | None = None) -> dict:
    """Write ``summary.json`` of a finished run: COCO AP of its best.pt, training seconds (summed over resumed
    segments: Ultralytics' ``time`` column restarts on resume), Ultralytics' own final val mAP50-95 and the threads
    the run trained with (kept from an earlier summary when re-scored). A torchvision run: :func:`summarise_tv`."""
    out = Path(spec["dir"])
    if threads is None and (out / "summary.json").is_file():
        threads = json.loads((out / "summary.json").read_text()).get("threads")
    if spec.get("tv"):
        return summarise_tv(spec, threads)
    rows = results_rows(out / "results.csv")
    wall = train_seconds(rows) or fallback_s
    best = str(out / "weights" / "best.pt")
    task = spec.get("task") or "detect"
    column = TASK_METRIC.get(task, TASK_METRIC["detect"])
    summary = {
        "method": spec["method"], "seed": spec["seed"], "epochs": len(rows), "wall_s": wall, "task": task,
        "epoch_s": wall / len(rows) if rows else 0.0,
        "ul_map": float(rows[-1]["metrics/mAP50-95(B)"]) if rows else float("nan"),
        "task_map": float(rows[-1][column]) if rows and column in rows[-1] else float("nan"),
        "gain20": plateau_gain(rows), "threads": threads,
        # COCOeval of the boxes (axis-aligned): not for OBB, whose boxes are rotated (its Ultralytics metric is)
        **(coco_ap(best, spec["data"], spec["train"]["imgsz"]) if task != "obb"
           else dict.fromkeys(("map", "map50", "aps", "apm", "apl"), float("nan"))),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def train_seconds(rows: list[dict]) -> float:
    """Training seconds of an Ultralytics results.csv, summed over resumed segments (its ``time`` column is
    cumulative and restarts when a run resumes)."""
    wall, prev = 0.0, 0.0
    for t in (float(r["time"]) for r in rows):
        wall, prev = (wall + prev, t) if t < prev else (wall, t)
    return wall + prev


def plateau_gain(rows: list[dict], window: int = PLATEAU_EPOCHS) -> float:
    """Ultralytics' val mAP50-95 gained over a run's last ``window`` epochs (its best of those epochs minus its best
    before them): below 0.003 the run is at its plateau (the converged recipe's rule); nan for a shorter run."""
    maps = [float(r["metrics/mAP50-95(B)"]) for r in rows if r.get("metrics/mAP50-95(B)") not in (None, "")]
    if len(maps) <= window:
        return float("nan")
    return max(maps[-window:]) - max(maps[:-window])


def _ckpt_epoch(path):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        return ckpt.get("epoch", -1) if ckpt.get("optimizer") is not None else None
    except Exception:
        return None


RECIPE_KEYS = ("kind", "datasets", "teacher", "student", "train", "seeds", "methods")
METHOD_KEYS = ("distill", "args", "control", "baseline", "model", "seeds", "datasets")


def check_recipe(rec, name) -> None:
    """A study recipe's structure, checked before any folder is made: methods present, every method's keys and every
    run argument known (Ultralytics' train keys, deprecated ones included, and the distillation ones; tv-train's for
    ``kind: tv``), the distillation values valid. A typo (``distil: true``, ``contol:``, ``epoch:``) trained a
    different experiment silently. Top-level keys that are not the recipe's own are YAML anchors, unless one is a
    near miss of a recipe key (``method:``)."""
    if not isinstance(rec, dict) or not isinstance(rec.get("methods"), dict) or not rec["methods"]:
        raise FGDError(f"recipe {name} lists no methods: a study recipe has `methods: {{name: {{...}}}}` (a recipe of "
                       "tv-train arguments runs with `yolo-fgd tv-train recipe=...`)")
    for k in rec:
        close = difflib.get_close_matches(str(k), RECIPE_KEYS, n=1, cutoff=0.8)
        if k not in RECIPE_KEYS and close:
            raise FGDError(f"recipe {name}: '{k}' is not a recipe key: did you mean '{close[0]}'?")
    tv = rec.get("kind") == "tv"
    known = {*TV_ARGS, *TV_FGD_KEYS} if tv else {*ultralytics_defaults(), *ultralytics_deprecated(), *DISTILL_ARGS}

    def check_args(args, where):
        if not isinstance(args or {}, dict):
            raise FGDError(f"recipe {name}, {where}: give arguments as a mapping key: value")
        unknown = sorted(set(args or {}) - known)
        if unknown:
            close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
            raise FGDError(f"recipe {name}, {where}: unknown argument '{unknown[0]}'"
                           + (f": did you mean '{close[0]}'?" if close else ""))

    check_args(rec.get("train"), "train")
    teacher = rec.get("teacher") or {}
    check_args(teacher if tv else teacher.get("train"), "teacher")
    for ds, spec in (rec.get("datasets") or {}).items():
        if isinstance(spec, dict) and "data" in spec:
            check_args(spec.get("train"), f"data set {ds}")
    for method, m in rec["methods"].items():
        m = m or {}
        if not isinstance(m, dict):
            raise FGDError(f"recipe {name}, method {method}: give it as a mapping, e.g. {{distill: true}}")
        bad = [k for k in m if k not in METHOD_KEYS]
        if bad:
            close = difflib.get_close_matches(bad[0], METHOD_KEYS, n=1)
            raise FGDError(f"recipe {name}, method {method}: '{bad[0]}' is not a method key"
                           + (f": did you mean '{close[0]}'?" if close else f" ({', '.join(METHOD_KEYS)})"))
        check_args(m.get("args"), f"method {method}")
        for ref in (m.get("control"), m.get("baseline")):
            if ref is not None and ref not in rec["methods"]:
                raise FGDError(f"recipe {name}, method {method}: '{ref}' is not a method of the recipe: pair it with "
                               f"one of {', '.join(rec['methods'])}")
        if m.get("distill") and not tv:
            given = {k: v for k, v in (m.get("args") or {}).items() if k in DISTILL_ARGS and k != "teacher"}
            try:
                resolve(given)
            except FGDError as e:
                raise FGDError(f"recipe {name}, method {method}: {e}") from None


def plan_tv(recipe: dict, root: Path) -> list[dict]:
    """Run specs of a torchvision recipe (``kind: tv``): the teacher (a plain tv-train run, seed 0, ``teacher:``
    arguments on top of ``train:``), then each method and seed at the student's budget. A distilled method gets
    ``teacher=`` and, as ``baseline=``, the plain run of its seed (``baseline: <method>``), which it waits for."""
    specs = []
    for ds_name, data in recipe["datasets"].items():
        coco = isinstance(data, dict) and "train_json" in data  # COCO files as they are; a YOLO set resolved
        data, tdir = data if coco else resolve_data(data), root / ds_name / "teacher"
        specs.append({"dir": str(tdir), "method": "teacher", "seed": 0, "data": data, "tv": True,
                      "train": {**recipe["train"], **(recipe.get("teacher") or {}), "fgd": False}, "dataset": ds_name})
        for method, m in recipe["methods"].items():
            m = dict(m or {})
            for seed in m.get("seeds", recipe["seeds"]):
                args, needs = dict(m.get("args") or {}), []
                if m.get("distill"):
                    args.update(fgd=True, teacher=str(tdir / "model.pth"))
                    needs.append(str(tdir / "summary.json"))  # the teacher run finished, not merely started
                    if m.get("baseline"):
                        args["baseline"] = str(root / ds_name / f"{m['baseline']}-s{seed}")
                        needs.append(str(Path(args["baseline"]) / "summary.json"))
                else:
                    args["fgd"] = False
                specs.append({"dir": str(root / ds_name / f"{method}-s{seed}"), "method": method, "seed": seed,
                              "data": data, "tv": True, "train": dict(recipe["train"]), "args": args,
                              "dataset": ds_name, "needs": needs, "control": m.get("baseline")})
    return specs


def plan(recipe: dict, root: Path) -> list[dict]:
    """All run specs of a recipe, teachers first (a teacher is trained once per dataset, seed 0)."""
    if recipe.get("kind") == "tv":
        return plan_tv(recipe, root)
    specs = []
    for ds_name, ds in recipe["datasets"].items():
        train = dict(recipe["train"])
        if isinstance(ds, dict) and "data" in ds:  # {data: ..., train: {per-dataset overrides}}
            train.update(ds.get("train") or {})
            ds = ds["data"]
        data = resolve_data(ds)
        tcfg = recipe["teacher"]
        tdir = root / ds_name / "teacher"
        teacher_pt = tcfg.get("weights") or str(tdir / "weights" / "best.pt")
        task = guess_model_task(str(recipe["student"]))  # from the model's name, e.g. yolo11n-seg.yaml -> segment
        if not tcfg.get("weights"):
            specs.append({"dir": str(tdir), "method": "teacher", "seed": 0, "data": data,
                          "model": model_path(tcfg["model"]),
                          "task": task,
                          "train": {**train, **(tcfg.get("train") or {})}, "dataset": ds_name})
        for method, m in recipe["methods"].items():
            m = dict(m or {})
            if m.get("datasets") and ds_name not in m["datasets"]:  # a method limited to some data sets
                continue
            args = {k: (teacher_pt if v == "TEACHER" else v) for k, v in (m.get("args") or {}).items()}
            for seed in m.get("seeds", recipe["seeds"]):
                uses_teacher = m.get("distill") or "TEACHER" in (m.get("args") or {}).values()
                model = model_path(m.get("model", recipe["student"]))
                # a run that feeds this one must have finished (its summary.json), not merely written a best.pt:
                # best.pt exists from its first epoch on. Plain runs start at once.
                needs = [str(tdir / "summary.json")] if uses_teacher and not tcfg.get("weights") else []
                run_args = dict(args)
                if str(model).startswith("RUN:"):  # fine-tuning: start from another method's student, same seed
                    base = root / ds_name / f"{model[4:]}-s{seed}"
                    model = str(base / "weights" / "best.pt")
                    needs.append(str(base / "summary.json"))
                if str(args.get("teacher", "")).startswith("RUN:"):  # another method's student teaches (a TA)
                    base = root / ds_name / f"{args['teacher'][4:]}-s{seed}"
                    run_args["teacher"] = str(base / "weights" / "best.pt")
                    needs.append(str(base / "summary.json"))
                specs.append({"dir": str(root / ds_name / f"{method}-s{seed}"), "method": method, "seed": seed,
                              "data": data, "model": model, "train": train, "task": task,
                              "control": m.get("control"),
                              "distill": bool(m.get("distill")), "args": {**({"teacher": teacher_pt} if m.get("distill") else {}),
                                                                    **run_args}, "dataset": ds_name, "needs": needs})
    return specs


def check_models(specs: list[dict]) -> None:
    """Fail before any training when a run's model is a YAML that Ultralytics cannot find (e.g. yolo11n-segment.yaml
    for yolo11n-seg.yaml); checkpoints (.pt) are checked by the run that loads them."""
    for name in sorted({str(s["model"]) for s in specs if str(s.get("model", "")).endswith((".yaml", ".yml"))}):
        try:
            yaml_model_load(name)
        except FileNotFoundError:
            raise FGDError(f"model '{name}' in the recipe is not a model YAML Ultralytics knows: use a name such as "
                           "yolo11n.yaml, yolo11n-seg.yaml, yolo11n-pose.yaml, yolo11n-obb.yaml or a path") from None


def report_stem(root: Path, recipe_name: str) -> str:
    """The file stem of a recipe's report in ``root``: ``results`` for the recipe that first reported there (its
    name kept in ``root/recipe.txt``), ``results_<recipe>`` for another recipe run under the same name to share its
    runs (``recipe=tv_ablations_cpu name=tv_study_cpu``), so neither report overwrites the other."""
    mark = root / "recipe.txt"
    if not mark.is_file():
        mark.write_text(recipe_name + "\n")
    return "results" if mark.read_text().strip() == recipe_name else f"results_{recipe_name}"


def report(root: Path, specs: list[dict], stem: str = "results") -> str:
    """Aggregate summaries into ``<stem>.csv`` / ``<stem>.md`` / ``<stem>.png`` (and ``<stem>_gap.csv``,
    ``<stem>_curves.png``) under ``root``; returns the Markdown."""
    rows = {}
    for s in specs:
        f = Path(s["dir"]) / "summary.json"
        if f.is_file():
            rows.setdefault((s["dataset"], s["method"]), []).append(json.loads(f.read_text()))
    columns = TV_COLUMNS if any(s.get("tv") for s in specs) else YOLO_REPORT
    if has_mask_ap(rows):
        columns = {**columns, **TV_MASK_COLUMNS}
    metrics = (*columns.values(), "epoch_s", "wall_s")
    lines_csv = ["dataset,method,seeds," + ",".join(f"{m}_mean,{m}_std" for m in metrics)]
    heads = list(columns)
    md = ["| dataset | method | seeds | " + " | ".join([heads[0], "per seed", *heads[1:], "s/epoch"]) + " |",
          "|---" * (len(heads) + 5) + "|"]
    for (ds, method), runs in rows.items():
        vals = {m: np.array([r.get(m, np.nan) for r in runs], float) for m in metrics}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a metric absent in every run (e.g. no large objects)
            stat = {m: (np.nanmean(v), np.nanstd(v, ddof=1) if np.isfinite(v).sum() > 1 else 0.0)
                    for m, v in vals.items()}
        lines_csv.append(f"{ds},{method},{len(runs)}," + ",".join(f"{stat[m][0]:.5f},{stat[m][1]:.5f}" for m in metrics))
        pm = lambda m, k=100: "–" if np.isnan(stat[m][0]) else f"{stat[m][0] * k:.1f} ± {stat[m][1] * k:.1f}"
        seeds = " / ".join(f"{r['map'] * 100:.1f}" for r in sorted(runs, key=lambda r: r["seed"]))
        cells = [pm("map"), seeds, *(pm(m) for m in list(columns.values())[1:]), f"{stat['epoch_s'][0]:.1f}"]
        md.append(f"| {ds} | {method} | {len(runs)} | " + " | ".join(cells) + " |")
    (root / f"{stem}.csv").write_text("\n".join(lines_csv) + "\n")
    text = "\n".join(md) + "\n" + gap_table(root, specs, rows, stem)
    (root / f"{stem}.md").write_text(text)
    _plot(root, rows, stem)
    _curves(root, specs, stem)
    return text


def has_mask_ap(rows: dict) -> bool:
    """Whether any summary of ``rows`` ((dataset, method) -> summaries) has Mask R-CNN's mask AP."""
    return any("mask_map" in r for runs in rows.values() for r in runs)


def gap_closed(run: dict, control: dict, teacher: dict, key: str = "map") -> float:
    """(run - control) / (teacher - control) of the summaries' ``key``: the share of the teacher's lead over the
    control that the run closes (negative: it fell behind the control)."""
    lead = teacher.get(key, np.nan) - control.get(key, np.nan)
    return (run.get(key, np.nan) - control.get(key, np.nan)) / lead if lead > 0 else float("nan")


def gap_table(root: Path, specs: list[dict], rows: dict, stem: str = "results") -> str:
    """The methods with a ``control`` (a recipe method run on the same seeds; a torchvision method's ``baseline``),
    paired by seed against it and against the data set's teacher: mean +- std and per-seed values of the difference
    and of the gap closed (:func:`gap_closed`), COCO mAP50-95 of best.pt and (YOLO) Ultralytics' last-epoch val.
    Also written to ``<stem>_gap.csv``; '' when none."""
    controls = {(s["dataset"], s["method"]): s["control"] for s in specs if s.get("control")}
    keys = {"map": "map"} if any(s.get("tv") for s in specs) else {"map": "map", "ul_map": "ul"}  # summary -> csv
    if has_mask_ap(rows):
        keys["mask_map"] = "mask"
    more = {"ul": "Ultralytics val", "mask": "mask mAP"}  # the figures beside COCO's box mAP: mean +- std only
    heads = ["dataset", "method", "control", "seeds", "Δ mAP50-95", "per seed", "gap closed", "per seed",
             *(h for k in list(keys.values())[1:] for h in (f"Δ {more[k]}", f"gap closed, {more[k]}"))]
    md = ["", "| " + " | ".join(heads) + " |", "|---" * len(heads) + "|"]
    csv = ["dataset,method,control,seed," + ",".join(f"delta_{k},gap_{k}" for k in keys.values())]
    ms = lambda v, pct="": f"{np.mean(v) * 100:+.1f} ± {np.std(v, ddof=1) * 100 if len(v) > 1 else 0:.1f}{pct}"
    each = lambda v, pct="": " / ".join(f"{x * 100:+.0f}{pct}" if pct else f"{x * 100:+.1f}" for x in v)
    for (ds, method), control in controls.items():
        teacher = (rows.get((ds, "teacher")) or [None])[0]
        by_seed = {r["seed"]: r for r in rows.get((ds, control), [])}
        pairs = [(r, by_seed[r["seed"]]) for r in sorted(rows.get((ds, method), []), key=lambda r: r["seed"])
                 if r["seed"] in by_seed]
        if not teacher or not pairs:
            continue
        cols = {}
        for k, name in keys.items():
            cols[f"delta_{name}"] = np.array([r.get(k, np.nan) - c.get(k, np.nan) for r, c in pairs])
            cols[f"gap_{name}"] = np.array([gap_closed(r, c, teacher, k) for r, c in pairs])
        for i, (r, _) in enumerate(pairs):
            csv.append(f"{ds},{method},{control},{r['seed']}," + ",".join(f"{cols[k][i]:.5f}" for k in cols))
        cells = [ms(cols["delta_map"]), each(cols["delta_map"]), ms(cols["gap_map"], " %"), each(cols["gap_map"], "%")]
        for name in list(keys.values())[1:]:
            cells += [ms(cols[f"delta_{name}"]), ms(cols[f"gap_{name}"], " %")]
        md.append(f"| {ds} | {method} | {control} | {len(pairs)} | " + " | ".join(cells) + " |")
    if len(md) == 3:
        return ""
    (root / f"{stem}_gap.csv").write_text("\n".join(csv) + "\n")
    return "\n".join(md) + "\n"


def _curves(root, specs, stem="results"):
    """<stem>_curves.png: Ultralytics' val mAP50-95 per epoch of every run (a continuation drawn after the epochs
    of the run it continues), one panel per data set."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return
    runs = [(s, results_rows(Path(s["dir"]) / "results.csv")) for s in specs if not s.get("tv")]
    runs = [(s, r) for s, r in runs if r]
    if not runs:
        return
    sets = sorted({s["dataset"] for s, _ in runs})
    fig, axes = plt.subplots(1, len(sets), figsize=(7 * len(sets), 4.5), tight_layout=True, squeeze=False)
    for ax, ds in zip(axes[0], sets):
        for s, rows in (x for x in runs if x[0]["dataset"] == ds):
            offset = 0
            base = str(s.get("model", ""))
            if base.endswith("best.pt") and "-s" in Path(base).parent.parent.name:  # RUN:<method>: continues that run
                offset = len(results_rows(Path(base).parent.parent / "results.csv"))
            x = [offset + i + 1 for i in range(len(rows))]
            y = [100 * float(r.get("metrics/mAP50-95(B)") or "nan") for r in rows]
            ax.plot(x, y, lw=1, label=f"{s['method']}-s{s['seed']}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("val mAP50-95 (%, Ultralytics)")
        ax.set_title(ds)
        ax.legend(fontsize=6, ncol=2)
    fig.savefig(root / f"{stem}_curves.png", dpi=110)
    plt.close(fig)


def _plot(root, rows, stem="results"):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return
    if not rows:
        return
    keys = list(rows)
    means = [100 * np.mean([r["map"] for r in rows[k]]) for k in keys]
    stds = [100 * np.std([r["map"] for r in rows[k]]) for k in keys]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(keys)), 4), tight_layout=True)
    ax.bar(range(len(keys)), means, yerr=stds, capsize=4, color=["C%d" % (i % 10) for i in range(len(keys))])
    ax.set_xticks(range(len(keys)), [f"{d}\n{m}" for d, m in keys], fontsize=8)
    ax.set_ylabel("mAP50-95 (%)")
    ax.set_title("yolo-fgd study: mean ± std over seeds")
    fig.savefig(root / f"{stem}.png", dpi=120)
    plt.close(fig)


def study(recipe: str = "study", project: str = "runs/study", name: str | None = None, lanes: int = 2,
          only: str | None = None, seeds: str | None = None, report_only: bool = False, rescore: bool = False,
          threads: int | None = None) -> str:
    """Run (or resume) every run of ``recipe`` with ``lanes`` processes of ``threads`` threads each (default: the
    cores shared among the lanes; two studies at once should share them too), then write and print the report
    (``only="a,b"``: only these methods, ``seeds="0"``: only these of the recipe's seeds, the teacher always;
    ``report_only=True``: just the report of the runs finished so far; ``rescore=True``: first re-evaluate every
    finished run, e.g. after a change of the evaluation protocol)."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise FGDError(f"threads={threads}: pass the threads of each run, e.g. threads=1 (default: the cores / lanes)")
    rec = load_recipe(recipe)
    check_recipe(rec, recipe if not isinstance(recipe, dict) else "(dict)")
    recipe_name = Path(str(recipe)).stem if not isinstance(recipe, dict) else "study"
    # absolute: Ultralytics would put a relative project under runs/detect/
    root = Path(project).resolve() / (name or recipe_name)
    root.mkdir(parents=True, exist_ok=True)
    every = specs = plan(rec, root)  # the report covers every finished run of the recipe, whatever only= and seeds=
    if only:
        keep = set(str(only).split(","))
        specs = [s for s in specs if s["method"] in keep or s["method"] == "teacher"]
    if seeds is not None and str(seeds) != "":
        given = seeds if isinstance(seeds, (list, tuple)) else str(seeds).split(",")  # the CLI reads 0,1 as (0, 1)
        try:
            keep_seeds = {int(x) for x in given}
        except ValueError:
            raise FGDError(f"seeds={','.join(map(str, given))}: give seeds as integers, e.g. seeds=0 or seeds=0,1") \
                from None
        specs = [s for s in specs if s["seed"] in keep_seeds or s["method"] == "teacher"]
    check_models(specs)
    if rescore:
        for s in specs:
            if (Path(s["dir"]) / "summary.json").is_file():
                summarise(s)
    todo = [] if report_only else [s for s in specs if not (Path(s["dir"]) / "summary.json").is_file()]
    todo.sort(key=lambda s: (s["method"] != "teacher", s["seed"]))  # teachers first, then seed by seed
    LOGGER.info(f"study {root}: {len(specs)} runs, {len(todo)} to do, {lanes} lanes")
    for data in {s["data"] for s in todo if not s.get("tv")}:
        warm_label_cache(data)  # parallel lanes would otherwise race to write the same labels/*.cache
    for data in {s["data"] for s in todo if s.get("tv") and isinstance(s["data"], str)}:
        coco_files(data)  # the COCO files of a YOLO data set, converted once here rather than by every lane
    threads = threads or max(1, (os.cpu_count() or 2) // max(lanes, 1))
    running: list[tuple[subprocess.Popen, dict]] = []
    pending = list(todo)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    # a TERM to the study (kill, a scheduler) stops its lanes too, as Ctrl-C does; they resume on the next start
    old_term = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        _drive(pending, running, lanes, env)
    finally:
        signal.signal(signal.SIGTERM, old_term)
        for proc, s in running:
            proc.terminate()
        for proc, s in running:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    stem = report_stem(root, recipe_name)
    text = report(root, every, stem)
    console.result(text)
    print(f"yolo-fgd: study results saved to {root} ({stem}.csv, {stem}.md, {stem}.png; one folder per run)")
    return text


def progress(spec: dict) -> str | None:
    """One line on a run in flight from its results.csv: epoch/total, losses, mAP so far, ETA (None before its first
    epoch ends)."""
    rows = results_rows(Path(spec["dir"]) / "results.csv")
    if not rows:
        return None
    last = rows[-1]
    total = int((spec.get("args") or {}).get("epochs") or spec["train"].get("epochs") or len(rows))
    done = int(float(last.get("epoch", len(rows))))
    per_epoch = train_seconds(rows) / max(len(rows), 1)
    if spec.get("tv"):  # tv-train's columns: epoch, time (of the epoch), lr, the losses, then the COCO columns
        per_epoch = sum(float(r["time"]) for r in rows) / len(rows)
        losses = "  ".join(f"{k.removeprefix('loss_')} {float(v):.3f}" for k, v in last.items()
                           if k not in ("epoch", "time", "lr", *TV_COLUMNS, "ARs", "ARm", "ARl") and v)
        score = float(last.get("mAP") or "nan")
    else:
        losses = "  ".join(f"{k[6:].removesuffix('_loss')} {float(v):.3f}" for k, v in last.items()
                           if k.startswith("train/") and v)  # train/box_loss -> box, train/crosskd -> crosskd
        score = float(last.get("metrics/mAP50-95(B)", 0))
    eta = per_epoch * max(total - done, 0)
    name = "/".join(Path(spec["dir"]).parts[-2:])
    return (f"study: {name}  {done}/{total} epochs  {losses}  mAP50-95 {score:.3f}"
            f"  ETA {int(eta // 60)}m{int(eta % 60):02d}s")


def _drive(pending: list, running: list, lanes: int, env: dict) -> None:
    """Start runs whose inputs exist, ``lanes`` at a time, until none is left (``running`` is kept up to date)."""
    shown = {}
    while pending or running:
        for proc, s in running:
            line = progress(s)
            if line and shown.get(s["dir"]) != line:
                shown[s["dir"]] = line
                LOGGER.info(line)
        for proc, s in list(running):
            if proc.poll() is not None:
                running.remove((proc, s))
                if proc.returncode:
                    LOGGER.warning(f"study run {s['dir']} failed (exit {proc.returncode}), see its train.log")
        for s in [s for s in pending if (Path(s["dir"]) / "summary.json").is_file()]:  # finished by another study
            pending.remove(s)
        elsewhere = [s for s in pending if holder(s["dir"]) is not None]  # being trained by another study: wait
        ready = [s for s in pending if s not in elsewhere and all(Path(n).is_file() for n in s.get("needs") or [])]
        while ready and len(running) < lanes:
            s = ready.pop(0)
            pending.remove(s)
            Path(s["dir"]).mkdir(parents=True, exist_ok=True)
            spec_file = Path(s["dir"]) / "spec.json"
            spec_file.write_text(json.dumps(s))
            log = open(Path(s["dir"]) / "train.log", "a")
            running.append((subprocess.Popen([sys.executable, "-m", "yolo_fgd.lab.study", str(spec_file)], stdout=log,
                                             stderr=subprocess.STDOUT, env=env), s))
            LOGGER.info(f"study: started {s['dir']} (log: {Path(s['dir']) / 'train.log'})")
        if not running and pending and not elsewhere:
            LOGGER.warning(f"study: {len(pending)} runs wait for a teacher or base run that failed; stopping")
            break
        time.sleep(5)


def use_threads(n: int) -> None:
    """Train and validate on ``n`` CPU threads: torch's, and Ultralytics' NUM_THREADS, to which its select_device()
    resets torch's on every CPU trainer and validator it builds (min(8, cores - 1), whatever the lanes)."""
    torch.set_num_threads(n)
    torch_utils.NUM_THREADS = n


if __name__ == "__main__":  # one run: python -m yolo_fgd.lab.study spec.json
    use_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    run_one(json.loads(Path(sys.argv[1]).read_text()))
