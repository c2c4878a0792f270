"""``torchrun --nproc_per_node N -m yolo_fgd.tv key=value ...``: distributed tv-train."""

import sys

from ..cfg import parse_kv
from .train import train

if __name__ == "__main__":
    train(**parse_kv(sys.argv[1:])[1])
