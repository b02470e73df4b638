"""Errors raised for bad input. Every message names the parameter or input at fault."""

from __future__ import annotations


class TokenReduceError(ValueError):
    """Base class of every error tokenreduce raises on purpose."""


class PlanError(TokenReduceError):
    """A plan string that does not parse, an unknown reducer, a bad hyperparameter or stage order."""


class BudgetError(PlanError):
    """A token budget that cannot be met: larger than the tokens, zero, negative or of the wrong type.

    A kind of `PlanError` (a budget is a plan's hyperparameter), so ``except PlanError`` catches every
    problem with a plan string."""


class UnsupportedModelError(TokenReduceError):
    """A model with no adapter, or a reducer the model's adapter cannot serve."""


class InputError(TokenReduceError):
    """Model inputs that do not fit together (placeholders vs images, unsupported keyword arguments)."""
