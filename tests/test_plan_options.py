"""Plan options: " @positions" is part of the plan (Plan.parse, str(plan), attach), not an eval-only suffix."""

from __future__ import annotations

import pytest
import torch
from tokenreduce.adapters.llava.zoo import build_llava

import tokenreduce as tr


@pytest.mark.parametrize("text", ["pool(tokens=16) @positions", "none @positions", "hired(keep=0.25)@positions",
                                  "aim-merge(keep=0.5)+aim-prune @positions"])
def test_positions_option_parses_prints_and_reparses(text):
    plan = tr.Plan.parse(text)
    assert plan.keep_positions
    assert str(plan).endswith(" @positions")
    again = tr.Plan.parse(str(plan))
    assert again == plan and str(again) == str(plan)


def test_at_signs_inside_arguments_are_not_options():
    plan = tr.Plan.parse("quota(keep=0.5, prompt='ask @positions or mail a@b {query}')")
    assert not plan.keep_positions and "@positions" in plan.reducers[0].prompt
    assert tr.Plan.parse(str(plan)) == plan


@pytest.mark.parametrize("text, match", [("pool(keep=0.5) @where", "unknown plan option @where"),
                                         ("pool(keep=0.5) @positions @positions", "twice"),
                                         ("@positions pool(keep=0.5)", "at the end"),
                                         ("pool(keep=0.5) @positions+random(keep=0.5)", "at the end")])
def test_bad_options_are_plan_errors(text, match):
    with pytest.raises(tr.PlanError, match=match):
        tr.Plan.parse(text)


def test_attach_reads_the_option_and_its_argument_overrides_it(processor, single_inputs):
    model = build_llava("tiny", seed=0)
    with torch.no_grad(), tr.apply(model, "random(keep=0.25, seed=1) @positions") as h:
        a = model(**single_inputs).logits
    assert h.keep_positions
    with torch.no_grad(), tr.apply(model, "random(keep=0.25, seed=1)", keep_positions=True):
        b = model(**single_inputs).logits
    with torch.no_grad(), tr.apply(model, "random(keep=0.25, seed=1) @positions", keep_positions=False) as h:
        c = model(**single_inputs).logits
    assert not h.keep_positions
    assert torch.equal(a, b) and not torch.allclose(a, c, atol=1e-3)
