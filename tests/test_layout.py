"""The architecture: layered imports checked by import-linter (and shown to fail on a reintroduced cycle or an
upward import), one name per idea with the names of earlier releases accepted with a warning."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

LINT = Path(sys.executable).with_name("lint-imports")


def lint(package_parent: Path):
    """Run the project's import contracts against the ``yolo_fgd`` package found under ``package_parent``."""
    return subprocess.run([str(LINT), "--config", str(ROOT / "pyproject.toml"), "--no-cache"], capture_output=True,
                          text=True, cwd=package_parent, env={"PYTHONPATH": str(package_parent), "PATH": ""},
                          timeout=300)


def test_contracts_kept():
    out = lint(ROOT)
    assert out.returncode == 0, out.stdout[-3000:]
    assert "5 kept, 0 broken" in out.stdout


@pytest.mark.parametrize("module, line, broken", [
    ("core/masks.py", "from .fgd import FGDLoss  # a cycle: fgd imports masks", "No import cycles"),
    ("core/fgd.py", "from ..yolo import model  # upward, and Ultralytics in the core", "Layers"),
    ("lab/study.py", "from .. import cli  # the CLI imported from below", "The CLI is imported by nothing"),
    ("deploy/edge.py", "import torch  # the edge runner must stay torch-free", "The edge runner"),
])
def test_contracts_fail_on_a_reintroduced_violation(tmp_path, module, line, broken):
    shutil.copytree(ROOT / "yolo_fgd", tmp_path / "yolo_fgd", ignore=shutil.ignore_patterns("__pycache__"))
    f = tmp_path / "yolo_fgd" / module
    f.write_text(f.read_text() + f"\n{line}\n")
    out = lint(tmp_path)
    assert out.returncode != 0, out.stdout[-2000:]
    assert f"{broken}" in out.stdout and "BROKEN" in out.stdout, out.stdout[-2000:]


def test_renamed_arguments_still_work_with_a_warning():
    from yolo_fgd.core.presets import resolve

    with pytest.warns(FutureWarning, match="'fgd_alpha' is deprecated, use 'fgd_fg'"):
        cfg = resolve({"fgd_alpha": 0.5, "fgd_kd_cls": 0.0, "fgd_lambda": 2.0})
    assert cfg["fg"] == 0.5 and cfg["kd_cls"] == 0.0 and cfg["gl"] == 2.0


def test_one_name_per_idea_from_preset_to_argument_to_loss():
    from yolo_fgd.core import TERMS, FGDLoss
    from yolo_fgd.core.presets import ARGS, KEYS, arg_name, presets

    assert TERMS == ("fg", "bg", "at", "gl")
    for name, preset in presets().items():
        assert set(preset) <= set(KEYS), (name, set(preset) - set(KEYS))
    assert set(ARGS) == {"teacher", "distill_preset", *(arg_name(k) for k in KEYS)}
    assert arg_name("fg") == "fgd_fg" and arg_name("kd_cls") == "kd_cls"
    loss = FGDLoss(4, 4, **{k: 1.0 for k in TERMS})
    import torch

    out = loss(torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4), torch.tensor([[0.1, 0.1, 0.6, 0.6]]),
               torch.tensor([0]))
    assert set(out) == {*TERMS, "total"}


def test_edge_runner_in_the_package_is_the_one_users_copy():
    assert (ROOT / "export" / "edge.py").resolve() == (ROOT / "yolo_fgd" / "deploy" / "edge.py").resolve()
    assert not any(p.is_symlink() for p in (ROOT / "yolo_fgd").rglob("*"))


def test_names_of_earlier_releases_still_import_and_run():
    """FGDTrainer (and its task siblings) are DistillTrainer's earlier names; fgd_preset, fgd_warmup and fgd_decay
    are distill_preset, distill_warmup and distill_decay's, read with a warning."""
    from yolo_fgd import DistillTrainer, FGDTrainer
    from yolo_fgd.cfg.distill import resolve
    from yolo_fgd.yolo import OBBDistillTrainer, OBBFGDTrainer

    assert FGDTrainer is DistillTrainer and OBBFGDTrainer is OBBDistillTrainer
    with pytest.warns(FutureWarning, match="'fgd_warmup' is deprecated, use 'distill_warmup'"):
        cfg = resolve({"fgd_preset": "mse", "fgd_warmup": 1.5, "fgd_decay": 2})
    assert cfg["mse"] and cfg["warmup"] == 1.5 and cfg["decay"] == 2


def test_top_level_cfg_holds_the_shipped_recipes_and_presets_once(tmp_path):
    """cfg/ at the top of the checkout has every recipe and the presets the package ships, each a link to the one
    copy (no second file to drift), and a recipe passed from it (recipe=cfg/NAME.yaml) is read by the study."""
    from yolo_fgd.cfg import RECIPES, load_recipe

    top = ROOT / "cfg"
    shipped = {p.name for p in RECIPES.glob("*.yaml")} | {"presets.yaml"}
    assert {p.name for p in top.iterdir()} == shipped
    for p in top.iterdir():
        assert p.is_symlink() and p.resolve().parent in {RECIPES, RECIPES.parent}, p
    assert load_recipe(str(top / "converged.yaml")) == load_recipe("converged")
    r = subprocess.run([str(Path(sys.executable).with_name("yolo-fgd")), "study", "recipe=cfg/nope.yaml"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "recipe 'cfg/nope.yaml' not found" in r.stderr
