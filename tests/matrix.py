"""The reducer matrix: how the oracle tests run every registered reducer, in one table.

The oracle tests parametrise over the registry itself (`names(Stage.VISUAL)`, ...), and look each reducer's
plans up here; `test_plan.py::test_every_registered_reducer_is_in_the_matrix` fails when a registered reducer
has no entry. A new reducer is covered by adding one line to `MATRIX`.

Plans are written for the tiny test models (2-4 decoder layers): "{keep}" is replaced by the fraction of the
visual tokens a VISUAL reducer keeps.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

import tokenreduce as tr


@dataclass(frozen=True)
class Case:
    """How to test one reducer.

    Attributes:
        reduce: a plan that really reduces (VISUAL: to about "{keep}" of the tokens).
        keep_all: a plan with this reducer that keeps every token (bit-identical to the stock model), or None.
        cls: the reducer scores tokens by the vision tower's CLS attention (refused on towers without one).
        exact: a VISUAL reducer that keeps exactly round(keep * tokens) tokens (per sample).
        tower: the reducer changes tokens inside the vision tower (refused where the model pools after it).
    """

    reduce: str
    keep_all: str | None
    cls: bool = False
    exact: bool = True
    tower: bool = False

    def plan(self, keep: float = 0.25) -> str:
        return self.reduce.format(keep=keep)


MATRIX: dict[str, Case] = {
    "aim-merge": Case("aim-merge(keep={keep})", "aim-merge(keep=1.0)"),
    "random": Case("random(keep={keep})", "random(keep=1.0)"),
    "pool": Case("pool(keep={keep})", "pool(keep=1.0)"),
    "hired": Case("hired(keep={keep})", "hired(keep=1.0)", cls=True),
    "quota": Case("quota(keep={keep}, scorer='uniform', resize='pool')", "quota(keep=1.0, scorer='uniform')"),
    "mustdrop-vision": Case("mustdrop-vision(threshold=0.3)", "mustdrop-vision(threshold=1.01)", cls=True,
                            exact=False, tower=True),
    "mustdrop": Case("mustdrop(layers=[1], global_thr=0.02, individual_thr=0.05, threshold=0.3)", None, cls=True,
                     exact=False, tower=True),
    "stc-prune": Case("stc-prune(keep={keep})", "stc-prune(keep=1.0)"),
    "stc-cache": Case("stc-cache(ratio=0.25)", None),
    "aim-prune": Case("aim-prune(start=1, step=0.25)", None),
    "mustdrop-prefill": Case("mustdrop-prefill(layers=[1], global_thr=0.035, individual_thr=0.5)",
                             "mustdrop-prefill(layers=[1], global_thr=0, individual_thr=0)"),
    "mustdrop-decode": Case("mustdrop-prefill(layers=[1], global_thr=0.035, individual_thr=0.5)+mustdrop-decode",
                            "mustdrop-prefill(layers=[1], global_thr=0, individual_thr=0)+mustdrop-decode"),
}


def case(name: str) -> Case:
    if name not in MATRIX:
        pytest.fail(f"reducer {name!r} is registered but has no entry in tests/matrix.py MATRIX: add one")
    return MATRIX[name]


def names(*stages: tr.Stage, fast: tuple[str, ...] | None = None, **flags: bool) -> list:
    """Registered reducers acting at `stages` (their stage as registered), optionally filtered by `Case` flags.

    With `fast`, the names not in `fast` are marked slow: `pytest -m "not slow"` runs one representative,
    CI runs them all.
    """
    out = []
    for name, cls in tr.reducers().items():
        if cls.stage not in stages:
            continue
        c = MATRIX.get(name)
        if c is not None and any(getattr(c, k) != v for k, v in flags.items()):
            continue
        slow = fast is not None and name not in fast
        out.append(pytest.param(name, marks=pytest.mark.slow) if slow else name)
    return out
