"""`tokenreduce bench` on the tiny preset: the JSON is complete and self-consistent (no timed asserts)."""

from __future__ import annotations

import builtins
import json
import time

import pytest
import torch
from tokenreduce.adapters.llava.llava15 import config_dims
from tokenreduce.adapters.llava.zoo import llava_config
from tokenreduce.eval.bench import COLUMNS, PeakRSS, hook_cost_line, table

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
    for header in ("plan", "vis tok", "TTFT ms", "prefill ms", "reduce ms", "TTFT x", "prefill x", "ideal x",
                   "prefill eff", "stock", "none", "pool(keep=0.25)", "--wide also shows"):
        assert header in printed
    assert "[round 1/1] [3/3] pool(keep=0.25)" in captured.err  # progress goes to stderr
    assert [r["plan"] for r in json.loads(out.read_text())["results"]] == ["none", "pool(keep=0.25)"]
    assert "hooks cost n/a (one repeat" in printed  # one repeat cannot tell a cost from noise


def test_bench_table_fits_120_columns_and_explains_every_column(bench):
    """The default table is at most 120 characters wide, whatever the plan names; every header it shows has a
    legend line; --wide shows every column; NaN, infinities and negative costs never appear."""
    records = [{**bench["stock"]}, *bench["results"]]
    long_name = "aim-merge(tokens=16, weighted=True)+aim-prune(start=0, step=0.5, tau=0.2)+mustdrop-decode"
    records.append({**bench["results"][-1], "plan": long_name, "prefill_efficiency": float("nan"),
                    "peak_mib": -3.2, "ttft_speedup": float("inf")})
    text = table(records)
    lines = text.splitlines()
    assert max(map(len, lines)) <= 120
    legend = {line.split("  ")[0].strip() for line in lines[len(records) + 3:]}
    shown = [c for c in COLUMNS if c.header in lines[0]]
    assert len(shown) >= 8 and {c.header for c in shown} <= legend
    assert "nan" not in text.lower() and "inf" not in text and " -3" not in text
    assert "n/a" in text
    start = next(i for i, line in enumerate(lines) if line.startswith("aim-merge(tokens=16, weighted"))
    end = lines.index("", start)  # the long name is the last row: its continuation lines run to the legend
    wrapped = [lines[start][:36].strip(), *(line.strip() for line in lines[start + 1:end])]
    assert all(len(w) <= 36 for w in wrapped) and len(wrapped) > 1
    assert "".join(wrapped).replace(" ", "") == long_name.replace(" ", "")
    wide = table(records, wide=True)
    assert all(c.header in wide.splitlines()[0] for c in COLUMNS) and "--wide also shows" not in wide
    assert "~0" in wide and " -3" not in wide and "nan" not in wide.lower()


def test_bench_hook_cost_is_never_negative():
    base = {"ttft_ms": 100.0, "ttft_ms_all": [90.0, 100.0, 110.0]}
    stock = {"ttft_ms": 150.0, "ttft_ms_spread": 5.0, "repeats": 3}
    assert hook_cost_line(stock, base).endswith("within noise (repeats vary by 20 ms)")
    stock = {"ttft_ms": 60.0, "ttft_ms_spread": 5.0, "repeats": 3}
    assert hook_cost_line(stock, base).endswith("hooks cost 40.0 ms")


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
    (["--preset", "tiny", "--plans", "pool(keep=0.5);aim-merge(keep="], "--plans"),
    (["--preset", "tiny", "--plans", " ; "], "no plan given"),
    (["--preset", "tiny", "--reducers", "pool,nope"], "unknown reducer 'nope'"),
    (["--preset", "tiny", "--plans", "pool(tokens=100)"], "exceeds the 64 visual tokens"),
    (["--preset", "tiny", "--plans", "pool(keep=0.5);mustdrop(layers=[2, 6, 10, 14])"], "decoder has 2 layers"),
    (["--preset", "tiny-onevision", "--video", "--plans", "hired(keep=0.5)"], "no CLS token"),
    (["--preset", "tiny-onevision"], "not a built-in image preset"),
    (["--model", "no/such-model"], "--model 'no/such-model'"),
    (["--preset", "tiny", "--device", "cuda:3"], "--device 'cuda:3'"),
    (["--preset", "tiny", "--attn", "flash_attention_2"], "--attn 'flash_attention_2'"),
    (["--preset", "tiny-onevision", "--video", "--frames", "0"], "--frames"),
])
def test_bench_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, message, monkeypatch):
    """Every bad option or plan fails with one line before anything is measured or written."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    out = tmp_path / "b.json"
    assert main(["bench", *argv, "--repeats", "1", "--warmup", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert "[round" not in err and "[warmup" not in err  # nothing was measured
    assert not out.exists()  # nor written


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
