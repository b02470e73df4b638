"""`tokenreduce bench`: time to first token, LLM prefill time and peak memory, unreduced vs reduced.

Every plan is measured in the same process as the unreduced model, round-robin over repeats so drift
(thermal, page cache) does not favour either side. The figure of merit is the **speedup efficiency**:
measured speedup / ideal speedup, the ideal being the ratio of FLOPs implied by the token counts
(DESIGN.md section 6). Results are rewritten to JSON after every round, so a killed run keeps what
finished.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import sys
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch

DEFAULT_REDUCERS = "aim-merge,random,pool"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="llava-1.5-7b-shape", help="model preset (default: LLaVA-1.5-7B widths)")
    p.add_argument("--llm-layers", type=int, default=2, help="LLM decoder layers (default 2, to fit a CPU)")
    p.add_argument("--vision-layers", type=int, default=None, help="vision layers (default: the preset's)")
    p.add_argument("--reducers", default=DEFAULT_REDUCERS, help=f"comma list (default {DEFAULT_REDUCERS})")
    p.add_argument("--keep", default="0.5,0.25,0.111", help="budgets as fractions of the visual tokens")
    p.add_argument("--plans", default=None, help="';'-separated plan strings instead of --reducers x --keep")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", default="bench-results/bench.json")


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every millisecond (CPU runs).

    Freed heap is returned to the OS first (`malloc_trim`) so one run's leftovers do not hide the next.
    """

    def __enter__(self) -> PeakRSS:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


def _inputs(processor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from PIL import Image

    path = resources.files("tokenreduce") / "assets" / "shapes.png"
    with resources.as_file(path) as p:
        image = Image.open(p).convert("RGB")
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    text = processor.apply_chat_template(conv, add_generation_prompt=True)
    inputs = dict(processor(text=text, images=image, return_tensors="pt"))
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs


def measure(model, inputs: dict[str, Any], plan: str) -> dict[str, Any]:
    """One time-to-first-token measurement of `plan` ("none" = unreduced, same code path)."""
    import tokenreduce as tr

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as mem, tr.apply(model, plan, sync_timing=True) as run, torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
        if cuda:
            torch.cuda.synchronize()
        ttft = time.perf_counter() - t0
    call = run.report.last
    return {
        "ttft": ttft,
        "vision": call.times["vision"],
        "prefill": call.times["prefill"],
        "reduce": sum(v for k, v in call.times.items() if k.startswith("reduce:")),
        "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else mem.mib,
        "tokens": call.tokens()[0],
        "seq_llm": call.seq_llm[0],
        "flops": dict(call.flops),
    }


def summarize(plan: str, runs: list[dict[str, Any]], base: dict[str, Any] | None, kv_bytes_per_token: float):
    """Medians of the repeats, speedups against the baseline record and the ideal speedups from FLOPs."""
    med = {k: statistics.median(r[k] for r in runs) for k in ("ttft", "vision", "prefill", "reduce", "peak_mib")}
    first = runs[0]
    rec: dict[str, Any] = {
        "plan": plan,
        "visual_tokens": first["tokens"],
        "seq_llm": first["seq_llm"],
        "ttft_ms": med["ttft"] * 1e3,
        "ttft_ms_min": min(r["ttft"] for r in runs) * 1e3,
        "prefill_ms": med["prefill"] * 1e3,
        "vision_ms": med["vision"] * 1e3,
        "reduce_ms": med["reduce"] * 1e3,
        "peak_mib": med["peak_mib"],
        "kv_cache_mib": kv_bytes_per_token * first["seq_llm"] / 2**20,
        "flops": first["flops"],
        "repeats": len(runs),
    }
    if base is not None:
        f, fb = first["flops"], base["flops"]
        ideal_prefill = fb["llm_prefill"] / f["llm_prefill"]
        ideal_ttft = (fb["vision"] + fb["llm_prefill"]) / (f["vision"] + f["llm_prefill"])
        rec["prefill_speedup"] = base["prefill_ms"] / rec["prefill_ms"]
        rec["ttft_speedup"] = base["ttft_ms"] / rec["ttft_ms"]
        rec["ideal_prefill_speedup"] = ideal_prefill
        rec["ideal_ttft_speedup"] = ideal_ttft
        rec["prefill_efficiency"] = rec["prefill_speedup"] / ideal_prefill
        rec["ttft_efficiency"] = rec["ttft_speedup"] / ideal_ttft
    return rec


COLUMNS = [
    ("plan", "plan", "{}"), ("visual_tokens", "vis tok", "{}"), ("seq_llm", "LLM seq", "{}"),
    ("ttft_ms", "TTFT ms", "{:.0f}"), ("vision_ms", "vision ms", "{:.0f}"), ("prefill_ms", "prefill ms", "{:.0f}"),
    ("reduce_ms", "reduce ms", "{:.1f}"), ("prefill_speedup", "prefill x", "{:.2f}"),
    ("ideal_prefill_speedup", "ideal x", "{:.2f}"), ("prefill_efficiency", "prefill eff", "{:.2f}"),
    ("ttft_speedup", "TTFT x", "{:.2f}"), ("ideal_ttft_speedup", "ideal TTFT x", "{:.2f}"),
    ("ttft_efficiency", "TTFT eff", "{:.2f}"), ("peak_mib", "peak MiB", "{:.0f}"), ("kv_cache_mib", "KV MiB", "{:.1f}"),
]


def table(records: list[dict[str, Any]]) -> str:
    cells = [[h for _, h, _ in COLUMNS]]
    for r in records:
        cells.append([fmt.format(r[k]) if k in r else "-" for k, _, fmt in COLUMNS])
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from tokenreduce.adapters.llava.zoo import build_llava_with_processor

    dtype = getattr(torch, args.dtype)
    t_build = time.perf_counter()
    model, processor = build_llava_with_processor(
        args.preset, attn=args.attn, dtype=dtype, llm_layers=args.llm_layers, vision_layers=args.vision_layers
    )
    inputs = _inputs(processor, dtype)
    n_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    if args.plans:
        plans = [p.strip() for p in args.plans.split(";") if p.strip()]
    else:
        keeps = [float(k) for k in args.keep.split(",")]
        plans = [f"{r}(tokens={max(1, round(k * n_visual))})" for k in keeps for r in args.reducers.split(",")]
    plans = ["none", *plans]
    print(f"built {args.preset} ({args.llm_layers} LLM layers) in {time.perf_counter() - t_build:.1f}s; "
          f"{n_visual} visual tokens; {len(plans)} plans x {args.repeats} repeats", file=sys.stderr)

    tc = model.config.text_config
    head_dim = tc.hidden_size // tc.num_attention_heads
    kv_per_token = 2 * tc.num_hidden_layers * tc.num_key_value_heads * head_dim * torch.finfo(dtype).bits // 8
    for i in range(args.warmup):
        print(f"warmup {i + 1}/{args.warmup}", file=sys.stderr)
        measure(model, inputs, plans[0])
    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in plans}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                    "cpu": _cpu_name()},
        "config": {k: v for k, v in vars(args).items() if k != "fn"},
        "visual_tokens_per_image": n_visual,
    }
    records: list[dict[str, Any]] = []
    for rep in range(args.repeats):
        for j, plan in enumerate(plans):
            print(f"[round {rep + 1}/{args.repeats}] [{j + 1}/{len(plans)}] {plan}", file=sys.stderr)
            runs[plan].append(measure(model, inputs, plan))
        base = summarize("none", runs["none"], None, kv_per_token)
        records = [summarize(p, runs[p], base, kv_per_token) for p in plans]
        out.write_text(json.dumps({**meta, "rounds_done": rep + 1, "results": records}, indent=2))
    print(table(records))
    print(f"\nwrote {out}")
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
