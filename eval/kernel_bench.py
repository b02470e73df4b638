"""`tokenreduce bench --kernels`: each kernel's time and peak memory, Triton vs torch reference vs naive torch.

For every operation of `tokenreduce.kernels` at image scale (576 and 2880 tokens; D 1024 and 4096) and video
scale (32 to 128 frames of 196 tokens; D 3584, LLaVA-OneVision-7B's width), three implementations run on the
same inputs, interleaved round by round after a warm-up, and report medians:

- ``naive``: the obvious torch code that materialises what the kernel avoids (the full similarity matrix, the
  expanded scatter index, every window's copy, per-frame Python loops);
- ``torch``: the kernel's torch reference (what runs on CPU);
- ``triton``: the Triton kernel (GPU only: on a CPU the column says so; Triton's interpreter is a test tool,
  not something to time).

Peak memory is the CUDA allocator's peak on a GPU, the process's resident-memory high-water mark on a CPU
(`PeakRSS`), measured in a separate call so the timing is not disturbed. A second table compares `aim-merge`'s
whole `reduce` (gathers, budgets, the VisualTokens bookkeeping) with its core merge (`bipartite_merge` on the
stacked frames) at 32 frames x 196 tokens on 1 and 2 threads: the reducer's overhead. The JSON has every row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tokenreduce import kernels as K
from tokenreduce.kernels._backend import interpreting

Fn = Callable[[], Any]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mib(fn: Fn, device: torch.device) -> float:
    """Peak memory of one call above the level before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from .bench import PeakRSS

    with PeakRSS() as peak:
        fn()
    return peak.mib


# ----------------------------------------------------------------------------------------------------------------
# the naive, materialising versions
# ----------------------------------------------------------------------------------------------------------------


def naive_match(a, b):
    sim = F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).transpose(1, 2)  # (B, Na, Nb)
    return sim.max(-1)


def naive_scatter(x, index, m, size):
    b, n, d = x.shape
    idx = index.clamp(min=0)[..., None].expand(b, n, d)  # the expanded (B, N, D) long index
    w = size * (index >= 0)
    acc = torch.zeros(b, m, d, device=x.device).scatter_add_(1, idx, x.float() * w[..., None])
    den = torch.zeros(b, m, device=x.device).scatter_add_(1, index.clamp(min=0), w)
    return acc / den.clamp_min(1e-30)[..., None]


def naive_windows(x, k):
    g, h, w, d = x.shape
    hh, ww = h // k, w // k
    win = x[:, : hh * k, : ww * k].float().reshape(g, hh, k, ww, k, d).permute(0, 1, 3, 2, 4, 5).reshape(g, hh, ww,
                                                                                                          k * k, d)
    u = F.normalize(win, dim=-1)
    gram = u @ u.transpose(-1, -2)  # every window's n x n cosines
    n = k * k
    return (gram.sum((-1, -2)) - n) / (n * (n - 1))


def naive_frames(x):
    return F.cosine_similarity(x[1:].float(), x[:-1].float(), dim=-1)


def naive_running(x):
    means = x.float().mean(1)
    anchors = means.cumsum(0) / torch.arange(1, x.shape[0] + 1, device=x.device)[:, None]
    return F.cosine_similarity(x.float(), anchors[:, None, :].expand_as(x), dim=-1)


def naive_topk(scores, frames, k):
    keep = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
    per = scores.shape[0] // frames
    for f in range(frames):  # one topk per frame
        keep[f * per + torch.topk(scores[f * per:(f + 1) * per], k).indices] = True
    return keep


# ----------------------------------------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------------------------------------


def cases(device: torch.device, dtype: torch.dtype, scale: str) -> list[tuple[str, str, Callable[[], dict[str, Fn]]]]:
    """(operation, shape label, builder of {"naive", "torch", "triton"} callables), built lazily."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    image = [(576, 1024), (576, 4096), (2880, 1024), (2880, 4096)]
    video = [32, 64, 128]
    dv = 3584
    if scale == "small":
        image, video, dv = [(576, 256), (2880, 256)], [32], 256
    out = []

    def match(b, n, d):
        def build():
            x = randn(b, n, d)
            a, bb = x[:, ::2], x[:, 1::2]
            return {"naive": lambda: naive_match(a, bb), "torch": lambda: K.bipartite_match(a, bb, backend="torch"),
                    "triton": lambda: K.bipartite_match(a, bb, backend="triton")}
        return build

    def scatter(b, n, d):
        def build():
            x = randn(b, n, d)
            index = torch.arange(n, device=device).div(2, rounding_mode="floor").expand(b, n).contiguous()
            size = torch.ones(b, n, device=device)
            m = (n + 1) // 2
            return {"naive": lambda: naive_scatter(x, index, m, size),
                    "torch": lambda: K.scatter_mean(x, index, m, size, backend="torch", check=False),
                    "triton": lambda: K.scatter_mean(x, index, m, size, backend="triton", check=False)}
        return build

    for n, d in image:
        out.append(("bipartite_match", f"{n} tokens, D {d}", match(1, n, d)))
    for f in video:
        out.append(("bipartite_match", f"{f} frames x 196, D {dv}", match(f, 196, dv)))
    for n, d in image:
        out.append(("scatter_mean", f"{n} tokens, D {d}", scatter(1, n, d)))
    for f in video:
        out.append(("scatter_mean", f"{f} frames x 196, D {dv}", scatter(f, 196, dv)))

    def windows(items, d):
        def build():
            x = randn(items, 24, 24, d)
            return {"naive": lambda: naive_windows(x, 3), "torch": lambda: K.window_similarity(x, 3, backend="torch"),
                    "triton": lambda: K.window_similarity(x, 3, backend="triton")}
        return build

    dw = 1024 if scale == "paper" else 256
    for items in (1, 5):
        out.append(("window_similarity", f"{items} x 24x24 grid, D {dw}", windows(items, dw)))

    def temporal(f, d, running):
        def build():
            x = randn(f, 196, d)
            if running:
                return {"naive": lambda: naive_running(x),
                        "torch": lambda: K.running_mean_similarity(x, backend="torch"),
                        "triton": lambda: K.running_mean_similarity(x, backend="triton")}
            return {"naive": lambda: naive_frames(x), "torch": lambda: K.frame_similarity(x, backend="torch"),
                    "triton": lambda: K.frame_similarity(x, backend="triton")}
        return build

    for f in video:
        out.append(("frame_similarity", f"{f} frames x 196, D {dv}", temporal(f, dv, False)))
        out.append(("running_mean_similarity", f"{f} frames x 196, D {dv}", temporal(f, dv, True)))

    def topk(f):
        def build():
            scores = torch.randn(f * 196, generator=g).to(device)
            seg = torch.arange(f, device=device).repeat_interleave(196)
            return {"naive": lambda: naive_topk(scores, f, 64), "torch": lambda: K.segment_topk(scores, seg, 64,
                                                                                                  backend="torch"),
                    "triton": lambda: K.segment_topk(scores, seg, 64, backend="triton")}
        return build

    for f in video:
        out.append(("segment_topk", f"{f} frames x 196, keep 64", topk(f)))
    return out


def time_case(fns: dict[str, Fn], device: torch.device, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Interleaved rounds: every implementation once per round, in turn; seconds per call."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def overhead_rows(device: torch.device, dtype: torch.dtype, repeats: int, warmup: int, d: int) -> list[dict]:
    """aim-merge's reduce vs its core merge at 32 frames x 196 tokens, on 1 and 2 threads (CPU).

    `ratio` is the median over rounds of reduce / core timed back to back in the same round (a shared machine's
    load changes between rounds more than within one); `bookkeeping_ms` is reduce with the core merge's result
    precomputed: everything the reducer does besides the merge (budgets, gathers, the VisualTokens update).
    """
    import tokenreduce as tr
    import tokenreduce.merge.aim as aim

    g = torch.Generator().manual_seed(1)
    feats = torch.randn(32, 196, d, generator=g).to(device, dtype)
    items = [tr.tokens.ItemInfo(image=0, kind="frame", index=f) for f in range(32)]
    vt = tr.VisualTokens.from_items(list(feats), [(14, 14)] * 32, torch.arange(32 * 196, device=device), items)
    reducer, ctx = aim.AIMMerge(keep=0.25), tr.Context()
    merge = aim.bipartite_merge
    fns = {"core": lambda: merge(feats, 49), "reduce": lambda: reducer.reduce([vt], [ctx])}
    rows = []
    threads = [1, 2] if device.type == "cpu" else [torch.get_num_threads()]
    before = torch.get_num_threads()
    rounds = max(repeats, 9)
    try:
        for n in threads:
            torch.set_num_threads(n)
            t = time_case(fns, device, rounds, warmup)
            done = merge(feats, 49)
            aim.bipartite_merge = lambda *a, _done=done, **k: _done  # the reducer without the merge itself
            try:
                book = time_case({"reduce": fns["reduce"]}, device, rounds, warmup)["reduce"]
            finally:
                aim.bipartite_merge = merge
            rows.append({"threads": n, "frames": 32, "tokens": 196, "dim": d,
                         "core_ms": statistics.median(t["core"]) * 1e3,
                         "reduce_ms": statistics.median(t["reduce"]) * 1e3,
                         "ratio": statistics.median(r / c for r, c in zip(t["reduce"], t["core"])),
                         "bookkeeping_ms": statistics.median(book) * 1e3})
    finally:
        torch.set_num_threads(before)
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from tokenreduce.loading import DTYPE_ALIASES, DTYPES

    dtype = DTYPES[DTYPE_ALIASES.get(args.dtype, args.dtype)]  # bench's --dtype: fp32/bf16/fp16 (or float32, ...)
    on_gpu = device.type == "cuda" and K.triton_available() and not interpreting()
    rows = []
    todo = cases(device, dtype, args.kernel_scale)
    try:
        from tqdm import tqdm
        todo_iter = tqdm(todo, desc="kernels", file=sys.stderr)
    except ImportError:  # tqdm comes with transformers; be safe anyway
        todo_iter = todo
    for op, shape, build in todo_iter:
        fns = build()
        if not on_gpu:
            fns.pop("triton")
        times = time_case(fns, device, args.repeats, args.warmup)
        row: dict[str, Any] = {"op": op, "shape": shape}
        for name in ("naive", "torch", "triton"):
            if name in fns:
                row[f"{name}_ms"] = statistics.median(times[name]) * 1e3
                row[f"{name}_mib"] = _peak_mib(fns[name], device)
            else:
                row[f"{name}_ms"] = row[f"{name}_mib"] = None
        del fns
        rows.append(row)
    over = overhead_rows(device, dtype, args.repeats, args.warmup, 3584 if args.kernel_scale == "paper" else 256)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu(),
        "triton": "compiled on the GPU" if on_gpu else "not measured: the Triton kernels need a CUDA GPU",
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "scale": args.kernel_scale,
        "rows": rows,
        "aim_merge_overhead": over,
    }


def _cpu() -> str:
    from .bench import _cpu_name

    return _cpu_name()


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


#: the kernel table's columns and what each means; the default table leaves out "triton MiB" and shortens shapes
LEGEND = {
    "op": "the kernel (tokenreduce.kernels entry point)",
    "shape": "its inputs: tokens (or frames x tokens per frame, or items x grid) and the feature width D",
    "naive ms": "plain torch that materialises what the kernel avoids (full similarity matrix, expanded index)",
    "torch ms": "our torch reference (blockwise, no Python loop over tokens or frames)",
    "triton ms": "the Triton kernel ('-': not measured, it needs a CUDA GPU)",
    "naive MiB": "peak memory of the naive version (CPU: resident-memory high-water mark; GPU: allocator peak)",
    "torch MiB": "peak memory of the torch reference",
    "triton MiB": "peak memory of the Triton kernel",
    "torch x": "naive ms / torch ms (above 1: the reference is faster)",
    "triton x": "naive ms / triton ms",
}
_NARROW = ("op", "shape", "naive ms", "torch ms", "triton ms", "naive MiB", "torch MiB", "torch x", "triton x")


def _compact(shape: str) -> str:
    """"128 frames x 196, D 3584" -> "128x196 D3584": the shape column of the default table."""
    for old, new in ((" frames", ""), (" tokens", ""), (" grid", ""), (" x ", "x"), (", D ", " D"), (", keep ", " k")):
        shape = shape.replace(old, new)
    return shape


def _aligned(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return [lines[0], "-" * len(lines[0]), *lines[1:]]


def table(result: dict[str, Any], wide: bool = False) -> str:
    """The kernel table (at most 120 columns unless `wide`) with its legend, then the aim-merge overhead table."""
    heads = list(LEGEND) if wide else list(_NARROW)
    rows = [heads]
    for r in result["rows"]:
        tx = None if r["triton_ms"] is None else r["naive_ms"] / r["triton_ms"]
        cells = {"op": r["op"], "shape": r["shape"] if wide else _compact(r["shape"]),
                 "naive ms": _fmt(r["naive_ms"]), "torch ms": _fmt(r["torch_ms"]), "triton ms": _fmt(r["triton_ms"]),
                 "naive MiB": _fmt(r["naive_mib"], ".1f"), "torch MiB": _fmt(r["torch_mib"], ".1f"),
                 "triton MiB": _fmt(r["triton_mib"], ".1f"), "torch x": f"{r['naive_ms'] / r['torch_ms']:.2f}x",
                 "triton x": "-" if tx is None else f"{tx:.2f}x"}
        rows.append([cells[h] for h in heads])
    key = max(len(h) for h in heads)
    lines = [f"kernels on {result['device']} ({result['dtype']}, {result['threads']} threads, medians of "
             f"{result['repeats']}); triton: {result['triton']}", "", *_aligned(rows), "",
             *(f"{h.rjust(key)}: {LEGEND[h]}" for h in heads)]
    lines += ["", "aim-merge(keep=0.25) reduce vs its core merge (bipartite_merge on the stacked frames); "
              "reduce / core", "is the median of per-round ratios, bookkeeping the reducer with the merge's result "
              "precomputed:", ""]
    over = [["threads", "frames x tokens", "D", "core ms", "reduce ms", "reduce / core", "bookkeeping ms"]]
    for r in result["aim_merge_overhead"]:
        over.append([str(r["threads"]), f"{r['frames']} x {r['tokens']}", str(r["dim"]), f"{r['core_ms']:.2f}",
                     f"{r['reduce_ms']:.2f}", f"{r['ratio']:.3f}", f"{r['bookkeeping_ms']:.2f}"])
    return "\n".join(lines + _aligned(over))


def main(args: argparse.Namespace) -> int:
    """Run the kernel benchmark, print the tables, write JSON to --out."""
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if out == Path("bench-results/bench.json"):  # the plan benchmark's default: keep them apart
        out = Path("bench-results/kernels.json")
    result = run(args)
    print(table(result, wide=getattr(args, "wide", False)))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0
