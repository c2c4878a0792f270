"""The loss core: pure PyTorch (no Ultralytics, torchvision or ONNX import).

``masks`` (Eq. 2-4), ``reference`` (Eq. 5-13 of one level, the one definition), ``compiled`` (it through
``torch.compile``), ``fgd`` (:class:`FGDLoss` per level, :class:`FGDPyramid`), ``response`` (the YOLO adapter's
head-response term), ``imitation`` (CWD, PKD, BCKD: the terms of the anchors FGD is compared with), ``presets``
(named weights and the train arguments that override them).
"""

from .fgd import TERMS, FGDLoss, FGDPyramid, GcBlock, NonLocal, attention, feature_mse, standardise
from .masks import fgd_masks, fgd_masks_loop
from .mgd import MGDLoss
from .imitation import bckd_cls, cwd_loss, linear_map, ltrb_giou_kd, moments, pkd_loss
from .response import angle_kd, box_kd, focal_weights, keypoint_kd, mask_kd, response_kd, side_distances

__all__ = ["TERMS", "FGDLoss", "FGDPyramid", "GcBlock", "NonLocal", "attention", "feature_mse", "standardise", "fgd_masks",
           "fgd_masks_loop", "MGDLoss", "angle_kd", "bckd_cls", "box_kd", "cwd_loss", "focal_weights", "ltrb_giou_kd",
           "pkd_loss", "linear_map", "moments", "keypoint_kd", "mask_kd", "response_kd", "side_distances"]
