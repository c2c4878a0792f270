"""``yolo-fgd demo`` (``make demo``): embedded data -> teacher (cached) -> student plain and distilled (shipped
preset) -> table -> ONNX export (fp32 + int8) and deployment benchmark of the distilled student."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ultralytics import YOLO
from ultralytics.utils.torch_utils import get_flops

from .. import console
from ..cfg import load_recipe
from ..deploy.benchmark import benchmark
from ..errors import FGDError
from .study import study


def model_size(path) -> tuple[float, float]:
    """(parameters in millions, GFLOPs at 640) of a YOLO checkpoint."""
    model = YOLO(path).model
    return sum(p.numel() for p in model.parameters()) / 1e6, get_flops(model, 640)


def demo(recipe: str = "demo", project: str = "runs", name: str = "demo", lanes: int = 2,
         epochs: int | None = None, teacher_epochs: int | None = None, imgsz: int | None = None,
         export: bool = True) -> str:
    """Run the demo and print/save the comparison table (``<project>/<name>/comparison.{md,csv}``)."""
    rec = load_recipe(recipe)
    if epochs:
        rec["train"]["epochs"] = int(epochs)
    if imgsz:
        rec["train"]["imgsz"] = int(imgsz)
    if teacher_epochs:
        rec["teacher"].setdefault("train", {})["epochs"] = int(teacher_epochs)
    root = Path(project).resolve() / name
    for ds in rec["datasets"]:
        for method in rec["methods"]:
            for seed in rec["seeds"]:
                shutil.rmtree(root / ds / f"{method}-s{seed}", ignore_errors=True)  # students are retrained
    study(rec, project=project, name=name, lanes=lanes)
    failed = [str(p.parent) for p in root.rglob("spec.json") if not (p.parent / "summary.json").is_file()]
    if failed:
        raise FGDError(f"demo run(s) {', '.join(failed)} failed: see train.log in each folder")

    lines = ["| model | mAP50 | mAP50-95 | params (M) | GFLOPs (640) | s/epoch |", "|---|---|---|---|---|---|"]
    csv = ["model,map50,map50_95,params_m,gflops,epoch_s"]
    for ds in rec["datasets"]:
        for method in ["teacher", *rec["methods"]]:
            for seed in rec["seeds"] if method != "teacher" else [0]:
                run = root / ds / (method if method == "teacher" else f"{method}-s{seed}")
                f = run / "summary.json"
                if not f.is_file():
                    continue
                s = json.loads(f.read_text())
                params, flops = model_size(run / "weights" / "best.pt")
                label = f"{method} ({rec['teacher']['model'] if method == 'teacher' else rec['student']})"
                lines.append(f"| {label} | {100 * s['map50']:.1f} | {100 * s['map']:.1f} | {params:.2f} | {flops:.1f} | "
                             f"{s['epoch_s']:.1f} |")
                csv.append(f"{method},{s['map50']:.5f},{s['map']:.5f},{params:.4f},{flops:.2f},{s['epoch_s']:.2f}")
    table = "\n".join(lines) + "\n"
    (root / "comparison.md").write_text(
        f"# yolo-fgd demo\n\nRecipe: {json.dumps(rec)}\n\nmAP: pycocotools COCOeval on the val split.\n\n{table}"
    )
    (root / "comparison.csv").write_text("\n".join(csv) + "\n")
    console.result(f"\nyolo-fgd demo results ({root / 'comparison.md'}):\n\n{table}")
    distilled = [root / ds / f"{m}-s{rec['seeds'][0]}" for ds in rec["datasets"] for m, v in rec["methods"].items()
                if (v or {}).get("distill")]
    if export and distilled and (distilled[0] / "weights" / "best.pt").is_file():
        best = distilled[0] / "weights" / "best.pt"
        data = json.loads((distilled[0] / "spec.json").read_text())["data"]
        benchmark(str(best), data=data, imgsz=rec["train"]["imgsz"], runs=30, project=str(root), name="benchmark")
        print(f"yolo-fgd: distilled student {best}, its ONNX files beside it, benchmark {root / 'benchmark'}")
    print(f"yolo-fgd: demo results saved to {root} (comparison.md, comparison.csv; one folder per run)")
    return table
