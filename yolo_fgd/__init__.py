"""yolo-fgd: Focal and Global Knowledge Distillation (FGD, CVPR 2022) for Ultralytics YOLO and torchvision.

Layers, top to bottom (imports point down only; ``make test`` checks it): ``cli`` -> ``lab`` (study, demo, probes,
cost benchmarks) -> ``deploy`` (export, parity, evaluation, benchmark, the torch-free edge runner) -> ``yolo`` and
``tv`` (adapters) -> ``core`` (losses, masks, presets) and ``data`` -> ``cfg``, ``errors``, ``timing``.

``FGDLoss`` and friends come from the core; ``DistillTrainer`` (it needs Ultralytics) from the YOLO adapter; both are
imported on first use.
"""

__version__ = "0.3.0"
_LAZY = {"FGDLoss": "core", "FGDPyramid": "core", "GcBlock": "core", "fgd_masks": "core", "response_kd": "core",
         "DistillTrainer": "yolo", "FGDTrainer": "yolo"}  # FGDTrainer: DistillTrainer's name in earlier releases
__all__ = [*_LAZY, "__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'yolo_fgd' has no attribute {name!r}")
