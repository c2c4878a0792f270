"""``yolo-fgd attention``: spatial and channel attention (Eq. 5-8) of teacher, baseline and FGD student on an image
(paper Fig. 1 and 5). Writes one PNG: a row per model, a column per Detect level (spatial attention over the image),
and a last column with the channel attention of the middle level."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from .edge import blob
from .errors import FGDError
from .loss import attention
from .trainer import load_teacher, neck_features


def attention_maps(model: str, teacher: str, source: str, baseline: str | None = None, imgsz: int = 640,
                   temperature: float = 0.5, out: str | None = None) -> Path:
    img = cv2.imread(str(source)) if Path(str(source)).is_file() else None
    if img is None:
        raise FGDError(f"source '{source}' is not a readable image: pass source=path/to/image.jpg")
    x, _, _ = blob(img, (imgsz, imgsz))
    t = torch.from_numpy(x)
    rgb = (x[0].transpose(1, 2, 0) * 255).astype(np.uint8)
    models = [("teacher", teacher)] + ([("baseline", baseline)] if baseline else []) + [("FGD student", model)]
    rows = []
    for label, path in models:
        net = load_teacher(path, "cpu")  # any detection checkpoint: frozen, fp32, eval
        with torch.no_grad():
            feats = neck_features(net, t)
        rows.append((label, [attention(f, temperature) for f in feats]))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nl = len(rows[0][1])
    fig, axes = plt.subplots(len(rows), nl + 1, figsize=(3.2 * (nl + 1), 3.0 * len(rows)), squeeze=False)
    for r, (label, atts) in enumerate(rows):
        for lvl, (a_s, _) in enumerate(atts):
            ax = axes[r, lvl]
            heat = cv2.resize(a_s[0].numpy(), (imgsz, imgsz), interpolation=cv2.INTER_NEAREST)
            ax.imshow(rgb)
            ax.imshow(heat, cmap="jet", alpha=0.5)
            ax.set_title(f"{label}: spatial P{lvl + 3}", fontsize=8)
            ax.axis("off")
        a_c = atts[min(1, nl - 1)][1][0].numpy()
        ax = axes[r, nl]
        ax.bar(np.arange(len(a_c)), a_c, width=1.0)
        ax.set_title(f"{label}: channel P{min(1, nl - 1) + 3} ({len(a_c)} ch)", fontsize=8)
    fig.tight_layout()
    dst = Path(out) if out else Path("runs") / "attention" / f"{Path(str(source)).stem}_attention.png"
    dst.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(dst, dpi=110)
    plt.close(fig)
    print(dst)
    return dst
