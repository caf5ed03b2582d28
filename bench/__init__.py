"""Benchmarks: each `python -m bench.<name>` writes bench/results/<name>.json and .md (figures, not tests)."""
