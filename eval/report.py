"""What people read: per-plan metrics, a terminal table with a legend, JSON, a Markdown report and plots.

Metrics per plan (`summarize`):

- accuracy: the share of questions the protocol scores correct (Video-MME's micro average). Video-MME adds the
  breakdowns by duration, domain, sub-category and task type that lmms-eval logs.
- MLVU: per-task accuracy and **M-Avg as MLVU defines it** (``choice_bench.py``: the mean over the task types
  present), and **lmms-eval's aggregate** (``mlvu_aggregate_results_dev/test``: the sum of per-task accuracies
  over its fixed 7 (dev) or 9 (test) task types divided by that count, absent tasks counting 0; a task outside
  the set makes lmms-eval raise ``KeyError``, reported as n/a with the reason). The two are labelled apart.
- accuracy kept: accuracy / the unreduced plan's accuracy ("n/a" when that is 0).
- visual tokens entering the LLM and their per-layer average (the number in-LLM pruning papers quote).
- FLOPs speedup: analytic prefill FLOPs (vision tower + LLM) of "none" over the plan's, on the same questions.
- time: the medians of measured vision time, LLM prefill time, time to first token, decode tokens/s and peak
  memory from the records; the measured TTFT speedup comes from `runner.measure_timing` (interleaved, medians of
  paired ratios, made in the process that writes the table).
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import MLVU_LMMS_TASKS

WIDTH = 120


def series_name(plan: str) -> str:
    """"aim-merge(tokens=32)+aim-prune" -> "aim-merge+aim-prune" (the line a plan belongs to in a plot)."""
    return re.sub(r"\([^)]*\)", "", plan).replace(" ", "")


def _mean(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def _median(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.median(xs)) if xs else None


def _acc(rs: Sequence[dict]) -> float | None:
    scored = [r["correct"] for r in rs if "correct" in r]
    return float(np.mean(scored)) if scored else None


def _by(rs: Sequence[dict], key) -> dict[str, float]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rs:
        groups[str(key(r))].append(r)
    return {k: _acc(v) for k, v in sorted(groups.items()) if _acc(v) is not None}


def mlvu_lmms_aggregate(per_task: dict[str, float], bench: str) -> tuple[float | None, str]:
    """lmms-eval's MLVU number (0-1) from per-task accuracies, and a note on how it was made."""
    fixed = MLVU_LMMS_TASKS["mlvu-test" if bench == "mlvu-test" else "mlvu"]
    outside = sorted(set(per_task) - set(fixed))
    if outside:
        return None, (f"lmms-eval would raise KeyError: {outside[0]!r} is not one of its {len(fixed)} MLVU task "
                      "types")
    value = sum(per_task.get(t, 0.0) for t in fixed) / len(fixed)
    absent = [t for t in fixed if t not in per_task]
    note = f"sum over its {len(fixed)} fixed task types / {len(fixed)}"
    return value, note + (f"; {len(absent)} absent, counted as 0" if absent else "")


def summarize(records: Sequence[dict[str, Any]], bench: str, timing: dict[str, Any] | None = None
              ) -> list[dict[str, Any]]:
    """One row per plan (in first-seen order) of the run's records; see the module docstring."""
    by_plan: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_plan[r["plan"]].append(r)
    ok = {p: [r for r in rs if "error" not in r] for p, rs in by_plan.items()}
    base = {r["question_id"]: r for r in ok.get("none", [])}
    base_acc = _acc(ok.get("none", []))
    rows = []
    for plan, rs in by_plan.items():
        good = ok[plan]
        row: dict[str, Any] = {"plan": plan, "series": series_name(plan), "n": len(good),
                               "errors": len(rs) - len(good)}
        if len(good) < len(rs):
            row["error"] = next(r["error"] for r in rs if "error" in r)
        if not good:
            rows.append(row)
            continue
        acc = _acc(good)
        per_task = _by(good, lambda r: r["task"])
        row.update(accuracy=acc, per_task=per_task)
        if bench in ("mlvu", "mlvu-test", "images") and per_task:
            row["m_avg"] = float(np.mean(list(per_task.values())))
            if bench != "images":
                row["lmms_aggregate"], row["lmms_aggregate_note"] = mlvu_lmms_aggregate(per_task, bench)
        if bench == "videomme":
            row["breakdown"] = {k: _by(good, lambda r, k=k: (r.get("meta") or {}).get(k))
                                for k in ("duration", "domain", "sub_category", "task_type")}
        if acc is not None and base_acc is not None:
            row["accuracy_kept"] = acc / base_acc if base_acc > 0 else None
        row["tokens"] = _mean([r["tokens"] for r in good])
        row["layer_avg"] = _mean([r["layer_avg"] for r in good])
        pairs = [(base[r["question_id"]], r) for r in good if r["question_id"] in base]
        full = sum(b["flops_prefill"] + b["flops_vision"] for b, _ in pairs)
        mine = sum(r["flops_prefill"] + r["flops_vision"] for _, r in pairs)
        row["flops_speedup"] = full / mine if pairs and mine > 0 else None
        sessions = sorted({r.get("session") for r in good})
        latest = [r for r in good if r.get("session") == good[-1].get("session")]
        row.update(
            sessions=len(sessions),
            ttft_ms=_ms(_median([r["ttft_s"] for r in latest])),
            vision_ms=_ms(_median([r["vision_s"] for r in latest])),
            prefill_ms=_ms(_median([r["prefill_s"] for r in latest])),
            decode_tps=_median([r.get("decode_tps") for r in latest]),
            peak_mib=_median([r.get("peak_mib") for r in latest]),
            completions_per_session=len(latest),
        )
        t = (timing or {}).get("plans", {}).get(plan)
        if t and "speedup" in t:
            row.update(speedup=t["speedup"], speedup_q1=t["speedup_q1"], speedup_q3=t["speedup_q3"],
                       within_noise=t["within_noise"], timed_ttft_ms=t["ttft_ms"])
        elif t and "error" in t:
            row["timing_error"] = t["error"]
        rows.append(row)
    return rows


def _ms(s: float | None) -> float | None:
    return None if s is None else s * 1e3


# --- formatting -------------------------------------------------------------------------------------------------


def fmt_speedup(row: dict[str, Any]) -> str:
    if row.get("speedup") is None:
        return "n/a"
    return f"{'~' if row.get('within_noise') else ''}{row['speedup']:.2f}x"


def _f(value: Any, spec: str, missing: str = "n/a") -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return missing
    return format(value, spec)


def short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


#: (key, header, formatter, legend)
COLUMNS: dict[str, tuple[str, Any, str]] = {
    "dataset": ("dataset", lambda r: r.get("dataset", ""), "the data set (the main job's layouts)"),
    "plan": ("plan", lambda r: r["plan"], "the reduction plan ('none': unreduced; '@positions': kept tokens keep "
             "their full-prompt position ids)"),
    "n": ("n", lambda r: str(r.get("n", 0)), "questions answered under the plan"),
    "acc": ("acc", lambda r: _f(r.get("accuracy"), ".3f"), "accuracy: share scored correct by the protocol's rule"),
    "kept": ("kept", lambda r: _f(r.get("accuracy_kept"), ".2f"), "accuracy kept: acc / the unreduced plan's "
             "acc (n/a when that is 0)"),
    "m_avg": ("M-Avg", lambda r: _f(r.get("m_avg"), ".3f", "-"), "MLVU's M-Avg: mean of the per-task accuracies "
              "over the task types present (MLVU's own definition)"),
    "lmms": ("lmms agg", lambda r: _f(r.get("lmms_aggregate"), ".3f"), "lmms-eval's MLVU aggregate: per-task "
             "accuracies over its fixed task set / its size, absent tasks 0 (n/a: lmms-eval would fail)"),
    "tokens": ("vis tok", lambda r: _f(r.get("tokens"), ".1f"), "visual tokens entering the LLM per question "
               "(mean)"),
    "layer": ("/layer", lambda r: _f(r.get("layer_avg"), ".1f"), "visual tokens per LLM layer, averaged over "
              "layers (differs from 'vis tok' for in-LLM pruning)"),
    "flops": ("FLOPs x", lambda r: _f(r.get("flops_speedup"), ".2f") + ("x" if r.get("flops_speedup") else ""),
              "analytic prefill FLOPs (vision + LLM) of 'none' / the plan's, same questions"),
    "ttft": ("TTFT ms", lambda r: _f(r.get("timed_ttft_ms", r.get("ttft_ms")), ".1f"), "time to first token, "
             "median (timing pass when run, else the answers of the latest session)"),
    "speedup": ("TTFT x", fmt_speedup, "measured TTFT speedup vs 'none': median of paired per-question ratios "
                "(interleaved, after warm-up); '~' marks a speedup within noise (its middle half spans 1.0)"),
    "vision": ("vision ms", lambda r: _f(r.get("vision_ms"), ".1f"), "vision tower time, median"),
    "prefill": ("prefill ms", lambda r: _f(r.get("prefill_ms"), ".1f"), "LLM prefill time, median"),
    "decode": ("dec tok/s", lambda r: _f(r.get("decode_tps"), ".1f"), "decode tokens/s after the first token, "
               "median (n/a: the answer was one token)"),
    "peak": ("peak MiB", lambda r: _f(r.get("peak_mib"), ".0f"), "peak memory above the level before the "
             "call (CPU: RSS high-water mark; GPU: max allocated), median"),
    "iqr": ("x IQR", lambda r: (f"{r['speedup_q1']:.2f}-{r['speedup_q3']:.2f}" if r.get("speedup_q1") is not None
                                else "n/a"), "interquartile range of the paired TTFT ratios"),
    "errors": ("err", lambda r: str(r.get("errors", 0)), "questions that raised (the plan cannot serve the model)"),
}


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str], *, wide: bool = False, width: int = WIDTH,
          legend: bool = True, per_task: bool = False) -> str:
    """A fixed-width text table of `rows` with `columns` (keys of `COLUMNS`), at most `width` characters unless
    `wide` (then also nothing is shortened); a legend line per column follows."""
    heads = [COLUMNS[c][0] for c in columns]
    cells = [[COLUMNS[c][1](r) for c in columns] for r in rows]
    tasks: list[str] = []
    if per_task:
        tasks = list(dict.fromkeys(t for r in rows for t in (r.get("per_task") or {})))
        heads += tasks
        for r, row in zip(rows, cells):
            row += [_f((r.get("per_task") or {}).get(t), ".3f", "-") for t in tasks]
    text_cols = {i for i, c in enumerate(columns) if c in ("dataset", "plan")}
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(heads)]
    if not wide and "plan" in columns:
        i = columns.index("plan")
        others = sum(w for j, w in enumerate(widths) if j != i) + 2 * (len(widths) - 1)
        widths[i] = max(len("plan"), min(widths[i], width - others))
        for row in cells:
            row[i] = short(row[i], widths[i])
    lines = ["  ".join(h.ljust(w) if i in text_cols else h.rjust(w) for i, (h, w) in enumerate(zip(heads, widths)))]
    lines.append("-" * len(lines[0]))
    for row in cells:
        lines.append("  ".join(c.ljust(w) if i in text_cols else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))))
    for r in rows:
        if r.get("error"):
            lines.append(short(f"! {r['plan']}: {r['errors']} question(s) failed: {r['error']}", width if not wide
                               else 10**6))
    if legend:
        lines.append("")
        lines += legend_lines(columns, width)
        if tasks:
            lines.append(f"{'tasks':>10}: accuracy per task type")
    return "\n".join(lines)


def legend_lines(columns: Sequence[str], width: int = WIDTH) -> list[str]:
    """One entry per column, wrapped to `width`."""
    import textwrap

    out = []
    for c in columns:
        out += textwrap.wrap(COLUMNS[c][2], width=width, initial_indent=f"{COLUMNS[c][0]:>10}: ",
                             subsequent_indent=" " * 12)
    return out


def eval_columns(bench: str, wide: bool) -> list[str]:
    cols = ["plan", "n", "acc", "kept"]
    if bench in ("mlvu", "mlvu-test"):
        cols += ["m_avg"] + (["lmms"] if wide else [])
    cols += ["tokens", "layer", "flops", "ttft", "speedup"]
    if wide:
        cols += ["iqr", "vision", "prefill", "decode", "peak", "errors"]
    return cols


# --- files ------------------------------------------------------------------------------------------------------


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def markdown(title: str, rows: Sequence[dict[str, Any]], columns: Sequence[str], header: dict[str, Any],
             notes: Sequence[str] = ()) -> str:
    """The Markdown report: what was run, the table with every column, breakdowns, warnings."""
    ident = header.get("identity", {})
    about = header.get("about", {})
    out = [f"# {title}", ""]
    model = about.get("model", {})
    data = about.get("data", {})
    proto = about.get("protocol", {})
    out += [f"- model: `{model.get('name')}` ({model.get('class')}, {model.get('dtype')}, fingerprint "
            f"`{model.get('fingerprint')}`)",
            f"- data: `{data.get('root')}` ({data.get('items')} questions, fingerprint `{data.get('fingerprint')}`)",
            f"- protocol: `{proto.get('name')}`: {proto.get('reference')}; extractor: {proto.get('extractor')}; "
            f"max_new_tokens {proto.get('max_new_tokens')}, greedy",
            f"- sampling: {ident.get('sampling')}; blank: {ident.get('blank')}; run id `{header.get('run_id')}`",
            f"- sessions: {len(header.get('sessions', []))}; versions: "
            f"{(header.get('sessions') or [{}])[-1].get('versions')}",
            ""]
    heads = [COLUMNS[c][0] for c in columns]
    out.append("| " + " | ".join(heads) + " |")
    out.append("|" + "---|" * len(heads))
    for r in rows:
        out.append("| " + " | ".join(COLUMNS[c][1](r).replace("|", "\\|") for c in columns) + " |")
    out += ["", "Columns: " + "; ".join(f"**{COLUMNS[c][0]}**: {COLUMNS[c][2]}" for c in columns), ""]
    tasks = list(dict.fromkeys(t for r in rows for t in (r.get("per_task") or {})))
    if tasks:
        out += ["## Accuracy per task", "", "| plan | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        for r in rows:
            out.append(f"| {r['plan']} | " + " | ".join(_f((r.get('per_task') or {}).get(t), '.3f', '-')
                                                         for t in tasks) + " |")
        out.append("")
    for key, label in (("duration", "duration"), ("domain", "domain"), ("sub_category", "sub-category"),
                       ("task_type", "task type")):
        cats = list(dict.fromkeys(c for r in rows for c in (r.get("breakdown") or {}).get(key, {})))
        if cats and key != "task_type":
            out += [f"## Video-MME by {label}", "", "| plan | " + " | ".join(cats) + " |", "|---|" + "---|" * len(cats)]
            for r in rows:
                vals = (r.get("breakdown") or {}).get(key, {})
                out.append(f"| {r['plan']} | " + " | ".join(_f(vals.get(c), '.3f', '-') for c in cats) + " |")
            out.append("")
    lmms = [r for r in rows if "lmms_aggregate_note" in r]
    if lmms:
        out += ["## MLVU: M-Avg and lmms-eval's aggregate", "",
                "M-Avg is MLVU's definition (mean over the task types present). lmms-eval's aggregate: "
                f"{lmms[0]['lmms_aggregate_note']}.", ""]
    warn = data.get("warnings") or []
    skipped = data.get("skipped") or []
    if warn or skipped or notes:
        out += ["## Data and run notes", ""]
        out += [f"- warning {w['qid']}: {w['message']}" for w in warn]
        out += [f"- skipped {w['qid']} ({w['kind']}): {w['message']}" for w in skipped]
        out += [f"- {n}" for n in notes]
        out.append("")
    return "\n".join(out)


def can_plot() -> bool:
    """Whether matplotlib is installed (the ``eval`` extra); without it tables and JSON are still written."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


PLOT_HINT = "plots need matplotlib: pip install 'tokenreduce[eval]' (tables, JSON and Markdown are written anyway)"


def plot(panels: Sequence[tuple[str, Sequence[dict[str, Any]]]], path: str | os.PathLike, x: str = "tokens",
         title: str | None = None) -> Path:
    """Accuracy against `x` ("tokens": visual tokens per LLM layer; "ttft": measured TTFT in ms; "speedup":
    measured TTFT speedup), one panel per (name, rows), one line per method (`series_name`), the unreduced model
    as a star and a dashed line. Written with matplotlib (Agg) as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xlabel = {"tokens": "visual tokens per LLM layer", "ttft": "time to first token (ms)",
              "speedup": "measured TTFT speedup vs unreduced"}[x]

    def xval(r: dict) -> float | None:
        if x == "tokens":
            return r.get("layer_avg")
        if x == "ttft":
            return r.get("timed_ttft_ms", r.get("ttft_ms"))
        return r.get("speedup")

    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.2 * max(1, len(panels)) + 1.8, 4.2),
                             squeeze=False)
    series_all = list(dict.fromkeys(series_name(r["plan"]) for _, rows in panels for r in rows
                                    if r["plan"] != "none"))
    cmap = plt.get_cmap("tab10" if len(series_all) <= 10 else "tab20")
    colours = {s: cmap(i % cmap.N) for i, s in enumerate(series_all)}
    for ax, (name, rows) in zip(axes[0], panels):
        rows = [r for r in rows if r.get("accuracy") is not None and xval(r) is not None]
        for s in series_all:
            pts = sorted((xval(r), r["accuracy"]) for r in rows if series_name(r["plan"]) == s and r["plan"] != "none")
            if pts:
                marker = "o" if "@positions" not in s else "s"
                ax.plot(*zip(*pts), marker=marker, color=colours[s], label=s, linewidth=1.5, markersize=4,
                        linestyle="-" if "@positions" not in s else "--")
        base = next((r for r in rows if r["plan"] == "none"), None)
        if base is not None:
            ax.axhline(base["accuracy"], color="black", linestyle=":", linewidth=1)
            ax.plot([xval(base)], [base["accuracy"]], marker="*", color="black", markersize=11, linestyle="none",
                    label="none (unreduced)")
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.02)
        if x == "tokens":
            ax.set_xlim(left=0)
        if x == "speedup":
            ax.axvline(1.0, color="grey", linewidth=0.8)
        ax.grid(alpha=0.3)
    handles, labels = [], []
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1 - 1.8 / fig.get_figwidth(), 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".partial.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def submission(records: Sequence[dict[str, Any]], plan: str) -> list[dict[str, Any]]:
    """MLVU-Test's submission format for one plan: [{"question_id", "question_type", "option"}], the option as
    the official script cuts it."""
    return [{"question_id": r["question_id"], "question_type": (r.get("meta") or {}).get("question_type", r["task"]),
             "option": r.get("extracted", "")} for r in records if r["plan"] == plan and "error" not in r]
