"""Configuration files shipped with the package and the ``key=value`` syntax of the command line.

``presets.yaml`` holds the loss presets (read by :mod:`yolo_fgd.core.presets`); ``recipes/`` holds the experiment
and torchvision recipes (``yolo-fgd study recipe=study``, ``yolo-fgd tv-train recipe=tv_retinanet_r101_r50``);
``models/`` model YAMLs that recipes name beside Ultralytics' own (``yolo11-ta.yaml``, a teacher assistant).
"""

from __future__ import annotations

import ast
import importlib.util
from functools import lru_cache
from pathlib import Path

import yaml

from ..errors import FGDError

ROOT = Path(__file__).resolve().parent
PRESETS = ROOT / "presets.yaml"
RECIPES = ROOT / "recipes"
MODELS = ROOT / "models"


def model_path(name):
    """A model a recipe names: a model YAML shipped in ``models/`` by its file name (as a path), else ``name`` as it
    is (an Ultralytics model name, a path, a checkpoint)."""
    shipped = MODELS / str(name)
    return str(shipped) if str(name).endswith((".yaml", ".yml")) and shipped.is_file() else name


def recipe_path(name) -> Path:
    """A recipe file: an existing path, else a shipped recipe by its name (``study``, ``cfg/study.yaml`` and
    ``study.yaml`` all find ``recipes/study.yaml``)."""
    p = Path(str(name))
    if p.is_file():
        return p
    shipped = RECIPES / (p.stem + ".yaml")
    if shipped.is_file():
        return shipped
    known = ", ".join(sorted(f.stem for f in RECIPES.glob("*.yaml")))
    raise FGDError(f"recipe '{name}' not found: pass a path to a recipe YAML or a shipped one ({known})")


def load_recipe(name) -> dict:
    """A recipe as a dict (a dict is returned as it is)."""
    if isinstance(name, dict):
        return name
    return yaml.safe_load(recipe_path(name).read_text())


def smart_value(text: str):
    """A command-line value as Python: None/True/False (any case), numbers, lists, else the string."""
    low = text.lower()
    if low in {"none", "null"}:
        return None
    if low in {"true", "false"}:
        return low == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def parse_kv(argv: list[str]) -> tuple[list[str], dict]:
    """Split ``argv`` into positional words and a ``key=value`` dict (values through :func:`smart_value`)."""
    words, kv = [], {}
    for a in argv:
        if "=" in a:
            k, v = a.split("=", 1)
            if not k.strip() or v.strip() == "":
                raise FGDError(f"'{a}' is not key=value: write arguments as key=value, e.g. epochs=10")
            kv[k.strip()] = smart_value(v.strip())
        else:
            words.append(a)
    return words, kv


@lru_cache
def ultralytics_defaults() -> dict:
    """Ultralytics' train/val/predict/export arguments and their defaults, read from its ``cfg/default.yaml``
    without importing it (importing Ultralytics imports torch: seconds)."""
    spec = importlib.util.find_spec("ultralytics")
    if spec is None or not spec.origin:
        raise FGDError("Ultralytics is not installed: pip install 'ultralytics>=8.4.190,<8.5'")
    return yaml.safe_load((Path(spec.origin).parent / "cfg" / "default.yaml").read_text())


@lru_cache(maxsize=1)
def ultralytics_deprecated() -> frozenset:
    """The deprecated or removed keys Ultralytics still takes and maps itself (``half``, ``hide_labels``, ...), read
    from its ``_handle_deprecation`` source without importing it: the keys of its mapping, its set of removed keys,
    the keys it pops or tests for."""
    import ast

    spec = importlib.util.find_spec("ultralytics")
    tree = ast.parse((Path(spec.origin).parent / "cfg" / "__init__.py").read_text())
    fn = next((n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "_handle_deprecation"), None)
    keys = set()
    for node in ast.walk(fn) if fn else ():
        found = []
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):  # old key -> (new key, transform)
            found = node.value.keys
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Set):  # removed keys
            found = node.value.elts
        elif isinstance(node, ast.Compare) and isinstance(node.ops[0], ast.In) and \
                isinstance(node.comparators[0], ast.Name):  # "end2end" in custom
            found = [node.left]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "pop":
            found = node.args[:1]
        keys.update(k.value for k in found if isinstance(k, ast.Constant) and isinstance(k.value, str))
    return frozenset(k for k in keys if k.isidentifier())


def checkpoint(path, which: str = "best") -> str:
    """A checkpoint path from what a user passes: a ``.pt`` as is, or a run folder (``runs/detect/NAME``) -> its
    ``weights/{which}.pt``; a run folder without it is a one-line error."""
    p = Path(str(path))
    if p.is_dir():
        ckpt = p / "weights" / f"{which}.pt"
        if not ckpt.is_file():
            raise FGDError(f"run folder '{path}' has no weights/{which}.pt: pass a finished run (its training may have "
                           f"failed or still be running) or a .pt file")
        return str(ckpt)
    return str(path)
