"""`tokenreduce bench` on the tiny preset: the JSON is complete and self-consistent (no timed asserts)."""

from __future__ import annotations

import builtins
import json
import time

import pytest
import torch
from tokenreduce.adapters.llava.llava15 import config_dims
from tokenreduce.adapters.llava.zoo import llava_config
from tokenreduce.eval.bench import PeakRSS

from tokenreduce.cli import main

REDUCERS = ("aim-merge", "random", "pool")


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
    for name in REDUCERS:
        expected[f"{name}(tokens=32)"] = 32
        expected[f"{name}(tokens=16)"] = 16
    assert {p: r["visual_tokens"] for p, r in results.items()} == expected
    assert [r["plan"] for r in bench["results"]][0] == "none"
    base = results["none"]
    for r in results.values():
        assert r["repeats"] == 2 and bench["rounds_done"] == 2
        assert base["seq_llm"] - r["seq_llm"] == 64 - r["visual_tokens"]
        assert r["ttft_ms_min"] <= r["ttft_ms"] and r["prefill_ms_min"] <= r["prefill_ms"]
        assert isinstance(r["peak_mib"], float)  # RSS above the level before the call (may even be < 0)
        assert r["memory_method"] in ("VmHWM", "sampled 1 ms")
    assert bench["machine"]["torch"] and bench["machine"]["threads"] >= 1
    assert bench["config"]["preset"] == "tiny"


def test_bench_flops_follow_from_the_sequence_lengths(bench):
    """The FLOPs in the JSON are the LLM's cost of the recorded sequence lengths (the tiny preset's widths)."""
    tc = llava_config("tiny").text_config
    dims = config_dims(tc, vocab=tc.vocab_size)
    base = bench["results"][0]
    for r in bench["results"]:
        assert r["flops"]["llm_prefill"] == pytest.approx(dims.forward_flops(r["seq_llm"]))
        assert r["flops"]["llm_prefill_full"] == pytest.approx(dims.forward_flops(base["seq_llm"]))
        assert r["flops"]["vision"] == base["flops"]["vision"] > 0  # the vision tower is not reduced


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
        assert r["ttft_speedup"] == pytest.approx(base["ttft_ms"] / r["ttft_ms"])
        assert r["prefill_efficiency"] == pytest.approx(r["prefill_speedup"] / r["ideal_prefill_speedup"])
        assert r["ttft_efficiency"] == pytest.approx(r["ttft_speedup"] / r["ideal_ttft_speedup"])
        min_speedup = base["prefill_ms_min"] / r["prefill_ms_min"]
        assert r["prefill_efficiency_min"] == pytest.approx(min_speedup / r["ideal_prefill_speedup"])
        assert r["prefill_ms_min"] == pytest.approx(min(r["prefill_ms_all"])) and len(r["prefill_ms_all"]) == 2
        assert r["kv_cache_mib"] < base["kv_cache_mib"]
        assert r["kv_cache_mib"] / base["kv_cache_mib"] == pytest.approx(r["seq_llm"] / base["seq_llm"])
    # 2 layers x 2 KV heads x head dim 16 x (K and V) x 4 bytes per token
    assert base["kv_cache_mib"] == pytest.approx(2 * 2 * 2 * 16 * 4 * base["seq_llm"] / 2**20)
    for r in results.values():
        assert r["reduce_ms"] >= 0 and (r["reduce_ms"] == 0) == (r["plan"] == "none")


def test_bench_measures_the_stock_model_too(bench):
    """The model with nothing attached is timed in the same rounds; `none` minus `stock` is the hooks' cost."""
    stock, base = bench["stock"], bench["results"][0]
    assert stock["plan"] == "stock" and stock["repeats"] == 2
    assert stock["hook_overhead_ms"] == pytest.approx(base["ttft_ms"] - stock["ttft_ms"])


def test_bench_prints_a_table(tmp_path, capsys):
    out = tmp_path / "one.json"
    assert main(["bench", "--preset", "tiny", "--plans", "pool(keep=0.25)", "--repeats", "1", "--warmup", "0",
                 "--out", str(out)]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    for header in ("plan", "vis tok", "LLM seq", "TTFT ms", "prefill ms", "vision ms", "reduce ms", "TTFT eff",
                   "prefill eff", "peak MiB", "KV MiB", "stock", "none", "pool(keep=0.25)"):
        assert header in printed
    assert "[round 1/1] [3/3] pool(keep=0.25)" in captured.err  # progress goes to stderr
    assert [r["plan"] for r in json.loads(out.read_text())["results"]] == ["none", "pool(keep=0.25)"]


def test_bench_token_budgets_and_batches(tmp_path, capsys):
    out = tmp_path / "nested" / "b.json"  # parent folders are created
    assert main(["bench", "--preset", "tiny", "--budgets", "40,8", "--reducers", "pool", "--batch", "2",
                 "--repeats", "1", "--warmup", "0", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    results = {r["plan"]: r for r in data["results"]}
    assert list(results) == ["none", "pool(tokens=40)", "pool(tokens=8)"]
    assert [r["visual_tokens"] for r in results.values()] == [64, 40, 8]
    base = results["none"]
    # two samples: the FLOPs and the KV cache count both, the ideal ratio is the single sample's
    kv = 2 * 2 * 2 * 16 * 4 * 2 * base["seq_llm"] / 2**20
    assert base["kv_cache_mib"] == pytest.approx(kv)
    tc = llava_config("tiny").text_config
    dims = config_dims(tc, vocab=tc.vocab_size)
    assert base["flops"]["llm_prefill"] == pytest.approx(2 * dims.forward_flops(base["seq_llm"]))


@pytest.mark.parametrize("argv, message", [
    (["--preset", "nope"], "--preset 'nope'"),
    (["--preset", "tiny", "--budgets", "100"], "exceed the 64 visual tokens"),
    (["--preset", "tiny", "--budgets", "x"], "--budgets 'x'"),
    (["--preset", "tiny", "--keep", "1.5"], "--keep '1.5'"),
    (["--preset", "tiny", "--plans", "bogus(keep=2)"], "bogus"),
])
def test_bench_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, message):
    out = tmp_path / "b.json"
    assert main(["bench", *argv, "--repeats", "1", "--warmup", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()  # nothing was measured


@pytest.mark.parametrize("reset_allowed", [True, False])
def test_peak_rss_sees_a_short_lived_allocation(monkeypatch, reset_allowed):
    """The peak counts memory freed before the block ends, via VmHWM or, where its reset is refused, sampling."""
    if not reset_allowed:
        real_open = builtins.open

        def refusing_open(file, *args, **kwargs):
            if str(file) == "/proc/self/clear_refs":
                raise PermissionError(file)
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", refusing_open)
    with PeakRSS() as mem:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        time.sleep(0.05)  # long enough for the sampler
        del block
    assert mem.method == ("VmHWM" if reset_allowed else "sampled 1 ms")
    assert 60 < mem.mib < 200
