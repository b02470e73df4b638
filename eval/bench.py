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
import math
import os
import platform
import statistics
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .errors import EvalError

DEFAULT_REDUCERS = "aim-merge,random,pool"
QWEN_TYPES = ("qwen2_vl", "qwen2_5_vl")
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
    from tokenreduce.cli import add_model_arguments

    which = p.add_mutually_exclusive_group()
    which.add_argument("--preset", default=None,
                       help="built-in random-weight model (default llava-1.5-7b-shape: LLaVA-1.5-7B widths; with "
                       "--video llava-onevision-7b-shape)")
    add_model_arguments(p, default_model=None, model_help=(
        "instead of --preset: a local checkpoint folder, a hub id already in the local Hugging Face cache "
        "(org/name), default (the shipped trained model) or a preset name"), group=which, default_device="auto")
    p.add_argument("--llm-layers", type=_count(1), default=None,
                   help="keep the first N LLM decoder layers (default: 2 for presets, to fit a CPU; all for --model)")
    p.add_argument("--vision-layers", type=_count(1), default=None,
                   help="keep the first N vision layers (default: all)")
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
    p.add_argument("--out", default="bench-results/bench.json", help="JSON path (parent folders are created)")
    p.add_argument("--decode", type=_count(0), default=0,
                   help="also generate this many tokens after the first and report decode tokens/s (default 0)")
    p.add_argument("--video", action="store_true",
                   help="video bench: a video model (default llava-onevision-7b-shape) at --frames frames")
    p.add_argument("--frames", default="32", help="with --video: comma list of frame counts (default 32)")
    p.add_argument("--wide", action="store_true", help="print every column (default: the table fits 120 characters)")
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
        "ttft_ms_spread": (max(r["ttft"] for r in runs) - min(r["ttft"] for r in runs)) * 1e3,
        "repeats": len(runs),
    }


@dataclass(frozen=True)
class Column:
    """One column of the bench table: record key, header, number format and the legend's explanation."""

    key: str
    header: str
    fmt: str
    legend: str
    cost: bool = False  # a time or memory cost: never shown below zero


#: every column, in the order `--wide` prints them; `NARROW` picks the default ones by priority
COLUMNS = [
    Column("plan", "plan", "{}", "`stock`: nothing attached; `none`: attached, no reducers (the baseline of every x)"),
    Column("visual_tokens", "vis tok", "{}", "visual tokens entering the LLM per sample"),
    Column("visual_layer_avg", "layer avg", "{:.0f}",
           "visual tokens averaged over the LLM layers (in-LLM pruning; the count MustDrop and AIM quote)"),
    Column("seq_llm", "LLM seq", "{}", "sequence length entering the LLM (text, visual and extra tokens)"),
    Column("ttft_ms", "TTFT ms", "{:.0f}", "time to first token (median of the repeats)", cost=True),
    Column("vision_ms", "vision ms", "{:.0f}", "vision tower and projector", cost=True),
    Column("prefill_ms", "prefill ms", "{:.0f}", "LLM prefill", cost=True),
    Column("reduce_ms", "reduce ms", "{:.1f}", "time the reducers spent choosing tokens (inside TTFT)", cost=True),
    Column("score_ms", "score ms", "{:.0f}", "of reduce ms: scoring frames (QuoTA's scorer)", cost=True),
    Column("ttft_speedup", "TTFT x", "{:.2f}", "TTFT speedup over `none`"),
    Column("ideal_ttft_speedup", "ideal TTFT x", "{:.2f}", "TTFT speedup the FLOPs predict (vision tower included)"),
    Column("ttft_efficiency", "TTFT eff", "{:.2f}", "TTFT x / ideal TTFT x"),
    Column("prefill_speedup", "prefill x", "{:.2f}", "LLM prefill speedup over `none`"),
    Column("ideal_prefill_speedup", "ideal x", "{:.2f}", "prefill speedup the FLOPs of the removed tokens predict"),
    Column("prefill_efficiency", "prefill eff", "{:.2f}",
           "prefill x / ideal x: 1.0 means the reduction pays off fully (the figure of merit)"),
    Column("peak_mib", "peak MiB", "{:.0f}",
           "peak memory of the call above what was resident before it (~0: below the measurement's noise)", cost=True),
    Column("kv_cache_mib", "KV MiB", "{:.1f}", "KV cache after prefill (and the decode cut)", cost=True),
    Column("decode_tps", "decode tok/s", "{:.2f}", "decode rate after the first token (--decode)"),
]
#: the default table's columns, most important first; taken while the table fits `MAX_WIDTH`
NARROW = ["plan", "visual_tokens", "visual_layer_avg", "ttft_ms", "ttft_speedup", "prefill_ms", "prefill_speedup",
          "ideal_prefill_speedup", "prefill_efficiency", "reduce_ms", "kv_cache_mib", "score_ms", "decode_tps",
          "peak_mib", "vision_ms", "seq_llm", "ideal_ttft_speedup", "ttft_efficiency"]
MAX_WIDTH = 120
PLAN_WIDTH = 36  # longer plan names wrap onto continuation lines


def cell(r: dict[str, Any], c: Column) -> str:
    """A record's value in column `c`: "-" when the record has none, "n/a" for NaN or infinity, "~0" for a cost
    that measured below zero (noise)."""
    v = r.get(c.key)
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "n/a"
        if c.cost and round(v, 1) <= 0 and c.key != "reduce_ms":
            return "~0"
    return c.fmt.format(v)


def _useful(c: Column, records: list[dict[str, Any]]) -> bool:
    """Whether a column says anything in the default table (a layer average equal to the tokens does not)."""
    if c.key == "visual_layer_avg":
        return any(r.get(c.key) is not None and abs(r[c.key] - r["visual_tokens"]) >= 0.5 for r in records)
    if c.key == "score_ms":
        return any((r.get(c.key) or 0) > 0 for r in records)
    return any(r.get(c.key) is not None for r in records)


def _wrap(text: str, width: int) -> list[str]:
    """A plan name over lines of at most `width`, broken after '+' or ', ' where possible."""
    lines, rest = [], text
    while len(rest) > width:
        cut = max(rest.rfind("+", 0, width), rest.rfind(", ", 0, width - 1) + 1)
        cut = cut + 1 if cut > 0 else width
        lines.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    return lines + [rest]


def columns_for(records: list[dict[str, Any]], wide: bool = False) -> tuple[list[Column], list[Column]]:
    """(shown, left out): every column with `wide`, else the most important ones that fit `MAX_WIDTH`."""
    by_key = {c.key: c for c in COLUMNS}
    if wide:
        return list(COLUMNS), []
    plan_w = min(PLAN_WIDTH, max(len(str(r["plan"])) for r in records))
    shown, width = [by_key["plan"]], plan_w
    for key in NARROW[1:]:
        c = by_key[key]
        if not _useful(c, records):
            continue
        w = max(len(c.header), *(len(cell(r, c)) for r in records))
        if width + 2 + w <= MAX_WIDTH:
            shown.append(c)
            width += 2 + w
    order = [c.key for c in COLUMNS]
    shown.sort(key=lambda c: order.index(c.key))
    left = [c for c in COLUMNS if c not in shown and _useful(c, records)]
    return shown, left


def table(records: list[dict[str, Any]], wide: bool = False, legend: bool = True) -> str:
    """A fixed-width text table of the records, at most `MAX_WIDTH` characters wide unless `wide`, then a
    legend explaining each column shown (and naming those only `--wide` shows)."""
    cols, left = columns_for(records, wide)
    plan_w = max(len(str(r["plan"])) for r in records) if wide else min(
        PLAN_WIDTH, max(len(str(r["plan"])) for r in records))
    rows = [[c.header for c in cols]] + [[cell(r, c) for c in cols] for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    widths[0] = max(plan_w, len(cols[0].header))
    lines = []
    for k, row in enumerate(rows):
        names = _wrap(row[0], widths[0]) if k else [row[0]]
        first = [names[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(first).rstrip())
        lines += [n for n in names[1:]]
    lines.insert(1, "-" * max(len(line) for line in lines))
    if legend:
        lines.append("")
        key_w = max(len(c.header) for c in cols)
        for c in cols:
            lines += textwrap.wrap(f"{c.header.ljust(key_w)}  {c.legend}", MAX_WIDTH,
                                   subsequent_indent=" " * (key_w + 2))
        if left:
            lines += textwrap.wrap("--wide also shows: " + ", ".join(c.header for c in left), MAX_WIDTH)
    return "\n".join(lines)


def hook_cost_line(stock: dict[str, Any], base: dict[str, Any]) -> str:
    """What attaching costs, `none` minus `stock`, or "within noise" when the difference is negative or smaller than
    how much either side's repeats vary (or there is only one repeat to judge by)."""
    diff = base["ttft_ms"] - stock["ttft_ms"]
    spread = max(max(base["ttft_ms_all"]) - min(base["ttft_ms_all"]), stock.get("ttft_ms_spread", 0.0))
    head = f"stock model {stock['ttft_ms']:.0f} ms, plan 'none' {base['ttft_ms']:.0f} ms: hooks cost "
    if stock["repeats"] < 2:
        return head + "n/a (one repeat cannot separate it from noise)"
    if diff <= spread:
        return head + f"within noise (repeats vary by {spread:.0f} ms)"
    return head + f"{diff:.1f} ms"


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


def check_arguments(args: argparse.Namespace) -> tuple[str, list[int]]:
    """Every option checked before anything is built or measured; returns (model spec, frame counts).

    Plans are parsed here too (a bad plan string fails before the model is built); what depends on the model
    (a reducer it cannot serve, layers it does not have, a budget above its visual tokens) is checked in
    `check_plans` right after the build, still before anything is measured or written."""
    from tokenreduce.cli import check_model_arguments
    from tokenreduce.plan import Plan

    kind = "video" if args.video else "image"
    spec = args.model or args.preset or ("llava-onevision-7b-shape" if args.video else "llava-1.5-7b-shape")
    if args.preset is not None:
        from tokenreduce.loading import presets

        if args.preset not in presets(kind):
            raise EvalError(f"--preset {args.preset!r}: not a built-in {kind} preset ({', '.join(presets(kind))}); "
                           "a checkpoint folder or hub id goes in --model")
    args.model = spec
    check_model_arguments(args, kind)
    frames = _number_list(args.frames, "--frames", int, lambda f: f >= 1, "frame counts must be positive") \
        if args.video else []
    if args.budgets:
        _number_list(args.budgets, "--budgets", int, lambda b: b >= 1, "token counts must be positive")
    if args.keep:
        _number_list(args.keep, "--keep", float, lambda k: 0 < k <= 1, "fractions must be in (0, 1]")
    if args.plans is not None:
        if not [p for p in args.plans.split(";") if p.strip()]:
            raise EvalError(f"--plans {args.plans!r}: no plan given")
        for plan in args.plans.split(";"):
            try:
                Plan.parse(plan)
            except Exception as e:
                raise EvalError(f"--plans: {e}") from None
    else:
        from tokenreduce.registry import get_reducer

        for name in args.reducers.split(","):
            if not name.strip():
                raise EvalError(f"--reducers {args.reducers!r}: empty name")
            try:
                get_reducer(name.strip().split("+")[0])
                Plan.parse(name.strip().replace("+", "(tokens=1)+", 1) if "+" in name else name.strip() + "(tokens=1)")
            except Exception as e:
                raise EvalError(f"--reducers: {e}") from None
    out = Path(args.out)
    if out.exists() and out.is_dir():
        raise EvalError(f"--out {args.out!r}: a folder; give a JSON file path")
    return spec, frames


def check_plans(model, plans: list[str], n_visual: int) -> None:
    """Attach every plan once (no call: this validates it on the model: stages, CLS token, decoder depth) and
    check budgets against the visual tokens, so a plan that cannot run fails before anything is measured."""
    import tokenreduce as tr
    from tokenreduce.plan import BudgetedReducer, Stage

    for plan in plans:
        try:
            parsed = tr.Plan.parse(plan)
            with tr.apply(model, parsed):
                pass
        except tr.TokenReduceError as e:
            raise EvalError(f"plan {plan!r}: {e}") from None
        for r in parsed.reducers:
            if isinstance(r, BudgetedReducer) and r.stage <= Stage.VISUAL and r.tokens is not None \
                    and r.tokens > n_visual:
                raise EvalError(f"plan {plan!r}: {r.name}(tokens={r.tokens}) exceeds the {n_visual} visual tokens "
                               "per image")


def main(args: argparse.Namespace) -> int:
    """Check every option, build the model, measure `stock`, `none` and every plan round-robin, print the table,
    write JSON."""
    from tokenreduce.cli import load_for

    if getattr(args, "kernels", False):
        from .kernel_bench import main as kernel_main

        return kernel_main(args)
    spec, frames = check_arguments(args)
    if args.llm_layers is None and spec in _preset_names(args.video):
        args.llm_layers = 2  # a 7B-shaped preset on a CPU: 2 of its decoder layers unless told otherwise
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    loaded = load_for(args, "video" if args.video else "image", llm_layers=args.llm_layers,
                      vision_layers=args.vision_layers)
    model = loaded.model
    dtype = next(model.parameters()).dtype
    if getattr(model.config, "model_type", "") in QWEN_TYPES:  # images at --image-size pixels (672: 576 tokens)
        return run_bench(args, model, _qwen_inputs(model, loaded.tokenizer, args, dtype), loaded.tokenizer,
                         Path(args.out), t_start, loaded.source)
    if not args.video:
        inputs = _inputs(loaded.processor, dtype, args.batch)
        return run_bench(args, model, inputs, None, Path(args.out), t_start, loaded.source)
    out = Path(args.out)
    for n in frames:
        inputs = _video_inputs(model, loaded.tokenizer, n, dtype, args.batch)
        path = out if len(frames) == 1 else out.with_name(f"{out.stem}-{n}f{out.suffix}")
        print(f"--- {n} frames", file=sys.stderr)
        run_bench(args, model, inputs, loaded.tokenizer, path, t_start, loaded.source)
    return 0


def _preset_names(video: bool) -> list[str]:
    from tokenreduce.loading import presets

    return presets("video" if video else "image")


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


def run_bench(args: argparse.Namespace, model, inputs: dict[str, Any], tokenizer, out: Path, t_start: float,
              source: str | None = None) -> int:
    """Measure `stock`, `none` and every plan on `inputs`, round-robin; print the table and write JSON to `out`."""
    from tokenreduce.errors import TokenReduceError

    dtype = next(model.parameters()).dtype
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    n_visual = visual_tokens(model, inputs)
    too_big = [b for b in (int(b) for b in (args.budgets or "").split(",") if b) if b > n_visual]
    if too_big:
        raise EvalError(f"--budgets: {too_big} exceed the {n_visual} visual tokens per image")
    plans = plan_list(args, n_visual)
    check_plans(model, plans, n_visual)  # every plan can run on this model: nothing measured or written before
    order: list[str | None] = [None, *plans]  # None: the stock model, nothing attached
    print(f"built {source or args.model} ({model.config.text_config.num_hidden_layers} LLM layers, {dtype}, "
          f"{model.device}) in {time.perf_counter() - t_start:.1f}s; {n_visual} visual tokens; {len(order)} "
          f"measurements x ({args.warmup} warmup + {args.repeats}) rounds", file=sys.stderr)

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
            try:
                m = measure(model, inputs, plan, args.decode, tokenizer)
            except TokenReduceError as e:  # found only by running it (a budget this input cannot meet)
                raise EvalError(f"plan {plan!r}: {e}") from None
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
        print(table([stock, *records], wide=args.wide))
        print(f"\n{hook_cost_line(stock, records[0])}; {time.perf_counter() - t_start:.0f} s in all; wrote {out}")
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
