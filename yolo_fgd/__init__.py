"""yolo-fgd: Focal and Global Knowledge Distillation (FGD, CVPR 2022) for Ultralytics YOLO and torchvision.

``FGDLoss`` is the framework-free loss core; ``FGDTrainer`` (imported lazily, it needs Ultralytics)
is the YOLO adapter.
"""

from .loss import FGDLoss, GcBlock, fgd_masks

__version__ = "0.1.0"
__all__ = ["FGDLoss", "GcBlock", "fgd_masks", "FGDTrainer", "__version__"]


def __getattr__(name):
    if name == "FGDTrainer":
        from .trainer import FGDTrainer

        return FGDTrainer
    raise AttributeError(f"module 'yolo_fgd' has no attribute {name!r}")
