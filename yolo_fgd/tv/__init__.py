"""The torchvision adapter (RetinaNet, FCOS, Faster R-CNN, Mask R-CNN: the paper's detectors), split as torchvision's ``references/detection``:
``models`` (factory, inheriting), ``distiller``, ``coco_utils`` (data), ``engine`` (one epoch, COCO evaluation),
``train`` (the entry point; ``python -m yolo_fgd.tv`` under torchrun)."""
