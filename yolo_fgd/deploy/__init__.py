"""Deployment: ONNX export with parity (``export``, ``tv_export``, ``parity``), INT8, evaluation of deployed models
(``evaluate``), the latency/accuracy benchmark (``benchmark``) and the torch-free edge runner (``edge``, a single
file to copy to the device; it imports nothing from this package)."""
