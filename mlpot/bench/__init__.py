"""Benchmarks (run from ``scripts/`` or ``python -m mlpot.bench.<name>``); never part of the tests."""
