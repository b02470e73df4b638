"""`tokenreduce bench` on the tiny preset: the JSON is complete and self-consistent (no timed asserts)."""

from __future__ import annotations

import json

import pytest

from tokenreduce.cli import main


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "b.json"
    code = main(["bench", "--preset", "tiny", "--keep", "0.5,0.25", "--repeats", "2", "--warmup", "0",
                 "--out", str(out)])
    assert code == 0
    return json.loads(out.read_text())


def test_bench_covers_every_plan_with_the_budget_met(bench):
    results = {r["plan"]: r for r in bench["results"]}
    assert bench["visual_tokens_per_image"] == 64
    expected = {"none": 64}
    for name in ("aim-merge", "random", "pool"):
        expected[f"{name}(tokens=32)"] = 32
        expected[f"{name}(tokens=16)"] = 16
    assert {p: r["visual_tokens"] for p, r in results.items()} == expected
    base = results["none"]
    for r in results.values():
        assert r["repeats"] == 2 and bench["rounds_done"] == 2
        assert base["seq_llm"] - r["seq_llm"] == 64 - r["visual_tokens"]


def test_bench_speedups_follow_from_the_recorded_numbers(bench):
    results = {r["plan"]: r for r in bench["results"]}
    base = results["none"]
    for plan, r in results.items():
        if plan == "none":
            continue
        f, fb = r["flops"], base["flops"]
        assert r["ideal_prefill_speedup"] == pytest.approx(fb["llm_prefill"] / f["llm_prefill"])
        assert r["ideal_prefill_speedup"] > 1
        ideal_ttft = (fb["vision"] + fb["llm_prefill"]) / (f["vision"] + f["llm_prefill"])
        assert r["ideal_ttft_speedup"] == pytest.approx(ideal_ttft)
        assert 1 < r["ideal_ttft_speedup"] < r["ideal_prefill_speedup"]  # the vision tower is not reduced
        assert r["prefill_speedup"] == pytest.approx(base["prefill_ms"] / r["prefill_ms"])
        assert r["prefill_efficiency"] == pytest.approx(r["prefill_speedup"] / r["ideal_prefill_speedup"])
        assert r["ttft_efficiency"] == pytest.approx(r["ttft_speedup"] / r["ideal_ttft_speedup"])
        assert r["kv_cache_mib"] < base["kv_cache_mib"]
        assert r["kv_cache_mib"] / base["kv_cache_mib"] == pytest.approx(r["seq_llm"] / base["seq_llm"])


def test_bench_prints_a_table(tmp_path, capsys):
    out = tmp_path / "one.json"
    assert main(["bench", "--preset", "tiny", "--plans", "pool(keep=0.25)", "--repeats", "1", "--warmup", "0",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "pool(keep=0.25)" in printed and "prefill eff" in printed and "none" in printed
    assert [r["plan"] for r in json.loads(out.read_text())["results"]] == ["none", "pool(keep=0.25)"]
