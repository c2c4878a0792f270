"""FGDTrainer: Ultralytics ``DetectionTrainer`` that adds FGD on the Detect inputs (P3/P4/P5) and, in the shipped
preset, a head-response term on the Detect outputs.

The student stays a plain ``DetectionModel``: its criterion is wrapped for training only, the FGD modules
(align + GcBlocks, one :class:`~yolo_fgd.loss.FGDLoss` per level) live on the trainer, join the optimiser,
gradient clipping and DDP all-reduce, and are saved in a sidecar ``fgd_last.pt`` next to ``last.pt``. The teacher
is loaded from its path on every rank, frozen, eval, fp32, and run without its head. Checkpoints hold only the
student, so they load with plain ``YOLO("best.pt")`` and ``ULTRALYTICS_SAFE_LOAD=1``.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ultralytics.cfg import get_cfg
from ultralytics.models.yolo.detect import DetectionTrainer, DetectionValidator
from ultralytics.utils import DEFAULT_CFG, DEFAULT_CFG_DICT, LOGGER, RANK, colorstr
from ultralytics.utils.torch_utils import unwrap_model

from .errors import FGDError
from .loss import head_kd
from .presets import FGD_ARGS, build_pyramid, resolve_fgd

SIDECAR = "fgd_last.pt"


def detect_head(model: nn.Module):
    """The Detect head (last layer) of an Ultralytics model, or None."""
    layers = getattr(model, "model", None)
    head = layers[-1] if isinstance(layers, nn.Sequential) and len(layers) else None
    return head if head is not None and hasattr(head, "cv2") and hasattr(head, "nl") else None


def head_channels(model: nn.Module) -> list[int]:
    """Channels of each Detect input, read from the first conv of each box branch."""
    return [int(branch[0].conv.in_channels) for branch in detect_head(model).cv2]


def neck_features(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Truncated forward through ``model.model[:-1]``: the Detect inputs (P3, P4, P5...) without running the head."""
    layers, saved = model.model, model.save
    y = []
    for m in layers[:-1]:
        if m.f != -1:
            x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
        x = m(x)
        y.append(x if m.i in saved else None)
    head = layers[-1]
    return [x if j == -1 else y[j] for j in ([head.f] if isinstance(head.f, int) else head.f)]


def train_outputs(preds) -> dict:
    """The student's raw training outputs ``{'boxes', 'scores', 'feats'}`` (under ``one2many`` for YOLO26);
    ``feats`` are the Detect inputs."""
    preds = preds[1] if isinstance(preds, tuple) else preds
    return preds.get("one2many", preds)


def head_outputs(model: nn.Module, feats: list[torch.Tensor]) -> dict:
    """Raw ``{'boxes' (N,4*reg_max,A), 'scores' (N,nc,A)}`` of a model's Detect head on its inputs ``feats``
    (the one-to-many branch, or one-to-one where fusion removed it)."""
    head = detect_head(model)
    out = head.forward_head(feats, **head.one2many)
    return out or head.forward_head(feats, **head.one2one)


def load_teacher(path, device) -> nn.Module:
    """Load a YOLO detection checkpoint as a frozen fp32 eval teacher, with one-line errors for bad files."""
    from ultralytics.nn.tasks import guess_model_task, load_checkpoint

    if not path:
        raise FGDError("no teacher given: pass teacher=path/to/teacher.pt (a trained YOLO detection checkpoint)")
    p = Path(path)
    if not p.is_file():
        raise FGDError(f"teacher '{path}' not found: pass teacher=path/to/best.pt of a trained YOLO detection model")
    try:
        model, _ = load_checkpoint(p, device="cpu")
    except Exception as e:  # corrupt zip, pickle error, foreign checkpoint format
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FGDError(
            f"teacher '{path}' could not be loaded ({first}): pass an Ultralytics YOLO .pt checkpoint, "
            "re-export it if it is damaged"
        ) from None
    task = getattr(model, "task", None) or guess_model_task(model)
    if task != "detect" or detect_head(model) is None:
        raise FGDError(
            f"teacher '{path}' is a '{task}' model, not a detection model: FGD needs a YOLO detect checkpoint as teacher"
        )
    model = model.float().fuse(verbose=False).eval().to(device)  # Conv+BN fused: same outputs, faster
    for p_ in model.parameters():
        p_.requires_grad_(False)
    return model


def check_pair(student: nn.Module, teacher: nn.Module, names: dict, teacher_path) -> None:
    """Raise FGDError when teacher and student/data cannot be paired level by level."""
    t_names = getattr(teacher, "names", None)
    t_names = dict(enumerate(t_names)) if isinstance(t_names, (list, tuple)) else t_names
    data_names = dict(enumerate(names)) if isinstance(names, (list, tuple)) else dict(names)
    if t_names is not None and len(t_names) != len(data_names):
        raise FGDError(
            f"teacher '{teacher_path}' has {len(t_names)} classes but the data has {len(data_names)}: "
            "train the teacher on the same data (same class list)"
        )
    if t_names is not None and {int(k): str(v) for k, v in t_names.items()} != {
        int(k): str(v) for k, v in data_names.items()
    }:
        diff = [f"{k}:{t_names.get(k)}!={v}" for k, v in data_names.items() if str(t_names.get(k)) != str(v)][:3]
        raise FGDError(
            f"teacher '{teacher_path}' class names differ from the data's ({', '.join(diff)}): "
            "train the teacher on the same data (same class order)"
        )
    s_head, t_head = detect_head(student), detect_head(teacher)
    if s_head is None:
        raise FGDError("student has no Detect head: use a YOLO detection model, e.g. model=yolo11n.yaml")
    s_stride = [int(s) for s in student.stride.tolist()]
    t_stride = [int(s) for s in teacher.stride.tolist()]
    if s_stride != t_stride:
        raise FGDError(
            f"teacher Detect levels have strides {t_stride} but the student's have {s_stride}: "
            "FGD pairs levels one to one, use models with the same levels (e.g. both P3-P5)"
        )


class FGDCriterion:
    """Training criterion of the student: detection loss + gain * FGD (Eq. 13), loss items extended with FGD terms.

    Not an ``nn.Module`` and dropped on deepcopy/pickle (becomes its base criterion), so the teacher never travels
    with the student (EMA, checkpoints, DDP state).
    """

    def __init__(self, base, trainer: "FGDTrainer"):
        self.base, self.trainer = base, trainer

    def __call__(self, preds, batch):
        loss, items = self.base(preds, batch)
        out = self.trainer.fgd_loss(train_outputs(preds), batch)
        bs = batch["img"].shape[0]
        fgd = out["total"] * bs
        self.trainer.fgd_observe(loss.sum(), fgd, out)
        loss = torch.cat([loss.view(-1), fgd.view(1).to(loss.dtype)])
        items = {**items, "fgd_loss": out["total"].detach(), **{f"{k}_loss": out[k] for k in ("fg", "bg", "at", "gl")}}
        if "kd" in out:  # response distillation, its own entry so the FGD instrumentation stays FGD's
            loss = torch.cat([loss, (out["kd"] * bs).view(1).to(loss.dtype)])
            items["kd_loss"] = out["kd"].detach()
        return loss, items

    def update(self):
        if hasattr(self.base, "update"):
            self.base.update()

    def __getattr__(self, name):  # hyp, stride, etc. of the base criterion
        if name in {"base", "trainer"}:
            raise AttributeError(name)
        return getattr(self.base, name)

    def __deepcopy__(self, memo):
        return copy.deepcopy(self.base, memo)

    def __reduce__(self):
        return copy.copy, (self.base,)


class FGDTrainer(DetectionTrainer):
    """DetectionTrainer with FGD from a frozen teacher (``teacher=path.pt``).

    Extra train args (see :data:`yolo_fgd.presets.FGD_ARGS`): ``teacher``, ``fgd_preset``, ``fgd_alpha``,
    ``fgd_beta``, ``fgd_gamma``, ``fgd_lambda``, ``fgd_temperature``, ``fgd_gain``, ``fgd_norm``, ``fgd_warmup``,
    ``fgd_decay``, ``fgd_share``, ``fgd_level_norm``, ablation switches ``fgd_split``, ``fgd_spatial``,
    ``fgd_channel`` and ``fgd_mse`` (Eq. 1 instead), and the head-response weights ``fgd_kd_cls``, ``fgd_kd_box``
    (:func:`~yolo_fgd.loss.head_kd`; on in the shipped preset).

    Example:
        >>> from ultralytics import YOLO
        >>> YOLO("yolo11n.yaml").train(trainer=FGDTrainer, teacher="teacher.pt", data="data.yaml", epochs=100)
    """

    def __init__(self, cfg=DEFAULT_CFG, overrides=None, _callbacks=None):
        cfg = {**FGD_ARGS, **(vars(cfg) if not isinstance(cfg, dict) else cfg)}
        overrides = dict(overrides or {})
        repoint = overrides.pop("teacher", None) if overrides.get("resume") else None
        super().__init__(cfg, overrides, _callbacks)
        if repoint:
            self.args.teacher = repoint  # a resumed run may re-point its teacher
        if getattr(self.args, "distill_model", None):
            raise FGDError(
                "teacher= and distill_model= both given: use yolo-fgd's teacher= for FGD, or plain `yolo train "
                "distill_model=` for Ultralytics' own distillation, not both"
            )
        if not self.args.teacher:
            raise FGDError("no teacher given: pass teacher=path/to/teacher.pt (a trained YOLO detection checkpoint)")
        if not Path(self.args.teacher).is_file():
            raise FGDError(
                f"teacher '{self.args.teacher}' not found: pass teacher=path/to/best.pt of a trained YOLO detection model"
            )
        self.fgd_cfg = resolve_fgd(self.args)
        self.teacher = None
        self.fgd = None
        self.box_bins = None  # (student, teacher) reg_max of the Detect heads, read in setup_model
        self._fgd_iter = 0  # batches seen this epoch (warm-up position)
        self._fgd_steps = 0  # batches seen in this process (instrumentation cadence)
        self.fgd_mult = 1.0  # gradient-share balancing multiplier (fgd_share), 1 when off
        self._fgd_stats = None
        self.add_callback("on_train_epoch_start", FGDTrainer._fgd_epoch_start)

    # --- model and FGD modules -------------------------------------------------------------------------------
    def setup_model(self):
        ckpt = super().setup_model()
        self.teacher = load_teacher(self.args.teacher, self.device)
        student = unwrap_model(self.model)
        check_pair(student, self.teacher, self.data["names"], self.args.teacher)
        self.fgd = build_pyramid(head_channels(student), head_channels(self.teacher), self.fgd_cfg).to(self.device)
        self.box_bins = (int(detect_head(student).reg_max), int(detect_head(self.teacher).reg_max))
        if self.resume:
            sidecar = Path(self.args.resume if isinstance(self.args.resume, (str, Path)) else self.args.model)
            sidecar = sidecar.with_name(SIDECAR)
            if sidecar.is_file():
                self.load_sidecar(sidecar)
                LOGGER.info(f"{colorstr('FGD:')} restored align/GcBlock modules from {sidecar}")
            else:
                LOGGER.warning(f"FGD: {sidecar} not found, resuming with freshly initialised align/GcBlock modules")
        if RANK in {-1, 0}:
            n = sum(p.numel() for p in self.fgd.parameters())
            LOGGER.info(
                f"{colorstr('FGD:')} teacher {self.args.teacher} (strides {[int(s) for s in self.teacher.stride]}), "
                f"{len(self.fgd.levels)} levels, {n:,} trainable FGD parameters, {self.fgd_cfg}"
            )
        return ckpt

    def _setup_train(self):
        super()._setup_train()
        model = unwrap_model(self.model)
        base = model.criterion if getattr(model, "criterion", None) is not None else model.init_criterion()
        model.criterion = FGDCriterion(base, self)

    def build_optimizer(self, model, name="auto", lr=0.001, momentum=0.9, decay=1e-5, iterations=1e5):
        """Ultralytics' optimizer plus the FGD modules: conv weights with the decayed group, the rest without."""
        optimizer = super().build_optimizer(model, name, lr, momentum, decay, iterations)
        groups = {g.get("param_group"): g for g in optimizer.param_groups if not g.get("use_muon")}
        decayed = [p for n, p in self.fgd.named_parameters() if p.ndim > 1]
        other = [p for n, p in self.fgd.named_parameters() if p.ndim <= 1]
        for params, kind in ((decayed, "weight"), (other, "bias")):
            template = {k: v for k, v in groups[kind].items() if k not in {"params", "initial_lr"}}
            optimizer.add_param_group({**template, "params": params})
        return optimizer

    def optimizer_step(self):
        """Unscale, all-reduce FGD grads across ranks, clip student + FGD together at 10, step, EMA."""
        self.scaler.unscale_(self.optimizer)
        fgd_params = [p for p in self.fgd.parameters() if p.grad is not None]
        if self.world_size > 1 and dist.is_initialized():
            for p in fgd_params:
                dist.all_reduce(p.grad)
                p.grad /= self.world_size
        torch.nn.utils.clip_grad_norm_([*self.model.parameters(), *fgd_params], max_norm=10.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()
        if self.ema:
            self.ema.update(self.model)

    # --- the FGD term ----------------------------------------------------------------------------------------
    @property
    def fgd_on(self) -> bool:
        """Whether the FGD term has any weight (gain and one of alpha, beta, gamma, lambda > 0)."""
        c = self.fgd_cfg
        return c["gain"] > 0 and any(c[k] > 0 for k in ("alpha", "beta", "gamma", "lambda"))

    def preprocess_batch(self, batch):
        batch = super().preprocess_batch(batch)
        self._fgd_iter += 1
        return batch

    def fgd_scale(self) -> float:
        """Schedule factor of the FGD weight: linear 0 -> 1 over the first ``fgd_warmup`` epochs, cosine 1 -> 0 over
        the last ``fgd_decay`` epochs (both fractional, per batch)."""
        nb = max(len(getattr(self, "train_loader", []) or []), 1)
        pos = self.epoch + self._fgd_iter / nb  # epochs done, fractional
        warmup, decay = float(self.fgd_cfg["warmup"]), float(self.fgd_cfg.get("decay") or 0)
        scale = min(1.0, pos / warmup) if warmup > 0 else 1.0
        if decay > 0:
            t = min(max((pos - (self.epochs - decay)) / decay, 0.0), 1.0)
            scale *= 0.5 * (1.0 + math.cos(math.pi * t))
        return scale

    LOG_EVERY = 25  # batches between gradient-norm measurements (two extra backward passes each)

    @staticmethod
    def _fgd_epoch_start(trainer):
        trainer._fgd_iter = 0
        trainer._fgd_stats = {"levels": 0.0, "n": 0, "share": [], "mult": trainer.fgd_mult}

    def fgd_observe(self, det_loss, fgd_loss, out):
        """Per-level sums every batch (no host sync); every LOG_EVERY batches the FGD/detection gradient-norm ratio
        on the student's parameters, which also drives ``fgd_share`` balancing."""
        st = self._fgd_stats
        if st is None or not det_loss.requires_grad:
            return
        st["levels"] = st["levels"] + out["levels"]
        st["n"] += 1
        self._fgd_steps += 1
        if (self._fgd_steps - 1) % self.LOG_EVERY or self.world_size > 1 or not fgd_loss.requires_grad:
            return
        params = [p for p in unwrap_model(self.model).parameters() if p.requires_grad]
        g_det = torch.autograd.grad(det_loss, params, retain_graph=True, allow_unused=True)
        g_fgd = torch.autograd.grad(fgd_loss, params, retain_graph=True, allow_unused=True)
        norm = lambda gs: torch.linalg.vector_norm(torch.stack([g.float().norm() for g in gs if g is not None]))
        ratio = float(norm(g_fgd) / norm(g_det).clamp(min=1e-12))
        st["share"].append(ratio)
        target, warm = float(self.fgd_cfg.get("share") or 0), self.fgd_scale()
        if target > 0 and ratio > 0 and warm > 0:
            # ratio = warm * mult * r0 (r0: ratio at unit weight); aim mult * r0 = target so that the share follows the
            # warm-up ramp up to `target`, moving half-way in log space each measurement
            want = target * self.fgd_mult * warm / ratio
            self.fgd_mult = float(min(max((self.fgd_mult * want) ** 0.5, 1e-6), 1e6))

    def fgd_epoch_metrics(self) -> dict:
        """Columns added to results.csv: per-level FGD (epoch mean), gradient-norm ratio, warm-up and share factors."""
        st = self._fgd_stats or {"levels": 0.0, "n": 0, "share": [], "mult": self.fgd_mult}
        n = max(st["n"], 1)
        levels = (st["levels"] / n).tolist() if torch.is_tensor(st["levels"]) else [0.0] * len(self.fgd.levels)
        cols = {f"fgd/P{i + 3}": round(float(v), 6) for i, v in enumerate(levels)}
        share = st["share"]
        cols["fgd/grad_ratio"] = round(sum(share) / len(share), 6) if share else 0.0
        cols["fgd/scale"] = round(self.fgd_scale(), 6)
        cols["fgd/mult"] = round(self.fgd_mult, 6)
        skipped = int(st.get("skipped", 0))
        cols["fgd/skipped"] = skipped
        if skipped:
            LOGGER.warning(f"FGD: {skipped} batch(es) this epoch had non-finite features or distillation loss; their "
                           "distillation contribution was dropped")
        return cols

    def save_metrics(self, metrics):
        super().save_metrics({**metrics, **self.fgd_epoch_metrics()})

    def fgd_loss(self, student_out, batch) -> dict:
        """FGD over all levels for one batch -> dict total (scaled), fg, bg, at, gl (weighted, detached), and with
        ``fgd_kd_cls``/``fgd_kd_box`` > 0 also kd (scaled response distillation, :func:`~yolo_fgd.loss.head_kd`).
        ``student_out``: the student's raw training outputs (:func:`train_outputs`)."""
        img = batch["img"]
        student_feats = student_out["feats"]
        kd_cls, kd_box = float(self.fgd_cfg["kd_cls"]), float(self.fgd_cfg["kd_box"])
        with torch.no_grad(), torch.autocast(img.device.type, enabled=False):
            teacher_feats = neck_features(self.teacher, img.float())
        xywh = batch["bboxes"].to(img.device).float()
        boxes = torch.cat([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1)
        # A non-finite feature must not reach the weights: such a batch gets zero FGD features and teacher outputs
        # (so finite losses with exactly zero gradient, `where` selects rather than multiplies) and is counted.
        # No host sync.
        ok = torch.stack([torch.isfinite(f).all() for f in (*student_feats, *teacher_feats)]).all()
        student_feats = [torch.where(ok, f, torch.zeros_like(f)) for f in student_feats]
        teacher_feats = [torch.where(ok, f, torch.zeros_like(f)) for f in teacher_feats]
        with torch.no_grad(), torch.autocast(img.device.type, enabled=False):  # on the sanitised features
            teacher_out = head_outputs(self.teacher, teacher_feats) if kd_cls or kd_box else None
        if self.fgd_on:
            out = self.fgd(student_feats, teacher_feats, boxes, batch["batch_idx"].to(img.device).view(-1))
        else:  # FGD weight 0 (e.g. the shipped preset, head response only): skip its work, keep the columns
            z = img.new_zeros(())
            out = {"total": z, "fg": z, "bg": z, "attention": z, "global": z,
                   "levels": img.new_zeros(len(self.fgd.levels))}
        warm = self.fgd_scale()
        s = warm * self.fgd_mult
        total = out["total"] * s
        kd = None
        if teacher_out is not None:
            terms = head_kd(student_out["scores"], teacher_out["scores"], student_out["boxes"], teacher_out["boxes"],
                            *self.box_bins)
            kd = (kd_cls * terms["cls"] + kd_box * terms["box"]) * warm
            ok = ok & torch.isfinite(kd)
        ok = ok & torch.isfinite(total)
        if self._fgd_stats is not None:
            self._fgd_stats["skipped"] = self._fgd_stats.get("skipped", 0) + (~ok).int()
        result = {
            "total": torch.where(ok, total, torch.zeros_like(total)),
            "fg": out["fg"] * s,
            "bg": out["bg"] * s,
            "at": out["attention"] * s,
            "gl": out["global"] * s,
            "levels": out["levels"] * s,
        }
        if kd is not None:
            result["kd"] = torch.where(ok, kd, torch.zeros_like(kd))
        return result

    # --- Ultralytics plumbing ---------------------------------------------------------------------------------
    def get_validator(self):
        """The stock validator, given only Ultralytics' own args (it rejects unknown keys)."""
        args = get_cfg({k: v for k, v in vars(self.args).items() if k in DEFAULT_CFG_DICT})
        return DetectionValidator(self.test_loader, save_dir=self.save_dir, args=args, _callbacks=self.callbacks)

    def _handle_nan_recovery(self, epoch):
        """Ultralytics reloads the student, optimiser and EMA from last.pt; reload the FGD modules from their sidecar
        too, so student and FGD state come from the same epoch."""
        recovered = super()._handle_nan_recovery(epoch)
        sidecar = self.wdir / SIDECAR
        if recovered and self.fgd is not None and sidecar.is_file():
            self.load_sidecar(sidecar)
        return recovered

    def load_sidecar(self, path):
        """Restore the FGD modules and the share multiplier from ``fgd_last.pt``."""
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.fgd.load_state_dict(state["fgd"])
        self.fgd_mult = float(state.get("mult", 1.0))

    def save_model(self):
        """Ultralytics' checkpoints (student only) plus the FGD modules in ``fgd_last.pt``, every file written to a
        temporary name and renamed, so a kill never leaves a half-written checkpoint."""
        final = {"last": self.last, "best": self.best}
        self.last, self.best = (p.with_name(f".{p.name}.tmp") for p in (final["last"], final["best"]))
        try:
            saved = super().save_model()
        finally:
            for key, path in final.items():
                tmp = getattr(self, key)
                if tmp.exists():
                    os.replace(tmp, path)
            self.last, self.best = final["last"], final["best"]
        if saved and self.fgd is not None:
            tmp = self.wdir / f".{SIDECAR}.tmp"
            torch.save({"fgd": self.fgd.state_dict(), "mult": self.fgd_mult, "epoch": self.epoch}, tmp)
            os.replace(tmp, self.wdir / SIDECAR)
        return saved
