"""The one definition of FGD (:func:`.reference.weighted`, Eq. 9-13) made fast by ``torch.compile`` (Inductor:
fused C++ loops on CPU, Triton kernels on CUDA), with the eager definition wherever the compiler cannot serve.

``YOLO_FGD_KERNEL=eager`` (or ``reference``) runs the eager definition; the default, ``compile``, compiles it at the
first call (about a minute on a 2-core CPU, seconds with a warm cache: Inductor keeps its compiled code under
``$TORCHINDUCTOR_CACHE_DIR``, by default ``/tmp/torchinductor_$USER``, and a later process finds it there). A compiler
that fails (no C++ compiler, an unsupported platform, an Inductor error) logs one warning and the eager definition
runs for the rest of the process; values and gradients are the same up to rounding.

Recompilation: the GcBlocks' weights fix each level's width, so each level has its own graph; a level whose height
and width change (multi-scale training, ``rect`` batches, the smaller last batch) is recompiled once with dynamic
sizes (Dynamo's automatic dynamic shapes) and then serves every size; a new batch size, once, likewise (a batch of
one is always a graph of its own). At most 3 graphs per level + 1 (``tests/test_compile.py`` counts them);
:data:`RECOMPILE_LIMIT` leaves room for ten levels (fp32 only: the loss always computes in fp32).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

import torch
import torch._functorch.config as aot_config

from ..errors import first_line
from . import reference

__all__ = ["BACKEND", "MODES", "RECOMPILE_LIMIT", "compiled", "level_terms", "mode", "using"]

LOG = logging.getLogger("ultralytics")  # Ultralytics' LOGGER, without importing Ultralytics into the core
MODES = {"compile": "compile", "auto": "compile", "eager": "eager", "reference": "eager", "torch": "eager"}
RECOMPILE_LIMIT = 32
BACKEND = "inductor"  # torch.compile's backend (a test counts the graphs with its own)
_compiled: dict = {}  # backend -> compiled function
_failed: list[str] = []  # the first compiler failure of this process: the eager definition runs from then on


def mode() -> str:
    """``compile`` or ``eager``, from ``YOLO_FGD_KERNEL`` (``compile`` when unset or unknown)."""
    return MODES.get(os.environ.get("YOLO_FGD_KERNEL", "compile").strip().lower(), "compile")


@contextmanager
def using(kernel: str):
    """``YOLO_FGD_KERNEL=kernel`` for the block (benchmarks that time both paths in one process)."""
    old = os.environ.get("YOLO_FGD_KERNEL")
    os.environ["YOLO_FGD_KERNEL"] = kernel
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("YOLO_FGD_KERNEL", None)
        else:
            os.environ["YOLO_FGD_KERNEL"] = old


def compiled(backend=None):
    """:func:`.reference.weighted` compiled with ``backend`` (:data:`BACKEND` when None; once per process and
    backend). Sets two process-wide compiler options: Dynamo's recompile limit to at least :data:`RECOMPILE_LIMIT`
    and AOT autograd's buffer donation off."""
    backend = backend or BACKEND
    if backend not in _compiled:
        import torch._dynamo

        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
        # no donated buffers (process-wide, read when a graph compiles and again at its backward): the distiller's
        # gradient-share probe backpropagates through the loss with retain_graph=True before the step's backward
        aot_config.donated_buffer = False
        _compiled[backend] = torch.compile(reference.weighted, backend=backend)
    return _compiled[backend]


def level_terms(fs, ft, mask_fg, mask_bg, gc_s, gc_t, weights, temperature, spatial=True, channel=True):
    """:func:`.reference.weighted` (the (4,) weighted terms of one level, Eq. 13), compiled unless ``mode()`` is
    ``eager`` or the compiler failed earlier in this process."""
    args = (fs, ft, mask_fg, mask_bg, gc_s, gc_t, weights, temperature, spatial, channel)
    if mode() == "eager" or _failed:
        return reference.weighted(*args)
    try:
        return compiled()(*args)
    except Exception as e:  # the compiler's failure, whatever its kind: the eager definition is the same loss
        _failed.append(f"{type(e).__name__}: {first_line(e)}")
        LOG.warning(f"yolo-fgd: torch.compile could not compile the FGD loss ({_failed[0]}); the eager loss runs "
                    "instead (same values, slower). YOLO_FGD_KERNEL=eager skips the compiler.")
        return reference.weighted(*args)
