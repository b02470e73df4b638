"""Benchmark: time to first token and peak memory, unreduced vs reduced, in one process."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="bench.json")


def main(args: argparse.Namespace) -> int:
    raise SystemExit("tokenreduce bench: being written")
