"""Evaluation: inference (whole / sliding window / multi-scale / flip), evaluate, metrics."""
