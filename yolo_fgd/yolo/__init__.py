"""The Ultralytics YOLO adapter: model taps (``model``), the model-side ``Distiller`` and its criterion
(``distiller``), and the trainers that call them from named hooks (``trainer``)."""

from .distiller import DistillCriterion, Distiller
from .trainer import TRAINERS, DistillMixin, FGDTrainer, OBBFGDTrainer, PoseFGDTrainer, SegmentFGDTrainer, trainer_for

__all__ = ["DistillCriterion", "Distiller", "DistillMixin", "FGDTrainer", "SegmentFGDTrainer", "PoseFGDTrainer",
           "OBBFGDTrainer", "TRAINERS", "trainer_for"]
