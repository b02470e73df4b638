"""Property-based fuzzing of `Plan.parse`: any string either raises `PlanError` (one line, nothing else) or
gives a plan that prints to a string which parses back to the same plan."""

from __future__ import annotations

import dataclasses

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import tokenreduce as tr

REDUCERS = tr.reducers()
FIELDS = sorted({f.name for cls in REDUCERS.values() for f in dataclasses.fields(cls)})

#: fragments that broke the parser or its reducers once, or sit on an edge of the value grammar
TRICKY = ["inf", "-inf", "+inf", "nan", "-nan", "true", "FALSE", "none", "no", "'no'", "{[1]: 2}", "{1: 2}", "[]",
          "()", "[[1]]", "1e400", "-1e400", "-0.0", "2**64", "18446744073709551616", "1_000", "0x10", "1j", "...",
          "b'x'", "set()", "'a\\'b\"c'", "'+'", "'('", "f'x'", "lambda: 1", "__import__('os')", "[1, 2][0]",
          "-" * 300 + "1", "(" * 300 + "1" + ")" * 300, "'" + "\\\\" * 3 + "'", "'{query}'", "'{x}'", "avg",
          "bilinear", "hired", "pool", "'pool'", "9" * 30, "True", "None", "1", "0", "-1", "0.5", "2.5", "64", "192"]

literals = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
    | st.dictionaries(st.integers() | st.text(max_size=3), inner, max_size=3),
    max_leaves=8,
)
value_src = st.one_of(literals.map(repr), st.sampled_from(TRICKY),
                      st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True))
key = st.one_of(st.sampled_from(FIELDS), st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True))
space = st.sampled_from(["", " ", "  ", "\n", "\t", " " * 40])


@st.composite
def kwargs_src(draw) -> str:
    pairs = draw(st.lists(st.tuples(key, value_src), max_size=5))
    sep = draw(st.sampled_from([",", ", ", " ,", ",\n"]))
    body = sep.join(f"{k}{draw(space)}={draw(space)}{v}" for k, v in pairs)
    return body + draw(st.sampled_from(["", ","])) if pairs else body


@st.composite
def entry_src(draw) -> str:
    name = draw(st.sampled_from(sorted(REDUCERS)) | st.from_regex(r"[A-Za-z_][\w\-.]{0,8}", fullmatch=True))
    if draw(st.booleans()):
        return name
    return f"{name}{draw(space)}({draw(kwargs_src())})"


@st.composite
def plan_src(draw) -> str:
    entries = draw(st.lists(entry_src(), min_size=1, max_size=4))
    return draw(space) + "+".join(f"{draw(space)}{e}{draw(space)}" for e in entries) + draw(space)


@st.composite
def mutated(draw) -> str:
    """A well-formed plan with a few characters inserted, deleted or replaced by the grammar's own symbols."""
    text = draw(plan_src())
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        ch = draw(st.sampled_from(list("()[]{}'\"+-=,.:_ \\#*0123456789ainfote")))
        if op == "insert":
            text = text[:i] + ch + text[i:]
        elif op == "delete":
            text = text[:i] + text[i + 1:]
        else:
            text = text[:i] + ch + text[i + 1:]
    return text


def check_parse(text: str) -> None:
    """The property: PlanError with a one-line message, or a plan whose printed form parses to itself."""
    try:
        plan = tr.Plan.parse(text)
    except tr.PlanError as e:
        message = str(e)
        assert message and "\n" not in message, f"error message is not one line: {message!r}"
        return
    printed = str(plan)
    again = tr.Plan.parse(printed)
    assert str(again) == printed, f"{text!r} printed as {printed!r}, which re-parses as {str(again)!r}"
    assert again.reducers == plan.reducers, f"{text!r} -> {printed!r} re-parses to different reducers"


FUZZ = settings(max_examples=400, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@FUZZ
@given(plan_src())
@example("pool(tokens={[1]: 2})")
@example("pool(keep=" + "-" * 5000 + "0.5)")
@example("mustdrop-prefill(global_thr=inf)")
@example("mustdrop(decode='no')")
@example("quota(keep=0.5, prompt='a\\'b\"c {query}')")
def test_grammar_shaped_plans(text):
    check_parse(text)


@FUZZ
@given(mutated())
def test_mutated_plans(text):
    check_parse(text)


@FUZZ
@given(st.text(alphabet=st.sampled_from(list("()[]{}'\"+-=,.:_ \\\n#*0123456789poolkeeptokensinfrandom")),
               max_size=60) | st.text(max_size=60))
def test_arbitrary_text(text):
    check_parse(text)
