"""`tokenreduce bench`: time to first token, LLM prefill time and peak memory, unreduced vs reduced.

Every plan is measured in the same process as the unreduced model, round-robin over repeats, every other
round in reverse order, so drift (thermal, page cache) does not favour either side. The figure of merit
is the **speedup efficiency**: measured speedup / ideal speedup, the ideal being the ratio of FLOPs
implied by the token counts (DESIGN.md section 6). Results are rewritten to JSON after every round, so a
killed run keeps what finished.

Two unreduced measurements are taken: `none` (the plan with no reducers, attached: same code path as a
reduced plan, so it gives the vision/prefill split and is the baseline of every speedup) and `stock`
(nothing attached: the model as Hugging Face ships it); `stock` vs `none` is the cost of the hooks.
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

from .errors import EvalError

DEFAULT_REDUCERS = "aim-merge,random,pool"
#: 50%, 25% and 11% of the visual tokens (288, 144 and 64 of LLaVA-1.5's 576)
DEFAULT_KEEP = "0.5,0.25,0.111"
PROMPT = "Describe the image."


def _count(minimum: int):
    """An argparse type: an integer >= `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `tokenreduce bench`."""
    p.add_argument("--preset", default="llava-1.5-7b-shape", help="model preset (default: LLaVA-1.5-7B widths)")
    p.add_argument("--llm-layers", type=_count(1), default=2, help="LLM decoder layers (default 2, to fit a CPU)")
    p.add_argument("--vision-layers", type=_count(1), default=None, help="vision layers (default: the preset's)")
    p.add_argument("--reducers", default=DEFAULT_REDUCERS, help=f"comma list (default {DEFAULT_REDUCERS})")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--keep", default=None,
                        help=f"budgets as fractions of the visual tokens (default {DEFAULT_KEEP})")
    budget.add_argument("--budgets", default=None, help="budgets as visual-token counts, e.g. 288,144,64")
    p.add_argument("--plans", default=None, help="';'-separated plan strings instead of --reducers x budgets")
    p.add_argument("--repeats", type=_count(1), default=3, help="measured rounds (median and min reported)")
    p.add_argument("--warmup", type=_count(0), default=1, help="unmeasured rounds over every plan first")
    p.add_argument("--batch", type=_count(1), default=1, help="copies of the prompt and image per call")
    p.add_argument("--threads", type=_count(1), default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", default="bench-results/bench.json", help="JSON path (parent folders are created)")
    p.add_argument("--decode", type=_count(0), default=0,
                   help="also generate this many tokens after the first and report decode tokens/s (default 0)")
    p.add_argument("--video", action="store_true",
                   help="video bench: a video preset (default llava-onevision-7b-shape) at --frames frames")
    p.add_argument("--frames", default="32", help="with --video: comma list of frame counts (default 32)")
    p.add_argument("--image-size", type=_count(28), default=672,
                   help="Qwen2-VL presets: the image's side in pixels (default 672: 576 visual tokens)")
    p.add_argument("--kernels", action="store_true",
                   help="benchmark the similarity kernels instead (Triton vs torch reference vs naive torch; "
                        "see tokenreduce.eval.kernel_bench)")
    p.add_argument("--kernel-scale", default="paper", choices=["paper", "small"],
                   help="with --kernels: the issue's image and video scales (default) or small ones for a quick run")


class PeakRSS:
    """Peak resident memory above the level at entry (CPU runs), in `mib`.

    Freed heap is returned to the OS first (`malloc_trim`) so one run's leftovers do not hide the next. The
    peak is the kernel's high-water mark (`VmHWM`, reset by writing 5 to /proc/self/clear_refs): exact and
    free. Where that reset is refused, a thread samples the RSS every millisecond instead (`method` says
    which); on a machine with few cores that thread slows the timed call by several percent.
    """

    def __enter__(self) -> PeakRSS:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        self._thread: threading.Thread | None = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "VmHWM"
        except OSError:
            self.method = "sampled 1 ms"
        self.base = self.peak = self._status("VmRSS")
        if self.method != "VmHWM":
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    @staticmethod
    def _status(key: str) -> int:
        """A `/proc/self/status` figure ("VmRSS", "VmHWM") in bytes."""
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise OSError(f"no {key} in /proc/self/status")

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._status("VmRSS"))

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self.peak = max(self.peak, self._status("VmHWM" if self.method == "VmHWM" else "VmRSS"))

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


def _inputs(processor, dtype: torch.dtype, batch: int = 1) -> dict[str, torch.Tensor]:
    """The shipped test image and a one-question chat prompt, `batch` times, through the processor."""
    from PIL import Image

    path = resources.files("tokenreduce") / "assets" / "shapes.png"
    with resources.as_file(path) as p:
        image = Image.open(p).convert("RGB")
    pinpoints = getattr(getattr(processor, "image_processor", None), "image_grid_pinpoints", None)
    if pinpoints:  # anyres: a square image at the largest square resolution (LLaVA-NeXT: 2x2 crops, 2880 tokens)
        side = max(min(h, w) for h, w in pinpoints if h == w) if any(h == w for h, w in pinpoints) else 0
        if side:
            image = image.resize((side, side))
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(conv, add_generation_prompt=True)
    inputs = dict(processor(text=[text] * batch, images=[image] * batch, return_tensors="pt"))
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs


class _FirstToken:
    """A stopping criterion that never stops but notes when generate produced its first token."""

    def __init__(self) -> None:
        self.t: float | None = None

    def __call__(self, input_ids, scores, **kwargs):
        if self.t is None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def measure(model, inputs: dict[str, Any], plan: str | None, decode: int = 0, tokenizer=None) -> dict[str, Any]:
    """One measurement of `plan` ("none": no reducers, attached; None: nothing attached).

    Time to first token, and with `decode` > 0 the decode rate of the next `decode` tokens (the first
    token's time is taken by a stopping-criterion callback, so one generate call gives both).
    """
    import contextlib

    from transformers import StoppingCriteriaList

    import tokenreduce as tr

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        allocated = torch.cuda.memory_allocated()
    attached = (tr.apply(model, plan, sync_timing=True, tokenizer=tokenizer) if plan is not None
                else contextlib.nullcontext())
    first = _FirstToken()
    with PeakRSS() as mem, attached as run, torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=1 + decode, min_new_tokens=1 + decode, do_sample=False,
                             stopping_criteria=StoppingCriteriaList([first]))
        if cuda:
            torch.cuda.synchronize()
        t_end = time.perf_counter()
    ttft = (first.t or t_end) - t0
    rec = {"ttft": ttft, "peak_mib": (torch.cuda.max_memory_allocated() - allocated) / 2**20 if cuda else mem.mib,
           "memory_method": "cuda max_memory_allocated" if cuda else mem.method}
    if decode:
        new = out.shape[1] - inputs["input_ids"].shape[1] - 1
        rec["decode_tps"] = new / max(t_end - first.t, 1e-9) if first.t is not None else 0.0
    if run is not None:
        call = run.report.last
        rec.update(
            vision=call.times["vision"],
            prefill=call.times["prefill"],
            reduce=sum(v for k, v in call.times.items() if k.startswith("reduce:")),
            score=sum(v for k, v in call.times.items() if k.startswith("score:")),
            tokens=call.tokens()[0],
            layer_avg=call.visual_layer_average[0],
            seq_llm=call.seq_llm[0],
            seq_llm_total=sum(call.seq_llm),
            kv_layer_tokens=sum(sum(layer) for layer in call.kv_tokens) if call.kv_tokens else None,
            llm_layers=len(call.kv_tokens) if call.kv_tokens else None,
            flops=dict(call.flops),
        )
    return rec


def visual_tokens(model, inputs: dict[str, Any]) -> int:
    """Visual tokens of the first sample as budgets count them (grid tokens the LLM sees; no newlines)."""
    import tokenreduce as tr

    with tr.apply(model, "none") as handle:
        return handle.visual_tokens(**inputs)[0]


def _ideal(f: dict[str, float], fb: dict[str, float]) -> tuple[float, float]:
    """(ideal prefill speedup, ideal TTFT speedup) of FLOPs `f` against the unreduced `fb`."""
    prefill = fb["llm_prefill"] / f["llm_prefill"]
    ttft = (fb.get("vision", 0.0) + fb["llm_prefill"]) / (f.get("vision", 0.0) + f["llm_prefill"])
    return prefill, ttft


def summarize(plan: str, runs: list[dict[str, Any]], base: dict[str, Any] | None, kv_bytes_per_token: float):
    """Medians (and minima) of the repeats, speedups against the baseline record, ideal speedups from FLOPs.

    Speedups and efficiencies use medians; `*_efficiency_min` use each side's fastest repeat instead.
    """
    med = {k: statistics.median(r[k] for r in runs)
           for k in ("ttft", "vision", "prefill", "reduce", "score", "peak_mib")}
    first = runs[0]
    layers = first.get("llm_layers") or 1
    kv_mib = (kv_bytes_per_token * first["kv_layer_tokens"] / layers if first.get("kv_layer_tokens") is not None
              else kv_bytes_per_token * first["seq_llm_total"]) / 2**20
    rec: dict[str, Any] = {
        "plan": plan,
        "visual_tokens": first["tokens"],
        "visual_layer_avg": first["layer_avg"],
        "seq_llm": first["seq_llm"],
        "ttft_ms": med["ttft"] * 1e3,
        "ttft_ms_min": min(r["ttft"] for r in runs) * 1e3,
        "prefill_ms": med["prefill"] * 1e3,
        "prefill_ms_min": min(r["prefill"] for r in runs) * 1e3,
        "ttft_ms_all": [r["ttft"] * 1e3 for r in runs],
        "prefill_ms_all": [r["prefill"] * 1e3 for r in runs],
        "vision_ms": med["vision"] * 1e3,
        "reduce_ms": med["reduce"] * 1e3,
        "score_ms": med["score"] * 1e3,
        "peak_mib": med["peak_mib"],
        "memory_method": first["memory_method"],
        "kv_cache_mib": kv_mib,
        "flops": first["flops"],
        "repeats": len(runs),
    }
    if "decode_tps" in first:
        rec["decode_tps"] = statistics.median(r["decode_tps"] for r in runs)
    if base is not None:
        ideal_prefill, ideal_ttft = _ideal(first["flops"], base["flops"])
        rec["prefill_speedup"] = base["prefill_ms"] / rec["prefill_ms"]
        rec["ttft_speedup"] = base["ttft_ms"] / rec["ttft_ms"]
        rec["ideal_prefill_speedup"] = ideal_prefill
        rec["ideal_ttft_speedup"] = ideal_ttft
        rec["prefill_efficiency"] = rec["prefill_speedup"] / ideal_prefill
        rec["ttft_efficiency"] = rec["ttft_speedup"] / ideal_ttft
        # the same from the fastest repeat of each side (noise on a shared machine only ever adds time)
        rec["prefill_efficiency_min"] = base["prefill_ms_min"] / rec["prefill_ms_min"] / ideal_prefill
        rec["ttft_efficiency_min"] = base["ttft_ms_min"] / rec["ttft_ms_min"] / ideal_ttft
        if "decode_tps" in rec and base.get("decode_tps"):
            rec["decode_speedup"] = rec["decode_tps"] / base["decode_tps"]
    return rec


def summarize_stock(runs: list[dict[str, Any]], base: dict[str, Any]) -> dict[str, Any]:
    """The model with nothing attached: TTFT and memory only, and the hooks' cost (`none` minus `stock`)."""
    ttft = statistics.median(r["ttft"] for r in runs) * 1e3
    return {
        "plan": "stock",
        "ttft_ms": ttft,
        "ttft_ms_min": min(r["ttft"] for r in runs) * 1e3,
        "peak_mib": statistics.median(r["peak_mib"] for r in runs),
        "memory_method": runs[0]["memory_method"],
        "hook_overhead_ms": base["ttft_ms"] - ttft,
        "repeats": len(runs),
    }


COLUMNS = [
    ("plan", "plan", "{}"), ("visual_tokens", "vis tok", "{}"), ("visual_layer_avg", "layer avg", "{:.0f}"),
    ("seq_llm", "LLM seq", "{}"),
    ("ttft_ms", "TTFT ms", "{:.0f}"), ("vision_ms", "vision ms", "{:.0f}"), ("prefill_ms", "prefill ms", "{:.0f}"),
    ("reduce_ms", "reduce ms", "{:.1f}"), ("score_ms", "score ms", "{:.0f}"), ("ttft_speedup", "TTFT x", "{:.2f}"),
    ("ideal_ttft_speedup", "ideal TTFT x", "{:.2f}"), ("ttft_efficiency", "TTFT eff", "{:.2f}"),
    ("prefill_speedup", "prefill x", "{:.2f}"), ("ideal_prefill_speedup", "ideal prefill x", "{:.2f}"),
    ("prefill_efficiency", "prefill eff", "{:.2f}"), ("peak_mib", "peak MiB", "{:.0f}"),
    ("kv_cache_mib", "KV MiB", "{:.1f}"), ("decode_tps", "decode tok/s", "{:.2f}"),
]


def table(records: list[dict[str, Any]]) -> str:
    """A fixed-width text table of the records ('-' where a record has no such field)."""
    cells = [[h for _, h, _ in COLUMNS]]
    for r in records:
        cells.append([fmt.format(r[k]) if k in r else "-" for k, _, fmt in COLUMNS])
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def plan_list(args: argparse.Namespace, n_visual: int) -> list[str]:
    """"none" first, then `--plans`, or every reducer at every budget (`--budgets` tokens or `--keep` fractions)."""
    if args.plans:
        plans = [p.strip() for p in args.plans.split(";") if p.strip()]
    else:
        if args.budgets:
            budgets = [int(b) for b in args.budgets.split(",")]
        else:
            budgets = [max(1, round(float(k) * n_visual)) for k in (args.keep or DEFAULT_KEEP).split(",")]
        plans = [f"{r.strip()}(tokens={b})" for b in budgets for r in args.reducers.split(",")]
    return ["none", *dict.fromkeys(p for p in plans if p != "none")]


def _write(out: Path, data: dict[str, Any]) -> None:
    """Write JSON through a temporary file, so a run killed mid-write leaves the previous round's file."""
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, out)


def main(args: argparse.Namespace) -> int:
    """Build the model, measure `stock`, `none` and every plan round-robin, print the table, write JSON."""
    from tokenreduce.adapters.llava.zoo import NEXT_PRESETS, PRESETS
    from tokenreduce.adapters.qwen2vl.zoo import PRESETS as QWEN_PRESETS
    from tokenreduce.adapters.videollm.zoo import PRESETS as VIDEO_PRESETS

    if getattr(args, "kernels", False):
        from .kernel_bench import main as kernel_main

        return kernel_main(args)
    if args.video:
        if args.preset == "llava-1.5-7b-shape":  # the image default: switch to the video default
            args.preset = "llava-onevision-7b-shape"
        if args.preset not in VIDEO_PRESETS:
            raise EvalError(f"--preset {args.preset!r}: not a video preset ({', '.join(VIDEO_PRESETS)})")
        frames = _number_list(args.frames, "--frames", int, lambda f: f >= 1, "frame counts must be positive")
    elif args.preset not in PRESETS and args.preset not in NEXT_PRESETS and args.preset not in QWEN_PRESETS:
        raise EvalError(f"--preset {args.preset!r}: not a built-in preset "
                        f"({', '.join([*PRESETS, *NEXT_PRESETS, *QWEN_PRESETS])})")
    # validate before the (slow) model build; the plan list is built from the same flags later
    if args.budgets:
        _number_list(args.budgets, "--budgets", int, lambda b: b >= 1, "token counts must be positive")
    if args.keep:
        _number_list(args.keep, "--keep", float, lambda k: 0 < k <= 1, "fractions must be in (0, 1]")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    t_start = time.perf_counter()
    if args.preset in QWEN_PRESETS:  # images at --image-size pixels (672: 576 merged tokens, LLaVA-1.5's count)
        from tokenreduce.adapters.qwen2vl.zoo import build_qwen

        model, tokenizer = build_qwen(args.preset, attn=args.attn, dtype=dtype, llm_layers=args.llm_layers,
                                      vision_layers=args.vision_layers)
        if torch.cuda.is_available():
            model = model.cuda()
        return run_bench(args, model, _qwen_inputs(model, tokenizer, args, dtype), tokenizer, Path(args.out), t_start)
    if not args.video:
        from tokenreduce.adapters.llava.zoo import build_llava_with_processor

        model, processor = build_llava_with_processor(
            args.preset, attn=args.attn, dtype=dtype, llm_layers=args.llm_layers, vision_layers=args.vision_layers
        )
        if torch.cuda.is_available():
            model = model.cuda()
        inputs = _inputs(processor, dtype, args.batch)
        return run_bench(args, model, inputs, None, Path(args.out), t_start)
    from tokenreduce.adapters.videollm.zoo import build_video_llm

    model, tokenizer = build_video_llm(args.preset, attn=args.attn, dtype=dtype, llm_layers=args.llm_layers,
                                       vision_layers=args.vision_layers)
    if torch.cuda.is_available():
        model = model.cuda()
    out = Path(args.out)
    for n in frames:
        inputs = _video_inputs(model, tokenizer, n, dtype, args.batch)
        path = out if len(frames) == 1 else out.with_name(f"{out.stem}-{n}f{out.suffix}")
        print(f"--- {n} frames", file=sys.stderr)
        run_bench(args, model, inputs, tokenizer, path, t_start)
    return 0


def _qwen_inputs(model, tokenizer, args: argparse.Namespace, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The shipped test image at --image-size x --image-size pixels and a one-question chat turn, --batch times."""
    from PIL import Image
    from tokenreduce.adapters.qwen2vl.zoo import qwen_inputs

    path = resources.files("tokenreduce") / "assets" / "shapes.png"
    with resources.as_file(path) as p:
        image = Image.open(p).convert("RGB").resize((args.image_size, args.image_size))
    text = f"<|im_start|>user\n<image>{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    side = args.image_size
    inputs = qwen_inputs(model, tokenizer, [text] * args.batch, images=[[image]] * args.batch,
                         min_pixels=side * side, max_pixels=side * side)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs


def _video_inputs(model, tokenizer, frames: int, dtype: torch.dtype, batch: int) -> dict[str, torch.Tensor]:
    """A generated clip (a moving square on a noisy background) of `frames` frames, as the model's video input."""
    import numpy as np
    from tokenreduce.adapters.videollm import video_inputs

    from tokenreduce.registry import adapter_for

    spec = adapter_for(model)(model).video_spec()
    rng = np.random.default_rng(0)
    clip = rng.integers(40, 80, (frames, spec.size, spec.size, 3), dtype=np.uint8)
    for t in range(frames):
        x = int((spec.size - 64) * t / max(1, frames - 1))
        clip[t, 100:164, x:x + 64] = (220, 40, 40)
    text = f"USER: {spec.token}\nWhat does the red square do? ASSISTANT:"
    inputs = video_inputs(tokenizer, spec, [text] * batch, [clip] * batch)
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(dtype)
    return inputs


def run_bench(args: argparse.Namespace, model, inputs: dict[str, Any], tokenizer, out: Path, t_start: float) -> int:
    """Measure `stock`, `none` and every plan on `inputs`, round-robin; print the table and write JSON to `out`."""
    from tokenreduce.plan import Plan

    dtype = next(model.parameters()).dtype
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    n_visual = visual_tokens(model, inputs)
    plans = plan_list(args, n_visual)
    for plan in plans:
        Plan.parse(plan)  # a bad plan fails here, before anything is measured
    too_big = [b for b in (int(b) for b in (args.budgets or "").split(",") if b) if b > n_visual]
    if too_big:
        raise EvalError(f"--budgets: {too_big} exceed the {n_visual} visual tokens per image")
    order: list[str | None] = [None, *plans]  # None: the stock model, nothing attached
    print(f"built {args.preset} ({model.config.text_config.num_hidden_layers} LLM layers) in "
          f"{time.perf_counter() - t_start:.1f}s; {n_visual} visual tokens; {len(order)} measurements x "
          f"({args.warmup} warmup + {args.repeats}) rounds", file=sys.stderr)

    tc = model.config.text_config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    kv_per_token = 2 * tc.num_hidden_layers * tc.num_key_value_heads * head_dim * torch.finfo(dtype).bits // 8
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                    "cpu": _cpu_name()},
        "config": {k: v for k, v in vars(args).items() if k != "fn"},
        "visual_tokens_per_image": n_visual,
    }
    runs: dict[str | None, list[dict[str, Any]]] = {p: [] for p in order}
    records: list[dict[str, Any]] = []
    stock: dict[str, Any] = {}
    rounds = args.warmup + args.repeats
    for rnd in range(rounds):
        warm = rnd < args.warmup
        tag = f"warmup {rnd + 1}/{args.warmup}" if warm else f"round {rnd - args.warmup + 1}/{args.repeats}"
        # forward, backward, forward, ...: a linear drift over a round cancels between the plans
        for j, plan in enumerate(order if (rnd - args.warmup) % 2 == 0 else order[::-1]):
            print(f"[{tag}] [{j + 1}/{len(order)}] {plan or 'stock (nothing attached)'}", file=sys.stderr, flush=True)
            m = measure(model, inputs, plan, args.decode, tokenizer)
            if not warm:
                runs[plan].append(m)
        if warm:
            continue
        base = summarize("none", runs["none"], None, kv_per_token)
        records = [summarize(p, runs[p], base, kv_per_token) for p in plans]
        stock = summarize_stock(runs[None], records[0])
        _write(out, {**meta, "rounds_done": rnd - args.warmup + 1, "wall_s": time.perf_counter() - t_start,
                     "stock": stock, "results": records})
    if records:
        print(table([stock, *records]))
        print(f"\nstock model {stock['ttft_ms']:.0f} ms, plan 'none' {records[0]['ttft_ms']:.0f} ms: hooks cost "
              f"{stock['hook_overhead_ms']:.1f} ms; {time.perf_counter() - t_start:.0f} s in all; wrote {out}")
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


def _number_list(text: str, flag: str, kind: type, ok, rule: str) -> list:
    """Parse a comma-separated list of numbers for `flag`, raising a one-line CLI error if it is bad."""

    try:
        values = [kind(v) for v in text.split(",")]
    except ValueError:
        raise EvalError(f"{flag} {text!r}: expected comma-separated {kind.__name__} values") from None
    if not all(ok(v) for v in values):
        raise EvalError(f"{flag} {text!r}: {rule}")
    return values
