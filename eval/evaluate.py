"""The main job: accuracy kept at a token budget, and what it buys in time, on the default models.

    tokenreduce evaluate                       # every method at 50/25/11% of the visual tokens, test split
    tokenreduce evaluate --limit 40 --datasets images --plans "none;pool(tokens=16)"
    tokenreduce evaluate --blank               # the same with the image/video blanked out (must fall to chance)
    tokenreduce evaluate --keep-positions      # reduced plans with kept tokens at their full-prompt position ids

It is `tokenreduce sweep` over the generated benchmark's three layouts, on the shipped models (the same runner:
`runner.run`): ``images`` (the image model, MLVU's official protocol), ``videomme`` (the video model, lmms-eval's
Video-MME protocol) and ``mlvu`` (the video model, MLVU's official protocol). The benchmark is written on first
use (``bench-results/data``). Every plan answers every question; then the **timing pass** measures time to first
token on a fixed set of questions (``--timing-items``), every plan interleaved with the unreduced model, after a
warm-up round, ``--timing-repeats`` rounds, medians of paired ratios (`runner.measure_timing`). It runs in every
invocation, so the speedups of a resumed run are measured afresh, never stitched from several sessions.

Outputs in ``--out`` (default ``bench-results/evaluate``): one run folder per data set (``images/``,
``videomme/``, ``mlvu/``; ``-blank`` for blanked runs) with its records, and ``table.txt``, ``summary.json``,
``report.md``, ``accuracy_vs_tokens.png`` and ``accuracy_vs_speedup.png`` over all of them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import models as M
from . import protocols as P
from .answer import POSITIONS, Answerer, Sampling, add_runtime_arguments, split_positions
from .datasets import Item
from .errors import EvalError
from .runner import blank_like

__all__ = ["POSITIONS", "answer", "blank_like", "ensure_benchmark", "items_from_samples", "load_items",
           "load_visual", "main", "main_job_plans", "split_positions"]

DATASETS = ("images", "videomme", "mlvu")
DEFAULT_KEEP = (0.5, 0.25, 0.111)
#: each method of the main job as a plan at a budget of {n} visual tokens: one line adds a method to the table
IMAGE_METHODS: dict[str, str] = {
    "random": "random(tokens={n})",
    "pool": "pool(tokens={n})",
    "aim-merge": "aim-merge(tokens={n})",
    "hired": "hired(tokens={n})",
    "aim-merge+aim-prune": "aim-merge(tokens={n})+aim-prune",
    "mustdrop": "mustdrop(tokens={n})",  # the budget form: visual tokens averaged over the decoder layers
}
VIDEO_METHODS: dict[str, str] = {
    "random": "random(tokens={n})",
    "pool": "pool(tokens={n})",
    "aim-merge": "aim-merge(tokens={n})",
    "quota": "quota(tokens={n})",
    "aim-merge+aim-prune": "aim-merge(tokens={n})+aim-prune",
    "stc-prune": "stc-prune(tokens={n})",
    "stc-cache+stc-prune": "stc-cache+stc-prune(tokens={n})",
    "mustdrop": "mustdrop-prefill(tokens={n})+mustdrop-decode",  # SigLIP: no CLS for the vision stage
}
IMAGE_REDUCERS = tuple(IMAGE_METHODS)
VIDEO_REDUCERS = tuple(VIDEO_METHODS)
#: plans whose budget is adaptive (MustDrop's thresholds, the release's rule beside the budget form above), run
#: once each. Layers 1/2/3 are MustDrop's 2/6/10/14
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
DEFAULT_LIMIT = 100
BENCH_OF = {"images": "images", "videomme": "videomme", "mlvu": "mlvu"}


# --- the plan list ----------------------------------------------------------------------------------------------


def plan_list(methods: dict[str, str] | Sequence[str], n_visual: int, keep: Sequence[float] = DEFAULT_KEEP,
              free: Sequence[str] = FREE_PLANS["image"]) -> list[str]:
    """"none", then every method at every budget (``round(k * n_visual)`` tokens, at least 1), then the plans
    with budgets of their own. `methods` maps a name to its plan template with ``{n}``; a bare reducer name (or
    "+"-joined names) gets the budget on its first reducer."""
    if not isinstance(methods, dict):
        methods = {m: "+".join([f"{m.split('+')[0]}(tokens={{n}})", *m.split("+")[1:]]) for m in methods}
    plans = ["none"]
    for k in keep:
        n = max(1, round(k * n_visual))
        plans += [template.format(n=n) for template in methods.values()]
    return plans + list(free)


def main_job_plans(model, kind: str, keep: Sequence[float] = DEFAULT_KEEP) -> list[str]:
    """The main job's plans for a model of `kind`: its methods at every budget of `keep` (fractions of its visual
    tokens; a video's newline token is not part of the budget), then its MustDrop threshold plans."""
    n_visual = M.visual_token_count(model) - (1 if kind == "video" else 0)
    return plan_list(IMAGE_METHODS if kind == "image" else VIDEO_METHODS, n_visual, keep, FREE_PLANS[kind])


# --- the pieces tests and `run --options` share with the main job ----------------------------------------------


def ensure_benchmark(bench: Path, split: str, n_images: int, n_videos: int, seed: int = 0) -> Path:
    """`bench/split`, written with `write_benchmark` when it is missing or has fewer items than needed."""
    root = Path(bench) / split
    manifest = root / "manifest.json"
    written = json.loads(manifest.read_text()) if manifest.exists() else {}
    ok = bool(written.get("complete"))
    if ok:
        counts = written.get("counts", {})
        ok = counts.get("images", 0) >= n_images and counts.get("videos", 0) >= n_videos
        from .synthetic.layouts import default_parameters, parameter_diff

        stale = parameter_diff(written.get("parameters"), default_parameters(seed, split))
        if stale:  # e.g. videos of the plain look, written before the video model moved to the rich one
            print(f"note: {root} was written with other generator parameters than this version's defaults "
                  f"({', '.join(stale)}), which the shipped models were trained on: remove the folder to write "
                  f"it again", file=sys.stderr, flush=True)
    if not ok:
        from .synthetic import write_benchmark

        print(f"writing the {split} split to {root} ({n_images} images, {n_videos} videos)", file=sys.stderr,
              flush=True)
        write_benchmark(bench, split, n_images=n_images, n_videos=n_videos, seed=seed, progress_every=100)
    return root


def load_items(split_dir: str | Path, dataset: str, limit: int | None = None) -> list[Item]:
    """The questions of one layout of a split folder (`datasets.load`), tasks interleaved."""
    from . import datasets as D

    if dataset not in DATASETS:
        raise EvalError(f"dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    return D.load(BENCH_OF[dataset], split_dir, limit=limit).items


def load_visual(item: Item, num_frames: int = M.NUM_FRAMES) -> np.ndarray:
    """(H, W, 3) uint8 image or (T, H, W, 3) uint8 frames sampled uniformly (lmms-eval's rule)."""
    if item.kind == "image":
        from PIL import Image

        return np.asarray(Image.open(item.media).convert("RGB"))
    from tokenreduce.video import load_video

    return load_video(item.media, num_frames=num_frames).frames


def items_from_samples(samples: Sequence, dataset: str) -> tuple[list[Item], list[np.ndarray]]:
    """In-memory generator samples (`synthetic.generate_images` / `generate_videos`) as items and their visual
    inputs (videos sampled uniformly to `models.NUM_FRAMES` frames, lmms-eval's rule), without writing files."""
    from tokenreduce.video import uniform_indices

    items, visuals = [], []
    for s in samples:
        q = s.question
        kind = "image" if dataset == "images" else "video"
        items.append(Item(s.uid, BENCH_OF[dataset], s.task, q.question, tuple(q.options), q.letter, Path(s.uid),
                          kind))
        if dataset == "images":
            visuals.append(s.image)
        else:
            frames = s.render()
            visuals.append(frames[uniform_indices(M.NUM_FRAMES, len(frames))])
    return items, visuals


_ANSWERERS: dict[int, Answerer] = {}


def answerer_for(model, tokenizer) -> Answerer:
    """An `Answerer` around a loaded default-style model (the image model gets its `LlavaProcessor`)."""
    key = id(model)
    if key not in _ANSWERERS or _ANSWERERS[key].model is not model:
        image = model.config.model_type == "llava"
        processor = M.build_image_processor(tokenizer, model.config.vision_config.image_size) if image else None
        from .answer import weights_fingerprint

        _ANSWERERS[key] = Answerer(model, tokenizer, processor, fingerprint=weights_fingerprint(model),
                                   name=getattr(model, "name_or_path", "model"), sampling=Sampling(M.NUM_FRAMES))
    return _ANSWERERS[key]


def answer(model, tokenizer, item: Item, visual: np.ndarray, plan: str = "none", protocol: str | None = None
           ) -> dict[str, Any]:
    """The main job's answer to one item under `plan` (" @positions" suffix allowed), scored by `protocol`
    (default: the item's bench protocol): completion, pred, correct, tokens, layer_avg, ttft_s, FLOPs."""
    return answerer_for(model, tokenizer).ask(item, visual, plan, protocol or item.protocol)


# --- the command ------------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `tokenreduce evaluate` (values are checked by `check_arguments`, before any work)."""
    p.add_argument("--bench", default=DEFAULT_BENCH, help=f"benchmark folder (default ./{DEFAULT_BENCH}; written "
                   "with the generator when missing)")
    p.add_argument("--split", default="test", choices=["validation", "test"])
    p.add_argument("--datasets", default=",".join(DATASETS), help=f"comma list of {', '.join(DATASETS)}")
    p.add_argument("--limit", default=str(DEFAULT_LIMIT), help=f"questions per data set (default {DEFAULT_LIMIT})")
    p.add_argument("--plans", default=None, help="';'-separated plans instead of every method at every budget")
    p.add_argument("--keep", default=",".join(map(str, DEFAULT_KEEP)), help="budgets as fractions of the visual "
                   "tokens (default 0.5,0.25,0.111)")
    p.add_argument("--keep-positions", action="store_true",
                   help=f"run every reduced plan with the kept tokens at their full-prompt position ids (rows "
                        f"labelled '{POSITIONS}'; a plan in --plans may carry the suffix itself)")
    p.add_argument("--blank", action="store_true", help="replace every image/video by a blank one (chance check)")
    p.add_argument("--model-dir", default=None, help="an image or video checkpoint folder instead of the shipped "
                   "defaults (then only the data sets of its kind run)")
    p.add_argument("--out", default="bench-results/evaluate", help="output folder")
    add_runtime_arguments(p, device_help="cpu or cuda[:N]")


def check_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """Every option checked and parsed before anything is written or loaded (one-line `EvalError`s)."""
    from .harness import parse_plans, positive_int

    values: dict[str, Any] = {}
    datasets = [d.strip() for d in str(args.datasets).split(",") if d.strip()]
    bad = [d for d in datasets if d not in DATASETS]
    if not datasets or bad:
        raise EvalError(f"--datasets {args.datasets!r}: unknown {', '.join(map(repr, bad)) or 'empty list'}; choose "
                        f"from {', '.join(DATASETS)}")
    values["datasets"] = list(dict.fromkeys(datasets))
    values["limit"] = positive_int("--limit", args.limit)
    values["threads"] = None if args.threads is None else positive_int("--threads", args.threads)
    values["timing_items"] = positive_int("--timing-items", args.timing_items, minimum=0)
    values["timing_repeats"] = positive_int("--timing-repeats", args.timing_repeats)
    keep = []
    for t in str(args.keep).split(","):
        try:
            k = float(t)
        except ValueError:
            raise EvalError(f"--keep {args.keep!r}: {t.strip()!r} is not a number") from None
        if not 0 < k <= 1:
            raise EvalError(f"--keep {args.keep!r}: fractions must be in (0, 1], got {t.strip()}")
        keep.append(k)
    values["keep"] = keep
    if args.plans is not None:
        given = [p.strip() for p in str(args.plans).split(";") if p.strip()]
        if not given:
            raise EvalError(f"--plans {args.plans!r}: no plan in it")
        values["plans"] = parse_plans("--plans", given)
    else:
        values["plans"] = None
        # the generated lists parse (a method template that does not is a bug here, caught before any work)
        for kind, methods in (("image", IMAGE_METHODS), ("video", VIDEO_METHODS)):
            parse_plans("main job", plan_list(methods, 64, keep, FREE_PLANS[kind]))
    from .answer import DTYPES

    if args.dtype not in DTYPES:
        raise EvalError(f"--dtype {args.dtype!r}: choose from {', '.join(DTYPES)}")
    if args.device != "cpu" and not str(args.device).startswith("cuda"):
        raise EvalError(f"--device {args.device!r}: cpu or cuda[:N]")
    if args.model_dir is not None and not (Path(args.model_dir) / "config.json").is_file():
        raise EvalError(f"--model-dir {args.model_dir!r}: no such checkpoint folder (no config.json)")
    return values


def _plans_for(values: dict[str, Any], model, kind: str, keep_positions: bool) -> list[str]:
    from .harness import parse_plans

    plans = values["plans"] if values["plans"] is not None else parse_plans(
        "main job", main_job_plans(model, kind, values["keep"]))
    if keep_positions:
        plans = ["none", *(p if p.endswith(POSITIONS) else f"{p} {POSITIONS}" for p in plans if p != "none")]
    return plans


def main(args: argparse.Namespace) -> int:
    """Run the data sets under every plan, time them, print the table, write JSON/Markdown/PNG."""
    import torch

    from . import datasets as D
    from . import report, runner

    values = check_arguments(args)
    t_start = time.perf_counter()
    if values["threads"]:
        torch.set_num_threads(values["threads"])
    torch.manual_seed(0)
    out = Path(args.out)
    custom_kind = None
    if args.model_dir:
        cfg = json.loads((Path(args.model_dir) / "config.json").read_text())
        custom_kind = "video" if cfg.get("model_type") == "llava_onevision" else "image"
    datasets = [d for d in values["datasets"] if custom_kind is None or (d == "images") == (custom_kind == "image")]
    if not datasets:
        raise EvalError(f"--model-dir {args.model_dir}: a {custom_kind} model, but --datasets has no {custom_kind} "
                        "data set")
    limit = values["limit"]
    need_images = limit if "images" in datasets else 0
    need_videos = limit if any(d != "images" for d in datasets) else 0
    root = ensure_benchmark(Path(args.bench), args.split, need_images, need_videos)
    progress = not args.no_progress
    loaded: dict[str, Answerer] = {}
    panels, all_rows, timings, notes = [], [], {}, []
    for ds in datasets:
        kind = "image" if ds == "images" else "video"
        if kind not in loaded:
            spec = args.model_dir or "default"
            loaded[kind] = Answerer.load(spec, kind, device=args.device, dtype=args.dtype, attn=args.attn,
                                         sampling=Sampling(M.NUM_FRAMES))
        answerer = loaded[kind]
        plans = _plans_for(values, answerer.model, kind, args.keep_positions)
        dataset = D.load(BENCH_OF[ds], root, limit=limit)
        protocol = P.BENCH_PROTOCOL[BENCH_OF[ds]]
        folder = out / (ds + ("-blank" if args.blank else ""))
        label = f"{ds}{' [blank]' if args.blank else ''}"
        result = runner.run(answerer, dataset, plans, protocol, folder, blank=args.blank, progress=progress,
                            label=label, about={"command": "evaluate", "argv": sys.argv[1:]})
        timing = None
        if values["timing_items"]:
            timing = runner.measure_timing(answerer, dataset.items[: values["timing_items"]], plans, protocol,
                                           repeats=values["timing_repeats"], blank=args.blank, progress=progress,
                                           label=f"{label} timing")
            timing["session"] = result.session["id"]
            report.write_json(folder / "timing.json", timing)
        rows = report.summarize(result.records, BENCH_OF[ds], timing)
        for r in rows:
            r["dataset"] = label
            if r.get("sessions", 1) > 1 and not values["timing_items"]:
                notes.append(f"{label} {r['plan']}: records from {r['sessions']} sessions; TTFT ms is the latest "
                             "session's only")
        notes += [f"{label}: {n}" for n in result.notes]
        panels.append((label, rows))
        all_rows += rows
        timings[label] = timing
    columns = ["dataset", "plan", "n", "acc", "kept", "tokens", "layer", "flops", "speedup"]
    if args.wide:
        columns += ["m_avg", "ttft", "iqr", "vision", "prefill", "errors"]
    text = report.table(all_rows, columns, wide=args.wide)
    print(text)
    for n in notes[:10]:
        print(f"note: {n}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    wide_cols = ["dataset", "plan", "n", "acc", "kept", "m_avg", "tokens", "layer", "flops", "ttft", "speedup",
                 "iqr", "vision", "prefill", "decode", "errors"]
    (out / "table.txt").write_text(report.table(all_rows, wide_cols, wide=True) + "\n")
    meta = {"bench": str(root), "split": args.split, "datasets": datasets, "limit": limit, "blank": args.blank,
            "keep_positions": args.keep_positions, "threads": torch.get_num_threads(), "frames": M.NUM_FRAMES,
            "protocols": {ds: P.get(P.BENCH_PROTOCOL[BENCH_OF[ds]]).to_dict() for ds in datasets},
            "timing": {"items": values["timing_items"], "repeats": values["timing_repeats"], "warmup": 1},
            "wall_s": time.perf_counter() - t_start}
    report.write_json(out / "summary.json", {"meta": meta, "rows": all_rows, "timing": timings, "notes": notes})
    md = ["# tokenreduce evaluate (the main job)", "", f"Test split of `{root}`, {limit} questions per data set, "
          f"{meta['threads']} thread(s); wall time {meta['wall_s']:.0f} s.", "",
          "| " + " | ".join(report.COLUMNS[c][0] for c in wide_cols) + " |", "|" + "---|" * len(wide_cols)]
    md += ["| " + " | ".join(report.COLUMNS[c][1](r) for c in wide_cols) + " |" for r in all_rows]
    md += ["", *report.legend_lines(wide_cols, 10**6), "", *[f"- {n}" for n in notes]]
    (out / "report.md").write_text("\n".join(md) + "\n")
    pngs = []
    if not report.can_plot():
        print(f"note: {report.PLOT_HINT}", file=sys.stderr)
    else:
        pngs.append(report.plot(panels, out / "accuracy_vs_tokens.png", "tokens", "accuracy vs visual tokens"))
    if pngs and any(r.get("speedup") for r in all_rows):
        pngs.append(report.plot(panels, out / "accuracy_vs_speedup.png", "speedup",
                                "accuracy vs measured TTFT speedup"))
    print(f"wrote {out / 'table.txt'}, {out / 'summary.json'}, {out / 'report.md'}, "
          f"{', '.join(map(str, pngs))} ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr)
    return 0


def cli(argv: list[str] | None = None) -> int:
    from tokenreduce.errors import TokenReduceError

    p = argparse.ArgumentParser(prog="python -m tokenreduce.eval.evaluate", description=__doc__.split("\n")[0])
    add_arguments(p)
    try:
        return main(p.parse_args(argv))
    except TokenReduceError as e:
        print(f"tokenreduce: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(cli())
