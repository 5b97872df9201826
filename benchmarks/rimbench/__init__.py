"""Pure helpers of the benchmarks (``benchmarks/rim_study.py`` and the cost benchmarks): data loaders and
training-data conditions, the baselines a practitioner would use instead, trainer callbacks, the
statistics and the study's analysis. ``safety_compass`` (the peer) is imported lazily, so the tests can
exercise each piece on tiny models without it.
"""
