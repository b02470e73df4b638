"""``tokenreduce eval`` and ``tokenreduce sweep``: MLVU and Video-MME (and the generated benchmark) from local
folders, any plan, any local checkpoint, resumable, shardable with torchrun.

    tokenreduce eval --bench videomme --data ~/data/videomme --model ~/ckpt/llava-ov-7b --plan "pool(keep=0.25)" \\
        --frames 32 --out runs/vm-pool
    tokenreduce eval --bench mlvu --data bench-results/data/test --plan "aim-merge(keep=0.5)" --out runs/mlvu
    tokenreduce sweep --bench mlvu --data bench-results/data/test --methods aim-merge,quota --budgets 0.5,0.25,0.11
    torchrun --nproc-per-node 2 -m tokenreduce eval ...          # the questions split across 2 processes

Every option is checked before anything is read, loaded or written; a bad one is a one-line
``tokenreduce: error: ...`` (`EvalError`) and exit status 2.

Outputs in ``--out``: ``run.json`` (what the run is: model, data, protocol, fingerprints, versions, sessions),
``records*.jsonl`` (one line per question and plan: ``question_id, plan, answer, pred, correct, completion`` and the
efficiency fields), ``summary.json``, ``table.txt``, ``report.md``, ``timing.json``, ``accuracy_vs_tokens.png``
and ``accuracy_vs_ttft.png``; MLVU-Test data without answers also gets ``submission-<plan>.json`` in the format
of MLVU's online evaluation.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import protocols as P
from .datasets import BENCHES
from .errors import EvalError

DEFAULT_BUDGETS = "0.5,0.25,0.111"
#: what a sweep always adds at every budget (the baselines a reduction method must beat)
BASELINES = ("random", "pool")


# --- option checks (strings in, one-line EvalError out) -----------------------------------------------------------


def positive_int(flag: str, value: Any, minimum: int = 1) -> int:
    """`value` as an integer >= `minimum`, else EvalError naming `flag`."""
    try:
        number = int(str(value).strip())
    except ValueError:
        raise EvalError(f"{flag} {value!r}: expected an integer") from None
    if number < minimum:
        raise EvalError(f"{flag} {number}: expected an integer >= {minimum}")
    return number


def positive_float(flag: str, value: Any) -> float:
    try:
        number = float(str(value).strip())
    except ValueError:
        raise EvalError(f"{flag} {value!r}: expected a number") from None
    if not math.isfinite(number) or number <= 0:
        raise EvalError(f"{flag} {value!r}: expected a positive number")
    return number


def budget_list(flag: str, text: str) -> list[float | int]:
    """Budgets: fractions of the visual tokens in (0, 1] (e.g. 0.25) or token counts >= 1 (e.g. 64)."""
    items = [t.strip() for t in str(text).split(",")]
    if not items or any(not t for t in items):
        raise EvalError(f"{flag} {text!r}: expected a comma-separated list like 0.5,0.25,0.111 or 288,144,64")
    out: list[float | int] = []
    for t in items:
        try:
            value = float(t)
        except ValueError:
            raise EvalError(f"{flag} {text!r}: {t!r} is not a number") from None
        if not math.isfinite(value) or value <= 0:
            raise EvalError(f"{flag} {text!r}: budgets must be positive, got {t}")
        if value > 1 and not value.is_integer():
            raise EvalError(f"{flag} {text!r}: {t} is neither a fraction in (0, 1] nor a whole number of tokens")
        out.append(int(value) if value > 1 else value)
    return out


def parse_plans(flag: str, plans: Sequence[str]) -> list[str]:
    """Every plan parsed (so a malformed one fails before any work), in canonical form, "none" first."""
    from tokenreduce.errors import PlanError

    from .answer import canonical_plan

    out = []
    for p in plans:
        try:
            out.append(canonical_plan(p))
        except PlanError as e:
            raise EvalError(f"{flag}: plan {p!r}: {e}") from None
    return list(dict.fromkeys(["none", *out]))


def budget_plan(method: str, budget: float | int) -> str:
    """"aim-merge+aim-prune" at 0.25 -> "aim-merge(keep=0.25)+aim-prune"; at 64 -> "aim-merge(tokens=64)+...".
    The budget goes to the first reducer of a composition."""
    head, *rest = [m.strip() for m in method.split("+")]
    arg = f"keep={budget:g}" if isinstance(budget, float) else f"tokens={budget}"
    if "(" in head:
        name, inner = head.split("(", 1)
        inner = inner.rstrip(")").strip()
        head = f"{name}({arg}, {inner})" if inner else f"{name}({arg})"
    else:
        head = f"{head}({arg})"
    return "+".join([head, *rest])


def sweep_plans(methods: Sequence[str], budgets: Sequence[float | int], extra: Sequence[str] = ()) -> list[str]:
    """"none", then for every budget every method plus the baselines (random, pool), then `extra` plans."""
    plans = ["none"]
    names = list(dict.fromkeys([*methods, *BASELINES]))
    for b in budgets:
        plans += [budget_plan(m, b) for m in names]
    return plans + list(extra)


def _common_checks(args: argparse.Namespace) -> dict[str, Any]:
    """Check the options shared by eval and sweep; returns the parsed values."""
    if args.bench not in BENCHES:
        raise EvalError(f"--bench {args.bench!r}: choose from {', '.join(BENCHES)}")
    if args.data is None:
        raise EvalError("--data: give the benchmark folder")
    if not Path(args.data).expanduser().is_dir():
        raise EvalError(f"--data {args.data!r}: no such folder")
    protocol = args.protocol or P.BENCH_PROTOCOL[args.bench]
    if protocol not in P.REGISTRY:
        raise EvalError(f"--protocol {protocol!r}: choose from {', '.join(P.REGISTRY)}")
    if args.bench == "videomme" and P.get(protocol).aggregate != "videomme":
        raise EvalError(f"--protocol {protocol}: a Video-MME protocol is needed for --bench videomme "
                        "(videomme, videomme-legacy)")
    if args.bench in ("mlvu", "mlvu-test") and P.get(protocol).aggregate != "mlvu":
        raise EvalError(f"--protocol {protocol}: an MLVU protocol is needed for --bench {args.bench}")
    values: dict[str, Any] = {"protocol": protocol}
    values["limit"] = None if args.limit is None else positive_int("--limit", args.limit)
    values["frames"] = positive_int("--frames", args.frames)
    values["fps"] = None if args.fps is None else positive_float("--fps", args.fps)
    values["max_frames"] = None if args.max_frames is None else positive_int("--max-frames", args.max_frames)
    if values["max_frames"] is not None and values["fps"] is None:
        raise EvalError("--max-frames applies with --fps only (uniform sampling takes --frames)")
    if values["fps"] is not None and values["max_frames"] is None:
        values["max_frames"] = values["frames"]
    values["threads"] = None if args.threads is None else positive_int("--threads", args.threads)
    values["timing_items"] = positive_int("--timing-items", args.timing_items, minimum=0)
    values["timing_repeats"] = positive_int("--timing-repeats", args.timing_repeats)
    if args.subtitles and args.bench != "videomme":
        raise EvalError("--subtitles is Video-MME's subtitle prompt; it needs --bench videomme")
    from .answer import DTYPES

    if args.dtype not in DTYPES:
        raise EvalError(f"--dtype {args.dtype!r}: choose from {', '.join(DTYPES)}")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        raise EvalError(f"--device {args.device!r}: cpu or cuda[:N]")
    return values


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """The options ``eval`` and ``sweep`` share."""
    from .answer import add_runtime_arguments

    p.add_argument("--bench", required=True, help=f"benchmark: {', '.join(BENCHES)}")
    p.add_argument("--data", required=True, help="the benchmark folder in its real layout (see the README); the "
                   "generated benchmark's split folders work too")
    p.add_argument("--model", default="default", help="default (the shipped model of the bench's kind) or a local "
                   "checkpoint folder; nothing is downloaded")
    p.add_argument("--out", default=None, help="the run folder (default bench-results/<command>/<bench>); rerunning "
                   "into it resumes; a folder holding another model's or data set's results is refused")
    p.add_argument("--protocol", default=None, help=f"one of {', '.join(P.REGISTRY)} (default: videomme for "
                   "videomme, mlvu for mlvu, mlvu-test for mlvu-test)")
    p.add_argument("--frames", default="8", help="frames sampled uniformly from each video (default 8)")
    p.add_argument("--fps", default=None, help="sample this many frames per second instead (at most --max-frames)")
    p.add_argument("--max-frames", default=None, help="with --fps: the cap (default --frames)")
    p.add_argument("--limit", default=None, help="only the first N questions (tasks interleaved)")
    p.add_argument("--subtitles", action="store_true", help="Video-MME with subtitles (lmms-eval's "
                   "videomme_w_subtitle prompt; subtitle/<videoID>.srt)")
    p.add_argument("--skip-missing", action="store_true", help="count and leave out malformed rows and questions "
                   "whose video is missing, instead of stopping")
    p.add_argument("--memory", action="store_true", help="record peak memory per question (CPU: RSS high-water)")
    add_runtime_arguments(p, device_help="cpu or cuda[:N] (under torchrun: each rank's own GPU)")


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``tokenreduce eval``."""
    add_common_arguments(p)
    p.add_argument("--plan", action="append", default=None, help="a plan, e.g. \"pool(keep=0.25)\" (repeat for more); "
                   "'none' (unreduced) always runs too, as the baseline of accuracy kept and speedup")


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``tokenreduce sweep``."""
    add_common_arguments(p)
    p.add_argument("--methods", default="aim-merge,hired", help="comma list of reducers or '+' compositions "
                   "(budget on the first), e.g. aim-merge,quota,aim-merge+aim-prune (default aim-merge,hired)")
    p.add_argument("--budgets", default=DEFAULT_BUDGETS, help="fractions of the visual tokens in (0, 1] or token "
                   f"counts (default {DEFAULT_BUDGETS}); random and pool always run at each")
    p.add_argument("--plans", default=None, help="';'-separated extra plans with budgets of their own")


# --- running -----------------------------------------------------------------------------------------------------


def execute(args: argparse.Namespace, plans: list[str], values: dict[str, Any], command: str) -> int:
    """Load data then model, run, time, report (rank 0 prints and writes)."""
    import torch

    from . import datasets as D
    from . import report, runner, store
    from .answer import Answerer, Sampling, checkpoint_info, resolve_model

    if values["threads"]:
        torch.set_num_threads(values["threads"])
    ctx = runner.dist_context()
    t0 = time.perf_counter()
    dataset = D.load(args.bench, Path(args.data).expanduser(), skip_missing=args.skip_missing, limit=values["limit"])
    if not dataset.items:
        raise EvalError(f"--data {args.data}: no questions to run")
    kind = dataset.items[0].kind
    device = ctx.device if ctx.world > 1 else args.device
    sampling = Sampling(frames=values["frames"], fps=values["fps"], max_frames=values["max_frames"])
    out = Path(args.out or f"bench-results/{command}/{args.bench}")
    if ctx.rank == 0:  # refuse another run's folder before loading anything
        info = checkpoint_info(resolve_model(args.model, kind), args.dtype)
        store.check_run(out, runner.run_identity(args.bench, values["protocol"], info, dataset.fingerprint,
                                                 sampling.to_dict(), subtitles=args.subtitles))
    answerer = Answerer.load(args.model, kind, device=device, dtype=args.dtype, attn=args.attn, sampling=sampling)
    answerer.subtitles = bool(args.subtitles)
    progress = not args.no_progress
    if ctx.rank == 0:
        warn = f", {len(dataset.warnings)} data warning(s)" if dataset.warnings else ""
        skip = f", {len(dataset.skipped)} skipped" if dataset.skipped else ""
        print(f"{args.bench}: {len(dataset.items)} questions from {dataset.root}{warn}{skip}; model {answerer.name}; "
              f"protocol {values['protocol']}; {len(plans)} plan(s); world size {ctx.world}; out {out}",
              file=sys.stderr)
    result = runner.run(answerer, dataset, plans, values["protocol"], out, progress=progress,
                        measure_memory=args.memory, about={"command": command, "argv": sys.argv[1:]})
    if ctx.rank != 0:
        ctx.barrier()
        ctx.close()
        return 0
    timing = None
    if values["timing_items"]:
        items = dataset.items[: values["timing_items"]]
        timing = runner.measure_timing(answerer, items, plans, values["protocol"], repeats=values["timing_repeats"],
                                       progress=progress, label=f"{args.bench} timing")
        timing["session"] = result.session["id"]
        report.write_json(out / "timing.json", timing)
    rows = report.summarize(result.records, args.bench, timing)
    columns = report.eval_columns(args.bench, args.wide)
    text = report.table(rows, columns, wide=args.wide)
    print(text)
    all_columns = report.eval_columns(args.bench, True)
    (out / "table.txt").write_text(report.table(rows, all_columns, wide=True) + "\n")
    summary = {"header": result.header, "session": result.session, "rows": rows, "timing": timing,
               "notes": result.notes, "wall_s": time.perf_counter() - t0}
    report.write_json(out / "summary.json", summary)
    (out / "report.md").write_text(report.markdown(f"tokenreduce {command}: {args.bench}", rows, all_columns,
                                                   result.header, result.notes) + "\n")
    written = [out / "summary.json", out / "table.txt", out / "report.md"]
    scored = [r for r in rows if r.get("accuracy") is not None]
    if scored and not report.can_plot():
        print(f"note: {report.PLOT_HINT}", file=sys.stderr)
    elif scored:
        title = f"{args.bench} ({values['protocol']}), {answerer.name}"
        written.append(report.plot([(args.bench, rows)], out / "accuracy_vs_tokens.png", "tokens", title))
        written.append(report.plot([(args.bench, rows)], out / "accuracy_vs_ttft.png", "ttft", title))
    if any("correct" not in r for r in result.records if "error" not in r):
        for plan in plans:
            path = out / f"submission-{_slug(plan)}.json"
            report.write_json(path, report.submission(result.records, plan))
            written.append(path)
    for note in result.notes[:5]:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {', '.join(str(w) for w in written)} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    ctx.barrier()
    ctx.close()
    return 0


def _slug(plan: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", plan).strip("_") or "none"


def main_eval(args: argparse.Namespace) -> int:
    """``tokenreduce eval``."""
    values = _common_checks(args)
    plans = parse_plans("--plan", args.plan or ["none"])
    return execute(args, plans, values, "eval")


def main_sweep(args: argparse.Namespace) -> int:
    """``tokenreduce sweep``: every method at every budget, plus none and the random and pool baselines."""
    values = _common_checks(args)
    budgets = budget_list("--budgets", args.budgets)
    methods = [m.strip() for m in str(args.methods).split(",") if m.strip()]
    if not methods:
        raise EvalError(f"--methods {args.methods!r}: give at least one reducer")
    extra = [p.strip() for p in (args.plans or "").split(";") if p.strip()]
    plans = parse_plans("--methods/--plans", sweep_plans(methods, budgets, extra))
    return execute(args, plans, values, "sweep")


def cli(argv: list[str] | None = None) -> int:
    """``python -m tokenreduce.eval.harness eval|sweep ...`` (the same as the tokenreduce subcommands)."""
    from tokenreduce.errors import TokenReduceError

    p = argparse.ArgumentParser(prog="python -m tokenreduce.eval.harness")
    sub = p.add_subparsers(dest="cmd", required=True)
    add_eval_arguments(sub.add_parser("eval"))
    add_sweep_arguments(sub.add_parser("sweep"))
    args = p.parse_args(argv)
    try:
        return main_eval(args) if args.cmd == "eval" else main_sweep(args)
    except TokenReduceError as e:
        print(f"tokenreduce: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(cli())
