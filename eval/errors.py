"""The error the evaluation harness raises for bad input (options, data folders, result folders).

It is a `tokenreduce.TokenReduceError`, so the command line prints it as one ``tokenreduce: error: ...`` line
and exits with status 2, without the harness knowing anything of the command line.
"""

from __future__ import annotations

from tokenreduce.errors import TokenReduceError


class EvalError(TokenReduceError):
    """Bad evaluation or benchmark input: an option (a budget list, a preset, a flag combination), a benchmark
    folder, a results folder that holds another run."""
