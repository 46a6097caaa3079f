"""Metrics and what is computed from per-image values: regions, worst case, statistics, comparisons."""
