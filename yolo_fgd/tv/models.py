"""torchvision RetinaNet/FCOS (ResNet FPN P3-P7), Faster R-CNN and Mask R-CNN (ResNet FPN P2-P6), as the paper
distils them.

A checkpoint this path saves is ``{"model": state_dict, "build": {arch, backbone, norm, width, anchor}}``, so a teacher is
rebuilt as it was trained; a bare state dict (a converted or downloaded model) is read with the arguments given.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import misc as misc_nn_ops
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from ..errors import FGDError, first_line

# the paper's preset of each architecture (two_stage: the official faster_rcnn / mask_rcnn configs' weights)
ARCH_PRESET = {"retinanet": "anchor_based", "fcos": "anchor_free", "faster_rcnn": "two_stage", "mask_rcnn": "two_stage"}
TWO_STAGE = ("faster_rcnn", "mask_rcnn")
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d")
GROUPS = 32  # GroupNorm groups (Wu & He, 2018); at least two channels per group where a layer has fewer than 64


def gn_groups(channels: int) -> int:
    """GroupNorm's groups for a layer of ``channels``: :data:`GROUPS`, fewer below 64 channels."""
    return min(GROUPS, channels // 2)


NORMS = {
    "frozen_bn": misc_nn_ops.FrozenBatchNorm2d,  # the paper's fine-tuning of an ImageNet backbone
    "bn": nn.BatchNorm2d,
    "gn": lambda c: nn.GroupNorm(gn_groups(c), c),  # training from scratch (He et al., 2019)
}


def norm_for(weights, norm: str | None) -> str:
    """The backbone's normalisation: ``norm`` if given, else frozen BN with a checkpoint (the paper's setting) and
    GroupNorm from scratch."""
    if norm is None:
        return "frozen_bn" if weights else "gn"
    if norm not in NORMS:
        raise FGDError(f"norm={norm} is not supported: use gn (from scratch), bn, or frozen_bn (a pretrained backbone)")
    return norm


def read_checkpoint(weights) -> tuple[dict, dict]:
    """(state dict, build arguments saved with it, or {}) of a local checkpoint; one-line errors otherwise."""
    p = Path(weights)
    if not p.is_file():
        raise FGDError(f"checkpoint '{weights}' not found: pass a local .pth (no downloads at run time)")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FGDError(f"checkpoint '{weights}' could not be loaded ({first_line(e, 120)})") from None
    if isinstance(state, dict) and "model" in state:
        return state["model"], dict(state.get("build") or {})
    return state, {}


def backbone_fpn(name: str, norm: str, width: int, trainable: int, two_stage: bool = False) -> BackboneWithFPN:
    """ResNet C3-C5 -> FPN P3-P5 + P6/P7 from P5 (RetinaNet's and FCOS'), or with ``two_stage`` C2-C5 -> P2-P5 + P6
    by max-pooling P5 (Faster R-CNN's); ``width`` channels on every level. Five levels either way."""
    if name not in BACKBONES:
        raise FGDError(f"backbone '{name}' unknown: use {', '.join(BACKBONES)}")
    body = getattr(resnet, name)(weights=None, norm_layer=NORMS[norm])
    train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable] + (["bn1"] if trainable == 5 else [])
    for k, p in body.named_parameters():
        if not any(k.startswith(layer) for layer in train):
            p.requires_grad_(False)
    c3 = body.inplanes // 4  # C3's channels: 128 (basic blocks) or 512 (bottlenecks)
    if two_stage:  # extra_blocks default: P6 = max-pool of P5
        return BackboneWithFPN(body, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
                               [c3 // 2, c3, 2 * c3, 4 * c3], width)
    return BackboneWithFPN(body, {"layer2": "0", "layer3": "1", "layer4": "2"}, [c3, 2 * c3, 4 * c3], width,
                           extra_blocks=LastLevelP6P7(width, width))


class ZeroBased:
    """A torchvision two-stage detector with this path's 0-based class ids: class k is its label k + 1 (0 is its
    background), shifted on the way in (targets) and out (detections)."""

    def forward(self, images, targets=None):
        if targets is not None:
            targets = [{**t, "labels": t["labels"] + 1} for t in targets]
        out = super().forward(images, targets)
        if self.training:
            return out
        # in the one-stage detectors' order (boxes, scores, labels[, masks]): what the ONNX export names its outputs
        return [{"boxes": d["boxes"], "scores": d["scores"], "labels": d["labels"] - 1,
                 **({"masks": d["masks"]} if "masks" in d else {})} for d in out]


class FasterRCNNZeroBased(ZeroBased, FasterRCNN):
    """torchvision's Faster R-CNN, 0-based class ids (:class:`ZeroBased`)."""


class MaskRCNNZeroBased(ZeroBased, MaskRCNN):
    """torchvision's Mask R-CNN, 0-based class ids (:class:`ZeroBased`); its targets carry 'masks' (N,H,W)."""


def anchors(size: int) -> AnchorGenerator:
    """RetinaNet's anchors with ``size`` on P3 (torchvision's and the paper's: 32), doubling per level to P7; three
    scales 2^(0, 1/3, 2/3) and three aspect ratios per position. For objects of 8-60 px at 192 px, a P3 anchor of 16
    gives 69 % of them an anchor at IoU >= 0.5, 32 gives 41 % (the rest learn from their single best match), 8 gives
    53 % (the stride-8 grid is too coarse for anchors that small)."""
    sizes = tuple((s, round(s * 2 ** (1 / 3)), round(s * 2 ** (2 / 3))) for s in (size * 2 ** i for i in range(5)))
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)


def rpn_anchors(size: int) -> AnchorGenerator:
    """Faster R-CNN's anchors with ``size`` on P2 (torchvision's: 32), doubling per level to P6; one scale and three
    aspect ratios per position."""
    return AnchorGenerator(tuple((size * 2 ** i,) for i in range(5)), ((0.5, 1.0, 2.0),) * 5)


def build(arch: str, backbone: str, num_classes: int, weights: str | None = None, min_size=(800,), max_size=1333,
          norm: str | None = None, width: int = 256, anchor: int = 32, rois: int = 512) -> nn.Module:
    """torchvision RetinaNet/FCOS with a ResNet FPN (P3-P7, ``width`` channels; the paper's 256) or Faster R-CNN
    (P2-P6), random init or a local checkpoint. A checkpoint saved by this path brings its own arch/backbone/norm/width/anchor.

    ``anchor``: the anchor size on the first level, RetinaNet's P3 (:func:`anchors`) or the two-stage RPN's P2
    (:func:`rpn_anchors`); FCOS's anchors are its strides.

    ``width`` is also the heads' width: RetinaNet's and FCOS's towers and Mask R-CNN's mask head (four 3x3 convs
    and the 2x up-sampling, torchvision's 256 at the paper's width, which keeps its checkpoints' shapes); at 128 the
    mask head costs a quarter of the FLOPs (torchvision's ran 4 convs of 256 channels on every positive RoI's 14x14
    features: about half of a step on this CPU).

    ``rois``: the two-stage box head's RoIs sampled per training image (torchvision's 512, a quarter of them
    positive at most); training only, so not saved with the weights.

    ``norm``: the backbone's normalisation (:func:`norm_for`); with ``gn`` RetinaNet's head has GroupNorm too, as
    torchvision's ``retinanet_resnet50_fpn_v2`` (FCOS's head always has it). A frozen-BN backbone trains its top
    three stages, as in the paper; any other trains all of them.
    """
    state, saved = read_checkpoint(weights) if weights else (None, {})
    arch, backbone = saved.get("arch", arch), saved.get("backbone", backbone)
    norm, width = norm_for(weights, saved.get("norm", norm)), int(saved.get("width", width))
    anchor = int(saved.get("anchor", anchor))
    if arch not in ARCH_PRESET:
        raise FGDError(f"arch '{arch}' is not supported: use {', '.join(ARCH_PRESET)}")
    if width < 2 or width % 2 or (norm == "gn" and width % gn_groups(width)):
        raise FGDError(f"width={width}: pass an even number of FPN channels (a multiple of {GROUPS} from 64 on with "
                       "norm=gn), e.g. 128 or the paper's 256")
    if anchor < 1:
        raise FGDError(f"anchor={anchor}: pass the anchor size on the first level in pixels, e.g. 16 or 32")
    if rois < 1:
        raise FGDError(f"rois={rois}: pass the RoIs sampled per training image, e.g. torchvision's 512 or 128")
    bb = backbone_fpn(backbone, norm, width, trainable=3 if norm == "frozen_bn" else 5, two_stage=arch in TWO_STAGE)
    min_size = tuple(min_size) if isinstance(min_size, (list, tuple)) else (int(min_size),)
    if arch in TWO_STAGE:  # torchvision's defaults otherwise (RoIAlign 7x7, 14x14 for masks)
        cls = FasterRCNNZeroBased if arch == "faster_rcnn" else MaskRCNNZeroBased
        model = cls(bb, num_classes=num_classes + 1, min_size=min_size, max_size=int(max_size),
                    rpn_anchor_generator=rpn_anchors(anchor), box_batch_size_per_image=int(rois))
        if arch == "mask_rcnn":
            model.roi_heads.mask_head = MaskRCNNHeads(width, (width,) * 4, 1)
            model.roi_heads.mask_predictor = MaskRCNNPredictor(width, width, num_classes + 1)
    elif arch == "retinanet":
        head_norm = partial(nn.GroupNorm, gn_groups(width)) if norm == "gn" else None
        head = RetinaNetHead(width, 9, num_classes, norm_layer=head_norm)
        model = RetinaNet(bb, num_classes=num_classes, head=head, anchor_generator=anchors(anchor), min_size=min_size,
                          max_size=int(max_size))
    else:
        model = FCOS(bb, num_classes=num_classes, min_size=min_size, max_size=int(max_size))
    model.build_args = {"arch": arch, "backbone": backbone, "norm": norm, "width": width,
                        **({"anchor": anchor} if arch != "fcos" else {})}
    if state is not None:
        try:
            missing, _ = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shapes differ: another number of classes, width or backbone
            first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
            raise FGDError(f"checkpoint '{weights}' does not fit {arch}/{backbone} with {num_classes} classes "
                           f"({first[:160]}): pass the data it was trained on, or its own arch/backbone") from None
        if len(missing) > len(model.state_dict()) // 2:
            raise FGDError(f"checkpoint '{weights}' does not match {arch}/{backbone} norm={norm} width={width} "
                           f"({len(missing)} missing keys)")
    return model


def save(model: nn.Module, path: Path) -> None:
    """A model's weights with the arguments that rebuild it (:func:`build` reads them back)."""
    torch.save({"model": model.state_dict(), "build": getattr(model, "build_args", {})}, path)


def inherit(student: nn.Module, teacher: nn.Module) -> list[str]:
    """Inheriting strategy (paper §4.2, †): copy the teacher's FPN and heads (a one-stage head; a two-stage RPN and
    RoI heads) into the student where shapes match."""
    t = teacher.state_dict()
    copied = []
    with torch.no_grad():
        for k, v in student.state_dict().items():
            if k.startswith(("backbone.fpn.", "head.", "rpn.", "roi_heads.")) and k in t and t[k].shape == v.shape:
                v.copy_(t[k])
                copied.append(k)
    return copied
