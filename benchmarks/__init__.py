"""pixcon's benchmark suite: ``python -m benchmarks`` (see suite.py)."""
import pixcon  # noqa: F401  (first, before torch: it sets OpenMP's wait policy for our programs)
