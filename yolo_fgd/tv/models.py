"""torchvision RetinaNet/FCOS with ResNet FPN backbones (P3-P7, 256 channels), as the paper distils them."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import misc as misc_nn_ops
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from ..errors import FGDError

ARCH_PRESET = {"retinanet": "anchor_based", "fcos": "anchor_free"}  # the paper's preset of each architecture


def build(arch: str, backbone: str, num_classes: int, weights: str | None = None, min_size=(800,), max_size=1333):
    """torchvision RetinaNet/FCOS with a ResNet FPN (P3-P7, 256 ch), random init or a local checkpoint file.

    From scratch the backbone's BatchNorm trains; from a checkpoint it is frozen, as in the paper's setting.
    """
    if arch not in ARCH_PRESET:
        raise FGDError(f"arch '{arch}' is not supported: use retinanet or fcos")
    norm = misc_nn_ops.FrozenBatchNorm2d if weights else nn.BatchNorm2d
    try:
        bb = resnet_fpn_backbone(backbone_name=backbone, weights=None, norm_layer=norm,
                                 trainable_layers=3 if weights else 5, returned_layers=[2, 3, 4],
                                 extra_blocks=LastLevelP6P7(256, 256))
    except KeyError:
        raise FGDError(f"backbone '{backbone}' unknown: use resnet18/34/50/101/152 or resnext101_32x8d") from None
    cls = RetinaNet if arch == "retinanet" else FCOS
    min_size = tuple(min_size) if isinstance(min_size, (list, tuple)) else (int(min_size),)
    model = cls(bb, num_classes=num_classes, min_size=min_size, max_size=int(max_size))
    if weights:
        p = Path(weights)
        if not p.is_file():
            raise FGDError(f"checkpoint '{weights}' not found: pass a local .pth (no downloads at run time)")
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:
            raise FGDError(f"checkpoint '{weights}' could not be loaded ({str(e).splitlines()[0][:120]})") from None
        state = state.get("model", state) if isinstance(state, dict) else state
        missing, unexpected = model.load_state_dict(state, strict=False)
        if len(missing) > len(model.state_dict()) // 2:
            raise FGDError(f"checkpoint '{weights}' does not match {arch}/{backbone} ({len(missing)} missing keys)")
    return model


def inherit(student: nn.Module, teacher: nn.Module) -> list[str]:
    """Inheriting strategy (paper §4.2, †): copy the teacher's FPN and head into the student where shapes match."""
    t = teacher.state_dict()
    copied = []
    with torch.no_grad():
        for k, v in student.state_dict().items():
            if (k.startswith("backbone.fpn.") or k.startswith("head.")) and k in t and t[k].shape == v.shape:
                v.copy_(t[k])
                copied.append(k)
    return copied
