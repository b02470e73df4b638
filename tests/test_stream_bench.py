"""The streaming bench (issue 19) runs end to end on a tiny model: interleaved sessions, checkpoints, the table,
the JSON with every per-frame time and memory sample, and the plot."""

from __future__ import annotations

import json

from tokenreduce.stream import bench


def test_bench_writes_table_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    code = bench.main(["--model", "tiny-onevision", "--minutes", "0.05,0.1", "--max-tokens", "40", "--uncapped",
                       "--plans", "none;stc-cache+stc-prune(keep=0.25)", "--repeats", "2", "--warmup", "1",
                       "--out", str(out), "--plot", str(png)])
    assert code == 0
    text = capsys.readouterr().out
    firsts = [line.split()[:2] for line in text.splitlines()]
    assert ["stc-cache+stc-prune(keep=0.25)", "40"] in firsts and ["none", "none"] in firsts
    assert max(len(line) for line in text.splitlines() if not line.startswith("wrote ")) <= 120
    assert "tower x: tower ms / the first plan's" in text and "TTFT ms" not in text  # legend; --wide has the rest
    r = json.loads(out.read_text())
    assert r["checkpoints"] == [3, 6]
    labels = [(p["plan"], p["max_tokens"]) for p in r["plans"]]
    assert labels == [("none", 40), ("stc-cache+stc-prune(keep=0.25)", 40), ("none", None)]
    for p in r["plans"]:
        assert len(p["frames"]) == 6 and len(p["answers"]) == 2 * 2
        assert [w["frames"] for w in p["windows"]] == [3, 6]
        assert all(w["fps"] > 0 and w["answer_ms"] > 0 for w in p["windows"])
    pruned = r["plans"][1]
    assert [f["kept"] for f in pruned["frames"]] == [4] * 6 and pruned["stats"]["reference_frames"] == 3
    assert max(f["visual_tokens"] for f in r["plans"][0]["frames"]) == 40  # capped
    assert r["plans"][2]["frames"][-1]["visual_tokens"] == 6 * 16  # uncapped grows
    assert png.stat().st_size > 10_000
    wide = bench.table(r, wide=True)
    assert all(h in wide.splitlines()[0] for h in bench.COLUMNS) and "TTFT ms: time to the answer's first" in wide


def test_bench_rejects_bad_arguments(capsys):
    assert bench.main(["--model", "tiny-onevision", "--minutes", "x"]) == 2
    assert bench.main(["--model", "tiny-onevision", "--plans", "bogus"]) == 2
    assert bench.main(["--model", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--minutes" in err and "unknown reducer" in err and "--model" in err
