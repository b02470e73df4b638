"""The reducer matrix (tests/matrix.py) covers every registered reducer, and each entry is a valid plan."""

from __future__ import annotations

from matrix import MATRIX

import tokenreduce as tr


def test_every_registered_reducer_is_in_the_matrix():
    """A reducer registered without a line in tests/matrix.py would miss the oracles silently: fail instead."""
    missing = sorted(set(tr.reducers()) - set(MATRIX))
    assert not missing, f"registered reducers with no entry in tests/matrix.py MATRIX: {missing}"
    stale = sorted(set(MATRIX) - set(tr.reducers()))
    assert not stale, f"tests/matrix.py MATRIX names reducers that are not registered: {stale}"


def test_matrix_plans_parse_and_use_their_reducer():
    for name, case in MATRIX.items():
        for text in (case.plan(0.25), case.keep_all):
            if text is None:
                continue
            plan = tr.Plan.parse(text)
            assert any(r.name == name or name.startswith(r.name) or r.name.startswith(name) for r in plan.reducers), \
                (name, text)
