"""DistillTrainer end to end on tiny data: API, CLI, checkpoints, resume, cross-family, errors, DDP re-creation."""

import copy
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, run_cli, save_untrained, train_teacher


def read_csv(path):
    with open(path) as f:
        return [{k.strip(): v for k, v in row.items()} for row in csv.DictReader(f)]


class StopAfterFirstEpoch(Exception):
    pass


@pytest.fixture(scope="module")
def fgd_run(data, runs, teacher):
    """One FGD run through the Python API (2 epochs), with the FGD state captured at setup and at the end."""
    from ultralytics import YOLO

    from yolo_fgd import DistillTrainer

    model = YOLO("yolo11n.yaml")
    seen = {}
    model.add_callback("on_pretrain_routine_end",
                       lambda t: seen.setdefault("init", copy.deepcopy(t.distiller.state_dict())))
    model.add_callback("on_train_end", lambda t: seen.setdefault("trainer", t))
    # nbs=batch and no warm-up: every batch is an optimiser step at full lr, so 4 steps must move every FGD weight;
    # fgd_gain=0.05 turns FGD on (the shipped preset has the head-response term only)
    model.train(trainer=DistillTrainer, teacher=teacher, data=data, epochs=2, project=str(runs), name="fgd", nbs=4,
                warmup_epochs=0, distill_warmup=0, fgd_gain=0.05, **TINY)
    return Path(runs) / "fgd", seen


def test_api_run_logs_fgd_terms(fgd_run):
    run, _ = fgd_run
    rows = read_csv(run / "results.csv")
    assert len(rows) == 2
    for key in ("train/fgd", "train/fgd_fg", "train/fgd_bg", "train/fgd_at", "train/fgd_gl", "train/kd",
                "fgd/P3", "fgd/P5", "fgd/grad_ratio", "distill/scale", "distill/skipped", "metrics/mAP50-95(B)"):
        assert key in rows[0], key
    assert float(rows[-1]["train/fgd"]) > 0
    assert float(rows[0]["fgd/grad_ratio"]) > 0 and float(rows[0]["fgd/P3"]) > 0
    assert (run / "weights" / "fgd_last.pt").is_file()


def test_fgd_modules_are_trained_and_teacher_frozen(fgd_run, teacher):
    _, seen = fgd_run
    trainer, init = seen["trainer"], seen["init"]
    now = trainer.distiller.state_dict()
    assert not any("teacher" in k or "student" in k for k in now), list(now)[:5]  # neither is a submodule
    for name in ("fgd.levels.0.align.weight", "fgd.levels.2.align.bias", "fgd.levels.1.gc_s.context.weight",
                 "fgd.levels.1.gc_t.context.weight", "fgd.levels.0.gc_s.transform.3.weight",
                 "fgd.levels.2.gc_t.transform.0.weight"):
        assert not torch.equal(init[name].cpu(), now[name].cpu()), f"{name} did not change"
    from ultralytics.nn.tasks import load_checkpoint

    ref = load_checkpoint(teacher)[0].fuse(verbose=False).state_dict()  # the teacher runs Conv+BN fused
    teacher_net = trainer.distiller.teacher
    for k, v in teacher_net.state_dict().items():
        if k in ref and v.shape == ref[k].shape:
            assert torch.allclose(v.float().cpu(), ref[k].float(), atol=1e-3), k
    assert not teacher_net.training
    assert all(not p.requires_grad for p in teacher_net.parameters())
    # the FGD parameters are in the optimiser, the teacher's are not
    opt_ids = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in opt_ids for p in trainer.distiller.parameters())
    assert not any(id(p) in opt_ids for p in teacher_net.parameters())


@pytest.mark.parametrize("which", ["best.pt", "last.pt"])
def test_checkpoints_are_plain_student_and_safe_load(fgd_run, which):
    run, _ = fgd_run
    path = run / "weights" / which
    code = (
        "import sys; from ultralytics import YOLO; m = YOLO(sys.argv[1]); "
        "mods = {type(x).__module__ for x in m.model.modules()}; "
        "assert not any('yolo_fgd' in x for x in mods), mods; "
        "assert not hasattr(m.model, 'teacher'); "
        "r = m.predict(source=__import__('numpy').zeros((64, 64, 3), 'uint8'), imgsz=64, verbose=False); print('OK')"
    )
    env = {**os.environ, "ULTRALYTICS_SAFE_LOAD": "1"}
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]
    ckpt = torch.load(path, weights_only=False)
    names = {type(m).__module__ for m in (ckpt.get("ema") or ckpt["model"]).modules()}
    assert not any("yolo_fgd" in n for n in names)


def test_resume_restores_fgd_state_and_finishes(data, runs, teacher):
    from ultralytics import YOLO

    from yolo_fgd import DistillTrainer

    def stop(trainer):
        if trainer.epoch == 0:
            raise StopAfterFirstEpoch

    model = YOLO("yolo11n.yaml")
    model.add_callback("on_fit_epoch_end", stop)
    with pytest.raises(StopAfterFirstEpoch):
        model.train(trainer=DistillTrainer, teacher=teacher, data=data, epochs=2, project=str(runs), name="resume",
                    fgd_gain=0.05, **TINY)
    wdir = Path(runs) / "resume" / "weights"
    saved = torch.load(wdir / "fgd_last.pt", weights_only=True)["fgd"]
    assert len(read_csv(wdir.parent / "results.csv")) == 1

    seen = {}
    resumed = YOLO(wdir / "last.pt")
    resumed.add_callback("on_pretrain_routine_end", lambda t: seen.update(
        start=t.start_epoch, state=copy.deepcopy(t.distiller.fgd.state_dict()), teacher=t.args.teacher))
    resumed.train(trainer=DistillTrainer, resume=True)
    assert seen["start"] == 1 and seen["teacher"] == teacher
    for k, v in saved.items():
        assert torch.equal(v.cpu(), seen["state"][k].cpu()), k
    assert len(read_csv(wdir.parent / "results.csv")) == 2


def test_cross_family_and_yolo26_student(data, runs):
    """yolov8n teacher -> yolo26n student (end-to-end head: features under preds['one2many']; DFL teacher bins vs
    the student's plain distances: the response term compares decoded distances)."""
    from ultralytics import YOLO

    from yolo_fgd import DistillTrainer

    t8 = train_teacher("yolov8n.yaml", data, runs, "teacher8n")
    YOLO("yolo26n.yaml").train(trainer=DistillTrainer, teacher=t8, data=data, epochs=1, project=str(runs), name="y26",
                               fgd_gain=0.05, **TINY)
    rows = read_csv(Path(runs) / "y26" / "results.csv")
    assert float(rows[0]["train/fgd"]) > 0 and float(rows[0]["train/kd"]) > 0


def test_default_is_response_and_crosskd_and_builds_no_fgd(data, runs, teacher, monkeypatch):
    """The shipped preset: head response + CrossKD with fitted convs (kd, crosskd columns); FGD has weight 0, so its modules
    are not built, optimised, saved or logged; with crosskd=0 too, the distiller has no module at all."""
    from ultralytics import YOLO

    from yolo_fgd import DistillTrainer
    from yolo_fgd.core import FGDPyramid

    def never(*a, **k):
        raise AssertionError("FGD was built with weight 0")

    monkeypatch.setattr(FGDPyramid, "__init__", never)
    seen = {}
    model = YOLO("yolo11n.yaml")
    model.add_callback("on_train_end", lambda t: seen.update(trainer=t))
    model.train(trainer=DistillTrainer, teacher=teacher, data=data, epochs=1, project=str(runs), name="kd", distill_warmup=0,
                **TINY)
    row = read_csv(Path(runs) / "kd" / "results.csv")[0]
    # CrossKD's convs, fitted to these few pixels, reproduce the teacher's features almost exactly: ~0 at 5 decimals
    assert float(row["train/kd"]) > 0 and float(row["train/crosskd"]) >= 0
    assert not any(k.startswith(("train/fg", "train/bg", "train/at", "train/gl", "fgd/")) for k in row), list(row)
    d = seen["trainer"].distiller
    assert d.fgd is None and all(n.startswith("cross.") for n, _ in d.named_parameters())
    assert d.cfg["crosskd_fit"] and [t.fitted for t in d.built if t.name == "crosskd"] == [True]  # convs fitted first
    assert set(torch.load(Path(runs) / "kd" / "weights" / "fgd_last.pt", weights_only=True)) == {"cross", "mult",
                                                                                                  "epoch"}
    model = YOLO("yolo11n.yaml")
    model.add_callback("on_train_end", lambda t: seen.update(trainer=t))
    model.train(trainer=DistillTrainer, teacher=teacher, data=data, epochs=1, project=str(runs), name="kd_only",
                distill_warmup=0, crosskd=0, **TINY)
    assert not list(seen["trainer"].distiller.parameters())
    assert "train/crosskd" not in read_csv(Path(runs) / "kd_only" / "results.csv")[0]
    assert not (Path(runs) / "kd_only" / "weights" / "fgd_last.pt").exists()


def test_cli_train_and_val(data, runs, teacher):
    out = run_cli("train", "model=yolo11n.yaml", f"teacher={teacher}", f"data={data}", "epochs=1", "imgsz=64",
                  "batch=4", "plots=False", f"project={runs}", "name=cli", "exist_ok=True", "device=cpu",
                  "fgd_gain=0.5", "distill_warmup=0")
    assert out.returncode == 0, out.stderr[-3000:]
    best = Path(runs) / "cli" / "weights" / "best.pt"
    assert best.is_file()
    args = (Path(runs) / "cli" / "args.yaml").read_text()
    assert "fgd_gain: 0.5" in args and "teacher:" in args
    out = run_cli("val", f"model={best}", f"data={data}", "imgsz=64", "batch=4", "plots=False",
                  f"project={runs}", "name=cli_val", "device=cpu")
    assert out.returncode == 0, out.stderr[-3000:]


def test_cli_help():
    out = run_cli("help")
    assert out.returncode == 0 and "yolo-fgd COMMAND help" in out.stdout and "benchmark-step" in out.stdout
    out = run_cli("train", "help")
    assert out.returncode == 0 and "teacher=" in out.stdout and "distill_warmup" in out.stdout


def one_line_error(out, *needles):
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    err = [ln for ln in out.stderr.strip().splitlines() if ln.startswith("yolo-fgd: error:")]
    assert len(err) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    for n in needles:
        assert n in err[0], err[0]


def cli_train(data, runs, *extra):
    return run_cli("train", "model=yolo11n.yaml", f"data={data}", "epochs=1", "imgsz=64", "batch=4",
                   f"project={runs}", "name=err", "exist_ok=True", "device=cpu", *extra)


def test_error_missing_teacher(data, runs, tmp_path):
    one_line_error(cli_train(data, runs), "no teacher given", "teacher=")
    one_line_error(cli_train(data, runs, f"teacher={tmp_path / 'nope.pt'}"), "not found")


def test_error_corrupt_teacher(data, runs, tmp_path):
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"\x00not a checkpoint" * 64)
    one_line_error(cli_train(data, runs, f"teacher={bad}"), "could not be loaded")


def test_error_classification_teacher(data, runs, tmp_path):
    cls = save_untrained("yolo11n-cls.yaml", ["circle", "ring", "triangle", "square", "star", "cross"], tmp_path / "c.pt")
    one_line_error(cli_train(data, runs, f"teacher={cls}"), "not a detection model")


def test_error_class_mismatch(data, runs, tmp_path):
    t = save_untrained("yolo11n.yaml", ["a", "b", "c"], tmp_path / "nc3.pt")
    one_line_error(cli_train(data, runs, f"teacher={t}"), "3 classes but the data has 6")
    t = save_untrained("yolo11n.yaml", ["ring", "circle", "triangle", "square", "star", "cross"], tmp_path / "order.pt")
    one_line_error(cli_train(data, runs, f"teacher={t}"), "class names differ")


def test_error_stride_mismatch(data, runs, tmp_path):
    names = ["circle", "ring", "triangle", "square", "star", "cross"]
    t = save_untrained("yolov8n-p2.yaml", names, tmp_path / "p2.pt")
    one_line_error(cli_train(data, runs, f"teacher={t}"), "strides", "[4, 8, 16, 32]")


def test_error_with_distill_model(data, runs, teacher):
    one_line_error(cli_train(data, runs, f"teacher={teacher}", f"distill_model={teacher}"), "distill_model")


def test_error_unknown_key_suggests(data, runs, teacher):
    one_line_error(cli_train(data, runs, f"teacher={teacher}", "fgd_fgg=1"), "fgd_fgg", "fgd_fg")
    one_line_error(cli_train(data, runs, f"teacher={teacher}", "distill_preset=yolox2"), "unknown distill_preset")


def test_ddp_recreation_keeps_args_and_not_teacher(data, runs, teacher):
    """Ultralytics' DDP path: pickle (class, args, model) with cloudpickle, rebuild the trainer as the temp file does."""
    from ultralytics import YOLO
    from ultralytics.utils import DEFAULT_CFG_DICT
    from ultralytics.utils.dist import generate_ddp_file
    from ultralytics.utils.patches import torch_load

    from yolo_fgd import DistillTrainer

    trainer = DistillTrainer(overrides=dict(model="yolo11n.yaml", teacher=teacher, data=data, epochs=1, fgd_gain=0.3,
                                        project=str(runs), name="ddp", **TINY))
    trainer.model = YOLO("yolo11n.yaml").model
    file = generate_ddp_file(trainer)
    try:
        state = torch_load(str(Path(file).with_suffix(".pt")), map_location="cpu")  # as the DDP temp file loads it
        assert state["trainer"] is DistillTrainer and state["args"]["teacher"] == teacher
        assert not any("yolo_fgd" in type(m).__module__ for m in state["model"].modules())
        src = Path(file).read_text()
        assert "state[\"trainer\"](cfg=cfg, overrides=state[\"args\"]" in src
        cfg = DEFAULT_CFG_DICT.copy()
        cfg.update(save_dir="")
        rebuilt = state["trainer"](cfg=cfg, overrides=state["args"], _callbacks=state["callbacks"])
        assert rebuilt.args.teacher == teacher and rebuilt.distill_cfg["gain"] == 0.3
        rebuilt.model = state["model"]
        rebuilt.device = torch.device("cpu")
        rebuilt.setup_model()  # loads the teacher from its path, as each rank does
        assert rebuilt.distiller.teacher is not None and len(rebuilt.distiller.fgd.levels) == 3
    finally:
        for f in (Path(file), Path(file).with_suffix(".pt")):
            f.unlink(missing_ok=True)


def test_attention_maps_png(fgd_run, teacher, data, tmp_path):
    from yolo_fgd.data.coco import split_images
    from yolo_fgd.lab.probes import attention_maps

    run, _ = fgd_run
    img = split_images(data, "val")[0][0]
    out = attention_maps(str(run / "weights" / "best.pt"), teacher, str(img), baseline=teacher, imgsz=64,
                         out=str(tmp_path / "att.png"))
    assert out.is_file() and out.stat().st_size > 10_000
    bad = run_cli("attention", f"model={run / 'weights' / 'best.pt'}", f"teacher={teacher}", f"source={tmp_path / 'x.jpg'}")
    assert bad.returncode == 2 and "not a readable image" in bad.stderr


def test_grad_share_balancing_moves_the_multiplier(data, runs, teacher, monkeypatch):
    from ultralytics import YOLO

    from yolo_fgd import DistillTrainer
    from yolo_fgd.yolo import Distiller

    monkeypatch.setattr(Distiller, "MEASURE_EVERY", 1)
    seen = {}
    model = YOLO("yolo11n.yaml")
    model.add_callback("on_train_end", lambda t: seen.update(mult=t.distiller.mult, cfg=t.distill_cfg))
    model.train(trainer=DistillTrainer, teacher=teacher, data=data, epochs=1, project=str(runs), name="share",
                fgd_share=5.0, fgd_gain=0.05, distill_warmup=0, nbs=4, warmup_epochs=0, **TINY)
    assert seen["cfg"]["share"] == 5.0 and seen["mult"] != 1.0
    r = read_csv(Path(runs) / "share" / "results.csv")[0]
    assert float(r["fgd/grad_ratio"]) > 0 and abs(float(r["fgd/mult"]) - seen["mult"]) < 1e-3 * max(1, seen["mult"])


def test_fgd_schedule_warmup_then_cosine_decay(data, runs, teacher):
    """distill_warmup ramps the weight 0 -> 1, distill_decay brings it back to 0 by the last batch (per batch, fractional)."""
    from yolo_fgd import DistillTrainer

    t = DistillTrainer(overrides=dict(model="yolo11n.yaml", data=data, teacher=teacher, epochs=10, distill_warmup=2,
                                  distill_decay=4, project=str(runs), name="schedule", **TINY))
    t.train_loader = [None] * 5  # 5 batches per epoch

    def at(epoch, batch):
        t.epoch, t.batch_i = epoch, batch
        return t.distill_scale()

    assert at(0, 0) == 0 and at(0, 5) == pytest.approx(0.5) and at(1, 5) == 1
    assert at(5, 5) == 1 and at(6, 0) == 1  # plateau until epochs - decay
    assert at(8, 0) == pytest.approx(0.5)  # half-way through the cosine
    assert 0 < at(9, 4) < at(9, 1) < at(8, 0) and at(9, 5) == pytest.approx(0, abs=1e-12)
    t.distill_cfg["decay"] = 0  # off: flat after warm-up
    assert at(9, 5) == 1


def test_imitation_ranks_teacher_above_untrained_student(teacher, data, tmp_path):
    from yolo_fgd.lab.probes import imitation

    untrained = save_untrained("yolo11n.yaml", read_names(teacher), tmp_path / "untrained.pt")
    r2 = imitation(f"{teacher},{untrained}", teacher, data=data, imgsz=64)
    own, rand = r2[teacher], r2[untrained]
    assert len(own) == len(rand) == 3 and all(v <= 1 for v in own + rand)
    assert all(o > 0.5 and o > r for o, r in zip(own, rand)), (own, rand)
    bad = run_cli("imitation", f"model={untrained}")
    assert bad.returncode == 2 and "teacher=" in bad.stderr


def read_names(ckpt):
    return torch.load(ckpt, map_location="cpu", weights_only=False)["model"].names


def test_benchmark_step_times_every_method(data, teacher, tmp_path):
    from yolo_fgd.lab.cost import benchmark_step

    run = Path(teacher).parent.parent  # the teacher's run folder, as every command takes it
    res = benchmark_step(str(run), data=data, imgsz=64, batch=4, fraction=1.0, project=str(tmp_path),
                         methods="default,fgd,distill_model", repeat=2)
    assert list(res) == ["plain", "default", "fgd", "distill_model"]  # plain added: every ratio is to it
    assert all(v["ms"] > 0 and v["x_min"] <= v["x_plain"] <= v["x_max"] for v in res.values())
    rows = read_csv(tmp_path / "step.csv")
    assert [r["method"] for r in rows] == list(res) and float(rows[0]["x_plain"]) == 1.0
    assert {p.name for p in tmp_path.iterdir() if p.is_dir()} == set(res)  # one run folder per method, reused


def distiller_on_a_batch(teacher, cfg=None):
    """A YOLO11n student with the teacher's classes, the shipped preset's distiller (or ``cfg``'s), and a 2-image
    batch."""
    from ultralytics.nn.tasks import DetectionModel

    from yolo_fgd.cfg.distill import resolve
    from yolo_fgd.yolo import Distiller

    names = read_names(teacher)
    torch.manual_seed(0)
    student = DetectionModel("yolo11n.yaml", nc=len(names), verbose=False).train()
    img = torch.rand(2, 3, 64, 64)
    batch = {"img": img, "bboxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]]), "batch_idx": torch.tensor([0.0])}
    return student, Distiller(student, teacher, cfg or resolve({}), names, "cpu"), img, batch


def test_amp_teacher_targets_match_fp32(data, teacher):
    """Under the step's autocast the teacher runs in half precision (its targets then cast to fp32): its Detect inputs
    and the response / CrossKD terms match the fp32 ones within the half type's rounding (CPU fp16 autocast here; on
    CUDA the same code runs under Ultralytics' AMP)."""
    from yolo_fgd.yolo.model import train_outputs

    student, d, img, batch = distiller_on_a_batch(teacher)
    feats32 = d.teacher_features(img)
    with torch.autocast("cpu", dtype=torch.float16):
        feats16 = d.teacher_features(img)
    for a, b in zip(feats16, feats32):
        assert a.dtype == torch.float32
        assert ((a - b).abs().max() / b.abs().max()) < 1e-2
    # how they were computed: the teacher's convs ran in half precision under autocast (a teacher forced to fp32
    # would match the values above as well)
    dtypes = []
    hook = d.teacher.model[1].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.float16):
        d.teacher_features(img)
    d.teacher_features(img)
    hook.remove()
    assert dtypes == [torch.float16, torch.float32], dtypes
    out = train_outputs(student(img))
    with torch.no_grad():
        ref = d(out, batch)
        with torch.autocast("cpu", dtype=torch.float16):
            amp = d(train_outputs(student(img)), batch)
    assert float(ref["kd"]) > 0.1  # a term of the detection losses' order, not a near-zero number
    assert amp["kd"].dtype == torch.float32 and abs(float(amp["kd"]) - float(ref["kd"])) <= 1e-2 * float(ref["kd"])
    assert amp["crosskd"].dtype == torch.float32 and torch.isfinite(amp["crosskd"])
    from yolo_fgd.yolo.model import head_outputs

    with torch.no_grad():  # the head's targets (class scores, box bins) from the AMP and the fp32 features
        t32 = head_outputs(d.teacher, d.teacher_input(feats32))
        with torch.autocast("cpu", dtype=torch.float16):
            t16 = head_outputs(d.teacher, d.teacher_input(feats16))
    for k in ("scores", "boxes"):
        assert ((t16[k].float() - t32[k]).abs().max() / t32[k].abs().max()) < 1e-2, k


def test_teacher_prefetch_gives_the_inline_terms(data, teacher):
    """On CPU the teacher's pass runs in a second thread while the student's forward runs (Ultralytics trains on
    cpu_count - 1 threads, leaving a core): the terms are those of the inline pass, to the bit."""
    import os
    import threading

    from yolo_fgd.yolo.model import train_outputs

    if (os.cpu_count() or 1) < 2:
        pytest.skip("the prefetch needs a second core")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        student, d, img, batch = distiller_on_a_batch(teacher)
        out = train_outputs(student(img))
        inline = d(out, batch)
        seen = []
        d.teacher.model[0].register_forward_hook(lambda *_: seen.append(threading.current_thread().name))
        d.prefetch(img)
        assert "pending" in d._refs
        prefetched = d(out, batch)
        assert "pending" not in d._refs and seen and seen[-1].startswith("yolo-fgd-teacher")
        for k in ("kd", "crosskd"):
            assert torch.equal(prefetched[k], inline[k]), k
    finally:
        torch.set_num_threads(threads)


def test_prefetch_is_used_whatever_tensor_object_carries_the_pixels(data, teacher, monkeypatch):
    """The teacher runs once per step when Ultralytics hands the model another tensor object over the same pixels
    (a view, a no-op .to()); other pixels run the teacher inline after the prefetch finished (never two teachers at
    once) and are counted; the thread is ended with training; with fewer than 2 x threads cores nothing is
    prefetched (the teacher's thread would oversubscribe them)."""
    import os
    import threading

    from yolo_fgd.yolo.model import train_outputs

    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        student, d, img, batch = distiller_on_a_batch(teacher)
        out = train_outputs(student(img))
        runs = []
        d.teacher.model[0].register_forward_hook(lambda *_: runs.append(threading.current_thread().name))
        d.prefetch(img)
        d(out, {**batch, "img": img.view_as(img)})  # another object, the same pixels
        assert len(runs) == 1 and runs[0].startswith("yolo-fgd-teacher") and d.stats["missed"] == 0, runs
        d.prefetch(img)
        other = img.clone()
        d(out, {**batch, "img": other})
        assert len(runs) == 3 and runs[-1] == threading.current_thread().name and d.stats["missed"] == 1, runs
        d.prefetch(img)
        d.close()
        assert "pending" not in d._refs and "pool" not in d._refs and len(runs) == 4
        monkeypatch.setattr(os, "cpu_count", lambda: 3)  # < 2 x 2 threads
        d.prefetch(img)
        assert "pending" not in d._refs
    finally:
        torch.set_num_threads(threads)


def test_a_skipped_batch_logs_zeros_not_nan(data, teacher):
    """A batch with non-finite student features is skipped: its loss and every logged item (FGD's per-term columns
    too) are exact zeros, not NaN."""
    from yolo_fgd.core.presets import resolve
    from yolo_fgd.yolo.model import train_outputs

    student, d, img, batch = distiller_on_a_batch(teacher, resolve({"fgd_gain": 0.05}))
    out = train_outputs(student(img))
    out["feats"] = [f.detach().clone() for f in out["feats"]]
    out["feats"][0][0, 0, 0, 0] = float("nan")
    res = d(out, batch)
    for k in ("fgd", "fgd_fg", "fgd_bg", "fgd_at", "fgd_gl", "kd", "crosskd"):
        assert torch.equal(res[k], torch.zeros_like(res[k])), (k, res[k])
    assert int(d.stats["skipped"]) == 1


def test_a_sidecar_of_another_epoch_is_not_restored(data, teacher, tmp_path, caplog):
    """The distiller's state is restored only from the sidecar saved with the checkpoint resumed from, at its epoch:
    a kill between the two saves (sidecar one epoch ahead), or a resume from an earlier epochK.pt, starts the modules
    fresh with a warning instead of pairing them with a student of another epoch."""
    import logging
    from types import SimpleNamespace

    from yolo_fgd.yolo.trainer import DistillMixin, sidecar_of

    _, d, _, _ = distiller_on_a_batch(teacher)
    saved = {k: v.clone() for k, v in d.cross.state_dict().items()}
    with torch.no_grad():
        for p in d.cross.parameters():
            p.add_(1.0)
    side = sidecar_of(tmp_path / "last.pt")
    assert side.name == "fgd_last.pt" and sidecar_of(tmp_path / "epoch4.pt").name == "fgd_epoch4.pt"
    torch.save({"cross": saved, "mult": 1.0, "epoch": 5}, side)
    trainer = SimpleNamespace(distiller=d, device="cpu")
    logging.getLogger("ultralytics").propagate = True
    with caplog.at_level(logging.WARNING, logger="ultralytics"):
        DistillMixin._restore(trainer, side, epoch=4)  # the checkpoint is an epoch behind
    assert not torch.equal(d.cross.state_dict()["0.weight"], saved["0.weight"])
    assert "is from epoch 5, the checkpoint from epoch 4" in caplog.text
    DistillMixin._restore(trainer, side, epoch=5)  # the pair saved together
    assert torch.equal(d.cross.state_dict()["0.weight"], saved["0.weight"])


def test_gradients_probe_measures_each_term_on_the_same_batches(teacher, data, tmp_path):
    """`yolo-fgd gradients`: per term the gradient of that term alone on the same seeded batches: doubling one term's
    weight doubles its norm ratio and leaves its cosines; the detection row is the reference (cos 1); a term with
    weight 0 has no row; the JSON on stdout is all of stdout."""
    import json

    from yolo_fgd.lab.probes import gradients

    untrained = save_untrained("yolo11n.yaml", read_names(teacher), tmp_path / "student.pt")  # an 80-class head
    bad = run_cli("gradients", f"model={untrained}", f"teacher={teacher}", f"data={data}", "imgsz=64")
    assert bad.returncode == 2 and bad.stderr.strip().startswith("yolo-fgd: error: model") and \
        "80 classes" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr[-2000:]
    student = teacher  # a trained network of the data's classes (in train mode here, so not the teacher's outputs)
    kw = dict(data=data, imgsz=64, batch=4, batches=2, fgd_gain=0, cwd=0, pkd=0, ld=0, bckd=0, kd_box=0, crosskd=1,
              lad=False)
    one = gradients(student, teacher, kd_cls=1, **kw)
    two = gradients(student, teacher, kd_cls=2, **kw)
    assert set(one) == {"det", "kd", "crosskd"}, one
    # the teacher's label assignment: the detection loss of the same predictions against the targets it chooses
    lad = gradients(student, teacher, kd_cls=1, **{**kw, "lad": True})
    assert {k: v for k, v in lad.items() if k != "lad"} == one
    # (a one-epoch teacher's boxes barely overlap the objects, so the soft targets the changed anchors get, and the
    # loss, move little: the foreground is the measure)
    assert 0 < lad["lad"]["fg_jaccard"] < 1, lad["lad"]
    assert one["det"]["cos_det"] == pytest.approx(1, abs=1e-6) and one["kd"]["ratio"] > 0
    assert two["kd"]["ratio"] == pytest.approx(2 * one["kd"]["ratio"], rel=1e-3), (one, two)
    assert two["kd"]["cos_val"] == pytest.approx(one["kd"]["cos_val"], abs=1e-3)
    assert two["crosskd"] == one["crosskd"]  # other terms: untouched
    r = run_cli("gradients", f"model={student}", f"teacher={teacher}", f"data={data}", "imgsz=64", "batch=4",
                "batches=1", "kd_cls=0", "kd_box=0", "cwd=0", "pkd=0", "ld=0", "bckd=0", "fgd_gain=0", "lad=False")
    assert r.returncode == 0, r.stderr[-2000:]
    assert set(json.loads(r.stdout)) == {"det", "crosskd"}, r.stdout
