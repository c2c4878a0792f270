"""The torchvision adapter (RetinaNet/FCOS, the paper's setting), split as torchvision's ``references/detection``:
``models`` (factory, inheriting), ``distiller``, ``coco_utils`` (data), ``engine`` (one epoch, COCO evaluation),
``train`` (the entry point; ``python -m yolo_fgd.tv`` under torchrun)."""
