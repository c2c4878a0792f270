"""Shared fixtures: offline Ultralytics settings, a tiny embedded data set and small teacher checkpoints."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")
os.environ.setdefault("YOLO_CONFIG_DIR", str(ROOT / ".yolo_config"))
os.environ.setdefault("YOLO_VERBOSE", "False")
# the eager definition of the FGD loss (compiling it takes a minute here); tests/test_compile.py tests the compiler
os.environ.setdefault("YOLO_FGD_KERNEL", "eager")

TINY = dict(imgsz=64, batch=4, workers=0, plots=False, exist_ok=True, amp=False, device="cpu", seed=0)


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    from yolo_fgd.data import shapes

    return str(shapes(tmp_path_factory.mktemp("data"), n_train=8, n_val=4, size=96))


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


def train_teacher(cfg, data, runs, name):
    from ultralytics import YOLO

    YOLO(cfg).train(data=data, epochs=1, project=str(runs), name=name, **TINY)
    return str(Path(runs) / name / "weights" / "best.pt")


@pytest.fixture(scope="session")
def teacher(data, runs):
    """A YOLO11s teacher trained one tiny epoch on the tiny data (channels 128/256/512 vs the student's 64/128/256)."""
    return train_teacher("yolo11s.yaml", data, runs, "teacher11s")


def save_untrained(cfg, names, path):
    """An untrained Ultralytics checkpoint with the given class names (for error-path tests)."""
    import torch
    from ultralytics import YOLO

    model = YOLO(cfg).model
    model.names = dict(enumerate(names)) if isinstance(names, (list, tuple)) else names
    model.args = {}
    torch.save({"model": model.half(), "train_args": {}, "epoch": -1}, path)
    return str(path)


def run_cli(*args, timeout=600, env=None, cwd=None):
    """Run the installed ``yolo-fgd`` console script (in ``cwd``); returns CompletedProcess."""
    import subprocess

    exe = Path(sys.executable).with_name("yolo-fgd")
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=cwd)


# Tests that train or export a model (they take these fixtures, or are marked): `make test-quick` leaves them out
SLOW_FIXTURES = {"teacher", "student", "exported", "installed", "fgd_run", "task_run", "tv_teacher"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
