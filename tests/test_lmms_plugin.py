"""The lmms-eval plugin and task files, against lmms-eval's real code (0.7.3, installed with --no-deps; see
tests/lmms_env.py): lmms-eval's own evaluator finds the ``tokenreduce`` model through the entry point, runs the
task files on the generated benchmark, and scores exactly what ``tokenreduce eval`` scores on the same questions.
Also: Video-MME's subtitle prompt and both MLVU aggregates against lmms-eval's own functions."""

from __future__ import annotations

import json
from pathlib import Path

import lmms_env
import pytest
from tokenreduce.eval import datasets as D
from tokenreduce.eval import protocols as P
from tokenreduce.eval import report, store
from tokenreduce.eval.lmms import write_tasks

from tokenreduce.cli import main as cli_main

PLAN = "pool(keep=0.5)"

pytestmark = pytest.mark.lmms_eval

_EVALUATE = r"""
import json, sys
from lmms_eval.evaluator import simple_evaluate
from lmms_eval.tasks import TaskManager
from lmms_eval.models import MODEL_REGISTRY_V2
assert "tokenreduce" in MODEL_REGISTRY_V2.list_model_names()
res = simple_evaluate(model="tokenreduce", model_args=sys.argv[2], tasks=sys.argv[3].split(","),
                      task_manager=TaskManager(include_path=sys.argv[1]), batch_size=1, device="cpu",
                      log_samples=True)
out = {"results": res["results"], "samples": {}}
for task, samples in res["samples"].items():
    out["samples"][task] = [{"doc": s["doc"], "resp": s["resps"][0][0], "tokens": s["token_counts"][0],
                             "metrics": s.get("videomme_perception_score") or s.get("mlvu_percetion_score")}
                            for s in samples]
print(json.dumps(out, default=str))
"""


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    from tokenreduce.eval.synthetic import write_benchmark

    root = tmp_path_factory.mktemp("gen")
    write_benchmark(root, "test", n_images=0, n_videos=6, progress_every=0)
    return root / "test"


@pytest.fixture(scope="module")
def lmms_run(bench, tmp_path_factory):
    lmms_env.paths()
    tasks = tmp_path_factory.mktemp("tasks")
    written = write_tasks(bench, tasks)
    assert {p.name for p in written} == {"tokenreduce_videomme.yaml", "tokenreduce_mlvu.yaml", "utils.py"}
    hf = tmp_path_factory.mktemp("hf")
    return lmms_env.run(_EVALUATE, str(tasks), f"pretrained=default,kind=video,plan={PLAN}",
                        "tokenreduce_videomme,tokenreduce_mlvu", env={"HF_HOME": str(hf)})


def ours(bench: Path, out: Path, name: str, protocol: str) -> tuple[dict, dict]:
    code = cli_main(["eval", "--bench", name, "--data", str(bench), "--plan", PLAN, "--protocol", protocol, "--out",
                     str(out), "--threads", "1", "--timing-items", "0", "--no-progress"])
    assert code == 0
    recs = [r for r in store.read_records(out)[0] if r["plan"] == PLAN]
    rows = {r["plan"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    return {r["question_id"]: r for r in recs}, rows[PLAN]


def test_videomme_task_scores_what_tokenreduce_eval_scores(bench, lmms_run, tmp_path):
    recs, row = ours(bench, tmp_path / "vm", "videomme", "videomme")
    samples = lmms_run["samples"]["tokenreduce_videomme"]
    assert len(samples) == len(recs) == 6
    for s in samples:
        r = recs[s["doc"]["question_id"]]
        assert s["resp"] == r["completion"]  # same prompt in the same chat turn, same plan, same tokens
        assert s["metrics"]["pred_answer"] == r["pred"]
        assert (s["metrics"]["score"] == 1.0) == r["correct"]
        # lmms-eval's token accounting gets what entered the LLM: the reduced sequence, not the prompt's length
        assert s["tokens"]["input_tokens"] == r["seq_llm"] and r["tokens"] == 144  # half of 8 x 36
    score = lmms_run["results"]["tokenreduce_videomme"]["videomme_perception_score,none"]
    assert score == pytest.approx(100 * row["accuracy"])


def test_mlvu_task_scores_what_tokenreduce_eval_scores(bench, lmms_run, tmp_path):
    recs, row = ours(bench, tmp_path / "mlvu", "mlvu", "mlvu-lmms")
    by_video = {r["meta"]["video"]: r for r in recs.values()}
    samples = lmms_run["samples"]["tokenreduce_mlvu"]
    assert len(samples) == len(by_video) == 6
    for s in samples:
        r = by_video[Path(s["doc"]["video_name"]).name]
        assert s["resp"] == r["completion"] and s["metrics"]["pred_answer"] == r["pred"]
        assert s["metrics"]["task_type"] == r["task"]  # "findNeedle" read as lmms-eval's "needle"
    score = lmms_run["results"]["tokenreduce_mlvu"]["mlvu_percetion_score,none"]
    assert score == pytest.approx(100 * row["m_avg"])


_SUBTITLE = r"""
import json, sys
from lmms_eval.tasks.videomme import utils
docs = json.loads(sys.argv[1])
print(json.dumps([utils.videomme_doc_to_text_subtitle(d, {"frame_num": 32}) for d in docs]))
"""


def test_subtitle_prompt_equals_lmms_evals(tmp_path):
    """lmms-eval reads videos and subtitles under $HF_HOME/videomme; the same folder read by our reader gives the
    same subtitle text and the same prompt body."""
    import numpy as np

    from tokenreduce.video import write_video

    root = tmp_path / "hf" / "videomme"
    (root / "data").mkdir(parents=True)
    (root / "subtitle").mkdir()
    rng = np.random.default_rng(0)
    docs = []
    for i, frames in enumerate((40, 97)):
        vid = f"vid{i}"
        write_video(root / "data" / f"{vid}.mp4", rng.integers(0, 255, (frames, 32, 32, 3), dtype=np.uint8), fps=10)
        lines = []
        for k in range(6):
            a, b = k * 1.3, k * 1.3 + 0.9
            t = lambda s: f"00:00:{int(s):02d},{int(s * 1000) % 1000:03d}"  # noqa: E731
            lines.append(f"{k + 1}\n{t(a)} --> {t(b)}\n<font color=\"white\" size=\".72c\">line {k} of {vid}</font>")
        (root / "subtitle" / f"{vid}.srt").write_text("\n\n".join(lines) + "\n")
        docs.append({"videoID": vid, "question_id": f"{i}-1", "question": "What?", "options": ["A. x", "B. y",
                     "C. z", "D. w"], "answer": "A", "duration": "short", "domain": "Knowledge",
                     "sub_category": "Astronomy", "task_type": "OCR Problems"})
    (root / "videomme.json").write_text(json.dumps(docs))
    theirs = lmms_env.run(_SUBTITLE, json.dumps(docs), env={"HF_HOME": str(tmp_path / "hf")})
    items = D.load("videomme", root).items
    for item, want in zip(items, theirs):
        subs = D.videomme_subtitles(item)
        assert subs.count("line") >= 2
        _, text, _ = P.prompt_parts("videomme", item.question, item.options, subtitles=subs)
        assert text == want


_AGG = r"""
import json, sys
from lmms_eval.tasks.mlvu import utils as ml
from lmms_eval.tasks.videomme import utils as vm
res = json.loads(sys.argv[1])
print(json.dumps({"dev": ml.mlvu_aggregate_results_dev(res["mlvu"]), "test": ml.mlvu_aggregate_results_test(
    res["mlvu_test"]), "videomme": vm.videomme_aggregate_results(res["videomme"])}))
"""


def test_aggregates_equal_lmms_evals():
    mlvu = [{"task_type": t, "pred_answer": p, "answer": "A"} for t, p in
            [("needle", "A"), ("needle", "B"), ("count", "A"), ("order", ""), ("plotQA", "A"), ("plotQA", "A")]]
    mlvu_test = [{"task_type": t, "pred_answer": "A", "answer": a} for t, a in
                 [("sportsQA", "A"), ("tutorialQA", "B"), ("needleQA", "A")]]
    vm = [{"duration": "short", "category": "Knowledge", "sub_category": "Astronomy", "task_category": "OCR Problems",
           "pred_answer": p, "answer": "C"} for p in ("C", "C", "A", "")]
    theirs = lmms_env.run(_AGG, json.dumps({"mlvu": mlvu, "mlvu_test": mlvu_test, "videomme": vm}))

    def per_task(rows):
        out: dict[str, list] = {}
        for r in rows:
            out.setdefault(r["task_type"], []).append(r["pred_answer"] == r["answer"])
        return {k: sum(v) / len(v) for k, v in out.items()}

    assert 100 * report.mlvu_lmms_aggregate(per_task(mlvu), "mlvu")[0] == pytest.approx(theirs["dev"])
    assert 100 * report.mlvu_lmms_aggregate(per_task(mlvu_test), "mlvu-test")[0] == pytest.approx(theirs["test"])
    assert theirs["videomme"] == pytest.approx(50.0)  # Video-MME's number is the plain micro average


def test_task_writer_refuses_other_folders(tmp_path):
    from tokenreduce.eval.errors import EvalError

    with pytest.raises(EvalError, match="not a generated benchmark split"):
        write_tasks(tmp_path, tmp_path / "tasks")
