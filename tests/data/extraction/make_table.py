"""Build `table.json`: real-looking model completions and the answer each reference implementation extracts.

    python tests/data/extraction/make_table.py --lmms-eval PATH --lmms-eval-legacy PATH --mlvu-repo PATH

- ``--lmms-eval``: a folder on which ``import lmms_eval`` gives lmms-eval 0.7.3 with the few dependencies its
  task modules import (``pip install --no-deps --target DIR lmms-eval==0.7.3 loguru ...``, see .ci/run).
- ``--lmms-eval-legacy``: the same for lmms-eval 0.7.1 (the last release before PR #1274), only the package;
  the dependencies come from ``--lmms-eval``.
- ``--mlvu-repo``: a checkout of JUNJIE99/MLVU (fd060c1): ``check_ans`` is read from
  ``evaluation/multiple_choice_evaluation/choice_bench.py`` (the module imports torchvision, so the function is
  taken from its source), and the MLVU-Test answer cut from ``evaluation_test/test_bench.py``'s inline code.

Each reference runs in its own subprocess (two lmms-eval versions cannot share one). The table holds, per
completion, what each reference compares with the ground truth (``raw``) and the letter our
`tokenreduce.eval.protocols.extract` must give (``letter``); `tests/test_protocols.py` checks our code against it,
and with lmms-eval installed also re-runs lmms-eval on every completion.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
OPTIONS = ["Yellow", "a red apple", "Shakes the woman's hand", "2", "RoadAccidents", "the man on the left",
           "Because he was late.", "(1)(3)(2)(4)", "Both A and B", "None of the above"]


def completions(seed: int = 0) -> list[str]:
    """About 700 completions in the forms VLMs give to multiple-choice prompts (after "Best Option: (" and
    after "Answer with the option's letter ..."), plus reasoning, other languages, markup and garbage."""
    out: list[str] = []
    letters = "ABCDEF"
    # after MLVU's "Best Option: (" prefill: "A) text", "A)", "A", repeats, stray tokens
    for L in letters:
        for o in OPTIONS[:5]:
            out += [f"{L}) {o}", f"{L}) {o}</s>", f"{L}){o}", f" {L}) {o}"]
        out += [f"{L})", f"{L}", f" {L}", f"{L} ", f"{L})\n", f"{L}) {L}) {OPTIONS[0]}", f"({L})", f"{L}.", f"{L}:",
                f"{L}</s>", f"{L.lower()})", f"{L.lower()}", f"{L}) or ({letters[(letters.index(L) + 1) % 6]})"]
    # after Video-MME's "Answer with the option's letter ..." post-prompt
    for L in "ABCD":
        out += [f"{L}. {OPTIONS[1]}", f"{L}. {OPTIONS[6]}", f"The answer is {L}.", f"The answer is ({L}).",
                f"The best answer is {L}", f"The best answer is: {L}", f"The correct answer is {L}. {OPTIONS[2]}",
                f"The correct option is {L}", f"The best option is ({L})", f"Best option: ({L})", f"Best Option: ({L})",
                f"Best answer: {L}", f"Answer: {L}", f"Answer: ({L}) {OPTIONS[3]}", f"answer: {L.lower()}",
                f"Option {L}", f"option {L}.", f"I choose {L}.", f"I think it's {L}.", f"My answer is {L}",
                f"**{L}**", f"\\boxed{{{L}}}", f"{L}\n\nExplanation: the video shows {OPTIONS[5]}.",
                f"Looking at the video, {OPTIONS[5]} appears first, so the answer is {L}.",
                f"Based on the frames, I would say {L}, {OPTIONS[4]}.", f"答案是{L}", f"选{L}", f"정답은 {L}입니다",
                f"答えは{L}です", f"({L}", f"{L}) ", f"[{L}]", f"{L},", f"'{L}'", f"\"{L}\"", f"{L}!", f"{L}?",
                f"The answer is {L}, not {'ABCD'[('ABCD'.index(L) + 2) % 4]}.",
                f"{'ABCD'[('ABCD'.index(L) + 1) % 4]} or {L}", f"Between A and {L}, I pick {L}.",
                f"It is {L}) {OPTIONS[0]}", f"{L}. {OPTIONS[8]}", f"The answer {L}", f"Answer {L}",
                f"THE ANSWER IS {L}", f"the answer is {L.lower()}", f"Correct answer is option {L}",
                f"The video shows {OPTIONS[1]}; Answer: {L}", f"{L}) {OPTIONS[7]}\n{L}) {OPTIONS[7]}"]
    # no letter, or letters only inside words, or malformed
    out += ["", " ", "\n", "</s>", "I don't know.", "The video does not show this.", "yes", "No", ")", ")A", "A)B)",
            "()", "(E)", "E", "F) green", "Z", "G)", "None of the options are correct.", "All of the above",
            "Cannot determine from the video", "Blue", "the red square moves left", "1", "(2)", "2)",
            "Depends on the scene.", "Both A and B", "Either C or D could be right", "Answer:", "The answer is",
            "Best option: (", "Best Option: ( )", "The best option isThe correct option is B",
            "Best answer:Best option: C", "Answer: none", "ABCD", "A B C D", "DCBA", "a.", "b) blue", "c", "d:",
            "The man in the video is walking down a long corridor with many doors on both sides of it",
            "The man in the video is walking down a long corridor with many doors on both sides of it B",
            "It could be option C but I am not entirely sure about it because the frames are blurry and dark",
            "In The Beginning, A Dog Enters.", "OK", "Candidate C", "Choice: D", "The choice is B",
            "A\nB", "B\nA", "C.\n\nD.", "(A)(B)", "A) B) C)", "B)A", "é", "İ answer is C", "ＡＢ", "Ａ",
            "The answer is Ｂ", "答案为D", "옵션 A", "답: B", "답은 C"]
    # noisy variants: random case, whitespace and punctuation around the common forms
    rng = random.Random(seed)
    forms = ["{L}", "({L})", "{L})", "{L}.", "{L}:", "Answer: {L}", "The answer is {L}", "Best option: ({L})",
             "{L}) {o}", "{L}. {o}", "option {L}", "I choose ({L}) {o}"]
    for _ in range(180):
        text = rng.choice(forms).format(L=rng.choice(letters), o=rng.choice(OPTIONS))
        if rng.random() < 0.3:
            text = rng.choice([" ", "\n", "  ", "\t"]) + text
        if rng.random() < 0.3:
            text = text + rng.choice([".", "!", "</s>", " ", "\n", ",", " because it is visible."])
        if rng.random() < 0.15:
            text = text.lower()
        out.append(text)
    return list(dict.fromkeys(out))


_LMMS_REFERENCE = r"""
import json, sys
mode = sys.argv[1]
texts = json.load(sys.stdin)
from importlib.metadata import version
res = {"version": version("lmms_eval")}
from lmms_eval.tasks.videomme import utils as vm
from lmms_eval.tasks.mlvu import utils as ml
res["videomme"] = [vm.extract_characters_regex(t) for t in texts]
res["mlvu-lmms"] = [ml.extract_characters_regex(t) for t in texts]
print(json.dumps(res))
"""


def run_lmms(texts: list[str], path: str, extra: str | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (path, extra) if p))
    out = subprocess.run([sys.executable, "-c", _LMMS_REFERENCE, "x"], input=json.dumps(texts), text=True,
                         capture_output=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def mlvu_functions(repo: Path):
    """MLVU's ``check_ans`` (defined from its source: the module itself imports torchvision) and MLVU-Test's cut
    (the inline lines of ``test_bench.py``, run as they are written there)."""
    import ast

    src = (repo / "evaluation/multiple_choice_evaluation/choice_bench.py").read_text()
    tree = ast.parse(src)
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check_ans")
    ns: dict = {}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "choice_bench.py", "exec"), ns)
    test_src = (repo / "evaluation_test/test_bench.py").read_text()
    start = test_src.index('        if (")") in pred:')
    cut = "\n".join(line[8:] for line in test_src[start:].splitlines()[:3])

    def test_cut(text: str) -> str:
        scope = {"pred": text.strip()}
        exec(cut, scope)
        return scope["pred"]

    return ns["check_ans"], test_cut


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lmms-eval", required=True)
    p.add_argument("--lmms-eval-legacy", required=True)
    p.add_argument("--mlvu-repo", required=True, type=Path)
    p.add_argument("--out", type=Path, default=HERE / "table.json")
    args = p.parse_args()
    texts = completions()
    new = run_lmms(texts, args.lmms_eval)
    old = run_lmms(texts, args.lmms_eval_legacy, args.lmms_eval)
    check_ans, test_cut = mlvu_functions(args.mlvu_repo)
    rows = []
    for i, t in enumerate(texts):
        # check_ans(pred, gt) compares its cut of pred with gt's letter: find the letter it accepts, if any
        accepted = [L for L in "ABCDEF@" if check_ans(pred=t, gt=f"({L}) x")]
        rows.append({"completion": t, "raw": {
            "videomme": new["videomme"][i], "mlvu-lmms": new["mlvu-lmms"][i],
            "videomme-legacy": old["videomme"][i], "mlvu-lmms-legacy": old["mlvu-lmms"][i],
            "mlvu": accepted[0] if accepted else None, "mlvu-test": test_cut(t)}})
    table = {
        "about": "completions -> what each reference compares with the ground truth; made by make_table.py",
        "references": {"videomme": f"lmms-eval {new['version']}", "mlvu-lmms": f"lmms-eval {new['version']}",
                       "videomme-legacy": f"lmms-eval {old['version']}",
                       "mlvu-lmms-legacy": f"lmms-eval {old['version']}",
                       "mlvu": "JUNJIE99/MLVU fd060c1 check_ans (null: no letter A-F or '@' is accepted)",
                       "mlvu-test": "JUNJIE99/MLVU fd060c1 evaluation_test/test_bench.py"},
        "rows": rows,
    }
    args.out.write_text(json.dumps(table, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(rows)} completions -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
