"""Benchmarks at real sizes: synthetic full-size ORIGINAL checkpoints (``bench.make_checkpoint``), the upstream
one-shot conversion restated as a baseline (``bench.baseline``) and the timing harness (``bench.run``)."""
