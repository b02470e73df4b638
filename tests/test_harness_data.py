"""Benchmark folders in the real layouts, with the quirks of real data (issue 18).

Fixtures are written here in the official file layouts: Video-MME as parquet with three questions per video, the
.MP4 and .mkv fallbacks and an .srt subtitle; MLVU dev as per-task JSON with an answer outside the candidates and
duplicated candidates (both occur in the real dev set); MLVU-Test with six options, with and without answers;
lmms-eval's MLVU form. Videos are real mp4/mkv files (PyAV), a few frames each.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenreduce.eval import datasets as D
from tokenreduce.eval import protocols as P
from tokenreduce.eval.errors import EvalError

from tokenreduce.video import write_video

pa = pytest.importorskip("pyarrow")  # in the dev and eval extras
import pyarrow.parquet as pq  # noqa: E402


def clip(path: Path, n: int = 6, colour: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = np.full((n, 32, 32, 3), 40, np.uint8)
    frames[:, 8:24, 8:24, colour % 3] = 220
    write_video(path, frames, fps=4)
    return path


def videomme_row(vid: str, q: int, answer: str = "B", **kw) -> dict:
    row = {"video_id": vid[-3:], "duration": "short", "domain": "Knowledge", "sub_category": "Astronomy",
           "url": f"https://example.org/{vid}", "videoID": vid, "question_id": f"{vid[-3:]}-{q}",
           "task_type": "Counting Problem" if q == 1 else "Object Recognition",
           "question": f"Question {q} about {vid}?",
           "options": ["A. one", "B. two", "C. three", "D. four"], "answer": answer}
    row.update(kw)
    return row


@pytest.fixture(scope="module")
def videomme(tmp_path_factory) -> Path:
    """Video-MME as downloaded: videomme/test-00000-of-00001.parquet, data/, subtitle/."""
    root = tmp_path_factory.mktemp("Video-MME")
    clip(root / "data" / "v001.mp4")
    clip(root / "data" / "v002.MP4", colour=1)
    clip(root / "data" / "v003.mkv", colour=2)
    rows = [videomme_row(v, q) for v in ("v001", "v002", "v003") for q in (1, 2, 3)]
    rows[4]["answer"] = "E"  # beyond the four options
    (root / "videomme").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), root / "videomme" / "test-00000-of-00001.parquet")
    (root / "subtitle").mkdir()
    (root / "subtitle" / "v001.srt").write_text(
        "1\n00:00:00,000 --> 00:00:00,600\n<font color=\"white\" size=\".72c\">hello there</font>\n\n"
        "2\n00:00:00,750 --> 00:00:01,400\n<font color=\"white\" size=\".72c\">general</font>\n\n"
        "3\n00:00:01,400 --> 00:00:01,500\nno font tag here\n", encoding="utf-8")
    return root


def test_videomme_parquet_keys_questions_not_videos(videomme):
    ds = D.load("videomme", videomme)
    assert [it.qid for it in ds.items] == [f"{v}-{q}" for v in ("001", "002", "003") for q in (1, 2, 3)]
    assert len({it.media for it in ds.items}) == 3  # three questions per video, nine items
    assert [it.media.name for it in ds.items[::3]] == ["v001.mp4", "v002.MP4", "v003.mkv"]  # lmms-eval's fallbacks
    first = ds.items[0]
    assert first.options == ("one", "two", "three", "four") and first.raw_options[0] == "A. one"
    assert first.meta["duration"] == "short" and first.task == "Counting Problem" and first.answer == "B"
    assert [p.kind for p in ds.warnings] == ["answer-beyond-options"] and ds.warnings[0].qid == "002-2"
    assert first.subtitle is not None and ds.items[3].subtitle is None
    assert len(ds.fingerprint) == 16 and ds.files[0].suffix == ".parquet"


def test_videomme_subtitles_follow_lmms_eval(videomme):
    ds = D.load("videomme", videomme)
    # 6 frames at 4 fps: 32 frames spread over 0..5 hit both font-tagged spans; the untagged span is dropped
    assert D.videomme_subtitles(ds.items[0]) == "hello there\ngeneral"
    assert D.videomme_subtitles(ds.items[3]) == "No subtitles available"
    assert D.videomme_subtitles(ds.items[0], frame_num=1) == "hello there"


def test_videomme_json_and_generated_layout_too(tmp_path, videomme):
    root = tmp_path / "vm"
    (root / "data").mkdir(parents=True)
    for f in (videomme / "data").iterdir():
        (root / "data" / f.name).write_bytes(f.read_bytes())
    rows = pq.read_table(videomme / "videomme" / "test-00000-of-00001.parquet").to_pylist()
    (root / "videomme.json").write_text(json.dumps(rows))
    (root / "notes.json").write_text(json.dumps({"not": "data"}))
    assert [it.qid for it in D.load("videomme", root).items] == [it.qid for it in D.load("videomme", videomme).items]


def test_missing_videos_and_malformed_rows_stop_or_are_counted(tmp_path, videomme):
    root = tmp_path / "vm"
    (root / "data").mkdir(parents=True)
    clip(root / "data" / "v001.mp4")
    rows = [videomme_row("v001", 1), videomme_row("v009", 1), videomme_row("v001", 2, question=""),
            videomme_row("v001", 3, options="A. x")]
    (root / "videomme.json").write_text(json.dumps(rows))
    with pytest.raises(EvalError) as e:
        D.load("videomme", root)
    msg = str(e.value)
    assert "3 bad question(s)" in msg and "009-1" in msg and "001-2" in msg and "--skip-missing" in msg
    ds = D.load("videomme", root, skip_missing=True)
    assert [it.qid for it in ds.items] == ["001-1"]
    assert sorted((p.qid, p.kind) for p in ds.skipped) == [("001-2", "malformed"), ("001-3", "malformed"),
                                                           ("009-1", "missing-media")]


MLVU_DEV = {
    "1_plotQA": [{"video": "movie_1.mp4", "duration": 10, "question": "What colour?", "candidates":
                  ["Yellow", "Red", "Yellow", "Blue"], "answer": "Yellow", "question_type": "plotQA"},
                 {"video": "movie_1.mp4", "duration": 10, "question": "Who?", "candidates": ["a", "b", "c", "d"],
                  "answer": "c", "question_type": "plotQA"}],
    "2_needle": [{"video": "needle_4.mp4", "duration": 8, "question": "What does he do?", "candidates":
                  ["Fishing", "Catching the drone", "Launching the drone", "Sunbathing"],
                  "answer": "Catching a flying drone quadcopter", "question_type": "findNeedle"},
                 {"video": "needle_5.mp4", "duration": 8, "question": "And then?", "candidates": ["x", "y", "z", "w"],
                  "answer": "w", "question_type": "findNeedle"}],
}


@pytest.fixture(scope="module")
def mlvu_dev(tmp_path_factory) -> Path:
    """MLVU dev as the official repository lays it out: json/<n>_<task>.json and video/<n>_<task>/."""
    root = tmp_path_factory.mktemp("MLVU")
    (root / "json").mkdir()
    for stem, rows in MLVU_DEV.items():
        (root / "json" / f"{stem}.json").write_text(json.dumps(rows))
        for r in rows:
            if not (root / "video" / stem / r["video"]).exists():
                clip(root / "video" / stem / r["video"])
    return root


def test_mlvu_dev_quirks_are_scored_as_mlvu_does(mlvu_dev):
    ds = D.load("mlvu", mlvu_dev)
    assert [it.qid for it in ds.items] == ["1_plotQA/0", "2_needle/0", "1_plotQA/1", "2_needle/1"]  # interleaved
    by = {it.qid: it for it in ds.items}
    assert by["2_needle/0"].task == "needle"  # the file's task key, as choice_bench.py, not "findNeedle"
    assert by["1_plotQA/0"].answer == "C"  # duplicated candidate: the last copy, as qa_template
    assert by["2_needle/0"].answer == "@"  # not among the candidates: chr(ord('A') - 1), never matched
    assert by["1_plotQA/0"].media == by["1_plotQA/1"].media  # two questions, one video
    kinds = {(p.qid, p.kind) for p in ds.warnings}
    assert kinds == {("1_plotQA/0", "duplicate-candidates"), ("2_needle/0", "answer-not-in-candidates")}
    assert not P.score("mlvu", "A) Yellow", "C") and P.score("mlvu", "C)", "C")
    assert not any(P.score("mlvu", f"{L})", "@") for L in "ABCD")


def test_generated_benchmark_folders_are_valid_data(tmp_path):
    from tokenreduce.eval.synthetic import write_benchmark

    write_benchmark(tmp_path / "gen", "test", n_images=4, n_videos=5, progress_every=0)
    split = tmp_path / "gen" / "test"
    for bench, folder, n in (("videomme", split, 5), ("videomme", split / "videomme", 5), ("mlvu", split, 5),
                             ("mlvu", split / "mlvu", 5), ("images", split, 4), ("images", split / "images", 4)):
        ds = D.load(bench, folder)
        assert len(ds.items) == n, (bench, folder)
        assert all(it.media.is_file() for it in ds.items)
        assert len({it.qid for it in ds.items}) == n


def test_mlvu_test_six_options_with_and_without_answers(tmp_path):
    root = tmp_path / "MLVU_Test"
    rows = [{"question_id": "SQA_0", "question_type": "sportsQA", "video": "sport_1.mp4", "question": "Who won?",
             "candidates": ["a", "b", "c", "d", "e", "f"], "answer": "e"},
            {"question_id": "TQA_3", "question_type": "tutorialQA", "video": "tut_1.mp4", "question": "Step two?",
             "candidates": ["a", "b", "c", "d", "e", "f"], "answer": "F"}]
    (root / "video").mkdir(parents=True)
    clip(root / "video" / "sport_1.mp4")
    clip(root / "video" / "tut_1.mp4")
    (root / "test_mcq.json").write_text(json.dumps(rows))
    ds = D.load("mlvu-test", root)
    assert [(it.qid, it.task, it.answer) for it in ds.items] == [("SQA_0", "sportsQA", "E"), ("TQA_3", "tutorialQA",
                                                                                                "F")]
    assert "(F) f\nOnly give the best option." in P.build_prompt("mlvu-test", "q", ds.items[0].options)
    for r in rows:
        del r["answer"]
    (root / "test_mcq.json").write_text(json.dumps(rows))
    assert [it.answer for it in D.load("mlvu-test", root).items] == [None, None]  # predictions only


def test_lmms_eval_mlvu_form(tmp_path):
    root = tmp_path / "mlvu_dev"
    clip(root / "video" / "2_needle" / "n.mp4")
    rows = [{"video_name": "video/2_needle/n.mp4", "duration": 3, "question": "What?\n(A) x\n(B) y",
             "candidates": ["x", "y"], "answer": "B", "task_type": "needle"}]
    (root / "mlvu_lmms_eval.json").write_text(json.dumps(rows))
    (it,) = D.load("mlvu", root).items
    assert (it.question, it.answer, it.task, it.raw_question) == ("What?", "B", "needle", "What?\n(A) x\n(B) y")


def test_bad_folders_are_one_line_errors(tmp_path):
    with pytest.raises(EvalError, match="no such folder"):
        D.load("mlvu", tmp_path / "nope")
    with pytest.raises(EvalError, match="no Video-MME annotations"):
        D.load("videomme", tmp_path)
    with pytest.raises(EvalError, match="unknown bench 'mlvux'"):
        D.load("mlvux", tmp_path)
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "1_x.json").write_text("{not json")
    with pytest.raises(EvalError, match="no mlvu annotations"):
        D.load("mlvu", tmp_path)
