"""Benchmarks (``make bench``): numbers for closing notes, never part of ``make test``."""
