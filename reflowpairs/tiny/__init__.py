"""Tiny offline teachers and worlds for tests, demos and benchmarks (``eo1``: a tiny EO-1 teacher)."""
