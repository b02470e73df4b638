"""`tokenreduce bench --kernels`: every kernel row with its three columns, the overhead table, the JSON."""

from __future__ import annotations

import json

from tokenreduce.cli import main


def test_kernel_bench_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "k.json"
    code = main(["bench", "--kernels", "--kernel-scale", "small", "--repeats", "1", "--warmup", "0",
                 "--out", str(out)])
    assert code == 0
    res = json.loads(out.read_text())
    ops = {r["op"] for r in res["rows"]}
    assert ops == {"bipartite_match", "scatter_mean", "window_similarity", "frame_similarity",
                   "running_mean_similarity", "segment_topk"}
    for r in res["rows"]:
        assert r["naive_ms"] > 0 and r["torch_ms"] > 0 and r["naive_mib"] is not None
        assert r["triton_ms"] is None  # no GPU here: the column says so, nothing is faked
    assert "need a CUDA GPU" in res["triton"]
    assert [r["threads"] for r in res["aim_merge_overhead"]] == [1, 2]
    for r in res["aim_merge_overhead"]:
        assert r["ratio"] > 0 and 0 < r["bookkeeping_ms"]
    printed = capsys.readouterr().out
    assert "reduce / core" in printed
    assert any(line.split()[:2] == ["bipartite_match", "2880"] for line in printed.splitlines())
    assert max(len(line) for line in printed.splitlines() if not line.startswith("kernels on")) <= 120
    assert "torch x: naive ms / torch ms" in printed  # the legend
    from tokenreduce.eval.kernel_bench import LEGEND, table

    wide = table(res, wide=True)
    assert all(h in wide.splitlines()[2] for h in LEGEND) and all(r["shape"] in wide for r in res["rows"])
