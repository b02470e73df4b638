"""The plain evaluation loop and the main job: accuracy kept at a token budget, on the default models.

    tokenreduce evaluate                      # every reducer at 50/25/11% of the visual tokens, test split
    tokenreduce evaluate --plans "none;pool(tokens=16)" --limit 40 --datasets images
    tokenreduce evaluate --blank              # the same with the image/video blanked out (must fall to chance)
    tokenreduce evaluate --keep-positions     # reduced plans with kept tokens at their full-prompt position ids

Reads a benchmark folder in the official layouts (`synthetic.write_benchmark`; written on first use when
missing): ``images`` (MLVU-like image records), ``videomme`` (Video-MME, lmms-eval's prompt) and ``mlvu``
(MLVU's official prompt). Each item is answered by greedy decoding (a few new tokens) with a plan applied, and
the letter is taken by the protocol's rule (MLVU: the character before the first ")"; Video-MME: lmms-eval's
legacy rule); lmms-eval's current ranked extractor is recorded too.

Outputs in ``--out`` (default ``bench-results/evaluate``): ``samples.jsonl`` (one line per item and plan,
appended as it goes, so a killed run resumes where it stopped), ``summary.json``, ``table.txt`` and
``accuracy_vs_tokens.png``. Accuracy is the mean over items (Video-MME's micro average) with the mean over tasks
(MLVU's M-Avg) beside it; visual tokens are those entering the LLM per item (for in-LLM pruning: the average per
layer); TTFT is the mean time to first token per item at batch 1; speedup is TTFT(none) / TTFT(plan).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import models as M
from . import protocols as P

DATASETS = ("images", "videomme", "mlvu")
DEFAULT_KEEP = (0.5, 0.25, 0.111)
IMAGE_REDUCERS = ("random", "pool", "aim-merge", "hired", "aim-merge+aim-prune")
VIDEO_REDUCERS = ("random", "pool", "aim-merge", "quota", "aim-merge+aim-prune", "stc-prune", "stc-cache+stc-prune")
#: plans whose budget is adaptive (MustDrop's thresholds), run once each. Layers 1/2/3 are MustDrop's 2/6/10/14
#: of 32 scaled to the 6-layer decoders; the thresholds scale its (0.001, 0.001) on 576 tokens by the token
#: count, from "drop little" to "drop much". SigLIP (video) has no CLS token for the vision stage, so video runs
#: the LLM stages only (prefill drop + KV cut), where kept tokens keep their original positions.
FREE_PLANS: dict[str, tuple[str, ...]] = {
    "image": ("mustdrop(layers=[1, 2, 3])",
              "mustdrop(layers=[1, 2, 3], global_thr=0.02, individual_thr=0.06)",
              "mustdrop(layers=[1, 2, 3], global_thr=0.04, individual_thr=0.2)"),
    "video": tuple(f"mustdrop-prefill(layers=[1, 2, 3], global_thr={g}, individual_thr={i})+mustdrop-decode"
                   for g, i in ((0.006, 0.01), (0.01, 0.03), (0.02, 0.1))),
}
DEFAULT_BENCH = "bench-results/data"  # under bench-results/, which git ignores
POSITIONS = "@positions"  # plan suffix: kept visual tokens keep their full-prompt position ids


@dataclass(frozen=True)
class Item:
    """One benchmark question: `options` are texts (no letters), `letter` the correct one, `path` the media."""

    dataset: str
    uid: str
    task: str
    question: str
    options: tuple[str, ...]
    letter: str
    path: Path

    @property
    def kind(self) -> str:
        return "image" if self.dataset == "images" else "video"

    @property
    def protocol(self) -> str:
        return "videomme" if self.dataset == "videomme" else "mlvu"


# --- reading the official layouts --------------------------------------------------------------------------------


def _letter(options: Sequence[str], answer_text: str) -> str:
    return P.LETTERS[list(options).index(answer_text)]


def load_items(split_dir: str | os.PathLike, dataset: str, limit: int | None = None) -> list[Item]:
    """Items of one dataset of a split folder (`<bench>/<split>`), in file order, interleaving the task files
    (so the first `limit` items cover every task)."""
    root = Path(split_dir)
    if dataset == "videomme":
        records = json.loads((root / "videomme" / "videomme.json").read_text())
        items = [Item("videomme", r["videoID"], r["task_type"], r["question"],
                      tuple(o.split(". ", 1)[1] for o in r["options"]), r["answer"],
                      root / "videomme" / "data" / f"{r['videoID']}.mp4") for r in records]
        return items[:limit]
    if dataset == "mlvu":
        folder, media = root / "mlvu" / "json", lambda stem, r: root / "mlvu" / "video" / stem / r["video"]
        task_key = "question_type"
    elif dataset == "images":
        folder, media = root / "images" / "json", lambda stem, r: root / "images" / "image" / stem / r["image"]
        task_key = "question_type"
    else:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    per_file = []
    for path in sorted(folder.glob("*.json")):
        per_file.append([Item(dataset, Path(r.get("video") or r["image"]).stem, r[task_key], r["question"],
                              tuple(r["candidates"]), _letter(r["candidates"], r["answer"]), media(path.stem, r))
                         for r in json.loads(path.read_text())])
    items = [it for group in zip(*per_file) for it in group]  # round-robin over tasks
    shortest = min((len(g) for g in per_file), default=0)
    for g in per_file:  # the rest of unequal files, in order
        items += g[shortest:]
    return items[:limit]


def items_from_samples(samples: Sequence, dataset: str) -> tuple[list[Item], list[np.ndarray]]:
    """In-memory generator samples (`synthetic.generate_images` / `generate_videos`) as items and their visual
    inputs (videos sampled uniformly to `models.NUM_FRAMES` frames, lmms-eval's rule), without writing files."""
    from tokenreduce.video import uniform_indices

    items, visuals = [], []
    for s in samples:
        q = s.question
        items.append(Item(dataset, s.uid, s.task, q.question, tuple(q.options), q.letter, Path(s.uid)))
        if dataset == "images":
            visuals.append(s.image)
        else:
            frames = s.render()
            visuals.append(frames[uniform_indices(M.NUM_FRAMES, len(frames))])
    return items, visuals


def load_visual(item: Item, num_frames: int = M.NUM_FRAMES) -> np.ndarray:
    """(H, W, 3) uint8 image or (T, H, W, 3) uint8 frames sampled uniformly (lmms-eval's rule)."""
    if item.kind == "image":
        from PIL import Image

        return np.asarray(Image.open(item.path).convert("RGB"))
    from tokenreduce.video import load_video

    return load_video(item.path, num_frames=num_frames).frames


def blank_like(visual: np.ndarray) -> np.ndarray:
    """The same shape filled with the scene background: the visual detail is gone, the format is not."""
    from .synthetic import BACKGROUND

    out = np.empty_like(visual)
    out[...] = BACKGROUND
    return out


# --- answering ---------------------------------------------------------------------------------------------------


class _FirstToken:
    """A stopping criterion that never stops; notes when generate produced its first token."""

    def __init__(self) -> None:
        self.t: float | None = None

    def __call__(self, input_ids, scores, **kwargs):
        if self.t is None:
            self.t = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def split_positions(plan: str) -> tuple[str, bool]:
    """"pool(tokens=16) @positions" -> ("pool(tokens=16)", True): the suffix runs a plan with the kept tokens at
    their full-prompt position ids (`tr.attach(..., keep_positions=True)`); its rows are their own series."""
    if plan.endswith(POSITIONS):
        return plan[: -len(POSITIONS)].strip(), True
    return plan, False


@torch.inference_mode()
def answer(model, tokenizer, item: Item, visual: np.ndarray, plan: str = "none", max_new_tokens: int = 4
           ) -> dict[str, Any]:
    """Greedy answer to one item under `plan` (optionally suffixed " @positions", see `split_positions`);
    returns the completion, extracted letters, correctness, visual tokens entering the LLM, average visual
    tokens per LLM layer, TTFT (s) and prefill FLOPs."""
    from transformers import StoppingCriteriaList

    import tokenreduce as tr

    prompt = P.build_prompt(item.protocol, item.question, item.options, item.kind)
    inputs = M.encode(tokenizer, model, [prompt], visual[None])
    first = _FirstToken()
    with tr.apply(model, plan, tokenizer=tokenizer) as run:  # tr.Plan.parse reads the " @positions" option
        t0 = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             stopping_criteria=StoppingCriteriaList([first]))
        t_end = time.perf_counter()
    call = run.report.calls[0] if getattr(run.report, "calls", None) else run.report.last
    completion = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    pred = P.extract(item.protocol, completion)
    return {
        "completion": completion, "pred": pred, "pred_ranked": P.extract_ranked(completion),
        "correct": pred == item.letter, "tokens": int(call.tokens()[0]),
        "layer_avg": float(call.visual_layer_average[0]), "ttft": (first.t or t_end) - t0,
        "flops_prefill": float(dict(call.flops).get("llm_prefill", 0.0)),
    }


# --- the loop ------------------------------------------------------------------------------------------------------


def _key(r: dict[str, Any]) -> tuple:
    return r["dataset"], r["plan"], bool(r.get("blank")), r["uid"]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a (possibly cut-off) JSONL file; a torn last line is ignored."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def evaluate(model, tokenizer, items: Sequence[Item], plans: Sequence[str], out_jsonl: Path | None = None,
             blank: bool = False, log_every: int = 0) -> list[dict[str, Any]]:
    """Every item under every plan; records are appended to `out_jsonl` (skipping those already there).

    A plan that raises (a reducer this model cannot serve) gets one record with its error and is skipped.
    """
    done = {_key(r): r for r in read_jsonl(out_jsonl) if "error" not in r} if out_jsonl else {}  # errors: retry
    records = []
    cache: dict[str, np.ndarray] = {}
    fh = out_jsonl.open("a") if out_jsonl else None
    try:
        for plan in plans:
            t0, n_new = time.perf_counter(), 0
            todo = [it for it in items if (it.dataset, plan, blank, it.uid) not in done]
            if todo:  # one unrecorded warm-up call per plan, so TTFT excludes first-call costs
                cache.setdefault(todo[0].uid, load_visual(todo[0]))
                warm = blank_like(cache[todo[0].uid]) if blank else cache[todo[0].uid]
                try:
                    answer(model, tokenizer, todo[0], warm, plan)
                except Exception:  # noqa: BLE001 - reported by the recorded call below
                    pass
            for i, item in enumerate(items):
                key = (item.dataset, plan, blank, item.uid)
                if key in done:
                    records.append(done[key])
                    continue
                if item.uid not in cache:
                    cache[item.uid] = load_visual(item)
                visual = blank_like(cache[item.uid]) if blank else cache[item.uid]
                rec = {"dataset": item.dataset, "plan": plan, "blank": blank, "uid": item.uid, "task": item.task,
                       "letter": item.letter}
                try:
                    rec.update(answer(model, tokenizer, item, visual, plan))
                except Exception as e:  # noqa: BLE001 - one unservable plan must not stop the others
                    rec["error"] = f"{type(e).__name__}: {e}"
                records.append(rec)
                n_new += 1
                if fh:
                    fh.write(json.dumps(rec) + "\n")
                    fh.flush()
                if "error" in rec:
                    print(f"[{item.dataset}] {plan}: skipped ({rec['error'][:160]})", flush=True)
                    break
                if log_every and (i + 1) % log_every == 0:
                    print(f"[{item.dataset}] {plan} {i + 1}/{len(items)}", flush=True)
            if n_new and "error" not in records[-1]:
                acc = np.mean([r.get("correct", False) for r in records if r["plan"] == plan
                               and r["dataset"] == items[0].dataset and r.get("blank") == blank])
                print(f"[{items[0].dataset}] {plan}{' [blank]' if blank else ''}: accuracy {acc:.3f} "
                      f"({n_new} new, {time.perf_counter() - t0:.1f}s)", flush=True)
    finally:
        if fh:
            fh.close()
    return records


def summarize(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (dataset, plan, blank): accuracy (micro), task-mean accuracy (MLVU's M-Avg), per-task accuracy,
    mean visual tokens (entering the LLM and per layer), mean TTFT (ms) and speedup vs "none"."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["dataset"], r["plan"], bool(r.get("blank")))].append(r)
    rows = []
    for (dataset, plan, blank), rs in groups.items():
        row: dict[str, Any] = {"dataset": dataset, "plan": plan, "blank": blank, "n": len(rs)}
        errors = [r["error"] for r in rs if "error" in r]
        if errors:
            row["error"] = errors[0]
            rows.append(row)
            continue
        per_task: dict[str, list[bool]] = defaultdict(list)
        for r in rs:
            per_task[r["task"]].append(r["correct"])
        row.update(
            accuracy=float(np.mean([r["correct"] for r in rs])),
            task_mean=float(np.mean([np.mean(v) for v in per_task.values()])),
            per_task={k: float(np.mean(v)) for k, v in sorted(per_task.items())},
            ranked_accuracy=float(np.mean([r["pred_ranked"] == r["letter"] for r in rs])),
            tokens=float(np.mean([r["tokens"] for r in rs])),
            layer_avg=float(np.mean([r["layer_avg"] for r in rs])),
            ttft_ms=1000 * float(np.mean([r["ttft"] for r in rs])),
        )
        rows.append(row)
    base = {(r["dataset"], r["blank"]): r for r in rows if r["plan"] == "none" and "ttft_ms" in r}
    for r in rows:
        b = base.get((r["dataset"], r["blank"]))
        if b and "ttft_ms" in r:
            r["speedup"] = b["ttft_ms"] / r["ttft_ms"]
            r["accuracy_kept"] = r["accuracy"] / b["accuracy"] if b["accuracy"] else float("nan")
    return rows


def table(rows: Sequence[dict[str, Any]]) -> str:
    """A fixed-width text table of the summary rows."""
    head = ["dataset", "plan", "n", "accuracy", "task-mean", "kept", "tokens", "tok/layer", "TTFT ms", "speedup"]
    cells, notes = [head], []
    for r in rows:
        name = r["plan"] + (" [blank]" if r["blank"] else "")
        if "error" in r:
            cells.append([r["dataset"], name, "-", "error", *["-"] * 6])
            notes.append(f"{r['dataset']} {name}: {r['error']}")
            continue
        cells.append([r["dataset"], name, str(r["n"]), f"{r['accuracy']:.3f}", f"{r['task_mean']:.3f}",
                      f"{r.get('accuracy_kept', float('nan')):.2f}", f"{r['tokens']:.1f}", f"{r['layer_avg']:.1f}",
                      f"{r['ttft_ms']:.1f}", f"{r.get('speedup', float('nan')):.2f}x"])
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines + notes)


# --- the plot (PIL only) ---------------------------------------------------------------------------------------

_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def reducer_name(plan: str) -> str:
    """"aim-merge(tokens=32)+aim-prune" -> "aim-merge+aim-prune" (the series a plan belongs to)."""
    import re

    return re.sub(r"\([^)]*\)", "", plan)


def plot(rows: Sequence[dict[str, Any]], path: str | os.PathLike, width: int = 960, height: int = 420) -> Path:
    """Accuracy vs visual tokens, one panel per dataset, one coloured series per reducer; written as PNG."""
    from PIL import Image, ImageDraw

    rows = [r for r in rows if "accuracy" in r and not r["blank"]]
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    series = list(dict.fromkeys(reducer_name(r["plan"]) for r in rows))
    colour = {s: _PALETTE[i % len(_PALETTE)] for i, s in enumerate(series)}
    legend_w = 190
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    n = max(len(datasets), 1)
    pw = (width - legend_w) // n
    for k, ds in enumerate(datasets):
        x0, y0, x1, y1 = k * pw + 50, 30, (k + 1) * pw - 15, height - 45
        d.rectangle([x0, y0, x1, y1], outline="black")
        d.text((x0, 10), f"{ds}: accuracy vs visual tokens", fill="black")
        pts = [r for r in rows if r["dataset"] == ds]
        tmax = max(r["layer_avg"] if r["layer_avg"] < r["tokens"] else r["tokens"] for r in pts) * 1.05 or 1
        sx = lambda t, x0=x0, x1=x1, tmax=tmax: x0 + (x1 - x0) * t / tmax
        sy = lambda a, y0=y0, y1=y1: y1 - (y1 - y0) * a
        for a in (0.0, 0.25, 0.5, 0.75, 1.0):
            d.line([x0, sy(a), x1, sy(a)], fill=(225, 225, 225))
            d.text((x0 - 32, sy(a) - 6), f"{a:.2f}", fill="black")
        for t in np.linspace(0, tmax, 5):
            d.text((sx(t) - 8, y1 + 6), f"{t:.0f}", fill="black")
        d.text(((x0 + x1) // 2 - 40, y1 + 22), "visual tokens", fill="black")
        for s in series:
            mine = [r for r in pts if reducer_name(r["plan"]) in (s, "none")]  # each curve ends at "none"
            sp = sorted((min(r["tokens"], r["layer_avg"]), r["accuracy"]) for r in mine)
            xy = [(sx(t), sy(a)) for t, a in sp]
            if len(xy) > 1:
                d.line(xy, fill=colour[s], width=2)
            for x, y in xy:
                d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour[s])
        d.line([x0, sy(0.25), x1, sy(0.25)], fill=(160, 160, 160))
        d.text((x1 - 40, sy(0.25) - 14), "chance", fill=(120, 120, 120))
    for i, s in enumerate(series):
        y = 40 + 18 * i
        d.rectangle([width - legend_w + 10, y, width - legend_w + 22, y + 12], fill=colour[s])
        d.text((width - legend_w + 28, y), s, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


# --- plans and the command -------------------------------------------------------------------------------------


def plan_list(reducers: Sequence[str], n_visual: int, keep: Sequence[float] = DEFAULT_KEEP,
              free: Sequence[str] = FREE_PLANS["image"]) -> list[str]:
    """"none", then every reducer at every budget (``tokens=round(k * n_visual)``; a "+"-joined entry gets the
    budget on its first reducer that takes one, e.g. "stc-cache+stc-prune(tokens=b)"), then the plans with budgets
    of their own."""
    import tokenreduce as tr

    plans = ["none"]
    for k in keep:
        b = max(1, round(k * n_visual))
        for r in reducers:
            parts = r.split("+")
            i = next(j for j, part in enumerate(parts) if issubclass(tr.get_reducer(part), tr.BudgetedReducer))
            parts[i] = f"{parts[i]}(tokens={b})"
            plans.append("+".join(parts))
    return plans + list(free)


def main_job_plans(model, kind: str, keep: Sequence[float] = DEFAULT_KEEP) -> list[str]:
    """The main job's plans for a model of `kind`: its reducers at every budget of `keep` (fractions of its visual
    tokens; a video's newline token is not part of the budget), then its MustDrop threshold plans."""
    n_visual = M.visual_token_count(model) - (1 if kind == "video" else 0)
    return plan_list(IMAGE_REDUCERS if kind == "image" else VIDEO_REDUCERS, n_visual, keep, FREE_PLANS[kind])


def ensure_benchmark(bench: Path, split: str, n_images: int, n_videos: int, seed: int = 0) -> Path:
    """`bench/split`, written with `write_benchmark` when it is missing or incomplete."""
    root = bench / split
    manifest = root / "manifest.json"
    ok = manifest.exists() and json.loads(manifest.read_text()).get("complete")
    if ok:
        counts = json.loads(manifest.read_text()).get("counts", {})
        ok = counts.get("images", 0) >= n_images and counts.get("videos", 0) >= n_videos
    if not ok:
        from .synthetic import write_benchmark

        print(f"writing the {split} split to {root} ({n_images} images, {n_videos} videos)", flush=True)
        write_benchmark(bench, split, n_images=n_images, n_videos=n_videos, seed=seed, progress_every=100)
    return root


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `tokenreduce evaluate`."""
    p.add_argument("--bench", default=DEFAULT_BENCH, help=f"benchmark folder (default ./{DEFAULT_BENCH}; written "
                   "with the synthetic generator when missing)")
    p.add_argument("--split", default="test", choices=["validation", "test"])
    p.add_argument("--datasets", default=",".join(DATASETS), help=f"comma list of {', '.join(DATASETS)}")
    p.add_argument("--limit", type=int, default=200, help="items per dataset (default 200)")
    p.add_argument("--plans", default=None, help="';'-separated plans instead of every reducer at every budget")
    p.add_argument("--keep", default=",".join(map(str, DEFAULT_KEEP)), help="budgets as fractions of the visual "
                   "tokens (default 0.5,0.25,0.111)")
    p.add_argument("--keep-positions", action="store_true",
                   help=f"run every reduced plan with the kept tokens at their full-prompt position ids (rows "
                        f"labelled '{POSITIONS}'; a plan in --plans may carry the suffix itself)")
    p.add_argument("--blank", action="store_true", help="replace every image/video by a blank one (chance check)")
    p.add_argument("--model-dir", default=None, help="an image or video checkpoint folder instead of the shipped "
                   "defaults (then only the datasets of its kind run)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", default="bench-results/evaluate", help="output folder")


def main(args: argparse.Namespace) -> int:
    """Run the datasets under every plan, print the table, write JSONL/JSON/table/PNG."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    bad = [d for d in datasets if d not in DATASETS]
    if bad:
        raise SystemExit(f"unknown dataset(s) {bad}; choose from {DATASETS}")
    custom = M.load(args.model_dir) if args.model_dir else None
    if custom is not None:
        kind = "video" if custom[0].config.model_type == "llava_onevision" else "image"
        datasets = [d for d in datasets if (d == "images") == (kind == "image")]
    need_images = args.limit if "images" in datasets else 0
    need_videos = args.limit if any(d != "images" for d in datasets) else 0
    root = ensure_benchmark(Path(args.bench), args.split, need_images, need_videos)
    keep = [float(k) for k in args.keep.split(",") if k.strip()]
    records = []
    loaded: dict[str, tuple] = {}
    for ds in datasets:
        kind = "image" if ds == "images" else "video"
        if kind not in loaded:
            loaded[kind] = custom if custom is not None else M.default_model(kind)
        model, tok = loaded[kind]
        if args.plans:
            plans = ["none", *dict.fromkeys(p.strip() for p in args.plans.split(";") if p.strip() and p != "none")]
        else:
            plans = main_job_plans(model, kind, keep)
        if args.keep_positions:
            plans = ["none", *(f"{p} {POSITIONS}" for p in plans if p != "none")]
        items = load_items(root, ds, args.limit)
        records += evaluate(model, tok, items, plans, out / "samples.jsonl", blank=args.blank)
    rows = summarize(records)
    text = table(rows)
    print(text)
    (out / "table.txt").write_text(text + "\n")
    meta = {"bench": str(root), "split": args.split, "datasets": datasets, "limit": args.limit, "blank": args.blank,
            "threads": torch.get_num_threads(), "keep_positions": args.keep_positions, "max_new_tokens": 4,
            "frames": M.NUM_FRAMES,
            "extractor": {"images": "mlvu paren", "mlvu": "mlvu paren", "videomme": "lmms-eval legacy"}}
    (out / "summary.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    png = plot(rows, out / "accuracy_vs_tokens.png")
    print(f"wrote {out / 'summary.json'}, {out / 'table.txt'}, {png}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tokenreduce.eval.evaluate", description=__doc__.split("\n")[0])
    add_arguments(p)
    return main(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(cli())
