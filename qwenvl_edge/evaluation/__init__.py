"""Judging a bundle: the quality report of ``qwenvl-edge eval`` (``evaluate``: vision rows, next-token KL and
task accuracy against a float reference) and the tiny model's synthetic task pictures (``task_images``), which
the demo, the training tools and the benchmarks draw too."""
