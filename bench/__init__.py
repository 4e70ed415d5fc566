"""Benchmark scripts (run from the repository root as `python -m bench.<name>`); not part of the package."""
