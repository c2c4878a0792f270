"""The Ultralytics YOLO adapter: model taps (``model``), the model-side ``Distiller`` and its criterion
(``distiller``), and the trainers that call them from named hooks (``trainer``)."""

from .distiller import DistillCriterion, Distiller
from .trainer import (
    TRAINERS,
    DistillMixin,
    DistillTrainer,
    FGDTrainer,
    OBBDistillTrainer,
    OBBFGDTrainer,
    PoseDistillTrainer,
    PoseFGDTrainer,
    SegmentDistillTrainer,
    SegmentFGDTrainer,
    trainer_for,
)

__all__ = ["DistillCriterion", "Distiller", "DistillMixin", "DistillTrainer", "SegmentDistillTrainer",
           "PoseDistillTrainer", "OBBDistillTrainer", "TRAINERS", "trainer_for",
           "FGDTrainer", "SegmentFGDTrainer", "PoseFGDTrainer", "OBBFGDTrainer"]  # the last four: earlier names
