"""Plans: parsing, validation, stage order, budgets and the registry."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from tokenreduce.adapters.llava.zoo import build_llava

import tokenreduce as tr
from tokenreduce.merge import AIMMerge
from tokenreduce.prune import Pool, RandomDrop


def test_parse_round_trip():
    plan = tr.Plan.parse("aim-merge(keep=0.25, weighted=True) + random(tokens=10, seed=3)+pool(keep=.5)")
    assert [type(r) for r in plan.reducers] == [AIMMerge, RandomDrop, Pool]
    assert plan.reducers[0].keep == 0.25 and plan.reducers[0].weighted is True
    assert plan.reducers[1].tokens == 10 and plan.reducers[1].seed == 3
    assert str(plan) == "aim-merge(keep=0.25, weighted=True)+random(tokens=10, seed=3)+pool(keep=0.5)"
    assert str(tr.Plan.parse(str(plan))) == str(plan)


@pytest.mark.parametrize("text", ["", "none", "  none "])
def test_empty_plans(text):
    assert len(tr.Plan.parse(text)) == 0


def test_bare_words_are_strings_or_bools():
    assert tr.Plan.parse("aim-merge(keep=0.5, weighted=true)").reducers[0].weighted is True


@pytest.mark.parametrize(
    "text, match",
    [
        ("aim-merg(keep=0.5)", r"unknown reducer 'aim-merg'; did you mean aim-merge"),
        ("nope", r"unknown reducer 'nope'"),
        ("aim-merge(keep=", r"unbalanced parentheses"),
        ("aim-merge(keep=0.5))", r"unbalanced '\)'"),
        ("aim-merge(keep=0.5)+", r"empty entry"),
        ("aim-merge(0.5)", r"arguments must be named"),
        ("aim-merge(kep=0.5)", r"unknown parameter\(s\) kep; known: frames, keep, metric, order, tokens, weighted"),
        ("aim-merge(keep=0.5 0.2)", r"cannot parse arguments"),
        ("aim-merge(keep=[1, 2][0])", r"not a literal"),
        ("9abc", r"cannot parse plan entry 1"),
        ("pool(keep=0.5, tokens=3)", r"either tokens= or keep=, not both"),
        ("pool", r"a budget is required"),
        ("pool(keep=0)", r"keep= must be in \(0, 1\], got 0"),
        ("pool(keep=1.5)", r"keep= must be in \(0, 1\], got 1.5"),
        ("pool(keep=-0.2)", r"keep= must be in \(0, 1\]"),
        ("pool(tokens=0)", r"tokens= must be positive, got 0"),
        ("pool(tokens=-3)", r"tokens= must be positive"),
        ("pool(tokens=2.5)", r"tokens= must be an integer, got 2.5"),
        ("pool(keep='half')", r"keep= must be a number"),
        ("random(keep=0.5, seed=1.5)", r"seed= must be an integer"),
    ],
)
def test_bad_plans_say_what_is_wrong(text, match):
    with pytest.raises(tr.TokenReduceError, match=match):
        tr.Plan.parse(text)


def test_plan_rejects_non_reducers():
    with pytest.raises(tr.PlanError, match="plan entry 0 is str"):
        tr.Plan(["pool"])


@dataclass
class _PrefillProbe(tr.Reducer):
    name = "probe-prefill"
    stage = tr.Stage.PREFILL
    summary = "test-only"


def test_stage_order_is_validated():
    with pytest.raises(tr.PlanError, match=r"probe-prefill \(prefill\) .*cannot|stage order"):
        tr.Plan([_PrefillProbe(), Pool(keep=0.5)])
    tr.Plan([Pool(keep=0.5), _PrefillProbe()])  # the right order is fine


@dataclass
class _FramesProbe(tr.Reducer):
    name = "probe-frames"
    stage = tr.Stage.FRAMES
    summary = "test-only"


def test_adapter_refuses_a_stage_it_cannot_serve():
    model = build_llava("tiny")
    with pytest.raises(tr.UnsupportedModelError, match="probe-frames runs at the frames stage"):
        tr.attach(model, tr.Plan([_FramesProbe()]))
    assert "forward" not in model.__dict__  # nothing was installed


def test_a_prefill_entry_must_be_a_prefill_reducer():
    model = build_llava("tiny")
    with pytest.raises(tr.PlanError, match="probe-prefill.*not a PREFILL reducer"):
        tr.attach(model, tr.Plan([_PrefillProbe()]))
    assert "forward" not in model.__dict__  # nothing was installed


def test_registry_lists_builtin_reducers_in_stage_order():
    names = tr.reducers()
    assert {"aim-merge", "random", "pool"} <= set(names)
    stages = [cls.stage for cls in names.values()]
    assert stages == sorted(stages)
    for cls in names.values():
        assert cls.summary and cls.__doc__


def test_register_reducer_rejects_name_clash():
    @dataclass
    class Clash(tr.Reducer):
        name = "pool"

    with pytest.raises(ValueError, match="already taken"):
        tr.register_reducer(Clash)


@pytest.mark.parametrize(
    "total, counts",
    [(7, [3, 3, 3]), (10, [64, 128, 64]), (3, [5, 5, 5, 5, 5]), (1, [4, 4]), (0, [4, 4]), (12, [4, 4, 4]),
     (100, [196] * 32), (31, [196] * 32), (5, [0, 10, 3])],
)
def test_split_budget_sums_exactly(total, counts):
    shares = tr.split_budget(total, counts)
    assert sum(shares) == total
    assert all(0 <= s <= c for s, c in zip(shares, counts))
    if total >= sum(c > 0 for c in counts):
        assert all(s >= 1 for s, c in zip(shares, counts) if c > 0)
    # proportional: no share is more than one token away from its exact share (beyond the floor of 1)
    n = sum(counts)
    for s, c in zip(shares, counts):
        assert abs(s - total * c / n) <= 1 + 1e-9 or s == 1


def test_split_budget_rejects_impossible():
    with pytest.raises(tr.BudgetError, match="larger than the 8 tokens"):
        tr.split_budget(9, [4, 4])


def test_keep_fraction_rounds_and_never_empties():
    assert Pool(keep=0.25).budget(64) == 16
    assert Pool(keep=0.11).budget(576) == 63
    assert Pool(keep=0.001).budget(64) == 1
    with pytest.raises(tr.BudgetError, match="tokens=65 is larger than the 64"):
        Pool(tokens=65).budget(64)
