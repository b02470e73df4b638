"""Answer extraction against the reference implementations, on 576 real-looking completions.

`tests/data/extraction/table.json` was made by `make_table.py` beside it, which ran lmms-eval 0.7.3 and 0.7.1's own
task functions and MLVU's own ``check_ans`` on every completion. The test marked ``lmms_eval`` re-runs lmms-eval
(installed with ``--no-deps``, see .ci/run) so the committed table cannot drift from the real code.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lmms_env
import pytest
from tokenreduce.eval import protocols as P

TABLE = json.loads((Path(__file__).parent / "data" / "extraction" / "table.json").read_text())
ROWS = TABLE["rows"]
LMMS = ("videomme", "videomme-legacy", "mlvu-lmms", "mlvu-lmms-legacy")


def expected_letter(protocol: str, raw: str | None) -> str:
    p = P.get(protocol)
    if raw is None:
        return ""
    raw = raw.upper() if p.ignore_case else raw
    return raw if len(raw) == 1 and raw in p.letters else ""


def test_the_table_is_large_and_covers_every_protocol():
    assert len(ROWS) >= 500
    assert set(ROWS[0]["raw"]) == set(P.REGISTRY)
    for name in P.REGISTRY:  # every protocol reads letters from many completions and nothing from many others
        letters = [expected_letter(name, r["raw"][name]) for r in ROWS]
        assert sum(map(bool, letters)) > 150 and letters.count("") > 100, name


@pytest.mark.parametrize("protocol", [*LMMS, "mlvu-test"])
def test_raw_extraction_equals_the_reference(protocol):
    wrong = [(r["completion"], r["raw"][protocol], P.get(protocol).raw(r["completion"]))
             for r in ROWS if P.get(protocol).raw(r["completion"]) != r["raw"][protocol]]
    assert not wrong, f"{len(wrong)} differ, e.g. {wrong[:5]}"


@pytest.mark.parametrize("protocol", list(P.REGISTRY))
def test_extract_and_score_equal_the_reference(protocol):
    """`extract` gives the reference's letter (or ""), and `score` accepts exactly the letters the reference
    accepts (for MLVU's check_ans: the one letter it accepts, '@' included, the ground truth of an answer that is
    not among the candidates)."""
    bad = []
    for r in ROWS:
        t, raw = r["completion"], r["raw"][protocol]
        if P.extract(protocol, t) != expected_letter(protocol, raw):
            bad.append((t, "extract", P.extract(protocol, t), raw))
        for gt in "ABCDEF@":
            want = raw is not None and (raw.lower() == gt.lower() if P.get(protocol).ignore_case else raw == gt)
            if P.score(protocol, t, gt) != want:
                bad.append((t, gt, P.score(protocol, t, gt), raw))
    assert not bad, f"{len(bad)} differ, e.g. {bad[:5]}"


def test_the_quirks_that_published_numbers_depend_on():
    # lmms-eval <= 0.7.1 Video-MME: the glued prefixes are never stripped, so a capital inside them wins
    assert P.extract("videomme-legacy", "Answer: B") == "A"
    assert P.extract("videomme-legacy", "Best Option: (A)") == "B"
    assert P.extract("videomme-legacy", "The best answer is C") == "C"  # a prefix that is really in the list
    # lmms-eval 0.7.3 reads both as meant
    assert P.extract("videomme", "Answer: B") == "B" and P.extract("videomme", "Best Option: (A)") == "A"
    # MLVU's check_ans: a bare letter counts, the same letter with a space does not; ")" first gives nothing
    assert P.score("mlvu", "A", "A") and not P.score("mlvu", " A", "A") and not P.score("mlvu", ")A", "A")
    assert P.score("mlvu", "B) blue", "B") and P.score("mlvu", "x@)", "@")
    # lmms-eval's MLVU extractor only knows A-D, also on MLVU-Test's six options
    assert P.extract("mlvu-lmms", "E) green") == "" and P.extract("mlvu-test", "E) green") == "E"
    assert P.extract("mlvu-lmms-legacy", " C) red ") == "C" and P.get("mlvu-lmms-legacy").raw("C red") == "C red"
    with pytest.raises(ValueError, match="unknown protocol 'mlvu2'"):
        P.extract("mlvu2", "A")


def test_prompts_are_the_references():
    q, opts = "What colour is it?", ["red", "blue", "green", "yellow"]
    vm = P.build_prompt("videomme", q, opts)
    assert vm == ("USER: <video>\n" + P.VIDEOMME_OPTION_PROMPT + "\nWhat colour is it?\nA. red\nB. blue\nC. green\n"
                  "D. yellow\n\nAnswer with the option's letter from the given choices directly. ASSISTANT:")
    assert P.build_prompt("videomme-legacy", q, opts) == vm
    ml = P.build_prompt("mlvu", q, opts)
    assert ml.startswith(P.MLVU_SYSTEM + " USER: <video>\nQuestion: What colour is it?\nOptions:\n(A) red\n")
    assert ml.endswith("(D) yellow\nOnly give the best option. ASSISTANT: Best Option: (")
    assert P.build_prompt("mlvu-lmms", q, opts, raw_question="Q?\n(A) x\n(B) y").endswith(
        "USER: <video>\nQ?\n(A) x\n(B) y\nOnly give the best option.\nBest option: ( ASSISTANT:")
    sub = P.build_prompt("videomme", q, opts, subtitles="hello\nworld")
    assert "This video's subtitles are listed below: \nhello\nworld\nSelect the best" in sub
    assert sub.endswith("D. yellow\nThe best answer is: ASSISTANT:")
    six = P.build_prompt("mlvu-test", q, opts + ["purple", "white"])
    assert "(F) white\nOnly give the best option." in six
    with pytest.raises(ValueError, match="at most 6 options"):
        P.build_prompt("mlvu", q, opts * 2)


@pytest.mark.lmms_eval
@pytest.mark.slow
def test_lmms_eval_itself_agrees_on_every_completion():
    """Runs lmms-eval 0.7.3's and 0.7.1's real task functions on all completions (each version in its own
    process) and compares them with the committed table and with our extractors."""
    sys.path.insert(0, str(Path(__file__).parent / "data" / "extraction"))
    try:
        from make_table import run_lmms
    finally:
        sys.path.pop(0)
    new, old = lmms_env.paths()
    texts = [r["completion"] for r in ROWS]
    cur, leg = run_lmms(texts, new), run_lmms(texts, old, new)
    assert cur["version"] == "0.7.3" and leg["version"] == "0.7.1"
    for i, r in enumerate(ROWS):
        got = {"videomme": cur["videomme"][i], "mlvu-lmms": cur["mlvu-lmms"][i],
               "videomme-legacy": leg["videomme"][i], "mlvu-lmms-legacy": leg["mlvu-lmms"][i]}
        for name, value in got.items():
            assert value == r["raw"][name] == P.get(name).raw(r["completion"]), (name, r["completion"])


def test_make_table_runs_in_a_subprocess_cleanly():
    """The generator's corpus is deterministic (the committed table is reproducible)."""
    code = ("import sys; sys.path.insert(0, 'tests/data/extraction'); import make_table, json; "
            "print(json.dumps(make_table.completions()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent.parent)
    assert json.loads(out.stdout) == [r["completion"] for r in ROWS]
