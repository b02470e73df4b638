"""The streaming bench: frames per second a `StreamingSession` sustains, answer latency after 1, 5 and 30 minutes of
stream, and memory over time, for several plans on one model, measured in one process.

    python -m tokenreduce.stream.bench --model default --minutes 1,5,30 --out stream-bench.json
    python -m tokenreduce.stream.bench --model llava-onevision-7b-shape --vision-layers 4 --llm-layers 1 \\
        --minutes 1,5 --max-tokens 12544 --out stream-bench-ov.json

Protocol: one session per plan over the same model and the same frames: generated test-split videos of the
benchmark played one after another, sampled at `--fps` (1 by default, STC's protocol is 0.5). Plans are
interleaved: every frame is pushed to every session before the next frame, in an order that rotates each frame,
so load on a shared machine hits every plan alike. Each session first pushes a few warm-up frames and is reset.
At each checkpoint every session is asked the current video's multiple-choice question `--repeats` times (the
median latency is reported; the question never stays in the cache). Memory: each session's KV-cache and cacher
bytes (exact, from the tensors) and the process's resident memory, sampled over the stream.

Per plan and window between checkpoints: median frame time (the sustained rate is 1000 / that; real time means
at least `--fps`), median vision-tower, projector+reducers and LLM-append times, the cacher's measured saving,
KV entries and MiB at the checkpoint, answer latency and time to first token, and the share answered correctly
(meaningful on the trained default model only). Ratios against the first plan ("none") give the encoder and
prefill savings that STC reports (vision encoder -24.5%, LLM prefill -45.3% on LLaVA-OV-7B with ReKV on a GPU).
Prints a table, writes JSON (every per-frame time and memory sample) and, with `--plot`, a matplotlib figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEFAULT_PLANS = ("none", "stc-cache", "stc-prune", "stc-cache+stc-prune")


def rss_mib() -> float:
    """Resident memory of this process (MiB), from /proc (0 where unavailable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def stream_source(fps: float, size: int = 112, seed: int = 0) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    """An endless stream: (frame (S, S, 3) uint8, the playing video's question) for test-split videos of the
    generated benchmark played one after another, each sampled at `fps` as `tokenreduce.video.fps_indices` does."""
    from tokenreduce.eval.synthetic.videos import VideoConfig, make_video
    from tokenreduce.video import fps_indices

    config = VideoConfig(size=size)
    index = 0
    while True:
        v = make_video(index, seed=seed, split="test", config=config)
        q = v.question
        meta = dict(uid=v.uid, question=q.question, options=list(q.options), answer=q.letter)
        for i in fps_indices(v.n_frames, v.fps, fps):
            yield v.frames[i], meta
        index += 1


def median(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(statistics.median(xs)) if xs else None


def run(model, processor, entries: Sequence[tuple[str, str, int | None]], minutes: Sequence[float], fps: float = 1.0,
        repeats: int = 3, warmup: int = 3, sample_every: int = 10, keep_positions: bool = False,
        max_new_tokens: int = 4, size: int = 112, progress: bool = True) -> dict[str, Any]:
    """Stream one shared frame sequence through one session per (label, plan, max_tokens) entry; see module doc."""
    from tqdm import tqdm

    from tokenreduce.eval.protocols import extract
    from tokenreduce.stream import StreamingSession

    checkpoints = sorted({max(1, round(m * 60 * fps)) for m in minutes})
    total = checkpoints[-1]
    sessions = [StreamingSession(model, processor, plan, max_tokens=cap, fps=fps, prompt="mlvu",
                                 keep_positions=keep_positions) for _, plan, cap in entries]
    source = stream_source(fps, size)
    with torch.no_grad():
        warm = [next(source)[0] for _ in range(warmup)]
        for s in sessions:
            if warm:
                s.push(np.stack(warm))
                s.ask("warm up?", ["a", "b"], max_new_tokens=1)
            s.reset()
    source = stream_source(fps, size)
    per = [dict(frames=[], memory=[], answers=[]) for _ in entries]
    rss = []
    n = len(sessions)
    t_start = time.perf_counter()
    bar = tqdm(total=total, desc="streaming", unit="frame", disable=not progress)
    with torch.no_grad():
        for t in range(total):
            frame, meta = next(source)
            for k in range(n):
                i = (t + k) % n  # rotate the order every frame
                rec = sessions[i].push(frame)[0]
                per[i]["frames"].append({key: rec[key] for key in (
                    "frame_ms", "vision_ms", "tower_ms", "llm_ms", "reduce_ms", "saved_ms", "kept", "visual_tokens",
                    "kv_tokens", "evicted")})
            if (t + 1) % sample_every == 0 or t + 1 in checkpoints:
                for i, s in enumerate(sessions):
                    st = s.stats
                    per[i]["memory"].append(dict(frame=t + 1, kv_mib=st["kv_bytes"] / 2 ** 20,
                                                 cacher_mib=st["cacher_bytes"] / 2 ** 20,
                                                 visual_tokens=st["visual_tokens"], position=st["position"]))
                rss.append(dict(frame=t + 1, rss_mib=rss_mib()))
            if t + 1 in checkpoints:
                for r in range(repeats):
                    for k in range(n):
                        i = (r + k) % n
                        s = sessions[i]
                        text = s.ask(meta["question"], meta["options"], max_new_tokens=max_new_tokens)
                        st = s.stats
                        per[i]["answers"].append(dict(frame=t + 1, minute=(t + 1) / fps / 60, repeat=r,
                                                      ms=st["last_answer_ms"], ttft_ms=st["last_ttft_ms"],
                                                      correct=extract("mlvu", text) == meta["answer"],
                                                      kv_tokens=st["kv_tokens"]))
            bar.update(1)
    bar.close()
    wall = time.perf_counter() - t_start
    results = []
    for (label, plan, cap), s, p in zip(entries, sessions, per):
        windows, prev = [], 0
        for c in checkpoints:
            fr = p["frames"][prev:c]
            ans = [a for a in p["answers"] if a["frame"] == c]
            mem = next(m for m in p["memory"] if m["frame"] == c)
            frame_ms = median([f["frame_ms"] for f in fr])
            windows.append(dict(
                minute=c / fps / 60, frames=c, frame_ms=frame_ms, fps=1000 / frame_ms if frame_ms else None,
                tower_ms=median([f["tower_ms"] for f in fr]),
                proj_reduce_ms=median([f["vision_ms"] - f["tower_ms"] + f["reduce_ms"] for f in fr]),
                llm_ms=median([f["llm_ms"] for f in fr]),
                saved_ms=float(np.mean([f["saved_ms"] for f in fr])) if fr else None,  # a mean: refs save 0
                kept=median([f["kept"] for f in fr]), kv_tokens=ans[0]["kv_tokens"] if ans else None,
                kv_mib=mem["kv_mib"], cacher_mib=mem["cacher_mib"], position=mem["position"],
                answer_ms=median([a["ms"] for a in ans]), ttft_ms=median([a["ttft_ms"] for a in ans]),
                correct=float(np.mean([a["correct"] for a in ans])) if ans else None,
            ))
            prev = c
        st = s.stats
        results.append(dict(label=label, plan=plan, max_tokens=cap, windows=windows, stats={
            k: st[k] for k in ("frames", "arrived_tokens", "kept_tokens", "evicted_tokens", "vision_ms", "tower_ms",
                               "vision_ms_saved", "reference_frames", "llm_ms")}, **p))
    return dict(fps=fps, minutes=list(minutes), checkpoints=checkpoints, repeats=repeats, warmup=warmup,
                keep_positions=keep_positions, wall_s=wall, rss=rss, plans=results)


#: every column of the table: (header, legend); the default table shows NARROW, `--wide` all of them
COLUMNS: dict[str, str] = {
    "plan": "the session's plan",
    "cap": "the session's cap on visual KV entries (max_tokens; 'none': uncapped)",
    "min": "minutes of stream at the checkpoint",
    "fps": "frames per second the session sustained over the window before the checkpoint",
    "frame ms": "wall time per pushed frame (encode, reduce, append to the KV cache), median",
    "tower ms": "vision tower time per frame, median",
    "tower x": "tower ms / the first plan's (below 1: the cacher saves encoder time)",
    "proj+red ms": "projector, pooling and reducers per frame, median",
    "LLM ms": "appending the frame's kept tokens to the LLM's KV cache, median",
    "LLM x": "LLM ms / the first plan's",
    "saved ms": "the cacher's measured saving per frame vs the recent reference frames (negative: it costs)",
    "kept": "visual tokens kept per frame",
    "KV tok": "visual entries in the KV cache at the checkpoint (bounded by the cap)",
    "KV MiB": "memory of those KV entries",
    "answer ms": "time to answer a question at the checkpoint (greedy), median of the repeats",
    "answer x": "answer ms / the first plan's",
    "TTFT ms": "time to the answer's first token, median",
    "correct": "share of the checkpoint's questions answered correctly",
}
NARROW = ("plan", "cap", "min", "fps", "tower x", "saved ms", "kept", "KV tok", "answer ms", "answer x", "correct")


def table(result: dict[str, Any], wide: bool = False) -> str:
    """One row per plan and checkpoint, with ratios against the first plan, and a legend under it; at most 120
    characters wide unless `wide` (every column)."""
    base = result["plans"][0]["windows"]

    def ratio(a, b):
        return f"{a / b:.2f}" if a and b else "-"

    def f(x, d=1):
        return "-" if x is None else f"{x:.{d}f}"

    heads = list(COLUMNS) if wide else list(NARROW)
    rows = [heads]
    for p in result["plans"]:
        cap = str(p["max_tokens"]) if p["max_tokens"] else "none"
        for w, b in zip(p["windows"], base):
            cells = {
                "plan": p["label"], "cap": cap, "min": f(w["minute"], 0 if w["minute"] >= 1 else 2),
                "fps": f(w["fps"], 2),
                "frame ms": f(w["frame_ms"]), "tower ms": f(w["tower_ms"]),
                "tower x": ratio(w["tower_ms"], b["tower_ms"]), "proj+red ms": f(w["proj_reduce_ms"]),
                "LLM ms": f(w["llm_ms"]), "LLM x": ratio(w["llm_ms"], b["llm_ms"]), "saved ms": f(w["saved_ms"]),
                "kept": f(w["kept"], 0), "KV tok": str(w["kv_tokens"]), "KV MiB": f(w["kv_mib"], 2),
                "answer ms": f(w["answer_ms"]), "answer x": ratio(w["answer_ms"], b["answer_ms"]),
                "TTFT ms": f(w["ttft_ms"]), "correct": f(w["correct"], 2),
            }
            rows.append([cells[h] for h in heads])
    widths = [max(len(r[i]) for r in rows) for i in range(len(heads))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    key = max(len(h) for h in heads)
    legend = [f"{h.rjust(key)}: {COLUMNS[h]}" for h in heads]
    return "\n".join(lines + [""] + legend)


def plot(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Memory (KV MiB, process RSS), frame time (rolling median) and answer latency over the stream (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fps = result["fps"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for p in result["plans"]:
        mem = p["memory"]
        minutes = [m["frame"] / fps / 60 for m in mem]
        axes[0].plot(minutes, [m["kv_mib"] + m["cacher_mib"] for m in mem], label=p["label"])
        ms = np.array([f["frame_ms"] for f in p["frames"]])
        k = max(1, min(31, len(ms) // 10))
        roll = [float(np.median(ms[max(0, i - k):i + 1])) for i in range(len(ms))]
        axes[1].plot(np.arange(1, len(ms) + 1) / fps / 60, roll, label=p["label"])
        ans = p["answers"]
        cps = sorted({a["minute"] for a in ans})
        axes[2].plot(cps, [median([a["ms"] for a in ans if a["minute"] == c]) for c in cps], "o-", label=p["label"])
    if result["rss"]:
        ax = axes[0].twinx()
        ax.plot([r["frame"] / fps / 60 for r in result["rss"]], [r["rss_mib"] for r in result["rss"]], "k:",
                label="process RSS")
        ax.set_ylabel("process RSS (MiB, dotted)")
    axes[0].set(title="per-stream memory (KV cache + cacher)", xlabel="stream minutes", ylabel="MiB")
    axes[1].set(title="time to ingest one frame (rolling median)", xlabel="stream minutes", ylabel="ms")
    axes[1].axhline(1000 / fps, color="grey", ls="--", lw=1, label="real time")
    axes[2].set(title="answer latency", xlabel="stream minutes", ylabel="ms (median)")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load(spec: str, vision_layers: int | None, llm_layers: int | None):
    """(model, processor) for --model: "default" (the shipped trained model) or a video preset (random weights)."""
    import tokenreduce as tr

    if spec == "default":
        return tr.load_default("video")
    from tokenreduce.adapters.videollm.zoo import PRESETS, build_video_llm

    if spec not in PRESETS:
        raise tr.InputError(f"--model must be default or one of {', '.join(PRESETS)}, got {spec!r}")
    return build_video_llm(spec, llm_layers=llm_layers, vision_layers=vision_layers)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tokenreduce.stream.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="default, or a video preset such as llava-onevision-7b-shape")
    p.add_argument("--vision-layers", type=int, default=None, help="vision layers of a preset (fewer on CPU)")
    p.add_argument("--llm-layers", type=int, default=None, help="decoder layers of a preset (fewer on CPU)")
    p.add_argument("--plans", default=";".join(DEFAULT_PLANS), help="plans separated by ';' (the first is the base)")
    p.add_argument("--minutes", default="1,5,30", help="checkpoints in minutes of stream (default 1,5,30)")
    p.add_argument("--fps", type=float, default=1.0, help="frames per second of stream (default 1)")
    p.add_argument("--max-tokens", type=int, default=1024, help="visual KV cap of every session (0: none)")
    p.add_argument("--uncapped", action="store_true", help="also stream the first plan with no cap")
    p.add_argument("--keep-positions", action="store_true", help="kept tokens keep their stream positions")
    p.add_argument("--repeats", type=int, default=3, help="questions per session and checkpoint (median)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up frames per session (then reset)")
    p.add_argument("--max-new-tokens", type=int, default=4)
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--out", default="stream-bench.json", help="JSON output")
    p.add_argument("--plot", default=None, help="write a PNG of memory and latency over time here (matplotlib)")
    p.add_argument("--wide", action="store_true", help="print every column (default: the table fits 120 characters)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    import tokenreduce as tr

    args = parse_args(argv)
    try:
        minutes = [float(m) for m in args.minutes.split(",") if m.strip()]
    except ValueError:
        print(f"error: --minutes must be numbers separated by commas, got {args.minutes!r}", file=sys.stderr)
        return 2
    plans = [p.strip() for p in args.plans.split(";") if p.strip()]
    if not minutes or min(minutes) <= 0 or not plans or args.fps <= 0 or args.repeats < 1 or args.max_tokens < 0:
        print("error: give positive --minutes, --fps and --repeats, at least one plan, and --max-tokens >= 0",
              file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    cap = args.max_tokens or None
    entries = [(p, p, cap) for p in plans]
    if args.uncapped and cap is not None:
        entries.append((plans[0], plans[0], None))
    try:
        for _, p, _ in entries:
            tr.Plan.parse(p)
        model, processor = load(args.model, args.vision_layers, args.llm_layers)
        size = model.config.vision_config.image_size
        result = run(model, processor, entries, minutes, fps=args.fps, repeats=args.repeats, warmup=args.warmup,
                     keep_positions=args.keep_positions, max_new_tokens=args.max_new_tokens, size=max(112, size))
    except tr.TokenReduceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result.update(model=args.model, vision_layers=args.vision_layers, llm_layers=args.llm_layers,
                  threads=torch.get_num_threads(), torch=torch.__version__, cpu_count=os.cpu_count(),
                  loadavg=os.getloadavg() if hasattr(os, "getloadavg") else None)
    text = table(result, wide=args.wide)
    print(text)
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    if args.plot:
        print(f"wrote {plot(result, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
