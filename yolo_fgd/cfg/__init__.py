"""Configuration files shipped with the package and the ``key=value`` syntax of the command line.

``presets.yaml`` holds the loss presets (read by :mod:`yolo_fgd.core.presets`); ``recipes/`` holds the experiment
and torchvision recipes (``yolo-fgd study recipe=study``, ``yolo-fgd tv-train recipe=tv_retinanet_r101_r50``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from ..errors import FGDError

ROOT = Path(__file__).resolve().parent
PRESETS = ROOT / "presets.yaml"
RECIPES = ROOT / "recipes"


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
