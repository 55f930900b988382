"""Benchmarks: each runs a baseline and a candidate side by side in one invocation and reports ratios."""
