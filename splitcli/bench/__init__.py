"""Benchmarks: measured side by side in one run, medians of repeats, JSON out."""
