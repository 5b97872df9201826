"""Pure helpers of ``benchmarks/rim_benchmark.py``: data loaders, the eval-point schedule and
in-process evaluation, the correlation and target analysis, plots and the Markdown report.

Kept importable without the benchmark's optional extras (``safety_compass`` is imported lazily),
so ``tests/test_benchmark_pieces.py`` can exercise each piece on tiny models.
"""
