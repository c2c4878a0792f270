"""``DistillTrainer`` (``FGDTrainer`` of earlier releases): Ultralytics' trainer with a model-side :class:`~yolo_fgd.yolo.distiller.Distiller`, as small
overrides of named hooks.

The student stays a plain Ultralytics model: its criterion is wrapped for training only, the distiller's modules join
the optimiser and are saved in a sidecar ``fgd_last.pt`` next to ``last.pt``. The teacher is loaded from its path on
every rank. Checkpoints hold only the student, so they load with plain ``YOLO("best.pt")`` and
``ULTRALYTICS_SAFE_LOAD=1``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from ultralytics.cfg import get_cfg
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.models.yolo.obb import OBBTrainer
from ultralytics.models.yolo.pose import PoseTrainer
from ultralytics.models.yolo.segment import SegmentationTrainer
from ultralytics.utils import DEFAULT_CFG, DEFAULT_CFG_DICT, LOGGER, RANK, YAML, colorstr
from ultralytics.utils.torch_utils import unwrap_model

from ..core.presets import ARGS, KEYS, arg_name, renamed, resolve, schedule_scale
from ..errors import FGDError
from .distiller import DistillCriterion, Distiller
from .model import check_names, check_task, checkpoint, checkpoint_file, load_model

SIDECAR = "fgd_last.pt"


class DistillMixin:
    """The distillation hooks, for any Ultralytics trainer of a Detect-family head (the detection one is
    ``DistillTrainer``). Train args: Ultralytics' plus :data:`yolo_fgd.core.presets.ARGS` (``teacher``, ``distill_preset``, ``fgd_*``,
    ``kd_cls``, ``kd_box``)."""

    task_name: str | None = None  # the task of the trainer it is mixed into (its teacher must have it)

    def __init__(self, cfg=DEFAULT_CFG, overrides=None, _callbacks=None):
        cfg = {**ARGS, **renamed(vars(cfg) if not isinstance(cfg, dict) else cfg)}
        overrides = renamed(dict(overrides or {}))
        repoint = overrides.pop("teacher", None) if overrides.get("resume") else None
        if not overrides.get("resume"):  # every check before Ultralytics makes the run folder (and prints its banner)
            self._check({**cfg, **overrides})
            self._check_teacher({**cfg, **overrides})
        super().__init__(cfg, overrides, _callbacks)
        try:
            self._init_distill(repoint)
        except BaseException:
            if not self.resume:
                discard_run(self.save_dir)  # the folder Ultralytics just made for this run
            raise

    def _init_distill(self, repoint) -> None:
        """The distillation half of ``__init__``, once Ultralytics' trainer exists (its run folder made)."""
        if repoint:
            self.args.teacher = repoint  # a resumed run may re-point its teacher
        self._check(vars(self.args))
        # absolute: a resume from another folder finds the teacher the run was trained with
        self.args.teacher = str(Path(checkpoint(self.args.teacher)).resolve())
        self.distill_cfg = resolve(self.args)
        for k in KEYS:  # the values in force, not the nulls of "from the preset": the run reproduces from args.yaml
            setattr(self.args, arg_name(k), self.distill_cfg[k])
        if RANK in {-1, 0} and (self.save_dir / "args.yaml").is_file():
            YAML.save(self.save_dir / "args.yaml", vars(self.args))
        self.distiller = None
        self.batch_i = 0  # batches seen this epoch (schedule position)
        self.add_callback("on_train_epoch_start", DistillMixin._epoch_start)
        self.add_callback("on_train_end", lambda trainer: trainer.distiller and trainer.distiller.close())

    def _check(self, args: dict) -> None:
        """One-line errors for what cannot run: both distillers at once, no teacher, bad distillation values, the
        gradient-share balancing under DDP (it measures norms on one process)."""
        if args.get("distill_model"):
            raise FGDError(
                "teacher= and distill_model= both given: use yolo-fgd's teacher= for FGD, or plain `yolo train "
                "distill_model=` for Ultralytics' own distillation, not both"
            )
        if args.get("resume") and args.get("teacher") and not Path(checkpoint(args["teacher"])).is_file():
            raise FGDError(f"this run's teacher '{args['teacher']}' (its args.yaml) is not found from "
                           f"{Path.cwd()}: resume with teacher=path/to/the/teacher's/best.pt to re-point it")
        checkpoint_file(args.get("teacher"), "teacher")
        cfg = resolve(args)
        if cfg["lad"] and self.task_name == "obb":
            raise FGDError("lad=True: the OBB assigner reads rotated boxes, which LAD does not decode from the "
                           "teacher: leave lad out for an OBB student")
        devices = getattr(self, "world_size", None) or len(str(args.get("device") or "").split(","))
        if cfg["share"] > 0 and devices > 1:
            raise FGDError(f"fgd_share={cfg['share']} balances gradient norms measured on one process, not under DDP "
                           f"({devices} devices): train on one device or leave fgd_share out")

    def _check_teacher(self, args: dict) -> None:
        """The teacher's loading, task and classes (against a data YAML's names), as one line before Ultralytics
        starts; the strides are checked against the student once it is built (:func:`check_pair`)."""
        path = checkpoint(args["teacher"])
        teacher = load_model(path, "cpu")
        if self.task_name:
            check_task(teacher, self.task_name, path)
        data = args.get("data")
        if isinstance(data, str) and data.endswith((".yaml", ".yml")) and Path(data).is_file():
            names = (YAML.load(data) or {}).get("names")
            if names:
                check_names(teacher, names, path)

    def setup_model(self):
        ckpt = super().setup_model()
        self.distiller = Distiller(unwrap_model(self.model), self.args.teacher, self.distill_cfg, self.data["names"],
                                   self.device).to(self.device)
        self.distiller.world_size = self.world_size
        if self.resume:
            resumed = Path(self.args.resume if isinstance(self.args.resume, (str, Path)) else self.args.model)
            self._restore(sidecar_of(resumed), ckpt.get("epoch") if isinstance(ckpt, dict) else None)
        if RANK in {-1, 0}:
            LOGGER.info(f"{colorstr('distill:')} teacher {self.args.teacher}, {self.distiller.describe()}, "
                        f"{self.distill_cfg}")
        return ckpt

    def _setup_train(self):
        super()._setup_train()
        model = unwrap_model(self.model)
        base = model.criterion if getattr(model, "criterion", None) is not None else model.init_criterion()
        model.criterion = DistillCriterion(base, self.distiller)

    def build_optimizer(self, model, name="auto", lr=0.001, momentum=0.9, decay=1e-5, iterations=1e5):
        """Ultralytics' optimizer plus the distiller's modules (conv weights decayed, the rest not); their gradients
        are synchronised and clipped by :meth:`Distiller.before_step`."""
        optimizer = super().build_optimizer(model, name, lr, momentum, decay, iterations)
        params = list(self.distiller.named_parameters())
        if params:
            groups = {g.get("param_group"): g for g in optimizer.param_groups if not g.get("use_muon")}
            for kind, chosen in (("weight", [p for _, p in params if p.ndim > 1]),
                                 ("bias", [p for _, p in params if p.ndim <= 1])):
                template = {k: v for k, v in groups[kind].items() if k not in {"params", "initial_lr"}}
                optimizer.add_param_group({**template, "params": chosen})
            optimizer.register_step_pre_hook(self.distiller.before_step)
        return optimizer

    def preprocess_batch(self, batch):
        batch = super().preprocess_batch(batch)
        self.batch_i += 1
        self.distiller.scale = self.distill_scale()
        self.distiller.prefetch(batch["img"])  # the teacher's pass overlaps the student's forward (CPU)
        return batch

    def distill_scale(self) -> float:
        """:func:`~yolo_fgd.core.presets.schedule_scale` at this batch (``distill_warmup``, ``distill_decay``)."""
        nb = max(len(getattr(self, "train_loader", []) or []), 1)
        return schedule_scale(self.epoch + self.batch_i / nb, self.epochs, self.distill_cfg)

    @staticmethod
    def _epoch_start(trainer):
        trainer.batch_i = 0
        trainer.distiller.stats = trainer.distiller.new_stats()

    def save_metrics(self, metrics):
        cols = self.distiller.epoch_metrics()
        if self.distiller.stats["missed"]:
            LOGGER.warning(f"distill: {self.distiller.stats['missed']} batch(es) this epoch reached the model as other "
                           "pixels than the teacher's prefetch read; the teacher ran again on them")
        if cols["distill/skipped"]:
            LOGGER.warning(f"distill: {cols['distill/skipped']} batch(es) this epoch had non-finite features or "
                           "distillation loss; their distillation contribution was dropped")
        super().save_metrics({**metrics, **cols})

    def get_validator(self):
        """The task's stock validator, given only Ultralytics' own args (it rejects unknown keys)."""
        args = self.args
        self.args = get_cfg({k: v for k, v in vars(args).items() if k in DEFAULT_CFG_DICT})
        try:
            return super().get_validator()
        finally:
            self.args = args

    def _restore(self, sidecar: Path, epoch: int | None = None) -> None:
        """Restore the distiller's modules and share multiplier from the sidecar of the checkpoint resumed from
        (``fgd_last.pt`` for ``last.pt``, ``fgd_epochK.pt`` for ``epochK.pt``) when it was saved at the same
        ``epoch``, or say why not and start them fresh."""
        if not sidecar.is_file():
            if list(self.distiller.parameters()):
                LOGGER.warning(f"distill: {sidecar} not found, resuming with freshly initialised distiller modules")
            return
        state = torch.load(sidecar, map_location=self.device, weights_only=True)
        if epoch is not None and state.get("epoch") != epoch:
            LOGGER.warning(f"distill: {sidecar} is from epoch {state.get('epoch')}, the checkpoint from epoch {epoch} "
                           "(a run stopped between the two saves): resuming with freshly initialised distiller modules")
            return
        missing = self.distiller.load_sidecar(state)
        LOGGER.info(f"{colorstr('distill:')} restored the distiller's state from {sidecar}")
        if missing:
            LOGGER.warning(f"distill: {sidecar} holds no {'/'.join(missing)} modules (off before), starting them fresh")

    def _handle_nan_recovery(self, epoch):
        """Ultralytics reloads the student, optimiser and EMA from last.pt; reload the distiller from its sidecar
        too, so student and distiller state come from the same epoch."""
        recovered = super()._handle_nan_recovery(epoch)
        if recovered and self.distiller is not None:
            self._restore(self.wdir / SIDECAR)  # last.pt's own epoch: the sidecar saved with it
        return recovered

    def save_model(self):
        """Ultralytics' checkpoints (student only) plus the distiller's state in ``fgd_last.pt`` (when it has any),
        every file written to a temporary name and renamed, so a kill never leaves a half-written checkpoint, and the
        sidecar renamed first: a ``last.pt`` never exists without the distiller state of its epoch."""
        final = {"last": self.last, "best": self.best}
        self.last, self.best = (p.with_name(f".{p.name}.tmp") for p in (final["last"], final["best"]))
        sidecar = self.wdir / f".{SIDECAR}.tmp"
        if self.distiller is not None and list(self.distiller.parameters()):
            self.wdir.mkdir(parents=True, exist_ok=True)
            torch.save(self.distiller.sidecar(self.epoch), sidecar)
        try:
            saved = super().save_model()
        finally:
            if sidecar.exists():
                if self.last.exists():  # the student's checkpoint was written: its sidecar goes into place first
                    os.replace(sidecar, self.wdir / SIDECAR)
                else:
                    sidecar.unlink()
            for key, path in final.items():
                tmp = getattr(self, key)
                if tmp.exists():
                    os.replace(tmp, path)
            self.last, self.best = final["last"], final["best"]
        periodic = self.wdir / f"epoch{self.epoch}.pt"  # save_period's checkpoint: its own sidecar beside it
        if periodic.is_file() and (self.wdir / SIDECAR).is_file():
            shutil.copy2(self.wdir / SIDECAR, sidecar_of(periodic))
        return saved


def discard_run(save_dir) -> None:
    """Remove a run folder that holds no checkpoint (a run that failed before its first epoch was saved)."""
    save_dir = Path(save_dir)
    if save_dir.is_dir() and not any(save_dir.rglob("*.pt")):
        shutil.rmtree(save_dir, ignore_errors=True)


def sidecar_of(checkpoint: Path) -> Path:
    """The distiller's state saved with a student checkpoint: ``fgd_last.pt`` for ``last.pt``, ``fgd_epochK.pt`` for
    ``epochK.pt``."""
    return checkpoint.with_name(f"fgd_{checkpoint.name}")


class DistillTrainer(DistillMixin, DetectionTrainer):
    """DetectionTrainer with distillation from a frozen teacher (``teacher=path.pt``): the head response and CrossKD
    of the shipped preset, FGD on the Detect inputs with ``fgd_gain=0.05`` (or a paper preset).

    Example:
        >>> from ultralytics import YOLO
        >>> YOLO("yolo11n.yaml").train(trainer=DistillTrainer, teacher="teacher.pt", data="data.yaml", epochs=100)
    """

    task_name = "detect"


class SegmentDistillTrainer(DistillMixin, SegmentationTrainer):
    """SegmentationTrainer with distillation (a segmentation teacher: the response term adds its masks)."""

    task_name = "segment"


class PoseDistillTrainer(DistillMixin, PoseTrainer):
    """PoseTrainer with distillation (a pose teacher: the response term adds its keypoints)."""

    task_name = "pose"


class OBBDistillTrainer(DistillMixin, OBBTrainer):
    """OBBTrainer with distillation (an OBB teacher: the response term adds its angles; FGD's masks use each rotated
    box's axis-aligned hull)."""

    task_name = "obb"


# the names of earlier releases, when every trainer was named for FGD (the shipped default has no FGD term)
FGDTrainer, SegmentFGDTrainer, PoseFGDTrainer, OBBFGDTrainer = (DistillTrainer, SegmentDistillTrainer,
                                                                 PoseDistillTrainer, OBBDistillTrainer)
TRAINERS = {"detect": DistillTrainer, "segment": SegmentDistillTrainer, "pose": PoseDistillTrainer,
            "obb": OBBDistillTrainer}


def trainer_for(task: str) -> type:
    """The distillation trainer of a student's task, as ``yolo`` picks its trainer."""
    if task not in TRAINERS:
        raise FGDError(f"task '{task}' has no distillation trainer: use a detect, segment, pose or obb student")
    return TRAINERS[task]
