"""``yolo-fgd tv-train`` arguments and their defaults (FGD's own keys, ``fgd_*``, come on top: :data:`FGD_KEYS`);
configuration only, so the CLI checks them before it imports torchvision."""

from .distill import TV_KEYS

ARGS = {
    "arch": "retinanet", "teacher_backbone": "resnet101", "student_backbone": "resnet50", "teacher": None,
    "student_weights": None, "data": "shapes", "epochs": 24, "batch": 2, "lr": 0.01, "momentum": 0.9,
    "weight_decay": 1e-4, "warmup_iters": 500, "warmup_factor": 1e-3, "clip": 35.0, "min_size": [800],
    "max_size": 1333, "inherit": False, "hflip": 0.5, "workers": 0, "device": "cpu", "project": "runs/tv",
    "name": "train", "seed": 0, "resume": False, "fgd": True, "distill_preset": None, "eval_every": 1, "amp": False,
    "baseline": None, "check_teacher": True, "norm": None, "width": 256, "anchor": 32,
    "rois": 512,
}
HELP = {  # what `yolo-fgd tv-train help` says of an argument (the rest are torchvision's references/detection ones)
    "arch": "retinanet | fcos | faster_rcnn | mask_rcnn (these two: FPN P2-P6, the paper's two-stage setting)", "teacher_backbone": "teacher's ResNet (a checkpoint saved here brings its own)",
    "student_backbone": "student's ResNet", "teacher": "teacher checkpoint .pth (a plain tv-train run's model.pth)",
    "student_weights": "a local checkpoint to start the student from (frozen BN: the paper's ImageNet setting)",
    "min_size": "shorter side(s); several: multi-scale training, evaluation at the last",
    "inherit": "copy the teacher's FPN and head into the student (paper 4.2)",
    "fgd": "False: plain training (a teacher or the baseline; saves model.pth)",
    "distill_preset": "default: the architecture's paper preset (anchor_based, anchor_free, two_stage)",
    "eval_every": "epochs between COCO evaluations (and the last)",
    "baseline": "a plain student run (its folder or results.csv) the teacher must beat before FGD starts",
    "check_teacher": "score the teacher on the val split first (False skips it)",
    "norm": "backbone normalisation gn | bn | frozen_bn (default: frozen_bn with student_weights, gn from scratch)",
    "width": "FPN and head channels (the paper's 256)",
    "anchor": "anchor size on the first level: RetinaNet's P3, the two-stage RPN's P2 (torchvision's 32; 16 for "
              "objects of 8-60 px)",
    "rois": "two-stage: RoIs sampled per training image for the box head (torchvision's 512; 128 where images hold "
            "few objects, a quarter of the head's cost)",
}
FGD_KEYS = TV_KEYS  # the rows of the table of terms marked tv (cfg/distill.py)
