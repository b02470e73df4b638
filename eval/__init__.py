"""Evaluation and benchmarks (installed as `tokenreduce.eval`)."""
