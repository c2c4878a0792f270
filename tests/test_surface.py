"""The command surface as a user meets it: delegated modes do their mode (never a training), results alone on stdout
on a settings folder that does not exist yet, one-line errors before anything is written, start-up without torch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TINY, run_cli, save_untrained


def tree(folder: Path) -> set:
    """Every path under ``folder`` (what a command may not add to on failure)."""
    return {p.relative_to(folder) for p in Path(folder).rglob("*")}


@pytest.fixture(scope="module")
def student(data, runs, teacher):
    """A distilled run folder (1 tiny epoch) to delegate modes on."""
    from ultralytics import YOLO

    from yolo_fgd import DistillTrainer

    YOLO("yolo11n.yaml").train(trainer=DistillTrainer, teacher=teacher, data=data, epochs=1, project=str(runs),
                               name="surface", **TINY)
    return Path(runs) / "surface"


def test_val_reports_metrics_and_trains_nothing(student, data, tmp_path):
    out = run_cli("val", f"model={student}", f"data={data}", "imgsz=64", "batch=4", "device=cpu", "plots=False",
                  f"project={tmp_path}", "name=v", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads(out.stdout)  # stdout is the metrics and nothing else
    assert "metrics/mAP50-95(B)" in metrics and "mode=train" not in out.stderr
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("train*"))


def test_predict_writes_a_prediction_and_trains_nothing(student, data, tmp_path):
    img = next((Path(data).parent / "images" / "val").glob("*.jpg"))
    out = run_cli("predict", f"model={student}", f"source={img}", "imgsz=64", "device=cpu", f"project={tmp_path}",
                  "name=p", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    saved = Path(out.stdout.strip())
    assert saved == tmp_path / "p" and (saved / img.name).is_file()
    assert not list(tmp_path.rglob("*.pt")) and "mode=train" not in out.stderr


def test_export_to_another_format_exports_and_trains_nothing(student, tmp_path):
    import shutil

    run = tmp_path / "r"
    shutil.copytree(student, run)
    before = tree(tmp_path)
    out = run_cli("export", f"model={run}", "format=torchscript", "imgsz=64", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    path = Path(json.loads(out.stdout)["torchscript"])
    assert path == run / "weights" / "best.torchscript" and path.is_file()
    assert tree(tmp_path) - before == {path.relative_to(tmp_path)}  # nothing else: no train folder, no download


def test_int8_without_calibration_images_touches_nothing(student, tmp_path):
    """An empty train folder: one line naming the data, and the earlier export left as it was (no -pre file)."""
    import shutil

    run = tmp_path / "r"
    shutil.copytree(student, run)
    (run / "weights" / "best.onnx").write_bytes(b"an earlier export")
    empty = tmp_path / "empty"
    for split in ("train", "val"):
        (empty / "images" / split).mkdir(parents=True)
    (empty / "data.yaml").write_text(f"path: {empty}\ntrain: images/train\nval: images/val\nnames: {{0: a}}\n")
    before = tree(tmp_path)
    out = run_cli("export", f"model={run}", "imgsz=64", "int8=True", f"data={empty / 'data.yaml'}", cwd=tmp_path)
    one_line(out, f"data '{empty / 'data.yaml'}' has no readable train images")
    assert tree(tmp_path) == before and (run / "weights" / "best.onnx").read_bytes() == b"an earlier export"


def test_failed_parity_leaves_earlier_export_as_it_was(student, data, tmp_path, monkeypatch):
    """The ONNX route stages its files: a check failing after Ultralytics wrote best.onnx moves nothing into place."""
    import shutil

    from yolo_fgd.deploy import export as ex
    from yolo_fgd.errors import FGDError

    run = tmp_path / "r"
    shutil.copytree(student, run)
    (run / "weights" / "best.onnx").write_bytes(b"an earlier export")
    before = tree(tmp_path)
    monkeypatch.setattr(ex, "parity", lambda *a: 1.0)  # the export differs from PyTorch
    with pytest.raises(FGDError, match="differs from PyTorch"):
        ex.export(str(run), imgsz=64, data=data)
    assert tree(tmp_path) == before and (run / "weights" / "best.onnx").read_bytes() == b"an earlier export"


def one_line(out, needle):
    lines = [ln for ln in out.stderr.strip().splitlines() if ln.startswith("yolo-fgd: error:")]
    assert out.returncode == 2 and len(lines) == 1 and needle in lines[0], (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_quick_start_on_a_fresh_settings_folder(tmp_path, teacher):
    """The README's first lines, literally, with a YOLO_CONFIG_DIR that does not exist yet (Ultralytics prints its
    first-run banner): $(yolo-fgd data shapes) holds the path alone, a run folder is a teacher, train prints best.pt."""
    import shutil

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "YOLO_CONFIG_DIR": str(tmp_path / "fresh-settings"), "YOLO_VERBOSE": "True",
           "PATH": f"{bin_dir}:{os.environ['PATH']}"}  # as a user has it: verbose, no settings yet
    (tmp_path / "runs" / "detect" / "teacher" / "weights").mkdir(parents=True)
    shutil.copy(teacher, tmp_path / "runs" / "detect" / "teacher" / "weights" / "best.pt")
    script = ("set -e\nDATA=$(yolo-fgd data shapes root=$PWD/data n_train=8 n_val=4 size=96)\n"
              "test -f \"$DATA\"\necho \"DATA=$DATA\" >&2\n"
              "BEST=$(yolo-fgd train model=yolo11n.yaml teacher=runs/detect/teacher data=$DATA epochs=1 imgsz=64 "
              "batch=4 workers=0 plots=False device=cpu name=distilled)\ntest -f \"$BEST\"\necho \"$BEST\"\n")
    out = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Creating new Ultralytics Settings" in out.stderr  # the banner came, and went to stderr
    assert out.stdout.strip() == str(tmp_path / "runs" / "detect" / "distilled" / "weights" / "best.pt")


BAD = [  # (arguments, the line's text); every case leaves the working folder as it was
    (["train", "teacher={teacher}", "data={data}", "device=0"], "device=0 asks for a CUDA GPU but this machine has none"),
    (["train", "teacher={teacher}", "data={data}", "device=0,1"], "device=0,1 asks for a CUDA GPU"),
    (["train", "teacher={teacher}", "data={data}", "device=gpu"], "device=gpu is not a device"),
    (["val", "model={teacher}", "data={data}", "device=cuda:0"], "asks for a CUDA GPU"),
    (["export", "model={teacher}", "device=1"], "asks for a CUDA GPU"),
    (["train", "teacher={teacher}", "data={data}", "kd_focal=True", "fgd_fg=0"], "kd_focal=True weighs"),
    (["train", "teacher={tmp}/runs/detect/nope", "data={data}"], "teacher '{tmp}/runs/detect/nope' not found"),
    (["train", "teacher={teacher}", "data={data}", "project=/proc/nope"], "project=/proc/nope cannot be written"),
    (["train", "new", "teacher={teacher}"], "'new' is not an argument of train"),
    (["data", "shapes", "Settings"], "'Settings' is not an argument of data"),
    (["val", "helpful", "model={teacher}"], "'helpful' is not an argument of val"),
    (["predict", "model={teacher}"], "predict needs source="),
    (["benchmark", "model={teacher},{tmp}/nope.pt", "project={tmp}/bench"], "model '{tmp}/nope.pt' not found"),
    (["benchmark", "model={teacher}", "openvino=maybe"], "openvino=maybe is not one of True, False"),
]


@pytest.mark.parametrize("args, needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_and_writes_nothing(args, needle, teacher, data, tmp_path):
    fill = lambda s: s.format(teacher=teacher, data=data, tmp=tmp_path)
    before = tree(tmp_path)
    out = run_cli(*map(fill, args), cwd=tmp_path)
    one_line(out, fill(needle))
    assert tree(tmp_path) == before


@pytest.mark.slow
def test_a_run_that_fails_after_its_folder_was_made_leaves_no_folder(tmp_path, data):
    """A teacher of other classes fails in setup_model, after Ultralytics made the run folder: it is removed, so the
    next run gets the name asked for (not NAME2)."""
    teacher = save_untrained("yolo11n.yaml", ["x", "y"], tmp_path / "other.pt")
    out = run_cli("train", "model=yolo11n.yaml", f"teacher={teacher}", f"data={data}", "epochs=1", "imgsz=64",
                  "batch=4", "workers=0", "device=cpu", f"project={tmp_path / 'runs'}", "name=p4a", cwd=tmp_path)
    one_line(out, "classes but the data has")
    assert not (tmp_path / "runs" / "p4a").exists()


def test_fgd_share_is_refused_under_ddp_before_any_folder(tmp_path, data, teacher):
    from yolo_fgd import DistillTrainer
    from yolo_fgd.errors import FGDError

    with pytest.raises(FGDError, match="fgd_share=0.1 balances gradient norms .* not under DDP"):
        DistillTrainer(overrides=dict(model="yolo11n.yaml", teacher=teacher, data=data, fgd_share=0.1, device="0,1",
                                  project=str(tmp_path), name="ddp"))
    assert not (tmp_path / "ddp").exists()


@pytest.mark.slow
def test_level_columns_are_named_by_stride(tmp_path):
    """A P2-P5 head: the per-level FGD columns are fgd/P2..fgd/P5 (not P3..P6)."""
    from ultralytics import YOLO

    from yolo_fgd.cfg.distill import resolve
    from yolo_fgd.yolo import Distiller

    names = {i: str(i) for i in range(3)}
    teacher = save_untrained("yolov8n-p2.yaml", names, tmp_path / "t.pt")
    student = YOLO("yolov8n-p2.yaml").model
    d = Distiller(student, teacher, resolve({"fgd_gain": 0.05}), names, "cpu")
    assert [k for k in d.epoch_metrics() if k.startswith("fgd/P")] == ["fgd/P2", "fgd/P3", "fgd/P4", "fgd/P5"]


def test_edge_runner_never_writes_into_an_earlier_runs_folder(tmp_path, student, data):
    from yolo_fgd.deploy.export import export

    onnx = export(str(student), imgsz=64, data=data)["onnx"]
    img = next((Path(data).parent / "images" / "val").glob("*.jpg"))
    for expected in ("edge", "edge-2"):
        r = subprocess.run([sys.executable, "-m", "yolo_fgd.deploy.edge", onnx, str(img)], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and f"results saved to {tmp_path / 'runs' / expected}" in r.stdout, r.stderr
        assert (tmp_path / "runs" / expected / img.name).is_file()


# --- no model, no torch: the quick tier --------------------------------------------------------------------------
LIGHT = [["help"], ["train", "help"], ["export", "--help"], ["trian"], ["train", "eopchs=3"], ["train", "imgsz=abc"],
         ["train", "teacher=t.pt", "fgd_gain=lots"], ["data", "coco"], ["tv-train", "epochs=abc"]]


@pytest.mark.parametrize("args", LIGHT, ids=[" ".join(a) for a in LIGHT])
def test_help_typos_and_bad_values_answer_without_importing_torch(args):
    code = ("import sys\nfrom yolo_fgd.cli import entrypoint\nrc = entrypoint(sys.argv[1:])\n"
            "heavy = sorted(m for m in ('torch', 'torchvision', 'ultralytics', 'cv2', 'onnx') if m in sys.modules)\n"
            "print('HEAVY', heavy, rc, file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert "HEAVY [] " in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().endswith(" 0" if "help" in args or "--help" in args else " 2"), r.stderr[-500:]


def test_every_loss_item_fits_ultralytics_header():
    """Ultralytics prints loss names in 11-character columns: a name of 11 or more runs into its neighbour. Every
    item a term of the table can add (its name and what it logs beside it) fits."""
    from yolo_fgd.yolo.distiller import ITEM_WIDTH, term_rows

    names = [n for row, cls in term_rows() for n in (row["name"], *cls.logs(row["name"]))]
    assert {"fgd", "fgd_fg", "fgd_gl", "mse", "mgd", "kd", "crosskd", "kd_kpt", "kd_angle", "kd_mask"} <= set(names)
    assert ITEM_WIDTH == 10 and max(map(len, names)) <= ITEM_WIDTH, names


@pytest.mark.parametrize("command, target", [("study", "yolo_fgd.lab.study:study"), ("demo", "yolo_fgd.lab.demo:demo"),
                                             ("curves", "yolo_fgd.lab.curves:curves")])
def test_the_help_table_lists_exactly_the_arguments_the_command_takes(command, target):
    """The rows of `_rows` help come from splitting on ';': a ';' inside one help text made a key of its next word
    (`give=` in `study help`), which the CLI then accepted as an argument."""
    import importlib
    import inspect

    from yolo_fgd.cli import COMMANDS

    module, name = target.split(":")
    params = set(inspect.signature(getattr(importlib.import_module(module), name)).parameters)
    assert {row[0] for row in COMMANDS[command].args} == params
