"""Errors the evaluation and benchmark harness raises for bad arguments or data; the CLI prints them as one line."""

from __future__ import annotations


class EvalError(Exception):
    """A bad harness argument (a budget list, a preset, a flag combination) or unusable benchmark data."""
