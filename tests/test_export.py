"""ONNX export, parity, INT8, the torch-free edge runner and the deployment benchmark, on a tiny trained student."""

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import ROOT, run_cli, train_teacher


@pytest.fixture(scope="module")
def student(data, runs):
    return train_teacher("yolo11n.yaml", data, runs, "export_student")


@pytest.fixture(scope="module")
def exported(student, data):
    from yolo_fgd.deploy.export import export

    return export(student, imgsz=64, data=data, int8=True)


def test_export_parity_and_int8(exported):
    assert Path(exported["onnx"]).is_file() and exported["parity"] is not None and exported["parity"] < 1e-3
    assert Path(exported["int8"]).is_file()
    assert Path(exported["int8"]).stat().st_size < 0.5 * Path(exported["onnx"]).stat().st_size


def test_edge_runner_matches_ultralytics_predictor(exported, data):
    from ultralytics import YOLO

    from yolo_fgd.data.coco import split_images
    from yolo_fgd.deploy.edge import EdgeModel

    files, _ = split_images(data, "val")
    edge = EdgeModel(exported["onnx"], conf=0.001, iou=0.7)
    ref = YOLO(exported["onnx"], task="detect")
    compared = 0
    for f in files:
        img = cv2.imread(str(f))
        det = edge(img)
        r = ref.predict(img, imgsz=64, conf=0.001, iou=0.7, verbose=False)[0].boxes
        want = np.concatenate([r.xyxy.numpy(), r.conf.numpy()[:, None], r.cls.numpy()[:, None]], 1)
        assert len(det) == len(want), (len(det), len(want))
        for row in want:  # every detection down to conf 0.001 (a 1-epoch model scores low)
            same = det[(det[:, 5] == row[5]) & (np.abs(det[:, 4] - row[4]) < 1e-3)]
            assert len(same) and np.abs(same[:, :4] - row[:4]).max(1).min() <= 1.0, row
            compared += 1
    assert compared > 0


def test_int8_model_runs_and_map_is_computed(exported, data):
    from yolo_fgd.deploy.evaluate import edge_ap

    stats = edge_ap(exported["int8"], data, threads=1)
    assert 0.0 <= stats["map"] <= 1.0


def test_edge_runner_is_torch_free(exported, tmp_path):
    img = tmp_path / "x.jpg"
    cv2.imwrite(str(img), np.full((80, 100, 3), 127, np.uint8))
    code = (
        "import runpy, sys; sys.argv = ['edge.py', sys.argv[1], sys.argv[2], '--out', sys.argv[3]]\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'torch', 'ultralytics', 'torchvision', 'yolo_fgd'}:\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "try:\n"
        "    runpy.run_path(str(__import__('pathlib').Path(sys.argv[0]).parent / 'edge.py'), run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "assert not any(m.split('.')[0] in {'torch', 'ultralytics'} for m in sys.modules)\n"
        "print('TORCH-FREE')\n"
    )
    script = tmp_path / "check.py"
    script.write_text(code)
    edge_dir = ROOT / "export"
    out = subprocess.run([sys.executable, "-c", code.replace("__import__('pathlib').Path(sys.argv[0]).parent",
                                                             f"__import__('pathlib').Path({str(edge_dir)!r})"),
                          exported["onnx"], str(img), str(tmp_path / "out")], capture_output=True, text=True)
    assert out.returncode == 0 and "TORCH-FREE" in out.stdout, out.stderr[-2000:]
    assert (tmp_path / "out" / "x.jpg").is_file()


def test_benchmark_writes_report(student, data, tmp_path, capsys):
    """Both runtimes, every precision stated (from the runtime, not the file name), model-only and end-to-end
    latency, one evaluation for all, the CPU's instruction sets and a recommendation; the table alone on stdout."""
    from yolo_fgd import console
    from yolo_fgd.deploy.benchmark import benchmark

    with console.results_only():
        rows = benchmark(student, data=data, imgsz=64, runs=3, threads=1, project=str(tmp_path), name="b")
    out = capsys.readouterr().out
    fmts = [r["format"] for r in rows]
    assert fmts[:3] == ["pytorch-fp32", "onnxruntime-fp32", "onnxruntime-int8"] and "openvino-f32" in fmts
    assert "openvino-int8" in fmts
    precision = {r["format"]: r["precision"] for r in rows}
    assert precision["onnxruntime-int8"] == "int8" and precision["openvino-f32"] == "fp32"
    assert precision["openvino-int8"].startswith("int8")
    for f in ("benchmark.csv", "benchmark.md", "benchmark.png"):
        assert (tmp_path / "b" / f).is_file()
    assert all(r["p50_ms"] > 0 and r["e2e_p50_ms"] > 0 and r["pre_post_ms"] > 0 for r in rows)  # (no timing race)
    assert all(r["size_mb"] > 0 and 0 <= r["map50_95"] <= 1 for r in rows) and rows[0]["d_map50_95"] == 0
    md = (tmp_path / "b" / "benchmark.md").read_text()
    assert "Recommended on this machine" in md and "CPU (" in md
    assert out.startswith("Batch 1, 64 px") and "{" not in out  # the table, no export JSON, on stdout


def test_openvino_export_parity_int8_and_the_edge_runner(student, data, tmp_path):
    """format=openvino through Ultralytics' exporter: the f32 IR checked against PyTorch, an NNCF INT8 IR, both
    beside the checkpoint; the edge runner runs them with --backend openvino and reports its stages in --json."""
    import json
    import shutil

    from yolo_fgd.deploy.edge import EdgeModel
    from yolo_fgd.deploy.export import export

    pytest.importorskip("openvino")
    run = tmp_path / "r" / "weights"
    run.mkdir(parents=True)
    shutil.copy(student, run / "best.pt")
    res = export(str(run / "best.pt"), format="openvino", imgsz=64, data=data, int8=True, calib=8)
    assert res["parity"] is not None and res["parity"] < 1e-3
    assert Path(res["openvino"]) == run / "best_openvino_model" and Path(res["int8"]).is_dir()
    assert not list(run.glob(".export-*"))  # the stage is gone
    f32 = EdgeModel(res["openvino"], precision="f32")
    assert f32.backend == "openvino" and f32.precision == "fp32" and f32.imgsz == (64, 64) and f32.names
    img = next((Path(data).parent / "images" / "val").glob("*.jpg"))
    r = subprocess.run([sys.executable, str(ROOT / "export" / "edge.py"), res["int8"], str(img), "--json",
                        str(tmp_path / "d.jsonl"), "--save-dir", str(tmp_path / "o")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads((tmp_path / "d.jsonl").read_text().splitlines()[0])
    assert {"pre_ms", "infer_ms", "post_ms"} <= set(rec) and rec["infer_ms"] > 0


def test_edge_runner_imports_openvino_only_when_asked(exported):
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import edge; m = edge.EdgeModel(sys.argv[2]); "
            "print('openvino' in sys.modules, m.backend, m.precision)")
    r = subprocess.run([sys.executable, "-c", code, str(ROOT / "export"), exported["onnx"]], capture_output=True,
                       text=True, timeout=120)
    assert r.stdout.split() == ["False", "onnxruntime", "fp32"], r.stderr[-1000:]


def test_benchmark_scores_pytorch_like_the_edge_runner(student, exported, data):
    """The benchmark's PyTorch row and its ONNX rows must see the same detections (one label per box, as deployed)."""
    import cv2
    import numpy as np

    from yolo_fgd.data.coco import split_images
    from yolo_fgd.deploy.edge import EdgeModel
    from yolo_fgd.deploy.evaluate import detect

    files, _ = split_images(data, "val")
    edge = EdgeModel(exported["onnx"], conf=0.001, iou=0.7)
    for pt, f in zip(detect(student, files, 64, multi_label=False), files):
        onnx = edge(cv2.imread(str(f)))
        assert len(pt) == len(onnx) > 0
        pt = np.array(sorted(pt, key=lambda d: -d[4]))
        onnx = onnx[np.argsort(-onnx[:, 4])]
        assert np.abs(pt[:, 4] - onnx[:, 4]).max() < 1e-3 and (pt[:, 5] == onnx[:, 5]).mean() > 0.95


def test_export_errors_are_one_line(tmp_path):
    missing = run_cli("export", f"model={tmp_path / 'none.pt'}")
    assert missing.returncode == 2 and "not found" in missing.stderr and "Traceback" not in missing.stderr
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage" * 100)
    corrupt = run_cli("export", f"model={bad}")
    assert corrupt.returncode == 2 and "could not be loaded" in corrupt.stderr and "Traceback" not in corrupt.stderr
    bad_onnx = tmp_path / "bad.onnx"
    bad_onnx.write_bytes(b"garbage")
    edge = subprocess.run([sys.executable, str(ROOT / "export" / "edge.py"), str(bad_onnx), str(tmp_path)],
                          capture_output=True, text=True)
    assert edge.returncode == 2 and "could not be loaded" in edge.stderr


def test_int8_keeps_the_head_decode_in_float(exported):
    import onnx

    from yolo_fgd.deploy.export import head_tail

    tail = head_tail(exported["onnx"])
    assert tail and any("dfl" in n for n in tail) and not any("cv2" in n or "cv3" in n for n in tail)
    q = onnx.load(exported["int8"])
    quantized_inputs = {i for n in q.graph.node if n.op_type == "DequantizeLinear" for i in n.output}
    decode = [n for n in q.graph.node if n.name in tail and n.op_type in ("Concat", "Softmax")]
    assert decode and not any(set(n.input) & quantized_inputs for n in decode if n.name.endswith("Concat_3"))
