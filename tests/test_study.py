"""Study and demo plumbing on a tiny recipe: runs, summaries, report files, resume (no re-training)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def tiny_recipe(root):
    return {
        "datasets": {"tiny": {"kind": "shapes", "root": str(root / "data"), "n_train": 8, "n_val": 4, "size": 96}},
        "teacher": {"model": "yolo11s.yaml"},
        "student": "yolo11n.yaml",
        "train": {"epochs": 1, "imgsz": 64, "batch": 4, "workers": 0, "plots": False, "amp": False, "device": "cpu"},
        "seeds": [0, 1],
        "methods": {"baseline": {}, "fgd": {"distill": True}, "distill": {"args": {"distill_model": "TEACHER"}}},
    }


def test_study_runs_reports_and_resumes(tmp_path):
    from yolo_fgd.lab.study import study

    rec = tiny_recipe(tmp_path)
    text = study(rec, project=str(tmp_path / "runs"), name="s", lanes=2)
    root = tmp_path / "runs" / "s"
    for f in ("results.csv", "results.md", "results.png"):
        assert (root / f).is_file(), f
    for method in ("baseline", "fgd", "distill"):
        assert f"| tiny | {method} | 2 |" in text
        s = json.loads((root / "tiny" / f"{method}-s1" / "summary.json").read_text())
        assert s["epochs"] == 1 and s["seed"] == 1 and 0 <= s["map"] <= 1
    fgd_args = (root / "tiny" / "fgd-s0" / "args.yaml").read_text()
    assert str(root / "tiny" / "teacher" / "weights" / "best.pt") in fgd_args
    stamp = {p: p.stat().st_mtime for p in root.rglob("summary.json")}
    study(rec, project=str(tmp_path / "runs"), name="s", lanes=2)  # everything done: nothing retrained
    assert {p: p.stat().st_mtime for p in root.rglob("summary.json")} == stamp
    text = study(rec, project=str(tmp_path / "runs"), name="s", only="fgd", seeds="1", report_only=True)
    # only= and seeds= choose what trains; the report keeps every finished run (it once shrank to the subset)
    assert "| tiny | fgd | 2 |" in text and "| tiny | baseline | 2 |" in text, text
    from yolo_fgd.errors import FGDError

    with pytest.raises(FGDError, match="seeds=a: give seeds as integers"):
        study(rec, project=str(tmp_path / "runs"), name="s", seeds="a", report_only=True)


@pytest.mark.slow
def test_a_yolo_run_trains_on_the_threads_the_study_gives_it(tmp_path):
    """threads= reaches the run: Ultralytics' select_device() used to reset torch to its own min(8, cores - 1), so on
    a 2-core machine a lane asked for 2 threads trained on 1, and on a large one lanes x 8 threads oversubscribed."""
    from ultralytics.utils import NUM_THREADS

    from yolo_fgd.lab.study import study

    rec = tiny_recipe(tmp_path)
    rec.update(seeds=[0], methods={"baseline": {}})
    study(rec, project=str(tmp_path / "runs"), name="t", lanes=1, threads=NUM_THREADS + 1)
    s = json.loads((tmp_path / "runs" / "t" / "tiny" / "baseline-s0" / "summary.json").read_text())
    assert s["threads"] == NUM_THREADS + 1  # what torch had after training and the final validation


def test_demo_table(tmp_path, capsys, monkeypatch):
    from yolo_fgd.lab.demo import demo

    rec = tiny_recipe(tmp_path)
    rec["seeds"] = [0]
    rec["methods"] = {"baseline": {}, "fgd": {"distill": True}}
    monkeypatch.chdir(tmp_path)
    demo(rec, project="runs", name="demo")  # relative project, as `make demo` passes it
    assert (tmp_path / "runs" / "demo" / "benchmark" / "benchmark.md").is_file()
    out = capsys.readouterr().out
    md = (tmp_path / "runs" / "demo" / "comparison.md").read_text()
    for label in ("teacher (yolo11s.yaml)", "baseline (yolo11n.yaml)", "fgd (yolo11n.yaml)"):
        assert label in md and label in out


def test_plan_orders_overrides_and_finetune(tmp_path):
    from yolo_fgd.lab.study import plan

    rec = tiny_recipe(tmp_path)
    rec["datasets"] = {"a": {"data": rec["datasets"]["tiny"], "train": {"imgsz": 96, "epochs": 3}}}
    rec["methods"] = {"baseline": {}, "mse": {"distill": True, "args": {"distill_preset": "mse"}, "seeds": [0]},
                      "ft": {"distill": True, "model": "RUN:baseline", "args": {"epochs": 2}}}
    specs = plan(rec, tmp_path / "r")
    assert [s["method"] for s in specs].count("mse") == 1 and [s["method"] for s in specs].count("ft") == 2
    assert all(s["train"]["imgsz"] == 96 and s["train"]["epochs"] == 3 for s in specs)
    ft = [s for s in specs if s["method"] == "ft"][1]
    assert ft["model"].endswith("a/baseline-s1/weights/best.pt")
    # it waits for the runs it needs to finish (summary.json), not for their best.pt, which exists from epoch 1 on:
    # a restarted study once started a distilled run against a teacher 30 epochs short of its end
    root = tmp_path / "r" / "a"
    assert ft["needs"] == [str(root / "teacher" / "summary.json"), str(root / "baseline-s1" / "summary.json")]
    assert [s for s in specs if s["method"] == "baseline"][0]["needs"] == []  # a plain run starts at once
    assert ft["args"]["teacher"].endswith("a/teacher/weights/best.pt") and ft["args"]["epochs"] == 2
    rec["datasets"]["b"] = rec["datasets"]["a"]["data"]
    rec["methods"]["ft"]["datasets"] = ["a"]  # a method limited to some data sets
    runs = {(s["dataset"], s["method"]) for s in plan(rec, tmp_path / "r")}
    assert ("a", "ft") in runs and ("b", "ft") not in runs and ("b", "baseline") in runs


def test_a_teacher_assistant_is_another_methods_student_of_the_same_seed(tmp_path):
    """A recipe's teacher assistant (Mirzadeh et al. 2020): method 'ta' trains the shipped yolo11-ta.yaml (named like
    an Ultralytics model, found in the package) distilled from the teacher; 'via_ta' is distilled from the 'ta'
    student of its own seed (teacher: RUN:ta), waits for it to finish, and the model sits between n and s in size."""
    from ultralytics.nn.tasks import DetectionModel

    from yolo_fgd.lab.study import check_models, plan

    rec = tiny_recipe(tmp_path)
    rec["methods"] = {"ta": {"distill": True, "model": "yolo11-ta.yaml"},
                      "via_ta": {"distill": True, "args": {"teacher": "RUN:ta", "epochs": 2}}}
    specs = {(s["method"], s["seed"]): s for s in plan(rec, tmp_path / "r")}
    root = tmp_path / "r" / "tiny"
    ta, via = specs[("ta", 1)], specs[("via_ta", 1)]
    assert ta["model"].endswith("yolo_fgd/cfg/models/yolo11-ta.yaml") and Path(ta["model"]).is_file()
    assert ta["args"]["teacher"] == str(root / "teacher" / "weights" / "best.pt")
    assert via["args"]["teacher"] == str(root / "ta-s1" / "weights" / "best.pt") and via["args"]["epochs"] == 2
    assert str(root / "ta-s1" / "summary.json") in via["needs"] and via["model"] == "yolo11n.yaml"
    check_models(list(specs.values()))
    size = {y: sum(p.numel() for p in DetectionModel(y, nc=3, verbose=False).parameters())
            for y in ("yolo11n.yaml", ta["model"], "yolo11s.yaml")}
    n, t, s_ = size.values()
    assert 1.5 * n < t < 0.75 * s_, size


@pytest.mark.parametrize("recipe", ["study.yaml", "calibrate.yaml", "remedies.yaml", "ablations.yaml", "demo.yaml",
                                    "candidates.yaml", "task_segment.yaml", "task_pose.yaml", "task_obb.yaml",
                                    "gpu_scale.yaml",
                                    "deepforest.yaml"])
def test_shipped_recipes_resolve(recipe):
    from yolo_fgd.cfg import load_recipe
    from yolo_fgd.core.presets import resolve as resolve_fgd
    from yolo_fgd.lab.study import check_models

    rec = load_recipe(f"cfg/{recipe}")  # the path of earlier releases still finds the shipped recipe
    assert rec["methods"] and rec["seeds"] and rec["train"]["epochs"] > 0
    check_models([{"model": rec["teacher"]["model"]}, {"model": rec["student"]}])  # names Ultralytics can build
    for name, m in rec["methods"].items():
        m = m or {}
        if m.get("distill"):
            cfg = resolve_fgd(m.get("args") or {})
            assert cfg["fg"] >= 0 and cfg["temperature"] > 0, name


def test_study_refuses_an_unknown_model_yaml_before_training(tmp_path):
    from yolo_fgd.errors import FGDError
    from yolo_fgd.lab.study import check_models

    with pytest.raises(FGDError, match="yolo11n-segment.yaml.*yolo11n-seg.yaml"):
        check_models([{"model": "yolo11n.yaml"}, {"model": "yolo11n-segment.yaml"}])


def test_presets_follow_the_paper():
    from yolo_fgd.core.presets import presets

    p = presets()  # fg, bg, at, gl = the paper's alpha, beta, gamma, lambda
    assert (p["anchor_based"]["fg"], p["anchor_based"]["bg"], p["anchor_based"]["at"],
            p["anchor_based"]["gl"]) == (1e-3, 5e-4, 1e-3, 5e-6)
    assert (p["two_stage"]["fg"], p["two_stage"]["gl"]) == (5e-5, 5e-7)
    assert (p["anchor_free"]["fg"], p["anchor_free"]["at"]) == (1.6e-3, 8e-3)
    assert (p["yolox"]["fg"], p["yolox"]["gl"]) == (2e-3, 1e-5)
    assert all(v["temperature"] == 0.5 for v in p.values())
    # the head-response term is the YOLO adapter's addition: the shipped YOLO default has it, the paper presets not
    assert p["yolo"]["kd_cls"] > 0 and p["yolo"]["kd_box"] > 0
    assert all(not v.get("kd_cls") and not v.get("kd_box") for k, v in p.items() if k not in {"yolo", "mgd"})


@pytest.mark.parametrize("key", ["distill_decay", "distill_warmup", "fgd_gain"])
def test_negative_schedule_or_weight_is_a_clear_error(key):
    from yolo_fgd.core.presets import resolve as resolve_fgd
    from yolo_fgd.errors import FGDError

    with pytest.raises(FGDError, match=f"{key}=-1.0 is negative"):
        resolve_fgd({key: -1})


def test_run_dir_lock_refuses_a_second_writer(tmp_path):
    import subprocess
    import sys

    from yolo_fgd.errors import FGDError
    from yolo_fgd.lab.study import claim

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".lock").write_text(str(other.pid))
        with pytest.raises(FGDError, match=f"being trained by process {other.pid}"):
            claim(tmp_path)
    finally:
        other.kill()
        other.wait()
    assert claim(tmp_path).read_text() == str(__import__("os").getpid())  # a dead holder's lock is taken over


def test_a_run_another_study_is_training_is_waited_for_not_started(tmp_path):
    """Two studies over one recipe (e.g. with threads=1 each): a run whose lock a live process holds is left to it;
    the driver waits, and drops it once its summary.json appears, without starting it or failing."""
    import subprocess
    import sys
    import threading

    from yolo_fgd.lab.study import _drive

    run = tmp_path / "m-s0"
    run.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".lock").write_text(str(other.pid))
        threading.Timer(2.0, lambda: (run / "summary.json").write_text("{}")).start()
        pending = [{"dir": str(run), "method": "m", "seed": 0, "needs": []}]
        _drive(pending, [], lanes=1, env={})
    finally:
        other.kill()
        other.wait()
    assert not pending and not (run / "spec.json").exists() and not (run / "train.log").exists()


def test_a_run_finished_elsewhere_is_not_retrained(tmp_path):
    """Two study processes sharing a project: a run the other one finished after this one planned it is kept."""
    from yolo_fgd.lab.study import run_one

    run = tmp_path / "m-s0"
    run.mkdir()
    (run / "summary.json").write_text('{"map": 0.25}')
    assert run_one({"dir": str(run)}) == {"map": 0.25} and not (run / "weights").exists()
    assert not (run / ".lock").exists()


def test_terminating_the_study_stops_its_lanes(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    rec = tiny_recipe(tmp_path)
    rec["train"]["epochs"] = 100
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(rec))
    root = tmp_path / "runs" / "s"
    study = subprocess.Popen([sys.executable, "-m", "yolo_fgd.cli", "study", f"recipe={tmp_path / 'r.yaml'}",
                              f"project={tmp_path / 'runs'}", "name=s", "lanes=1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = root / "tiny" / "teacher" / ".lock"
    for _ in range(240):
        if lock.is_file() or study.poll() is not None:
            break
        time.sleep(0.5)
    assert lock.is_file(), "the teacher lane never started"
    lane = int(lock.read_text())
    study.send_signal(signal.SIGTERM)
    study.wait(timeout=60)
    for _ in range(60):
        try:
            os.kill(lane, 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    else:
        os.kill(lane, signal.SIGKILL)
        pytest.fail("the lane outlived the study")


def test_detect_is_multi_label_like_the_validator(data, teacher):
    from yolo_fgd.data.coco import split_images
    from yolo_fgd.deploy.evaluate import detect

    files, _ = split_images(data, "val")
    dets = detect(teacher, files, 64)
    assert len(dets) == len(files) and all(len(d) <= 300 for d in dets)
    boxes = [tuple(round(v, 3) for v in d[:4]) for im in dets for d in im]
    assert len(set(boxes)) < len(boxes), "no box was kept for two classes: NMS is not multi-label"
    assert all(d[4] >= 0.001 for im in dets for d in im)


def test_summary_sums_wall_time_over_resumed_segments(tmp_path, monkeypatch):
    import yolo_fgd.lab.study as st

    run = tmp_path / "m-s0"
    run.mkdir()
    rows = ["epoch,time,metrics/mAP50-95(B)", "1,10,0.1", "2,20,0.2", "3,8,0.3", "4,17,0.4"]  # resumed after epoch 2
    (run / "results.csv").write_text("\n".join(rows) + "\n")
    monkeypatch.setattr(st, "coco_ap", lambda *a: {"map": 0.3})
    s = st.summarise({"dir": str(run), "method": "m", "seed": 0, "data": "d", "train": {"imgsz": 64}})
    assert s["wall_s"] == 37 and s["epoch_s"] == 37 / 4 and s["ul_map"] == 0.4


def tiny_tv_recipe(root):
    return {
        "kind": "tv",
        "datasets": {"tiny": {"kind": "shapes", "root": str(root / "data"), "n_train": 8, "n_val": 4, "size": 96}},
        "train": {"arch": "retinanet", "student_backbone": "resnet18", "width": 32, "anchor": 8, "min_size": [64],
                  "max_size": 64, "epochs": 1, "batch": 4, "warmup_iters": 2},
        "teacher": {"student_backbone": "resnet34", "epochs": 2},
        "seeds": [0],
        "methods": {"plain": {}, "fgd": {"distill": True, "baseline": "plain", "args": {"check_teacher": False}}},
    }


@pytest.mark.slow
def test_tv_study_plans_runs_resumes_and_reports_the_paper_columns(tmp_path):
    """A torchvision recipe: the teacher (its own arguments on top), plain and FGD students; FGD waits for the teacher
    and the plain run of its seed (its baseline); the report has COCO's columns; a second start retrains nothing."""
    from yolo_fgd.lab.study import plan, study

    rec = tiny_tv_recipe(tmp_path)
    root = tmp_path / "runs" / "tv"
    specs = {s["method"]: s for s in plan(rec, root)}
    assert specs["teacher"]["train"]["student_backbone"] == "resnet34" and specs["teacher"]["train"]["epochs"] == 2
    fgd = specs["fgd"]
    assert fgd["args"]["teacher"] == str(root / "tiny" / "teacher" / "model.pth")
    assert fgd["args"]["baseline"] == str(root / "tiny" / "plain-s0")
    assert fgd["needs"] == [str(root / "tiny" / "teacher" / "summary.json"), str(root / "tiny" / "plain-s0" / "summary.json")]
    text = study(rec, project=str(tmp_path / "runs"), name="tv", lanes=2, threads=3)  # the default: cores / lanes
    assert text.splitlines()[0].startswith("| dataset | method | seeds | mAP | per seed | AP50 | AP75 | APs | APm | APl "
                                           "| AR100 | s/epoch |")
    for method, epochs in (("teacher", 2), ("plain", 1), ("fgd", 1)):
        assert f"| tiny | {method} | 1 |" in text
        s = json.loads((root / "tiny" / (method if method == "teacher" else f"{method}-s0") / "summary.json")
                       .read_text())
        assert s["epochs"] == epochs and 0 <= s["map"] <= 1 and set(s) >= {"ap75", "ar100"}
        assert s["threads"] == 3  # what the run's torch used, not what was asked
    runs = {m: json.loads((root / "tiny" / d / "summary.json").read_text())["map"]
            for m, d in (("teacher", "teacher"), ("plain", "plain-s0"), ("fgd", "fgd-s0"))}
    assert "| tiny | fgd | plain | 1 |" in text  # paired with its baseline, the gap to the teacher
    gap = (root / "results_gap.csv").read_text().splitlines()
    assert gap[0] == "dataset,method,control,seed,delta_map,gap_map", gap
    delta, closed = map(float, gap[1].split(",")[4:])
    assert abs(delta - (runs["fgd"] - runs["plain"])) < 1e-5
    lead = runs["teacher"] - runs["plain"]
    assert (abs(closed - delta / lead) < 1e-4) if lead > 0 else closed != closed  # nan when the teacher is not ahead
    fgd_args = json.loads((root / "tiny" / "fgd-s0" / "args.json").read_text())
    assert fgd_args["fgd"] and fgd_args["teacher"].endswith("teacher/model.pth")
    stamp = {p: p.stat().st_mtime for p in root.rglob("summary.json")}
    study(rec, project=str(tmp_path / "runs"), name="tv", lanes=2)
    assert {p: p.stat().st_mtime for p in root.rglob("summary.json")} == stamp


def test_a_mask_rcnn_study_reports_mask_ap_and_rescore_rereads_its_runs(tmp_path):
    """Mask R-CNN's runs: the report has the segm COCOeval columns (mask_mAP, mask_AP50) after the box ones, and the
    gap table pairs the mask mAP by seed as it pairs the box mAP; ``rescore=True`` re-reads a torchvision run's last
    epoch (it went to the YOLO scorer, a KeyError), so summaries written before the mask columns gain them."""
    import csv

    from yolo_fgd.lab.study import plan, study

    rec = tiny_tv_recipe(tmp_path)
    rec["datasets"]["tiny"]["task"] = "segment"
    rec["train"]["arch"] = "mask_rcnn"
    root = tmp_path / "runs" / "tv"
    head = "epoch,time,lr,loss_mask,mAP,AP50,AP75,APs,APm,APl,AR100,ARs,ARm,ARl,mask_mAP,mask_AP50,mask_AP75\n"
    values = {"teacher": (0.40, 0.30), "plain": (0.20, 0.10), "fgd": (0.25, 0.20)}  # last epoch's box, mask mAP
    for s in plan(rec, root):
        box, mask = values[s["method"]]
        out = Path(s["dir"])
        out.mkdir(parents=True)
        (out / "results.csv").write_text(head + "1,10,0.01,0.9,0.01,0,0,0,0,0,0,0,0,0,0.01,0,0\n"
                                         f"2,20,0.01,0.5,{box},0.6,0.4,0.1,0.3,0.5,0.5,0.4,0.5,0.6,{mask},0.5,0.1\n")
        (out / "summary.json").write_text(json.dumps({"method": s["method"], "seed": s["seed"], "map": box,
                                                      "threads": 1, "epoch_s": 15.0, "wall_s": 30.0}))
    text = study(rec, project=str(tmp_path / "runs"), name="tv", report_only=True, rescore=True)
    assert text.splitlines()[0].endswith("| AR100 | mask_mAP | mask_AP50 | s/epoch |"), text
    assert "| tiny | fgd | 1 | 25.0 ± 0.0 | 25.0 |" in text and "| 20.0 ± 0.0 | 50.0 ± 0.0 | 15.0 |" in text, text
    fgd = json.loads((root / "tiny" / "fgd-s0" / "summary.json").read_text())
    assert (fgd["mask_map"], fgd["mask_map50"], fgd["threads"]) == (0.20, 0.5, 1)
    gap = list(csv.DictReader(open(root / "results_gap.csv")))
    assert [(round(float(r["delta_map"]), 4), round(float(r["gap_map"]), 4), round(float(r["delta_mask"]), 4),
             round(float(r["gap_mask"]), 4)) for r in gap] == [(0.05, 0.25, 0.1, 0.5)], gap
    assert "| Δ mask mAP | gap closed, mask mAP |" in text and "| +10.0 ± 0.0 | +50.0 ± 0.0 % |" in text, text


def test_plateau_gain_is_the_last_window_over_the_best_before():
    """The plateau rule's figure: best val mAP50-95 of the last 20 epochs minus the best before them (a run that
    peaked early and fell gains a negative amount; a run of 20 epochs or fewer has no figure)."""
    import math

    from yolo_fgd.lab.study import plateau_gain

    rows = lambda maps: [{"metrics/mAP50-95(B)": str(m)} for m in maps]
    rising = [i / 100 for i in range(40)]  # +0.01 per epoch
    assert math.isclose(plateau_gain(rows(rising)), 0.39 - 0.19)
    flat = [0.5] * 20 + [0.501] * 20
    assert math.isclose(plateau_gain(rows(flat)), 0.001)
    assert plateau_gain(rows([0.6] * 21 + [0.5] * 20)) < 0
    assert math.isnan(plateau_gain(rows([0.1] * 20)))


def test_progress_eta_counts_every_segment_of_a_resumed_run(tmp_path):
    """Ultralytics' time column restarts when a run resumes: the ETA uses the seconds of every segment (it showed a
    run of 80 minutes left as 2 minutes after a resume)."""
    from yolo_fgd.lab.study import progress

    run = tmp_path / "r"
    run.mkdir()
    times = [10, 20, 30, 5, 15]  # three epochs, a resume, two more: 45 s over 5 epochs
    (run / "results.csv").write_text("epoch,time,train/box_loss,train/crosskd,metrics/mAP50-95(B)\n" +
                                     "".join(f"{i + 1},{t},1.5,8.25,0.1\n" for i, t in enumerate(times)))
    line = progress({"dir": str(run), "train": {"epochs": 10}, "args": {}})
    assert "5/10 epochs" in line and "ETA 0m45s" in line, line
    assert "box 1.500  crosskd 8.250" in line, line  # the loss items by their names (a term's has no _loss)


def test_gap_table_pairs_each_seed_with_its_control_and_the_teacher(tmp_path):
    """A method with a ``control``: per seed (run - control) / (teacher - control), on COCO and Ultralytics' mAP, paired
    by seed (a seed the control lacks is left out), mean +- std and per-seed values; results_gap.csv holds them."""
    import csv

    from yolo_fgd.lab.study import plan, report

    rec = tiny_recipe(tmp_path)
    rec["methods"] = {"plain": {}, "kd": {"distill": True, "control": "plain"}}
    rec["seeds"] = [0, 1, 2]
    specs = plan(rec, tmp_path / "r")
    assert [s.get("control") for s in specs if s["method"] == "kd"] == ["plain"] * 3
    values = {("teacher", 0): (0.60, 0.70), ("plain", 1): (0.50, 0.60), ("plain", 2): (0.40, 0.50),
              ("kd", 1): (0.55, 0.62), ("kd", 2): (0.35, 0.55), ("kd", 0): (0.99, 0.99)}  # kd-s0 has no control
    for s in specs:
        if (s["method"], s["seed"]) in values:
            m, ul = values[(s["method"], s["seed"])]
            out = tmp_path / "r" / "tiny" / f"{s['method']}-s{s['seed']}" if s["method"] != "teacher" else \
                tmp_path / "r" / "tiny" / "teacher"
            out.mkdir(parents=True, exist_ok=True)
            (out / "summary.json").write_text(json.dumps({"method": s["method"], "seed": s["seed"], "map": m,
                                                          "ul_map": ul, "epoch_s": 1.0, "wall_s": 1.0}))
    text = report(tmp_path / "r", specs)
    row = [line for line in text.splitlines() if line.startswith("| tiny | kd | plain |")]
    assert row and "| 2 |" in row[0] and "+50% / -25%" in row[0], text  # seed 1: 0.05/0.10; seed 2: -0.05/0.20
    assert "+12.5 ± 53.0 %" in row[0], row  # mean and sample std of +50 % and -25 %
    gap = list(csv.DictReader(open(tmp_path / "r" / "results_gap.csv")))
    assert [(r["seed"], round(float(r["gap_map"]), 4), round(float(r["gap_ul"]), 4)) for r in gap] == \
        [("1", 0.5, 0.2), ("2", -0.25, 0.25)], gap


def test_a_report_keeps_every_finished_run_and_a_second_recipe_in_the_folder_writes_its_own(tmp_path):
    """`only=` and `seeds=` choose what trains, not what the report shows: the report lists every finished run of the
    recipe (an `only=` run once rewrote results.md with its one method). A second recipe run under the first's name
    (to share its teacher and plain runs, as `recipe=tv_ablations_cpu name=tv_study_cpu`) writes
    results_<recipe>.*, leaving the first recipe's results.* as they were. Folder listed before and after."""
    import yaml

    from yolo_fgd.lab.study import study

    rec = tiny_recipe(tmp_path)
    rec["methods"] = {"plain": {}, "kd": {"distill": True, "control": "plain"}}
    rec["seeds"] = [0]
    (tmp_path / "first.yaml").write_text(yaml.safe_dump(rec))
    rec["methods"] = {"plain": {}, "other": {"distill": True, "control": "plain"}}
    (tmp_path / "second.yaml").write_text(yaml.safe_dump(rec))
    root = tmp_path / "runs" / "first" / "tiny"
    for run, m in (("teacher", 0.6), ("plain-s0", 0.4), ("kd-s0", 0.5), ("other-s0", 0.45)):
        (root / run).mkdir(parents=True)
        (root / run / "summary.json").write_text(json.dumps({"method": run.split("-")[0], "seed": 0, "map": m,
                                                             "ul_map": m, "epoch_s": 1.0, "wall_s": 1.0}))
    kw = dict(project=str(tmp_path / "runs"), report_only=True)
    text = study(str(tmp_path / "first.yaml"), only="kd", **kw)
    assert "| tiny | plain |" in text and "| tiny | kd |" in text and "| tiny | teacher |" in text, text
    before = sorted(p.name for p in (tmp_path / "runs" / "first").iterdir())
    first_md = (tmp_path / "runs" / "first" / "results.md").read_text()
    text2 = study(str(tmp_path / "second.yaml"), name="first", only="other", seeds="0", **kw)
    after = sorted(p.name for p in (tmp_path / "runs" / "first").iterdir())
    assert (tmp_path / "runs" / "first" / "results.md").read_text() == first_md
    assert set(after) - set(before) >= {"results_second.md", "results_second.csv", "results_second_gap.csv"}, after
    assert set(before) <= set(after), (before, after)
    assert "| tiny | other | plain |" in text2 and "| tiny | kd |" not in text2, text2


RECIPE_TYPOS = [
    (("methods", "kd"), {"distil": True, "control": "plain"}, "method kd: 'distil' is not a method key: did you mean "
                                                               "'distill'?"),
    (("methods", "kd"), {"distill": True, "contol": "plain"}, "method kd: 'contol' is not a method key: did you mean "
                                                               "'control'?"),
    (("methods", "kd"), {"distill": True, "args": {"epoch": 3}}, "method kd: unknown argument 'epoch': did you mean "
                                                                  "'epochs'?"),
    (("methods", "kd"), {"distill": True, "control": "plane"}, "method kd: 'plane' is not a method of the recipe"),
    (("methods", "kd"), {"distill": True, "args": {"kd_cls": -1}}, "method kd: kd_cls=-1.0 is negative"),
    (("train",), {"epochs": 1, "imgsz": 64, "lr": 0.1}, "train: unknown argument 'lr'"),
    (("method",), {"kd": {"distill": True}}, "'method' is not a recipe key: did you mean 'methods'?"),
]


@pytest.mark.parametrize("where, value, needle", RECIPE_TYPOS, ids=[t[2][:40] for t in RECIPE_TYPOS])
def test_a_study_recipe_with_a_typo_is_one_line_before_any_folder(tmp_path, where, value, needle):
    """A study recipe's method keys, run arguments and pairings are checked before anything is made: `distil: true`
    trained the method plainly, `contol:` left it unpaired, `epoch:` failed inside every run. One line, exit 2, the
    folder as it was (listed before and after)."""
    import yaml

    rec = tiny_recipe(tmp_path)
    rec["seeds"] = [0]
    rec["methods"] = {"plain": {}, "kd": {"distill": True, "control": "plain"}}
    node = rec
    for k in where[:-1]:
        node = node[k]
    node[where[-1]] = value
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(rec))
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    r = subprocess.run([sys.executable, "-m", "yolo_fgd.cli", "study", f"recipe={tmp_path / 'r.yaml'}",
                        f"project={tmp_path / 'runs'}"], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "YOLO_OFFLINE": "1"})
    after = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], r.stderr[-1500:]
    assert lines[0].startswith(f"yolo-fgd: error: recipe {tmp_path / 'r.yaml'}")
    assert before == after == ["r.yaml"], after


def _trains(rec: dict, m: dict) -> str:
    """What a recipe method trains, with its distillation arguments resolved against their preset: two methods
    with the same value train the same thing."""
    from yolo_fgd.core.presets import KEYS, arg_name, resolve
    from yolo_fgd.tv.models import ARCH_PRESET

    args = dict(m.get("args") or {})
    what = {"model": m.get("model", rec.get("student")), "distill": bool(m.get("distill"))}
    if m.get("distill"):
        names = {arg_name(k) for k in KEYS} | {"distill_preset"}
        given = {k: args.pop(k) for k in list(args) if k in names}
        if rec.get("kind") == "tv":
            arch = {**rec["train"], **args}.get("arch", "retinanet")
            given.setdefault("distill_preset", ARCH_PRESET[arch])
        what["auto"] = given.get("fgd_gain") == "auto"
        what["distill"] = resolve({k: v for k, v in given.items() if not (k == "fgd_gain" and v == "auto")})
    what["args"] = args
    return json.dumps(what, sort_keys=True, default=str)


STUDY_RECIPES = sorted(p.name for p in (Path(__file__).parents[1] / "yolo_fgd/cfg/recipes").glob("*.yaml")
                       if "\nmethods:" in p.read_text())  # the study recipes (the others are tv-train's)


@pytest.mark.parametrize("recipe", STUDY_RECIPES)
def test_no_two_methods_of_a_shipped_recipe_train_the_same_thing(recipe):
    """Every method of a shipped recipe is its own experiment: no two that share a seed and a data set train the same
    model with the same arguments once the distillation arguments are resolved against their preset. A preset
    default that changes (crosskd_fit became True in 0.4.0) must not silently turn a measured row into a copy of
    another (gpu_scale's 'default' and 'default_fit', candidates' 'crosskd' and 'crosskd_fit' did)."""
    from yolo_fgd.cfg import load_recipe

    rec = load_recipe(f"cfg/{recipe}")
    seen = {}
    for name, m in rec["methods"].items():
        m = m or {}
        for seed in m.get("seeds", rec["seeds"]):
            for ds in m.get("datasets", list(rec["datasets"])):
                key = (seed, ds, _trains(rec, m))
                assert key not in seen, f"{recipe}: '{name}' trains what '{seen[key]}' does (seed {seed}, {ds})"
                seen[key] = name
