"""Every registered reducer documents its parameters (`tr.param`), and `tokenreduce list` and the README show them.

The rule is checked over the registry, so a reducer added later fails here until each of its fields has a
one-line description.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

import tokenreduce as tr
from tokenreduce.cli import main, reducer_table
from tokenreduce.plan import parameters

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("name", sorted(tr.reducers()))
def test_every_parameter_has_a_one_line_description_and_a_default(name):
    cls = tr.reducers()[name]
    assert cls.summary and "\n" not in cls.summary, f"{name}: set `summary`, one line"
    fields = dataclasses.fields(cls)
    params = parameters(cls)
    assert [p.name for p in params] == [f.name for f in fields]
    for f, p in zip(fields, params):
        where = f"{name}.{f.name} ({cls.__module__})"
        assert p.doc, f"{where}: declare it with tr.param(default, \"one-line description\")"
        assert "\n" not in p.doc and len(p.doc) <= 110, f"{where}: the description must be one line of <= 110 chars"
        assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING, \
            f"{where}: every parameter needs a default (plans may leave it out)"
        assert p.shown and "\n" not in p.shown


def test_list_prints_every_parameter_with_its_default_and_meaning(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert max(map(len, out.splitlines())) <= 120
    for name, cls in tr.reducers().items():
        assert f"{name} ({cls.stage}): " in out
        for p in parameters(cls):
            assert f"{p.name}={p.shown}" in out, f"{name}: {p.name}={p.shown} not printed"
            assert p.doc.split()[0] in out
    assert "layers=2/6/10/14 of 32, scaled" in out  # mustdrop's layers are listed (they were missing once)


def test_list_one_reducer_in_full(capsys):
    assert main(["list", "mustdrop-prefill"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("mustdrop-prefill (prefill): ") and "hired" not in out
    assert "tokens=None" in out and "budget form" in out and "MustDrop stage 2" in out  # and the docstring
    assert main(["list", "mustdrp"]) == 2
    assert "did you mean mustdrop" in capsys.readouterr().err


def test_list_json_is_structured(capsys):
    assert main(["list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(tr.reducers())
    hired = {p["name"]: p for p in rows["hired"]["parameters"]}
    assert hired["keep"] == {"name": "keep", "type": "float | None", "default": 0.2, "default_shown": "0.2",
                             "description": hired["keep"]["description"]}
    assert "20%" in hired["keep"]["description"]
    layers = {p["name"]: p for p in rows["mustdrop"]["parameters"]}["layers"]
    assert layers["default"] is None and "scaled" in layers["default_shown"]
    assert {p["name"] for p in rows["quota"]["parameters"]} >= {"scorer", "power", "resize", "prompt"}


def test_the_readme_table_is_the_generated_one():
    text = README.read_text()
    m = re.search(r"<!-- reducers:begin[^>]*-->\n(.*?)\n<!-- reducers:end -->", text, flags=re.S)
    assert m, "README.md lost the <!-- reducers:begin ... --> / <!-- reducers:end --> markers around its table"
    assert m.group(1) == reducer_table(), (
        "README.md's reducer table differs from the registry's: run `tokenreduce list --markdown` and paste its "
        "output between the reducers:begin and reducers:end markers"
    )
