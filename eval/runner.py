"""The one runner behind ``tokenreduce eval``, ``tokenreduce sweep`` and the main job (``tokenreduce evaluate``).

`run` answers every question of a data set under every plan and appends one record per (plan, question) to the
run folder (`store`), flushed as it finishes; a rerun into the same folder skips what is there. Under
``torchrun --nproc-per-node N`` (gloo on CPU, nccl on GPU; several nodes with torchrun's usual flags) the
questions left to do are split across the ranks, each rank appends to its own record file, and rank 0 reads
them all when every rank is done: the results are those of one process.

`measure_timing` is the robust time-to-first-token measurement the tables use: a fixed set of questions, every
plan and the unreduced model measured back to back per question (forward order one round, reverse the next, so
drift cancels), warm-up rounds first, medians of per-question ratios. It always runs in the process that makes
the table, so timings of a resumed run are measured afresh, never mixed from several sessions.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import protocols as P
from . import store
from .answer import Answerer, canonical_plan
from .datasets import Dataset, Item
from .errors import EvalError

# --- torch.distributed -----------------------------------------------------------------------------------------


class Dist:
    """The process group when started by torchrun (WORLD_SIZE > 1), else a single process. gloo on CPU, nccl
    on GPU (each rank on cuda:LOCAL_RANK)."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owned = False
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                backend = "nccl" if torch.cuda.is_available() else "gloo"
                if backend == "nccl":
                    torch.cuda.set_device(self.local_rank)
                dist.init_process_group(backend)
                self.owned = True

    @property
    def device(self) -> str:
        return f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.owned:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owned = False


_DIST: Dist | None = None


def dist_context() -> Dist:
    """The process's `Dist` (made once)."""
    global _DIST
    if _DIST is None:
        _DIST = Dist()
    return _DIST


# --- the run -------------------------------------------------------------------------------------------------------


def run_identity(bench: str, protocol: str, model: dict[str, Any], data_fingerprint: str, sampling: dict[str, Any],
                 *, subtitles: bool = False, blank: bool = False) -> dict[str, Any]:
    """What makes two result sets comparable: the same model (fingerprint, class, dtype), data, protocol and
    settings. Plans are series inside a run, not part of its identity."""
    proto = P.get(protocol)
    return {
        "bench": bench,
        "protocol": {"name": proto.name, "reference": proto.reference, "extractor": proto.extractor,
                     "max_new_tokens": proto.max_new_tokens},
        "model": {k: model[k] for k in ("fingerprint", "class", "dtype")},
        "data": {"fingerprint": data_fingerprint},
        "sampling": dict(sampling),
        "subtitles": bool(subtitles),
        "blank": bool(blank),
        "generation": {"do_sample": False, "num_beams": 1},
    }


def identity(answerer: Answerer, dataset: Dataset, protocol: str, *, blank: bool = False) -> dict[str, Any]:
    """`run_identity` of a loaded model on a data set."""
    return run_identity(dataset.bench, protocol, answerer.describe(), dataset.fingerprint,
                        answerer.sampling.to_dict(), subtitles=answerer.subtitles, blank=blank)


@dataclass
class RunResult:
    """What a run produced (complete on rank 0; other ranks get their own share only)."""

    out: Path
    header: dict[str, Any]
    records: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    session: dict[str, Any] = field(default_factory=dict)
    rank: int = 0


def blank_like(visual: np.ndarray) -> np.ndarray:
    """The same shape filled with the generated scenes' background: the visual detail is gone, the format not."""
    from .synthetic import BACKGROUND

    out = np.empty_like(visual)
    out[...] = BACKGROUND
    return out


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="q", disable=not enabled, dynamic_ncols=True, file=sys.stderr,
                mininterval=0.5, leave=True)


def run(answerer: Answerer, dataset: Dataset, plans: Sequence[str], protocol: str, out: str | os.PathLike, *,
        blank: bool = False, progress: bool = True, measure_memory: bool = False, label: str | None = None,
        about: dict[str, Any] | None = None) -> RunResult:
    """Answer every question of `dataset` under every plan, appending records to the run folder `out`.

    Args:
        answerer: the model.
        dataset: the questions (`datasets.load`).
        plans: plan strings ("none" first is added if missing); printed forms are the series names.
        protocol: a `protocols.REGISTRY` name.
        out: the run folder (refused if it holds another run, see `store.open_run`).
        blank: answer with every image/video replaced by a blank one (the chance check).
        progress: show a tqdm bar (rank 0) with ETA and running accuracy.
        measure_memory: record peak memory per question (CPU: the RSS high-water mark; always on GPU).
        label: the bar's label.
        about: extra descriptive fields for ``run.json`` (not part of the identity).

    Returns:
        `RunResult`; on rank 0 its records are every record of the run for these plans and questions.
    """
    proto = P.get(protocol)
    plans = list(dict.fromkeys(canonical_plan(p) for p in ["none", *plans]))
    ctx = dist_context()
    ident = identity(answerer, dataset, proto.name, blank=blank)
    info = {"model": answerer.describe(), "data": dataset.summary(), "protocol": proto.to_dict(), **(about or {})}
    status = None
    if ctx.rank == 0:
        try:
            status = store.open_run(out, ident, info)
        except EvalError as e:
            status = e
    status = ctx.broadcast(status)
    if isinstance(status, EvalError):
        raise status
    header = status
    rid = header["run_id"]
    session = store.new_session(ctx.world, ctx.device)
    session = ctx.broadcast(session)
    if ctx.rank == 0:
        store.add_session(out, session)
    records_file = store.RecordFile(out, ctx.rank)  # cuts this rank's torn last line before anyone reads
    ctx.barrier()
    existing, notes = store.read_records(out, rid)
    done = {(r["plan"], r["question_id"]) for r in existing if "error" not in r}
    wanted = {(p, it.qid) for p in plans for it in dataset.items}
    todo = [it for it in dataset.items if any((p, it.qid) not in done for p in plans)]
    mine = todo[ctx.rank::ctx.world]
    pending = sum(1 for it in mine for p in plans if (p, it.qid) not in done)
    broken: dict[str, str] = {}
    stats: dict[str, list[bool]] = {}
    desc = label or f"{dataset.bench} [{proto.name}]"
    try:
        with _progress(pending, desc, progress and ctx.rank == 0) as bar:
            if mine:
                _warm_up(answerer, mine[0], plans, proto.name, blank)
            for item in mine:
                visual = inputs = None
                for plan in plans:
                    if (plan, item.qid) in done:
                        continue
                    if plan in broken:
                        bar.update(1)
                        continue
                    rec = _base_record(item, plan, rid, session["id"], ctx.rank, proto.name, answerer, dataset)
                    try:
                        if inputs is None:  # the visual and the model inputs do not depend on the plan
                            visual = answerer.visual(item)
                            visual = blank_like(visual) if blank else visual
                            inputs = answerer.inputs(item, visual, proto.name)
                        rec.update(answerer.ask(item, visual, plan, proto.name, measure_memory=measure_memory,
                                                inputs=inputs))
                    except Exception as e:  # noqa: BLE001 - a plan this model cannot serve must not stop the rest
                        rec["error"] = f"{type(e).__name__}: {e}"
                        broken[plan] = rec["error"]
                        bar.write(f"{desc}: plan {plan!r} fails ({rec['error'][:200]}); its other questions are "
                                  "skipped this session")
                    records_file.write(rec)
                    if "correct" in rec:
                        stats.setdefault(plan, []).append(rec["correct"])
                    bar.update(1)
                    bar.set_postfix_str(_postfix(stats, plan), refresh=False)
    finally:
        records_file.close()
    ctx.barrier()
    if ctx.rank != 0:
        return RunResult(Path(out), header, [], notes, session, ctx.rank)
    records, notes = store.read_records(out, rid)
    records = [r for r in records if (r["plan"], r["question_id"]) in wanted]
    header = store.read_header(out)
    return RunResult(Path(out), header, records, notes, session, 0)


def _postfix(stats: dict[str, list[bool]], plan: str) -> str:
    parts = []
    if "none" in stats:
        parts.append(f"acc none {np.mean(stats['none']):.3f}")
    if plan != "none" and plan in stats:
        short = plan if len(plan) <= 28 else plan[:25] + "..."
        parts.append(f"{short} {np.mean(stats[plan]):.3f}")
    return ", ".join(parts)


def _base_record(item: Item, plan: str, rid: str, sid: str, rank: int, protocol: str, answerer: Answerer,
                 dataset: Dataset) -> dict[str, Any]:
    return {"run": rid, "session": sid, "rank": rank, "question_id": item.qid, "plan": plan, "bench": item.bench,
            "task": item.task, "answer": item.answer, "protocol": protocol, "model": answerer.fingerprint,
            "data": dataset.fingerprint, "meta": item.meta}


def _warm_up(answerer: Answerer, item: Item, plans: Sequence[str], protocol: str, blank: bool) -> None:
    """One unrecorded call per plan, so first-call costs (allocations, lazy imports) stay out of the records."""
    visual = answerer.visual(item)
    visual = blank_like(visual) if blank else visual
    for plan in plans:
        try:
            answerer.ask(item, visual, plan, protocol)
        except Exception:  # noqa: BLE001 - the recorded call reports it
            pass


# --- robust timing -------------------------------------------------------------------------------------------------


def measure_timing(answerer: Answerer, items: Sequence[Item], plans: Sequence[str], protocol: str, *,
                   repeats: int = 3, warmup: int = 1, blank: bool = False, progress: bool = True,
                   label: str = "timing") -> dict[str, Any]:
    """Time to first token of every plan against the unreduced model, measured robustly in this process.

    For each of `repeats` rounds (after `warmup` unrecorded ones) and each question, "none" and every plan run
    back to back, in forward order on even rounds and reverse order on odd ones. A plan's speedup is the median
    over (question, round) of TTFT(none) / TTFT(plan) from the same burst, reported with its interquartile
    range: where that range contains 1, the difference is within noise.

    Returns:
        {"method", "items", "repeats", "warmup", "threads", "seconds", "plans": {plan: {"ttft_ms", "speedup",
        "speedup_q1", "speedup_q3", "within_noise", "n"}}}
    """
    plans = list(dict.fromkeys(canonical_plan(p) for p in ["none", *plans]))
    t0 = time.perf_counter()
    visuals, inputs = [], []
    for it in items:
        v = answerer.visual(it)
        visuals.append(blank_like(v) if blank else v)
        inputs.append(answerer.inputs(it, visuals[-1], protocol))
    times: dict[str, list[list[float]]] = {p: [] for p in plans}  # plan -> per measured round, per item
    failed: dict[str, str] = {}
    total = (warmup + repeats) * len(items) * len(plans)
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=label, unit="call", disable=not progress, file=sys.stderr, dynamic_ncols=True,
              mininterval=0.5) as bar:
        for rnd in range(warmup + repeats):
            order = plans if rnd % 2 == 0 else plans[::-1]
            row: dict[str, list[float]] = {p: [] for p in plans}
            for it, v, enc in zip(items, visuals, inputs):
                for plan in order:
                    if plan in failed:
                        row[plan].append(float("nan"))
                        bar.update(1)
                        continue
                    try:
                        row[plan].append(answerer.ask(it, v, plan, protocol, inputs=enc)["ttft_s"])
                    except Exception as e:  # noqa: BLE001 - reported in the result
                        failed[plan] = f"{type(e).__name__}: {e}"
                        row[plan].append(float("nan"))
                    bar.update(1)
            if rnd >= warmup:
                for p in plans:
                    times[p].append(row[p])
    out: dict[str, Any] = {
        "method": "interleaved: per question, none and every plan back to back (order reversed every other "
                  "round); median over (question, round) of TTFT(none)/TTFT(plan) from the same burst",
        "items": [it.qid for it in items], "repeats": repeats, "warmup": warmup, "threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - t0, "plans": {},
    }
    base = np.array(times["none"], dtype=float)
    for p in plans:
        if p in failed:
            out["plans"][p] = {"error": failed[p]}
            continue
        t = np.array(times[p], dtype=float)
        ratios = (base / t).reshape(-1)
        q1, med, q3 = (float(x) for x in np.percentile(ratios, [25, 50, 75]))
        out["plans"][p] = {"ttft_ms": float(np.median(t)) * 1e3, "ttft_ms_q1": float(np.percentile(t, 25)) * 1e3,
                           "ttft_ms_q3": float(np.percentile(t, 75)) * 1e3, "speedup": med, "speedup_q1": q1,
                           "speedup_q3": q3, "within_noise": bool(q1 <= 1.0 <= q3) and p != "none",
                           "n": int(ratios.size)}
    return out


def median(values: Sequence[float]) -> float | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and np.isnan(v))]
    return float(statistics.median(vals)) if vals else None
