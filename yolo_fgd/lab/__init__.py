"""The experiment lab: the study (``study``), the demo (``demo``), probes of what a student learned (``probes``:
attention maps, imitation reach) and cost benchmarks (``cost``: loss, training step, memory soak)."""
