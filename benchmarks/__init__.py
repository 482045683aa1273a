"""pixcon's benchmark suite: ``python -m benchmarks`` (see suite.py)."""
