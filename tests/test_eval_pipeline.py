"""The default-model pipeline without shipped weights: tokenizer, checkpoints, training script, main job.

The trained checkpoints are checked by tests/test_default_models.py once they ship; these tests cover the
code that makes and evaluates them, on fresh (untrained) models, so they can fail on their own.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from tokenreduce.eval import evaluate as E
from tokenreduce.eval import models as M
from tokenreduce.eval import protocols as P
from tokenreduce.eval import synthetic as syn
from transformers import AutoTokenizer, LlavaForConditionalGeneration


@pytest.fixture(scope="module")
def tokenizer():
    return M.build_tokenizer()


@pytest.fixture(scope="module")
def image_checkpoint(tmp_path_factory, tokenizer) -> Path:
    """A fresh image model saved like the shipped one."""
    path = tmp_path_factory.mktemp("ckpt") / "image"
    model = M.build_model("image", tokenizer, seed=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_tokenizer_round_trips_every_protocol(tokenizer):
    for s in syn.generate_images(8, seed=0, split="test"):
        q = s.question
        for p in P.PROTOCOLS:
            text = P.build_prompt(p, q.question, q.options, "image") + P.target(p, q.letter)
            ids = tokenizer(text)["input_ids"]
            assert tokenizer.unk_token_id not in ids
            assert tokenizer.decode(ids) == text
            assert P.extract(p, P.target(p, q.letter)) == q.letter


def test_checkpoint_loads_with_stock_from_pretrained(image_checkpoint):
    model = LlavaForConditionalGeneration.from_pretrained(image_checkpoint)
    tok = AutoTokenizer.from_pretrained(image_checkpoint)
    assert tok.convert_tokens_to_ids("<image>") == model.config.image_token_id
    loaded, _ = M.load(image_checkpoint)
    assert type(loaded) is LlavaForConditionalGeneration


def test_extractors():
    assert P.extract("mlvu", "B) red") == "B"
    assert P.extract("mlvu", "no answer") == ""
    assert P.extract("videomme-legacy", "The best answer is C") == "C"
    assert P.extract("videomme", "(D) blue") == "D"
    assert P.extract("mlvu-lmms", " A") == "A"


def test_main_job_runs_end_to_end_and_resumes(tmp_path: Path, image_checkpoint):
    p = argparse.ArgumentParser()
    E.add_arguments(p)
    args = p.parse_args(["--bench", str(tmp_path / "bench"), "--datasets", "images", "--limit", "4",
                         "--plans", "none;pool(tokens=16)", "--model-dir", str(image_checkpoint),
                         "--out", str(tmp_path / "out"), "--threads", "2", "--timing-items", "2",
                         "--timing-repeats", "1", "--no-progress"])
    assert E.main(args) == 0
    out = tmp_path / "out"
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert {r["plan"] for r in rows} == {"none", "pool(tokens=16)"}
    assert all(r["tokens"] == 16 for r in rows if r["plan"] != "none")
    assert all(r["speedup"] > 0 for r in rows)  # measured by the timing pass
    assert (out / "accuracy_vs_tokens.png").stat().st_size > 1000
    assert (out / "accuracy_vs_speedup.png").stat().st_size > 1000
    assert "TTFT x" in (out / "table.txt").read_text()
    records = out / "images" / "records.jsonl"
    n = len(records.read_text().splitlines())
    assert n == 8  # 4 items x 2 plans
    assert E.main(args) == 0  # a second run finds every sample done and adds nothing
    assert len(records.read_text().splitlines()) == n


def test_keep_positions_rows_are_their_own_series(tmp_path: Path, image_checkpoint):
    """--keep-positions runs every reduced plan with the " @positions" suffix, and `answer` turns the suffix
    into kept positions: the LLM's prefill sees position ids up to the full prompt's length, not the reduced."""
    p = argparse.ArgumentParser()
    E.add_arguments(p)
    args = p.parse_args(["--bench", str(tmp_path / "bench"), "--datasets", "images", "--limit", "2",
                         "--plans", "none;random(tokens=8)", "--keep-positions", "--model-dir", str(image_checkpoint),
                         "--out", str(tmp_path / "out"), "--threads", "2", "--timing-items", "0", "--no-progress"])
    assert E.main(args) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert {r["plan"] for r in summary["rows"]} == {"none", "random(tokens=8) @positions"}
    assert summary["meta"]["keep_positions"] is True
    assert E.split_positions("pool(tokens=16) @positions") == ("pool(tokens=16)", True)
    assert E.split_positions("pool(tokens=16)") == ("pool(tokens=16)", False)
    model, tok = M.load(image_checkpoint)
    item = E.load_items(Path(summary["meta"]["bench"]), "images", 1)[0]
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append((kw["inputs_embeds"].shape[1], int(kw["position_ids"].max()))), with_kwargs=True)
    try:
        for plan in ("random(tokens=8)", "random(tokens=8) @positions"):
            seen.clear()
            assert E.answer(model, tok, item, E.load_visual(item), plan)["tokens"] == 8
            length, last = seen[0]  # the prefill
            full = M.visual_token_count(model)
            assert last == (length - 1 if "@" not in plan else length - 1 + full - 8), plan
    finally:
        hook.remove()


@pytest.mark.slow
def test_training_script_checkpoints_and_resumes(tmp_path: Path, capsys):
    """A few steps of the real training script; a second run with more steps resumes instead of restarting."""
    from tokenreduce.eval import train as T

    out = tmp_path / "run"
    common = ["--model", "image", "--out", str(out), "--val-every", "1000", "--val-size", "8", "--save-every", "2",
              "--log-every", "1", "--threads", "1"]
    assert T.main([*common, "--steps", "2"]) == 0
    assert (out / "state.pt").exists() and (out / "best" / "config.json").exists()
    LlavaForConditionalGeneration.from_pretrained(out / "best")  # the best checkpoint is a stock checkpoint
    capsys.readouterr()
    assert T.main([*common, "--steps", "2"]) == 0  # the same run again: resumes, finds it done
    assert "resumed at step 2/2" in capsys.readouterr().out
    assert T.main([*common, "--steps", "2", "--total-steps", "4"]) == 0  # a longer schedule continues from step 3
    log = capsys.readouterr().out
    assert "step 3/4" in log and "step 1/4" not in log


def test_evaluate_without_a_model_is_a_one_line_error(tmp_path: Path, capsys):
    from tokenreduce.cli import main

    code = main(["evaluate", "--datasets", "images", "--limit", "1", "--plans", "none",
                 "--model-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "tokenreduce: error:" in err and "missing" in err
