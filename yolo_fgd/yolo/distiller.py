"""The YOLO distiller: owns the teacher, the feature taps and the distillation forward (the shape of Ultralytics'
``nn/distill_model.py`` and the official FGD ``DetectionDistiller``); the trainer only calls it from named hooks.

Terms whose weight is 0 are not built: no FGD pyramid (align convs, GcBlocks) without FGD weight, no teacher head run
without a response weight, and neither appears in the loss items or ``results.csv``.
"""

from __future__ import annotations

import copy
import importlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch import nn

from ..cfg.distill import TERM_TABLE
from ..errors import FGDError
from .model import (
    assigner_inputs,
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
from .terms import Batch, Term

ITEM_WIDTH = 10  # Ultralytics prints loss items in 11-character columns: a longer name runs into its neighbour


def term_class(impl: str) -> type[Term]:
    """The :class:`~yolo_fgd.yolo.terms.Term` subclass a row's ``impl`` names: ``"module:Class"`` under
    ``yolo_fgd.yolo``, or a full dotted module path."""
    module, _, name = impl.partition(":")
    return getattr(importlib.import_module(module if "." in module else f"{__package__}.{module}"), name)


def term_rows() -> list[tuple[dict, type[Term]]]:
    """The rows of :data:`~yolo_fgd.cfg.distill.TERM_TABLE` that are terms, with their classes, in table order."""
    return [(row, term_class(row["impl"])) for row in TERM_TABLE if row.get("impl")]


def batch_key(img: torch.Tensor) -> tuple:
    """What identifies a batch's pixels: its memory, shape, strides, dtype and in-place version."""
    return img.data_ptr(), tuple(img.shape), img.stride(), img.dtype, img._version


class Distiller(nn.Module):
    """Teacher + the distillation terms with weight (one :class:`~yolo_fgd.yolo.terms.Term` per row of
    :data:`~yolo_fgd.cfg.distill.TERM_TABLE` that is on) for one YOLO student.

    The teacher is held outside the module tree (not in ``state_dict``, the optimiser or DDP) and the student only by
    reference; the module's own parameters are the terms' trainable parts, registered under their ``state`` names
    (``fgd``: the FGD pyramid, ``cross``: CrossKD's 1x1 convs), none otherwise.

    Args:
        student: the student model (unwrapped), for channel/stride/box-bin checks and the gradient-share probe.
        teacher: path of the teacher checkpoint, loaded frozen on ``device``.
        cfg: a resolved preset (:func:`yolo_fgd.core.presets.resolve`).
        names: the data's class names.

    ``scale`` (the schedule factor, set per batch by the trainer) multiplies every term; ``mult`` (gradient-share
    balancing, ``fgd_share``) multiplies the feature term's.
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
        self.student_channels, self.teacher_channels = head_channels(student), head_channels(model)
        self.box_bins = (int(detect_head(student).reg_max), int(detect_head(model).reg_max))
        self.level_names = [f"P{round(math.log2(float(s)))}" for s in model.stride]  # stride 8 -> P3, 4 -> P2
        self.scale, self.mult, self.world_size = 1.0, 1.0, 1
        self.steps = 0  # batches seen in this process (measurement cadence)
        task, rows = model_task(student), term_rows()
        for cls in {cls for _, cls in rows if cls.state}:
            setattr(self, cls.state, None)  # e.g. self.fgd is None without FGD weight
        self.built = [cls(self, row["name"]) for row, cls in rows if cls.on(cfg, row["name"], task)]
        for term in self.built:
            if term.module is not None:
                setattr(self, term.state, term.module)
        self.feature = next((t for t in self.built if t.state == "fgd"), None)  # the FGD pyramid's term
        long = [n for n in self.terms if len(n) > ITEM_WIDTH]
        if long:
            raise FGDError(f"loss item(s) {long} are longer than {ITEM_WIDTH} characters: Ultralytics' header would "
                           "run them together; give the term a shorter name in TERM_TABLE")
        self.stats = self.new_stats()

    @property
    def teacher(self) -> nn.Module:
        return self._refs["teacher"]

    @property
    def modules_by_state(self) -> dict[str, nn.Module]:
        """The trainable parts of the built terms under their sidecar names (``fgd``, ``cross``)."""
        return {t.state: t.module for t in self.built if t.module is not None}

    @property
    def terms(self) -> tuple[str, ...]:
        """Loss items this distiller adds, in table order (fixed at construction: identical on every batch): each
        built term's name, then what it logs beside it (FGD: ``fgd_fg``...)."""
        return tuple(n for t in self.built for n in (t.name, *t.logs(t.name)))

    def describe(self) -> str:
        n = sum(p.numel() for p in self.parameters())
        on = " + ".join(t.name for t in self.built) or "no term with weight"
        return f"teacher strides {[int(s) for s in self.teacher.stride]}, {on}, {n:,} trainable distiller parameters"

    # --- the forward of one batch -----------------------------------------------------------------------------
    def forward(self, student_out: dict, batch: dict, teacher: tuple | None = None) -> dict:
        """Distillation terms of one batch (0-d fp32 tensors, times the schedule ``scale``): each built term's loss
        under its name (``fgd``, ``kd``, ``crosskd``...), what it logs beside it (detached) and, with FGD, ``levels``
        (L,). A batch with a non-finite feature or term gets exact zeros (a select, no host sync) and is counted.
        ``teacher``: :meth:`teacher_pass` of this batch when the caller has already run it (LAD)."""
        img = batch["img"]
        teacher_feats, teacher_out, ok = teacher if teacher is not None else self.teacher_pass(img)
        student_feats = student_out["feats"]
        ok = ok & torch.stack([torch.isfinite(f).all() for f in student_feats]).all()
        student_feats = [torch.where(ok, f, torch.zeros_like(f)) for f in student_feats]
        teacher_feats = [torch.where(ok, f, torch.zeros_like(f)) for f in teacher_feats]
        boxes = batch_idx = None
        if any(t.needs_boxes for t in self.built):
            boxes = batch_boxes(batch["bboxes"].to(img.device).float(), img.shape[-2:])
            batch_idx = batch["batch_idx"].to(img.device).view(-1)
        b = Batch(student_out, student_feats, teacher_feats, teacher_out, boxes, batch_idx)
        out = {}
        for term in self.built:
            loss, logs = term(b)
            out[term.name] = loss * self.scale
            out.update({k: v * self.scale for k, v in logs.items()})
            ok = ok & torch.isfinite(out[term.name])
        if self.feature is not None:
            out["levels"] = self.feature.levels * self.scale
        for name in [n for t in self.built for n in (t.name, *t.logs(t.name))]:  # logged items too: never NaN
            out[name] = torch.where(ok, out[name], torch.zeros_like(out[name]))
        self.stats["skipped"] = self.stats["skipped"] + (~ok).int()
        return out

    @property
    def needs_head(self) -> bool:
        """Whether a term or the label assignment (``lad``) reads the teacher's head outputs (the response term,
        CrossKD, the task's term)."""
        return bool(self.cfg.get("lad")) or any(t.needs_head for t in self.built)

    def assignment(self, teacher: tuple) -> tuple:
        """LAD's inputs from :meth:`teacher_pass` output: the teacher's class probabilities (N,A,K), boxes (N,A,4)
        (xyxy pixels, :func:`~yolo_fgd.yolo.model.assigner_inputs`) and whether its pass was finite (0-d bool)."""
        feats, out, ok = teacher
        return (*assigner_inputs(out, feats, self.teacher.stride, self.box_bins[1]), ok)

    def prefetch(self, img: torch.Tensor) -> None:
        """Start the teacher's pass on a batch in a second thread while the student runs; :meth:`teacher_pass` picks
        it up. CPU only, and only where the cores left idle hold a second team of the process' intra-op threads
        (cpu_count >= 2 x threads: PyTorch's thread count is process-wide, so the teacher's thread uses as many as the
        student's and would oversubscribe otherwise). Grad mode and autocast are per thread: the pass sets both."""
        if img.device.type != "cpu" or (os.cpu_count() or 1) < 2 * torch.get_num_threads():
            return
        self.discard()
        pool = self._refs.get("pool") or self._refs.setdefault("pool", ThreadPoolExecutor(1, "yolo-fgd-teacher"))
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        self._refs["pending"] = (batch_key(img), pool.submit(self._teacher_pass, img, dtype))

    def teacher_pass(self, img: torch.Tensor) -> tuple[list, dict | None, torch.Tensor]:
        """The teacher's Detect inputs [L x (N,C,H,W)] fp32, its head outputs when a term needs them, and whether its
        features were finite (0-d bool; non-finite ones are zeroed before the head, so no NaN reaches a gradient),
        for the batch ``img`` (N,3,H,W): from :meth:`prefetch` when it ran on these very pixels (the same memory,
        shape and version, whatever tensor object Ultralytics hands the model), else now, after any prefetch of
        other pixels has finished (counted in ``stats['missed']``)."""
        pending = self._refs.get("pending")
        if pending is not None and pending[0] == batch_key(img):
            return self._refs.pop("pending")[1].result()
        if pending is not None:
            self.stats["missed"] += 1
            self.discard()  # not these pixels: let it finish rather than run two teachers at once
        return self._teacher_pass(img)

    def discard(self) -> None:
        """Wait for a prefetch nobody picked up (so it does not run beside the next one)."""
        pending = self._refs.pop("pending", None)
        if pending is not None:
            pending[1].result()

    def close(self) -> None:
        """End the prefetch thread (the end of training)."""
        self.discard()
        pool = self._refs.pop("pool", None)
        if pool is not None:
            pool.shutdown(wait=True)

    def _teacher_pass(self, img: torch.Tensor, autocast: torch.dtype | None = None) -> tuple:
        """:meth:`teacher_pass` itself: under the calling thread's autocast, or (a prefetch thread) ``autocast``'s."""
        with torch.autocast(img.device.type, dtype=autocast) if autocast else nullcontext():
            feats = self.teacher_features(img)
            ok = torch.stack([torch.isfinite(f).all() for f in feats]).all()
            feats = [torch.where(ok, f, torch.zeros_like(f)) for f in feats]
            if not self.needs_head:
                return feats, None, ok
            with torch.no_grad():  # one pass of the teacher's head serves the response term, CrossKD and the task's
                return feats, head_outputs(self.teacher, self.teacher_input(feats)), ok

    def teacher_features(self, img: torch.Tensor) -> list[torch.Tensor]:
        """The teacher's Detect inputs [L x (N,C,H,W)] fp32 for a batch of images (N,3,H,W): no autograd state, under
        the step's autocast (with AMP the teacher runs in fp16 like the student; the distillation terms are computed
        in fp32 from its outputs), channels_last on CPU."""
        with torch.no_grad():
            feats = neck_features(self.teacher, self.teacher_input(img if torch.is_autocast_enabled(img.device.type)
                                                                   else img.float()))
        return [f.float() for f in feats]

    def teacher_input(self, x):
        """``x`` (a tensor or a list of them) in the teacher's memory format."""
        if not self.channels_last:
            return x
        if isinstance(x, list):
            return [t.contiguous(memory_format=torch.channels_last) for t in x]
        return x.contiguous(memory_format=torch.channels_last)

    # --- instrumentation ----------------------------------------------------------------------------------------
    def new_stats(self) -> dict:
        return {"levels": 0.0, "n": 0, "ratio": [], "skipped": 0, "missed": 0}

    def observe(self, det_loss: torch.Tensor, out: dict, bs: int) -> None:
        """Per-level sums every batch (no host sync); every MEASURE_EVERY batches the FGD/detection gradient-norm ratio
        on the student's parameters, which also drives ``fgd_share`` balancing."""
        if self.feature is None or not det_loss.requires_grad:
            return
        st = self.stats
        st["levels"] = st["levels"] + out["levels"]
        st["n"] += 1
        self.steps += 1
        fgd = out[self.feature.name] * bs
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
        state = {name: module.state_dict() for name, module in self.modules_by_state.items()}
        return {**state, "mult": self.mult, "epoch": epoch}

    def load_sidecar(self, state: dict) -> list[str]:
        """Restore from :meth:`sidecar` output; returns the names of built modules the sidecar did not hold."""
        self.mult = float(state.get("mult", 1.0))
        missing = []
        for term in [t for t in self.built if t.module is not None]:
            if state.get(term.state):
                term.module.load_state_dict(state[term.state])
                term.fitted = True  # a restored adapter is not fitted again
            else:
                missing.append(term.state)
        return missing


class DistillCriterion:
    """The student's training criterion: its own loss + the distiller's terms as extra loss items
    (:attr:`Distiller.terms`: ``fgd`` or ``mse`` or ``mgd``, ``fgd_fg``..., ``kd``, ``crosskd``, ``kd_kpt``...: those the
    distiller built).

    Not an ``nn.Module`` and dropped on deepcopy/pickle (becomes its base criterion), so the teacher never travels
    with the student (EMA, checkpoints, DDP state).
    """

    def __init__(self, base, distiller: Distiller):
        self.base, self.distiller = base, distiller

    def __call__(self, preds, batch):
        d = self.distiller
        teacher = d.teacher_pass(batch["img"]) if d.cfg.get("lad") else None
        with assigned_by(self.base, d.assignment(teacher) if teacher is not None else None):
            loss, items = self.base(preds, batch)
        out = d(train_outputs(preds), batch, teacher)
        bs = batch["img"].shape[0]
        self.distiller.observe(loss.sum(), out, bs)
        parts, items = [loss.view(-1)], dict(items)
        for term in self.distiller.built:
            parts.append((out[term.name] * bs).view(1).to(loss.dtype))
            items.update({n: out[n].detach() for n in (term.name, *term.logs(term.name))})
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


class TeacherAssigner:
    """LAD (Nguyen et al., WACV 2022): a detection loss's assigner called with the teacher's class probabilities
    (N,A,K) and boxes (N,A,4) in place of the student's own (its other inputs as given); the student's own where the
    teacher's pass was not finite (``ok``, a 0-d bool: a select, no host sync)."""

    def __init__(self, assigner, scores: torch.Tensor, boxes: torch.Tensor, ok: torch.Tensor):
        self.assigner, self.scores, self.boxes, self.ok = assigner, scores, boxes, ok

    def __call__(self, pd_scores, pd_bboxes, *args, **kwargs):
        scores = torch.where(self.ok, self.scores.to(pd_scores.dtype), pd_scores)
        boxes = torch.where(self.ok, self.boxes.to(pd_bboxes.dtype), pd_bboxes)
        return self.assigner(scores, boxes, *args, **kwargs)


@contextmanager
def assigned_by(criterion, teacher: tuple | None):
    """Within, the one-to-many detection loss of ``criterion`` (itself, or ``one2many`` of an end-to-end loss such as
    YOLO26's) assigns with the teacher's predictions ``teacher`` (:meth:`Distiller.assignment`; None: its own). Its
    assigner is put back on exit, so no copy of the loss (EMA, checkpoint) holds the teacher's tensors."""
    if teacher is None:
        yield
        return
    loss = getattr(criterion, "one2many", criterion)
    own = loss.assigner
    loss.assigner = TeacherAssigner(own, *teacher)
    try:
        yield
    finally:
        loss.assigner = own
