"""A newcomer's first hour: the Quick start, literally, from a directory outside the checkout with a non-editable
install; help for every subcommand; one-line errors for the inputs a newcomer gets wrong."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from yolo_fgd.cli import COMMANDS  # light: the CLI imports configuration only

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``pip install .`` (not editable) into a folder outside the checkout; dependencies come from the test venv."""
    target = tmp_path_factory.mktemp("site")
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--target",
                          str(target), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return target


def sh(cmd: str, cwd: Path, env: dict, timeout: int = 900):
    out = subprocess.run(cmd, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                         executable="/bin/bash")
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out.stdout + out.stderr


def test_quick_start_from_any_directory_with_a_plain_install(installed, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(installed), "PATH": f"{BIN}:{os.environ['PATH']}",
           "YOLO_CONFIG_DIR": str(tmp_path / "settings"), "YOLO_VERBOSE": "True"}  # a first run: banner, logs
    where = sh("python -c 'import yolo_fgd; print(yolo_fgd.__file__)'", tmp_path, env)
    assert str(installed) in where and str(ROOT) not in where
    work = tmp_path / "project"
    work.mkdir()
    data = subprocess.run(f"yolo-fgd data shapes root={tmp_path / 'data'} n_train=8 n_val=4 size=96", shell=True,
                          cwd=work, env=env, capture_output=True, text=True, timeout=300).stdout
    assert Path(data.strip()).is_file() and data.count("\n") == 1, data  # the path alone, as $(...) captures it
    data = data.strip()
    tiny = "epochs=1 imgsz=64 batch=4 workers=0 plots=False device=cpu"
    sh(f"yolo train model=yolo11s.yaml data={data} {tiny} project=$PWD/runs/detect name=teacher", work, env)
    out = sh(f"yolo-fgd train model=yolo11n.yaml teacher=runs/detect/teacher data={data} {tiny} "
             "name=distilled", work, env)
    best = work / "runs" / "detect" / "distilled" / "weights" / "best.pt"
    assert f"distilled student saved to {best}" in out and best.is_file()
    out = sh("yolo-fgd export model=runs/detect/distilled imgsz=64 int8=True", work, env)
    onnx = best.with_suffix(".onnx")
    assert f"exported {onnx}, {best.with_name('best-int8.onnx')}" in out and onnx.is_file()
    assert "deprecated" not in out
    out = sh(f"yolo-fgd benchmark model=runs/detect/distilled data={data} imgsz=64 runs=2", work, env)
    report = work / "runs" / "benchmark" / "bench"
    assert f"benchmark saved to {report}" in out and (report / "benchmark.md").is_file()
    assert f"benchmark reusing {onnx}" in out  # the export above matched: not redone, not overwritten
    # the README's last line: the data's val images, $(dirname $DATA)/images/val
    out = sh(f"DATA={data}; python -m yolo_fgd.deploy.edge {onnx} $(dirname $DATA)/images/val --json dets.jsonl", work,
             env)
    images = sorted((Path(data).parent / "images" / "val").glob("*.jpg"))
    assert f"results saved to {work / 'runs' / 'edge'}" in out
    assert all((work / "runs" / "edge" / img.name).is_file() for img in images)
    records = [json.loads(x) for x in (work / "dets.jsonl").read_text().splitlines()]
    assert sorted(r["file"] for r in records) == [str(i) for i in images]
    assert "latency_ms" in records[0] and isinstance(records[0]["detections"], list)
    assert not (ROOT / "runs" / "detect" / "distilled").exists()


def test_benchmark_exports_beside_its_report_when_the_existing_export_does_not_match(tmp_path, data, runs, teacher):
    import shutil

    from yolo_fgd.deploy.benchmark import exported
    from yolo_fgd.deploy.export import export

    run = tmp_path / "r" / "weights"
    run.mkdir(parents=True)
    shutil.copy(teacher, run / "best.pt")
    first = export(str(run / "best.pt"), imgsz=64, data=data)
    stamp = Path(first["onnx"]).stat().st_mtime
    res = exported(str(run / "best.pt"), 96, False, data, tmp_path / "report", "r")  # other size: not reused
    assert Path(res["onnx"]).parent == (tmp_path / "report").resolve() and Path(first["onnx"]).stat().st_mtime == stamp


def run_cli_inproc(capsys, *args):
    from yolo_fgd.cli import entrypoint

    code = entrypoint([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("flag", ["help", "-h", "--help"])
def test_every_subcommand_answers_help(capsys, command, flag):
    code, out, err = run_cli_inproc(capsys, command, flag)
    assert code == 0 and f"yolo-fgd {command}:" in out and "Arguments:" in out and "Example:" in out, err
    assert "Traceback" not in out + err


def test_top_level_help_lists_commands_in_a_newcomers_order(capsys):
    code, out, _ = run_cli_inproc(capsys, "help")
    assert code == 0 and "`" not in out.splitlines()[0]
    order = [out.index(f"yolo-fgd {c}") for c in ("data shapes", "train model", "export model", "benchmark model")]
    assert order == sorted(order)
    assert "mse" in run_cli_inproc(capsys, "train", "help")[1]  # every preset listed


BAD = [
    (["train", "teacher=t.pt", "imgsz=abc"], "imgsz=abc is not an image size"),
    (["train", "teacher=t.pt", "epochs=-1"], "epochs=-1 must be a whole number >= 1"),
    (["train", "teacher=t.pt", "batch=0"], "batch=0 is not a batch size"),
    (["train", "teacher=t.pt", "lr0=fast"], "lr0"),
    (["train", "teacher=t.pt", "data=datasets/nope.yaml"], "data 'datasets/nope.yaml' not found: pass data="),
    (["train", "teacher=t.pt", "fgd_gain=lots"], "fgd_gain=lots is not a number"),
    (["train", "resume", "model=runs/detect/none"], "not found"),
    (["export", "imgsz=abc", "model=x.pt"], "imgsz=abc is not a number"),
    (["export", "imgsz=-64", "model=x.pt"], "imgsz=-64 must be > 0"),
    (["export"], "export needs model="),
    (["benchmark", "model=a.pt", "runs=0"], "runs=0 must be > 0"),
    (["study", "lanes=two"], "lanes=two is not a number"),
    (["study", "recipe=nope"], "recipe 'nope' not found"),
    (["study", "threads=0"], "threads=0: pass the threads of each run"),
    (["tv-train", "epochs=abc"], "epochs=abc is not a number"),
    (["tv-train", "kd_cls=1"], "unknown tv-train argument"),
    (["tv-train", "amp=True", "device=cpu"], "amp=True needs a CUDA device"),
    (["tv-train", "fgd=False", "width=-3"], "width=-3: pass an even number of FPN channels"),
    (["tv-train", "fgd=False", "width=100"], "width=100: pass an even number"),
    (["tv-train", "fgd=False", "anchor=0"], "anchor=0: pass the anchor size on the first level"),
    (["tv-train", "fgd=False", "arch=faster_rcnn", "rois=0"], "rois=0: pass the RoIs sampled per training image"),
    (["tv-train", "fgd=False", "norm=batch"], "norm=batch is not supported"),
    (["tv-train", "recipe=tv_faster_rcnn_cpu"], "recipe=tv_faster_rcnn_cpu is not a recipe of tv-train arguments but a "
                                                "study of several runs: run `yolo-fgd study recipe=tv_faster_rcnn_cpu`"),
    (["tv-train", "fgd=False", "data={'train_json': 'a.json'}"], "lacks train_images, val_json, val_images: give COCO"),
    (["benchmark-step", "teacher=nope.pt"], "teacher 'nope.pt' not found"),
    (["benchmark-loss", "pyramid=nope.py"], "pyramid=nope.py has no loadable FGDPyramid"),
    (["benchmark-loss", "relation=attn"], "relation=attn is not one of gcblock, nonlocal"),
    (["data", "coco"], "'coco' is not an argument of data (it takes shapes | deepforest"),
    (["trian"], "did you mean 'train'"),
    (["attention", "model=a.pt"], "attention needs teacher=, source="),
    (["imitation", "model=a.pt", "teacher=b.pt", "data=missing.yaml"], "data 'missing.yaml' not found: pass data="),
    (["gradients", "model=a.pt", "teacher=b.pt", "data=missing.yaml"], "data 'missing.yaml' not found: pass data="),
    (["gradients", "model=a.pt", "teacher=b.pt", "batches=0"], "batches=0 must be > 0"),
]


@pytest.mark.parametrize("args, needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2(capsys, args, needle):
    code, out, err = run_cli_inproc(capsys, *args)
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("yolo-fgd: error:")]
    assert code == 2 and len(lines) == 1 and needle in lines[0], (code, err[-1500:])
    assert "Traceback" not in out + err


def test_a_tv_train_recipe_with_an_unknown_key_is_one_line_before_any_folder(tmp_path, monkeypatch):
    """A user's tv-train recipe is checked as the command line is: a key tv-train does not take (a typo such as
    `epoch:`) was silently dropped and the run trained on the default; now one line, exit 2, the folder as it was."""
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("arch: faster_rcnn\nepoch: 2\nanchors: 16\n")
    monkeypatch.chdir(tmp_path)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    r = subprocess.run([sys.executable, "-m", "yolo_fgd.cli", "tv-train", f"recipe={recipe}", "fgd=False"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    after = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"yolo-fgd: error: unknown tv-train argument(s) ['anchors', 'epoch'] in recipe {recipe}: see "
        "`yolo-fgd tv-train help`"], r.stderr[-1500:]
    assert before == after == ["mine.yaml"], after


def test_interrupt_names_the_runs_real_checkpoint(tmp_path, capsys, monkeypatch):
    last = tmp_path / "runs" / "detect" / "x" / "weights" / "last.pt"
    last.parent.mkdir(parents=True)
    import torch

    torch.save({"epoch": 0, "optimizer": {}}, last)  # an unfinished run's checkpoint, as resume requires

    class Trainer:
        pass

    class Model:  # stands for YOLO(...): Ctrl-C arrives during train(), after the trainer wrote last.pt
        task = "detect"

        def __init__(self, *a):
            self.trainer = Trainer()

        def train(self, **kw):
            self.trainer.last = last
            raise KeyboardInterrupt

    monkeypatch.setattr("ultralytics.YOLO", Model)  # the CLI imports it when the command runs
    code, out, err = run_cli_inproc(capsys, "train", f"model={last}", "resume")
    assert code == 130 and f"resume with: yolo-fgd train resume model={last}" in err, err


def test_edge_runner_errors_are_one_line(tmp_path, data):
    edge = str(ROOT / "yolo_fgd" / "deploy" / "edge.py")
    missing = subprocess.run([sys.executable, edge, str(tmp_path / "none.onnx"), str(tmp_path)],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "not found" in missing.stderr and "Traceback" not in missing.stderr
    import torch

    class Plain(torch.nn.Module):  # an ONNX model that is not a YOLO detector
        def forward(self, x):
            return x.mean((2, 3))

    onnx = tmp_path / "plain.onnx"
    torch.onnx.export(Plain(), (torch.rand(1, 3, 32, 32),), str(onnx), dynamo=False)
    wrong = subprocess.run([sys.executable, edge, str(onnx), str(tmp_path)], capture_output=True, text=True)
    assert wrong.returncode == 2 and "not a YOLO detection model" in wrong.stderr, wrong.stderr[-500:]
    assert re.search(r"edge: error: .*export a detect model", wrong.stderr)


def test_benchmark_loss_measures_another_versions_pyramid(tmp_path):
    from yolo_fgd.core import FGDPyramid
    from yolo_fgd.lab.cost import pyramid_class

    other = tmp_path / "loss.py"
    other.write_text("from yolo_fgd.core.fgd import FGDPyramid as Base\n\n\nclass FGDPyramid(Base):\n    pass\n")
    cls = pyramid_class(str(other))
    assert issubclass(cls, FGDPyramid) and cls is not FGDPyramid and pyramid_class(None) is FGDPyramid


def test_benchmark_loss_reports_path_counts_and_ratio(capfd):
    """The eager definition (compile=False: no minute of compiling here) runs and says so; dispatch counts and the
    ratio to plain MSE come out, without the profiler's native start/stop lines on stderr."""
    from yolo_fgd.lab.cost import benchmark_loss

    import torch

    threads = torch.get_num_threads()
    try:
        res = benchmark_loss(batch=2, imgsz=64, boxes=3, repeat=1, step=False, threads=1, compile=False)
    finally:
        torch.set_num_threads(threads)  # the harness sets the process' threads
    out, err = capfd.readouterr()
    assert res["fgd_path"] == "eager" and "fgd_path" in out and "profiler_st" not in err
    assert res["fgd_aten_ops"] >= res["fgd_compute_ops"] > res["mse_compute_ops"] > 0
    assert res["fgd_over_mse"] > 0 and "fgd_kernels" not in res  # launches are counted on CUDA only
