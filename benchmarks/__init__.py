"""pixcon's benchmark suite: ``python -m benchmarks`` (see suite.py)."""
import importlib

# pixcon first, before torch: it sets OpenMP's wait policy for our programs (pixcon/__init__.py)
importlib.import_module("pixcon")
