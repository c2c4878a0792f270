"""The YOLO distiller: owns the teacher, the feature taps and the distillation forward (the shape of Ultralytics'
``nn/distill_model.py`` and the official FGD ``DetectionDistiller``); the trainer only calls it from named hooks.

Terms whose weight is 0 are not built: no FGD pyramid (align convs, GcBlocks) without FGD weight, no teacher head run
without a response weight, and neither appears in the loss items or ``results.csv``.
"""

from __future__ import annotations

import copy
import math
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn

from ..core import TERMS, angle_kd, focal_weights, keypoint_kd, mask_kd, response_kd
from ..core.presets import TASK_KEYS, build_pyramid, cross_on, fgd_on, response_on
from .model import (
    batch_boxes,
    check_pair,
    detect_head,
    head_channels,
    head_outputs,
    load_model,
    model_task,
    neck_features,
    train_outputs,
)

SCALED = ("fgd", "kd", "crosskd", *TASK_KEYS.values())  # terms that enter the loss (times the batch size), in order
MODULES = ("fgd", "cross")  # the distiller's trainable parts: optimised, all-reduced, saved in the sidecar


def feature_term(cfg: dict) -> str:
    """The name of the feature term a resolved preset builds: ``mse``, ``mgd`` or ``fgd``."""
    return "mse" if cfg["mse"] else "mgd" if cfg["mgd"] else "fgd"


def item_name(key: str, cfg: dict) -> str:
    """The loss item (and ``results.csv`` column ``train/NAME``) of an entry of :meth:`Distiller.forward`'s output:
    the term's own name, which is its weight's argument where it has one (``crosskd``, ``kd_kpt``), FGD's four terms
    ``fgd_fg``... as their weights; at most 10 characters, so Ultralytics' 11-character header keeps them apart."""
    return feature_term(cfg) if key == "fgd" else f"fgd_{key}" if key in TERMS else key


class Distiller(nn.Module):
    """Teacher + FGD pyramid + head-response, CrossKD and task terms for one YOLO student.

    The teacher is held outside the module tree (not in ``state_dict``, the optimiser or DDP) and the student only by
    reference; the module's own parameters are those of :data:`MODULES` that have weight (the FGD pyramid, CrossKD's
    1x1 convs), none otherwise.

    Args:
        student: the student model (unwrapped), for channel/stride/box-bin checks and the gradient-share probe.
        teacher: path of the teacher checkpoint, loaded frozen on ``device``.
        cfg: a resolved preset (:func:`yolo_fgd.core.presets.resolve`).
        names: the data's class names.

    ``scale`` (the schedule factor, set per batch by the trainer) multiplies every term; ``mult`` (gradient-share
    balancing, ``fgd_share``) multiplies FGD's.
    """

    MEASURE_EVERY = 25  # batches between gradient-norm measurements (two extra backward passes each)

    def __init__(self, student: nn.Module, teacher, cfg: dict, names, device):
        super().__init__()
        model = load_model(teacher, device, "teacher")
        check_pair(student, model, names, teacher)
        # the teacher's convs in channels_last on CPU: 1.3-1.5x faster forward there (oneDNN), same values
        self.channels_last = torch.device(device).type == "cpu"
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self._refs = {"teacher": model, "student": student}  # plain dict: not submodules
        self.cfg = cfg
        cs, ct = head_channels(student), head_channels(model)
        self.fgd = build_pyramid(cs, ct, cfg) if fgd_on(cfg) else None
        self.response = response_on(cfg)
        # CrossKD: 1x1 convs taking the student's Detect inputs to the teacher's widths, for the teacher's head
        self.cross = nn.ModuleList(nn.Conv2d(a, b, 1) if a != b else nn.Identity() for a, b in zip(cs, ct)) \
            if cross_on(cfg) else None
        self.box_bins = (int(detect_head(student).reg_max), int(detect_head(model).reg_max))
        self.level_names = [f"P{round(math.log2(float(s)))}" for s in model.stride]  # stride 8 -> P3, 4 -> P2
        # the task's extra head output (keypoints, angle, masks), distilled when its weight is > 0
        task = model_task(student)
        self.task_term = TASK_KEYS[task] if task in TASK_KEYS and cfg[TASK_KEYS[task]] > 0 else None
        self.scale, self.mult, self.world_size = 1.0, 1.0, 1
        self.steps = 0  # batches seen in this process (measurement cadence)
        self.stats = self.new_stats()

    @property
    def teacher(self) -> nn.Module:
        return self._refs["teacher"]

    @property
    def feature_term(self) -> str | None:
        """The feature term's name (:func:`feature_term`), None when it has no weight."""
        return None if self.fgd is None else feature_term(self.cfg)

    def item_name(self, key: str) -> str:
        """The loss item of an entry of :meth:`forward`'s output (:func:`item_name`)."""
        return item_name(key, self.cfg)

    @property
    def terms(self) -> tuple[str, ...]:
        """Loss items this distiller adds, in order (fixed at construction: identical on every batch)."""
        keys = [k for k, on in (("fgd", self.fgd is not None), ("kd", self.response), ("crosskd", self.cross is not None),
                                (self.task_term, bool(self.task_term))) if on]
        if self.feature_term == "fgd":
            keys[1:1] = TERMS
        return tuple(self.item_name(k) for k in keys)

    def describe(self) -> str:
        n = sum(p.numel() for p in self.parameters())
        on = [t for t, v in (("FGD", self.fgd is not None), ("head response", self.response),
                             ("CrossKD", self.cross is not None), (self.task_term, self.task_term)) if v]
        return (f"teacher strides {[int(s) for s in self.teacher.stride]}, {' + '.join(on) or 'no term with weight'}, "
                f"{n:,} trainable distiller parameters")

    # --- the forward of one batch -----------------------------------------------------------------------------
    def forward(self, student_out: dict, batch: dict) -> dict:
        """Distillation terms of one batch (0-d fp32 tensors): ``fgd`` (scaled FGD total), ``fg``/``bg``/``at``/``gl``
        (its terms, detached), ``levels`` (L,), ``kd`` (scaled response term), ``crosskd`` (scaled CrossKD term),
        each present when built.
        A batch with a non-finite feature or term gets exact zeros (a select, no host sync) and is counted."""
        img = batch["img"]
        teacher_feats, teacher_out, ok = self.teacher_pass(img)
        student_feats = student_out["feats"]
        ok = ok & torch.stack([torch.isfinite(f).all() for f in student_feats]).all()
        student_feats = [torch.where(ok, f, torch.zeros_like(f)) for f in student_feats]
        teacher_feats = [torch.where(ok, f, torch.zeros_like(f)) for f in teacher_feats]
        out = {}
        if self.fgd is not None or self.cfg["kd_focal"]:  # the boxes feed FGD's masks and the focal weights only
            boxes = batch_boxes(batch["bboxes"].to(img.device).float(), img.shape[-2:])
            batch_idx = batch["batch_idx"].to(img.device).view(-1)
        if self.fgd is not None:
            terms = self.fgd(student_feats, teacher_feats, boxes, batch_idx)
            s = self.scale * self.mult
            out = {"fgd": terms["total"] * s, **{k: terms[k].detach() * s for k in TERMS}, "levels": terms["levels"] * s}
            ok = ok & torch.isfinite(out["fgd"])
        if self.response:
            cfg = self.cfg
            weights = focal_weights(boxes, batch_idx, teacher_feats, cfg["temperature"], cfg["bg"] / cfg["fg"]) \
                if cfg["kd_focal"] else None
            t = response_kd(student_out["scores"], teacher_out["scores"], student_out["boxes"], teacher_out["boxes"],
                            *self.box_bins, anchor_weight=weights)
            out["kd"] = (cfg["kd_cls"] * t["cls"] + cfg["kd_box"] * t["box"]) * self.scale
            ok = ok & torch.isfinite(out["kd"])
        if self.cross is not None:  # under the step's autocast, as the student's own head; gradients reach the
            # student and the 1x1 convs only (the teacher's parameters are frozen)
            crossed = head_outputs(self.teacher, self._teacher_input([a(f) for a, f in zip(self.cross, student_feats)]))
            t_reg = self.box_bins[1]
            t = response_kd(crossed["scores"], teacher_out["scores"], crossed["boxes"], teacher_out["boxes"], t_reg)
            out["crosskd"] = self.cfg["crosskd"] * (t["cls"] + t["box"]) * self.scale
            ok = ok & torch.isfinite(out["crosskd"])
        if self.task_term:
            out[self.task_term] = self.cfg[self.task_term] * self.task_loss(student_out, teacher_out, teacher_feats) \
                * self.scale
            ok = ok & torch.isfinite(out[self.task_term])
        for k in SCALED:
            if k in out:
                out[k] = torch.where(ok, out[k], torch.zeros_like(out[k]))
        self.stats["skipped"] = self.stats["skipped"] + (~ok).int()
        return out

    @property
    def needs_head(self) -> bool:
        """Whether a term reads the teacher's head outputs (the response term, CrossKD, the task's term)."""
        return bool(self.response or self.cross is not None or self.task_term)

    def prefetch(self, img: torch.Tensor) -> None:
        """Start the teacher's pass on a batch in a second thread while the student runs (CPU only, where Ultralytics
        trains on cpu_count - 1 threads: the teacher takes a core the student leaves idle); :meth:`teacher_pass` picks
        it up. Grad mode and autocast are per thread: the pass sets both itself."""
        if img.device.type != "cpu" or (os.cpu_count() or 1) <= torch.get_num_threads():
            return
        pool = self._refs.get("pool") or self._refs.setdefault("pool", ThreadPoolExecutor(1, "yolo-fgd-teacher"))
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        self._refs["pending"] = (img, pool.submit(self._teacher_pass, img, dtype))

    def teacher_pass(self, img: torch.Tensor) -> tuple[list, dict | None, torch.Tensor]:
        """The teacher's Detect inputs [L x (N,C,H,W)] fp32, its head outputs when a term needs them, and whether its
        features were finite (0-d bool; non-finite ones are zeroed before the head, so no NaN reaches a gradient),
        for the batch ``img`` (N,3,H,W): from :meth:`prefetch` when it ran on this batch, else now."""
        pending = self._refs.pop("pending", None)
        if pending is not None and pending[0] is img:
            return pending[1].result()
        return self._teacher_pass(img)

    def _teacher_pass(self, img: torch.Tensor, autocast: torch.dtype | None = None) -> tuple:
        """:meth:`teacher_pass` itself: under the calling thread's autocast, or (a prefetch thread) ``autocast``'s."""
        with torch.autocast(img.device.type, dtype=autocast) if autocast else nullcontext():
            feats = self.teacher_features(img)
            ok = torch.stack([torch.isfinite(f).all() for f in feats]).all()
            feats = [torch.where(ok, f, torch.zeros_like(f)) for f in feats]
            if not self.needs_head:
                return feats, None, ok
            with torch.no_grad():  # one pass of the teacher's head serves the response term, CrossKD and the task's
                return feats, head_outputs(self.teacher, self._teacher_input(feats)), ok

    def teacher_features(self, img: torch.Tensor) -> list[torch.Tensor]:
        """The teacher's Detect inputs [L x (N,C,H,W)] fp32 for a batch of images (N,3,H,W): no autograd state, under
        the step's autocast (with AMP the teacher runs in fp16 like the student; the distillation terms are computed
        in fp32 from its outputs), channels_last on CPU."""
        with torch.no_grad():
            feats = neck_features(self.teacher, self._teacher_input(img if torch.is_autocast_enabled(img.device.type)
                                                                    else img.float()))
        return [f.float() for f in feats]

    def _teacher_input(self, x):
        """``x`` (a tensor or a list of them) in the teacher's memory format."""
        if not self.channels_last:
            return x
        if isinstance(x, list):
            return [t.contiguous(memory_format=torch.channels_last) for t in x]
        return x.contiguous(memory_format=torch.channels_last)

    def task_loss(self, student_out: dict, teacher_out: dict, teacher_feats) -> torch.Tensor:
        """The unweighted term of the task's extra head output: keypoints (pose), angles (OBB) or masks (segment)."""
        scores = teacher_out["scores"]
        if self.task_term == "kd_kpt":
            return keypoint_kd(student_out["kpts"], teacher_out["kpts"], scores, detect_head(self.teacher).kpt_shape[1])
        if self.task_term == "kd_angle":
            return angle_kd(student_out["angle"], teacher_out["angle"], scores)
        with torch.no_grad():
            t_proto = detect_head(self.teacher).proto(self._teacher_input(teacher_feats[0])).float()
        return mask_kd(student_out["mask_coefficient"], student_out["proto"], teacher_out["mask_coefficient"], t_proto,
                       scores)

    # --- instrumentation ----------------------------------------------------------------------------------------
    def new_stats(self) -> dict:
        return {"levels": 0.0, "n": 0, "ratio": [], "skipped": 0}

    def observe(self, det_loss: torch.Tensor, out: dict, bs: int) -> None:
        """Per-level sums every batch (no host sync); every MEASURE_EVERY batches the FGD/detection gradient-norm ratio
        on the student's parameters, which also drives ``fgd_share`` balancing."""
        if self.fgd is None or not det_loss.requires_grad:
            return
        st = self.stats
        st["levels"] = st["levels"] + out["levels"]
        st["n"] += 1
        self.steps += 1
        fgd = out["fgd"] * bs
        if (self.steps - 1) % self.MEASURE_EVERY or self.world_size > 1 or not fgd.requires_grad:
            return
        params = [p for p in self._refs["student"].parameters() if p.requires_grad]
        g_det = torch.autograd.grad(det_loss, params, retain_graph=True, allow_unused=True)
        g_fgd = torch.autograd.grad(fgd, params, retain_graph=True, allow_unused=True)
        norm = lambda gs: torch.linalg.vector_norm(torch.stack([g.float().norm() for g in gs if g is not None]))
        ratio = float(norm(g_fgd) / norm(g_det).clamp(min=1e-12))
        st["ratio"].append(ratio)
        target = float(self.cfg.get("share") or 0)
        if target > 0 and ratio > 0 and self.scale > 0:
            # ratio = scale * mult * r0 (r0: ratio at unit weight); aim mult * r0 = target so that the share follows
            # the warm-up ramp up to `target`, moving half-way in log space each measurement
            want = target * self.mult * self.scale / ratio
            self.mult = float(min(max((self.mult * want) ** 0.5, 1e-6), 1e6))

    def epoch_metrics(self) -> dict:
        """Columns added to results.csv: ``distill/scale``, ``distill/skipped`` and, with FGD, per-level ``fgd/P3``...
        (named by each level's stride: P2 for stride 4, P6 for 64),
        ``fgd/grad_ratio`` (mean of the epoch's measurements) and ``fgd/mult``."""
        st = self.stats
        cols = {"distill/scale": round(self.scale, 6), "distill/skipped": int(st["skipped"])}
        if self.fgd is not None:
            n = max(st["n"], 1)
            levels = (st["levels"] / n).tolist() if torch.is_tensor(st["levels"]) else [0.0] * len(self.fgd.levels)
            cols.update({f"fgd/{name}": round(float(v), 6) for name, v in zip(self.level_names, levels)})
            cols["fgd/grad_ratio"] = round(sum(st["ratio"]) / len(st["ratio"]), 6) if st["ratio"] else 0.0
            cols["fgd/mult"] = round(self.mult, 6)
        return cols

    # --- optimisation and state -----------------------------------------------------------------------------------
    def before_step(self, *_) -> None:
        """Optimizer step pre-hook (gradients already unscaled): average the distiller's gradients over DDP ranks and
        clip them at norm 10, as Ultralytics clips the student's."""
        params = [p for p in self.parameters() if p.grad is not None]
        if not params:
            return
        if self.world_size > 1 and dist.is_initialized():
            for p in params:
                dist.all_reduce(p.grad)
                p.grad /= self.world_size
        nn.utils.clip_grad_norm_(params, max_norm=10.0)

    def sidecar(self, epoch: int) -> dict:
        """What ``fgd_last.pt`` holds (the student's checkpoints hold no distiller state): the modules of every term
        with weight, under their names (``fgd``, ``cross``)."""
        state = {name: getattr(self, name).state_dict() for name in MODULES if getattr(self, name) is not None}
        return {**state, "mult": self.mult, "epoch": epoch}

    def load_sidecar(self, state: dict) -> list[str]:
        """Restore from :meth:`sidecar` output; returns the names of built modules the sidecar did not hold."""
        self.mult = float(state.get("mult", 1.0))
        missing = []
        for name in MODULES:
            module = getattr(self, name)
            if module is not None:
                if state.get(name):
                    module.load_state_dict(state[name])
                else:
                    missing.append(name)
        return missing


class DistillCriterion:
    """The student's training criterion: its own loss + the distiller's terms as extra loss items
    (:attr:`Distiller.terms`: ``fgd`` or ``mse`` or ``mgd``, ``fgd_fg``..., ``kd``, ``crosskd``, ``kd_kpt``...: those the
    distiller has).

    Not an ``nn.Module`` and dropped on deepcopy/pickle (becomes its base criterion), so the teacher never travels
    with the student (EMA, checkpoints, DDP state).
    """

    def __init__(self, base, distiller: Distiller):
        self.base, self.distiller = base, distiller

    def __call__(self, preds, batch):
        loss, items = self.base(preds, batch)
        out = self.distiller(train_outputs(preds), batch)
        bs = batch["img"].shape[0]
        self.distiller.observe(loss.sum(), out, bs)
        parts, items, d = [loss.view(-1)], dict(items), self.distiller
        for k in SCALED:
            if k in out:
                parts.append((out[k] * bs).view(1).to(loss.dtype))
                items[d.item_name(k)] = out[k].detach()
                if k == "fgd" and d.feature_term == "fgd":  # FGD's own terms, logged beside its total
                    items.update({d.item_name(t): out[t] for t in TERMS})
        return torch.cat(parts), items

    def update(self):
        if hasattr(self.base, "update"):
            self.base.update()

    def __getattr__(self, name):  # hyp, stride, etc. of the base criterion
        if name in {"base", "distiller"}:
            raise AttributeError(name)
        return getattr(self.base, name)

    def __deepcopy__(self, memo):
        return copy.deepcopy(self.base, memo)

    def __reduce__(self):
        return copy.copy, (self.base,)
