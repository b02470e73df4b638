"""``tokenreduce eval`` / ``sweep`` end to end on the generated benchmark and the shipped video model: records,
resume after kill -9, torn lines, refusing another run's folder, torchrun with 2 processes, tables, reports and
plots, and the one-line errors for bad options."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tokenreduce.eval import report, store

from tokenreduce.cli import main as cli_main

N = 6
PLAN = "pool(keep=0.5)"


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    from tokenreduce.eval.synthetic import write_benchmark

    root = tmp_path_factory.mktemp("gen")
    write_benchmark(root, "test", n_images=4, n_videos=N, progress_every=0)
    return root / "test"


def base_args(bench: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "--bench", "mlvu", "--data", str(bench), "--plan", PLAN, "--out", str(out), "--threads", "1",
            "--timing-items", "0", "--no-progress", *extra]


def cli(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "tokenreduce.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def keys(out: Path) -> list[tuple[str, str]]:
    recs, _ = store.read_records(out)
    return sorted((r["plan"], r["question_id"]) for r in recs)


def answers(out: Path) -> dict:
    recs, _ = store.read_records(out)
    return {(r["plan"], r["question_id"]): (r["completion"], r["correct"], r["tokens"]) for r in recs}


@pytest.fixture(scope="module")
def reference(bench, tmp_path_factory) -> Path:
    """One uninterrupted single-process run."""
    out = tmp_path_factory.mktemp("ref") / "run"
    r = cli(base_args(bench, out, "--timing-items", "2", "--timing-repeats", "1"))
    assert r.returncode == 0, r.stderr
    return out


def test_records_and_outputs(reference):
    lines = (reference / "records.jsonl").read_text().splitlines()
    assert len(lines) == 2 * N  # none + the plan, one line per question
    rec = json.loads(lines[0])
    for field in ("question_id", "plan", "answer", "pred", "correct", "completion", "tokens", "layer_avg",
                  "flops_prefill", "flops_vision", "vision_s", "prefill_s", "ttft_s", "run", "model", "data",
                  "protocol"):
        assert field in rec, field
    header = json.loads((reference / "run.json").read_text())
    ident = header["identity"]
    assert ident["protocol"]["name"] == "mlvu" and ident["model"]["fingerprint"] == rec["model"]
    assert header["sessions"][0]["versions"]["torch"] and rec["run"] == header["run_id"]
    summary = json.loads((reference / "summary.json").read_text())
    rows = {r["plan"]: r for r in summary["rows"]}
    assert rows[PLAN]["tokens"] == 144 and rows["none"]["tokens"] == 288  # 8 frames x 36, newline not counted
    assert rows[PLAN]["flops_speedup"] > 1.2 and rows["none"]["flops_speedup"] == pytest.approx(1.0)
    assert rows["none"]["m_avg"] is not None and "speedup" in rows[PLAN]
    assert summary["timing"]["repeats"] == 1 and len(summary["timing"]["items"]) == 2
    for name in ("accuracy_vs_tokens.png", "accuracy_vs_ttft.png"):
        assert (reference / name).read_bytes()[:4] == b"\x89PNG"
    md = (reference / "report.md").read_text()
    assert "MLVU: M-Avg and lmms-eval's aggregate" in md and "| none |" in md


@pytest.mark.slow
def test_kill_9_then_resume_redoes_nothing_and_duplicates_nothing(bench, reference, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "tokenreduce.cli", *base_args(bench, out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    path = out / "records.jsonl"
    while time.time() < deadline and (not path.exists() or len(path.read_bytes().splitlines()) < 3):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(store.read_records(out)[0])
    assert 3 <= done_before < 2 * N, "the kill should land mid-run"
    with path.open("ab") as f:  # what a kill in the middle of a write leaves: half a record, no newline
        f.write(b'{"run": "x", "question_id": "2_needle/9", "pl')
    r = cli(base_args(bench, out))
    assert r.returncode == 0, r.stderr
    data = path.read_bytes()
    assert data.endswith(b"\n") and b'"pl{' not in data and b'"question_id": "2_needle/9"' not in data
    lines = data.splitlines()
    assert len(lines) == 2 * N and all(json.loads(x) for x in lines)  # every line whole, none twice
    assert keys(out) == keys(reference)
    assert answers(out) == answers(reference)
    sessions = json.loads((out / "run.json").read_text())["sessions"]
    assert len(sessions) == 2


def test_another_model_or_data_is_refused(bench, reference, tmp_path, capsys):
    from tokenreduce.eval import models as M

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = (out / "records.jsonl").read_bytes()
    other = tmp_path / "other-model"
    shutil.copytree(M.model_dir("video"), other)
    config = json.loads((other / "config.json").read_text())
    config["text_config"]["rms_norm_eps"] = 1e-5  # a different model
    (other / "config.json").write_text(json.dumps(config))
    code = cli_main(base_args(bench, out, "--model", str(other)))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("tokenreduce: error: --out") and "another run" in err
    assert "model.fingerprint" in err and len(err.strip().splitlines()) == 1
    code = cli_main(base_args(bench, out, "--protocol", "mlvu-lmms"))
    err = capsys.readouterr().err
    assert code == 2 and "protocol.name: 'mlvu' there, 'mlvu-lmms' now" in err
    assert (out / "records.jsonl").read_bytes() == before  # nothing touched


@pytest.mark.slow
def test_adding_a_plan_reuses_the_finished_ones(bench, reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    r = cli(base_args(bench, out, "--plan", "random(keep=0.25)"))
    assert r.returncode == 0, r.stderr
    recs = store.read_records(out)[0]
    assert len(recs) == 3 * N
    assert {r["session"] for r in recs if r["plan"] == "none"} == {json.loads(
        (reference / "records.jsonl").read_text().splitlines()[0])["session"]}  # not redone


@pytest.mark.torchrun
@pytest.mark.slow
def test_torchrun_two_processes_give_the_table_of_one(bench, reference, tmp_path):
    out = tmp_path / "run"
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    r = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "tokenreduce.cli",
                        *base_args(bench, out)], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "records.rank1.jsonl").exists()  # rank 1 answered its share
    per_rank = [len((out / f).read_text().splitlines()) for f in ("records.jsonl", "records.rank1.jsonl")]
    assert all(n > 0 for n in per_rank) and sum(per_rank) == 2 * N
    assert answers(out) == answers(reference)
    one = {r["plan"]: r for r in json.loads((reference / "summary.json").read_text())["rows"]}
    two = {r["plan"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    for plan in one:
        for field in ("n", "accuracy", "m_avg", "per_task", "tokens", "layer_avg", "flops_speedup"):
            assert one[plan][field] == two[plan][field], (plan, field)
    assert r.stdout.count("none") >= 1  # the table is printed once, by rank 0


@pytest.mark.slow
def test_sweep_adds_baselines_at_every_budget(bench, tmp_path):
    out = tmp_path / "sweep"
    r = cli(["sweep", "--bench", "images", "--data", str(bench), "--methods", "aim-merge", "--budgets", "0.5,16",
             "--out", str(out), "--threads", "1", "--timing-items", "1", "--timing-repeats", "1", "--no-progress"])
    assert r.returncode == 0, r.stderr
    plans = [row["plan"] for row in json.loads((out / "summary.json").read_text())["rows"]]
    assert plans == ["none", "aim-merge(keep=0.5)", "random(keep=0.5)", "pool(keep=0.5)", "aim-merge(tokens=16)",
                     "random(tokens=16)", "pool(tokens=16)"]
    assert max(len(line) for line in r.stdout.splitlines()) <= 120


@pytest.mark.parametrize("args, needle", [
    (["--limit", "0"], "--limit 0: expected an integer >= 1"),
    (["--limit", "-1"], "--limit -1: expected an integer >= 1"),
    (["--limit", "abc"], "--limit 'abc': expected an integer"),
    (["--threads", "0"], "--threads 0"),
    (["--frames", "-3"], "--frames -3"),
    (["--fps", "0"], "--fps '0': expected a positive number"),
    (["--fps", "nan"], "--fps 'nan'"),
    (["--plan", "pool(tokens=16"], "--plan: plan 'pool(tokens=16'"),
    (["--plan", "nosuch(keep=0.5)"], "nosuch"),
    (["--protocol", "videomme"], "an MLVU protocol is needed"),
    (["--protocol", "mlvu3"], "--protocol 'mlvu3'"),
    (["--subtitles"], "--subtitles"),
    (["--dtype", "int8"], "--dtype 'int8'"),
    (["--timing-items", "-1"], "--timing-items -1"),
    (["--max-frames", "4"], "--max-frames applies with --fps only"),
])
def test_bad_eval_options_are_one_line_errors_before_any_work(args, needle, bench, tmp_path, capsys):
    out = tmp_path / "never"
    code = cli_main(base_args(bench, out, *args))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("tokenreduce: error:") and needle in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("args, needle", [
    (["--budgets", "0"], "budgets must be positive"),
    (["--budgets", "1.5"], "neither a fraction"),
    (["--budgets", "0.5,,0.2"], "comma-separated"),
    (["--budgets", "x"], "'x' is not a number"),
    (["--methods", "aim-merge,nosuch"], "nosuch"),
    (["--methods", " , "], "at least one reducer"),
    (["--plans", "pool(keep=2)"], "keep"),
])
def test_bad_sweep_options(args, needle, bench, tmp_path, capsys):
    out = tmp_path / "never"
    code = cli_main(["sweep", "--bench", "mlvu", "--data", str(bench), "--out", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("tokenreduce: error:") and needle in err, err
    assert not out.exists()


def test_missing_data_folder_and_bench(tmp_path, capsys):
    assert cli_main(["eval", "--bench", "mlvu", "--data", str(tmp_path / "x"), "--out", str(tmp_path / "o")]) == 2
    assert "--data" in capsys.readouterr().err
    assert cli_main(["eval", "--bench", "nope", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--bench 'nope'" in capsys.readouterr().err


# --- the table and report formatting (no model needed) ---------------------------------------------------------


def fake_rows():
    long = "aim-merge(tokens=16, frames=2)+aim-prune(layer=2, step=0.125, tau=0.1, iterations=5) @positions"
    rows = [{"plan": "none", "n": 10, "accuracy": 0.0, "tokens": 128.0, "layer_avg": 128.0, "flops_speedup": 1.0,
             "speedup": 1.0, "speedup_q1": 1.0, "speedup_q3": 1.0, "within_noise": False, "ttft_ms": 20.0},
            {"plan": long, "n": 10, "accuracy": 0.3, "accuracy_kept": None, "tokens": 16.0, "layer_avg": 9.5,
             "flops_speedup": 3.2, "speedup": 1.04, "speedup_q1": 0.97, "speedup_q3": 1.1, "within_noise": True,
             "ttft_ms": 19.0},
            {"plan": "quota(keep=0.25)", "n": 0, "errors": 10, "error": "UnsupportedModelError: no CLS"}]
    return rows


def test_table_is_at_most_120_wide_with_a_legend_and_no_nan():
    rows = fake_rows()
    text = report.table(rows, report.eval_columns("mlvu", wide=False))
    assert max(len(line) for line in text.splitlines()) <= 120
    assert "nan" not in text.lower() and "-0." not in text
    assert "n/a" in text  # accuracy kept against a 0 baseline, speedups of a failed plan
    assert "~1.04x" in text and "within noise" in text
    assert "kept: accuracy kept" in text and "vis tok:" in text and "TTFT x:" in text
    assert "! quota(keep=0.25): 10 question(s) failed" in text
    wide = report.table(rows, report.eval_columns("mlvu", wide=True), wide=True)
    assert rows[1]["plan"] in wide and "x IQR" in wide and "peak MiB" in wide


def test_lmms_eval_aggregate_follows_its_fixed_task_sets():
    value, note = report.mlvu_lmms_aggregate({"needle": 1.0, "count": 0.5}, "mlvu")
    assert value == pytest.approx(1.5 / 7) and "5 absent, counted as 0" in note
    value, note = report.mlvu_lmms_aggregate({"needle": 1.0, "direction": 0.5}, "mlvu")
    assert value is None and "KeyError" in note and "'direction'" in note
    value, _ = report.mlvu_lmms_aggregate({"needleQA": 1.0, "sportsQA": 1.0}, "mlvu-test")
    assert value == pytest.approx(2 / 9)


@pytest.mark.parametrize("args, needle", [
    (["--limit", "0"], "--limit 0: expected an integer >= 1"),
    (["--limit", "-1"], "--limit -1: expected an integer >= 1"),
    (["--keep", "2"], "--keep '2': fractions must be in (0, 1]"),
    (["--keep", "abc"], "--keep 'abc': 'abc' is not a number"),
    (["--keep", "0"], "fractions must be in (0, 1]"),
    (["--plans", "none;pool(tokens=16"], "--plans: plan 'pool(tokens=16'"),
    (["--plans", "aim-merge(tokens=16)+nosuch"], "nosuch"),
    (["--plans", " ; "], "no plan in it"),
    (["--datasets", "imagez"], "--datasets 'imagez': unknown 'imagez'"),
    (["--datasets", "images,"], None),  # a trailing comma is fine (but nothing runs here: --limit is bad)
    (["--threads", "0"], "--threads 0"),
    (["--threads", "-1"], "--threads -1"),
    (["--timing-repeats", "0"], "--timing-repeats 0"),
])
def test_bad_evaluate_options_fail_before_writing_anything(args, needle, tmp_path, capsys):
    bench, out = tmp_path / "bench", tmp_path / "out"
    extra = ["--limit", "0"] if needle is None else []
    code = cli_main(["evaluate", "--bench", str(bench), "--out", str(out), *args, *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("tokenreduce: error:"), err
    assert needle is None or needle in err, err
    assert len(err.strip().splitlines()) == 1
    assert not bench.exists() and not out.exists()  # the benchmark is written only after every check passed


def test_evaluate_refuses_another_models_results(tmp_path, capsys):
    """Issue 22 #1: evaluate --model-dir into a folder of another model's results used to print the old table;
    now the run folder's fingerprints refuse it, and the old records stay as they were."""
    from tokenreduce.eval import models as M

    other = tmp_path / "other"
    shutil.copytree(M.model_dir("image"), other)
    config = json.loads((other / "config.json").read_text())
    config["text_config"]["rms_norm_eps"] = 1e-5
    (other / "config.json").write_text(json.dumps(config))
    common = ["evaluate", "--bench", str(tmp_path / "bench"), "--datasets", "images", "--limit", "2", "--plans",
              "none", "--timing-items", "0", "--threads", "1", "--no-progress", "--out", str(tmp_path / "out")]
    assert cli_main(common) == 0
    records = tmp_path / "out" / "images" / "records.jsonl"
    before = records.read_bytes()
    capsys.readouterr()
    assert cli_main([*common, "--model-dir", str(other)]) == 2
    err = capsys.readouterr().err
    assert "tokenreduce: error: --out" in err and "another run" in err and "model.fingerprint" in err
    assert records.read_bytes() == before
