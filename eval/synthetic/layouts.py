"""Writing a split to disk in the official file layouts, resumably.

`write_benchmark(out_dir, split, ...)` writes `out_dir/<split>/`:

```
manifest.json                      generator version, seed, split seed, parameters, counts, complete flag
scenes.json                        ground truth of every item: objects (images), sprites with frame spans (videos)
videomme/videomme.json             Video-MME records (lmms-eval/Video-MME fields, in its column order):
                                     video_id, duration ("short"/"medium"/"long"), domain, sub_category, url,
                                     videoID, question_id, task_type, question, options ["A. ...", ...], answer "A"
videomme/data/<videoID>.mp4        the videos (lmms-eval resolves <root>/data/<videoID>.mp4)
mlvu/json/<n>_<task>.json          MLVU per-task lists: video, duration (seconds), question, candidates (texts),
                                     answer (the correct candidate's text, as MLVU's own JSON does), question_type
mlvu/video/<n>_<task>/<videoID>.mp4  the same videos (hard links; copies where links fail)
mlvu/mlvu_lmms_eval.json           lmms-eval's MLVU form (sy1998/MLVU_dev fields): video_name (relative to
                                     mlvu/), duration, question (with "(A) ..." candidate lines appended:
                                     lmms-eval's prompt uses only this field; the exact format in the real data
                                     is unverified), candidates, answer (letter), task_type
images/json/<n>_<task>.json        images, MLVU-like: image, question, candidates, answer (text), question_type,
                                     caption (every object with its position, reading order)
images/image/<n>_<task>/<uid>.png  the images (PNG, lossless)
```

Video-MME's `domain`/`sub_category`/`task_type` take values from the real benchmark's lists (lmms-eval's
aggregation indexes fixed tables by them): every video is "Film & Television" / "Animation", and the task types
are mapped in `VIDEOMME_TASK_TYPE`. MLVU file names reuse the real numbers where the task exists there
(2_needle, 4_count, 5_order; needle's question_type is "findNeedle" as in MLVU) and continue at 10 for new ones.

**Resumable.** Every image and video is written atomically (temporary name, then rename) and skipped when it
already exists, so a killed run loses nothing it finished and a rerun completes the rest. The JSON indexes are
rebuilt from the (deterministic) generator at the end of every run. A rerun with different parameters (seed,
sizes, grid, fps, crf, tasks, generator version) is refused rather than mixing two benchmarks in one folder;
counts may grow between runs.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from PIL import Image

from .images import ALL_IMAGE_TASKS, IMAGE_TASKS, ImageConfig, ImageSample, check_tasks, make_image
from .mp4 import DEFAULT_CRF, write_mp4
from .seeds import LETTERS, check_split, split_seed
from .videos import VIDEO_TASKS, VideoConfig, VideoSample, make_video

#: bump when the same seed and parameters would produce different data
GENERATOR_VERSION = "2"

VIDEOMME_FIELDS = ("video_id", "duration", "domain", "sub_category", "url", "videoID", "question_id", "task_type",
                   "question", "options", "answer")
MLVU_FIELDS = ("video", "duration", "question", "candidates", "answer", "question_type")
MLVU_LMMS_FIELDS = ("video_name", "duration", "question", "candidates", "answer", "task_type")
IMAGE_FIELDS = ("image", "question", "candidates", "answer", "question_type", "caption")

VIDEOMME_DOMAIN = "Film & Television"
VIDEOMME_SUB_CATEGORY = "Animation"
VIDEOMME_TASK_TYPE = {
    "needle": "Attribute Perception",
    "order": "Temporal Reasoning",
    "count": "Counting Problem",
    "direction": "Temporal Perception",
    "final_corner": "Spatial Perception",
}
#: task -> (MLVU folder / json stem, MLVU question_type)
MLVU_TASKS = {
    "needle": ("2_needle", "findNeedle"),
    "count": ("4_count", "count"),
    "order": ("5_order", "order"),
    "direction": ("10_direction", "direction"),
    "final_corner": ("11_final_corner", "final_corner"),
}
IMAGE_TASK_FILES = {"colour_at": "1_colour_at", "shape_at": "2_shape_at", "relation": "3_relation",
                    "count_colour": "4_count_colour", "colour_of": "5_colour_of", "shape_of": "6_shape_of",
                    "present": "7_present"}


# --- small file helpers -----------------------------------------------------------------------------------------


def dump_json(obj: Any) -> str:
    """The one JSON formatting used for every file (deterministic: same data, same bytes)."""
    return json.dumps(obj, indent=1, ensure_ascii=False) + "\n"


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_png_atomic(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)


def link_or_copy(src: Path, dst: Path) -> None:
    """Make `dst` the same file as `src` (hard link; an atomic copy where linking is not possible)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except FileExistsError:
        return
    except OSError:
        tmp = dst.with_name(dst.name + ".partial")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


class Progress:
    """Plain progress lines every `every` items (and at the end): "[test] videos 40/200 (12 existed) 9.8/s"."""

    def __init__(self, label: str, total: int, every: int, stream: TextIO | None = None) -> None:
        self.label, self.total, self.every = label, total, every
        self.stream = stream if stream is not None else sys.stderr
        self.done = self.skipped = 0
        self.t0 = time.perf_counter()

    def step(self, skipped: bool) -> None:
        self.done += 1
        self.skipped += skipped
        if self.every > 0 and (self.done % self.every == 0 or self.done == self.total):
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
            print(f"{self.label} {self.done}/{self.total} ({self.skipped} existed) {rate:.1f}/s",
                  file=self.stream, flush=True)


# --- records --------------------------------------------------------------------------------------------------------


def videomme_record(sample: VideoSample) -> dict[str, Any]:
    video_id = f"{sample.index + 1:06d}"
    q = sample.question
    return {
        "video_id": video_id,
        "duration": sample.duration,
        "domain": VIDEOMME_DOMAIN,
        "sub_category": VIDEOMME_SUB_CATEGORY,
        "url": f"synthetic://tokenreduce/{sample.split}/{sample.uid}",
        "videoID": sample.uid,
        "question_id": f"{video_id}-1",
        "task_type": VIDEOMME_TASK_TYPE[sample.task],
        "question": q.question,
        "options": q.lettered(),
        "answer": q.letter,
    }


def mlvu_record(sample: VideoSample) -> dict[str, Any]:
    q = sample.question
    return {
        "video": f"{sample.uid}.mp4",
        "duration": sample.seconds,
        "question": q.question,
        "candidates": list(q.options),
        "answer": q.answer_text,
        "question_type": MLVU_TASKS[sample.task][1],
    }


def mlvu_lmms_record(sample: VideoSample) -> dict[str, Any]:
    q = sample.question
    folder = MLVU_TASKS[sample.task][0]
    lines = [q.question] + [f"({LETTERS[i]}) {o}" for i, o in enumerate(q.options)]
    return {
        "video_name": f"video/{folder}/{sample.uid}.mp4",
        "duration": sample.seconds,
        "question": "\n".join(lines),
        "candidates": list(q.options),
        "answer": q.letter,
        "task_type": MLVU_TASKS[sample.task][1],
    }


def image_record(sample: ImageSample) -> dict[str, Any]:
    q = sample.question
    return {
        "image": f"{sample.uid}.png",
        "question": q.question,
        "candidates": list(q.options),
        "answer": q.answer_text,
        "question_type": sample.task,
        "caption": sample.caption,
    }


def image_scene(sample: ImageSample) -> dict[str, Any]:
    return {"uid": sample.uid, "task": sample.task, "objects": [asdict(o) for o in sample.objects],
            "backdrop": None if sample.backdrop is None else sample.backdrop.seed}


def video_scene(sample: VideoSample) -> dict[str, Any]:
    return {
        "uid": sample.uid, "task": sample.task, "duration": sample.duration, "n_frames": sample.n_frames,
        "fps": sample.fps,
        "sprites": [{"colour": s.colour, "shape": s.shape, "offset": [s.dy, s.dx],
                     "appearances": [[a.start, a.stop, a.row, a.col, a.row_end, a.col_end] for a in s.appearances]}
                    for s in sample.sprites],
        "backdrop": None if sample.backdrop is None else sample.backdrop.seed,
    }


# --- the writer -------------------------------------------------------------------------------------------------


def _parameters(seed: int, split: str, image_config: ImageConfig, video_config: VideoConfig, crf: int,
                image_tasks: Sequence[str], video_tasks: Sequence[str]) -> dict[str, Any]:
    return {
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "split": split,
        "split_seed": split_seed(seed, split),
        "image": image_config.to_dict(),
        "video": video_config.to_dict(),
        "crf": int(crf),
        "image_tasks": list(image_tasks),
        "video_tasks": list(video_tasks),
    }


def default_parameters(seed: int, split: str) -> dict[str, Any]:
    """The manifest `parameters` `write_benchmark` writes with every default (the shipped models' looks)."""
    return _parameters(seed, split, ImageConfig(), VideoConfig(), DEFAULT_CRF, IMAGE_TASKS, VIDEO_TASKS)


def parameter_diff(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """The top-level manifest `parameters` keys whose values differ between `old` (None: none) and `new`."""
    old = old or {}
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _check_resumable(manifest_path: Path, parameters: dict[str, Any]) -> None:
    if not manifest_path.exists():
        return
    try:
        old = json.loads(manifest_path.read_text(encoding="utf-8")).get("parameters")
    except (OSError, ValueError) as e:
        raise ValueError(f"{manifest_path}: unreadable manifest ({e}); remove the folder to start over") from None
    if old != parameters:
        diff = parameter_diff(old, parameters)
        raise ValueError(f"{manifest_path.parent} holds a benchmark made with other parameters ({', '.join(diff)}); "
                         f"use another folder or remove it")


def write_benchmark(out_dir: str | os.PathLike, split: str = "test", n_images: int = 400, n_videos: int = 200,
                    seed: int = 0, *, image_config: ImageConfig | None = None,
                    video_config: VideoConfig | None = None, crf: int = DEFAULT_CRF,
                    image_tasks: Sequence[str] = IMAGE_TASKS, video_tasks: Sequence[str] = VIDEO_TASKS,
                    progress_every: int = 50, stream: TextIO | None = None) -> dict[str, Any]:
    """Write `n_images` images and `n_videos` videos of `split` to `out_dir/<split>/` (layout in the module
    docstring) and return the manifest. Resumes a killed run: finished files are kept and skipped."""
    check_split(split)
    if n_images < 0 or n_videos < 0:
        raise ValueError(f"n_images and n_videos must be >= 0, got {n_images}, {n_videos}")
    image_config = image_config or ImageConfig()
    video_config = video_config or VideoConfig()
    image_tasks = check_tasks(image_tasks, ALL_IMAGE_TASKS)
    video_tasks = check_tasks(video_tasks, VIDEO_TASKS)
    root = Path(out_dir) / split
    parameters = _parameters(seed, split, image_config, video_config, crf, image_tasks, video_tasks)
    manifest_path = root / "manifest.json"
    _check_resumable(manifest_path, parameters)
    manifest: dict[str, Any] = {
        "generator": "tokenreduce.eval.synthetic",
        "parameters": parameters,
        "requested": {"images": n_images, "videos": n_videos},
        "complete": False,
    }
    write_text_atomic(manifest_path, dump_json(manifest))

    image_records: dict[str, list[dict]] = {IMAGE_TASK_FILES[t]: [] for t in image_tasks}
    image_scenes, image_counts = [], Counter()
    progress = Progress(f"[{split}] images", n_images, progress_every, stream)
    for i in range(n_images):
        sample = make_image(i, seed, split, image_config, image_tasks)
        stem = IMAGE_TASK_FILES[sample.task]
        path = root / "images" / "image" / stem / f"{sample.uid}.png"
        existed = path.exists()
        if not existed:
            write_png_atomic(path, sample.image)
        image_records[stem].append(image_record(sample))
        image_scenes.append(image_scene(sample))
        image_counts[sample.task] += 1
        progress.step(existed)

    videomme, mlvu_lmms, video_scenes = [], [], []
    mlvu: dict[str, list[dict]] = {MLVU_TASKS[t][0]: [] for t in video_tasks}
    video_counts, duration_counts = Counter(), Counter()
    progress = Progress(f"[{split}] videos", n_videos, progress_every, stream)
    for i in range(n_videos):
        sample = make_video(i, seed, split, video_config, video_tasks, render=False)
        path = root / "videomme" / "data" / f"{sample.uid}.mp4"
        existed = path.exists()
        if not existed:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_mp4(path, sample.render(), sample.fps, crf)
        folder = MLVU_TASKS[sample.task][0]
        link_or_copy(path, root / "mlvu" / "video" / folder / f"{sample.uid}.mp4")
        videomme.append(videomme_record(sample))
        mlvu[folder].append(mlvu_record(sample))
        mlvu_lmms.append(mlvu_lmms_record(sample))
        video_scenes.append(video_scene(sample))
        video_counts[sample.task] += 1
        duration_counts[sample.duration] += 1
        progress.step(existed)

    if n_images:
        for stem, records in image_records.items():
            write_text_atomic(root / "images" / "json" / f"{stem}.json", dump_json(records))
    if n_videos:
        write_text_atomic(root / "videomme" / "videomme.json", dump_json(videomme))
        for stem, records in mlvu.items():
            write_text_atomic(root / "mlvu" / "json" / f"{stem}.json", dump_json(records))
        write_text_atomic(root / "mlvu" / "mlvu_lmms_eval.json", dump_json(mlvu_lmms))
    write_text_atomic(root / "scenes.json", dump_json({"images": image_scenes, "videos": video_scenes}))
    manifest["counts"] = {
        "images": n_images, "videos": n_videos,
        "image_tasks": {t: image_counts[t] for t in image_tasks},
        "video_tasks": {t: video_counts[t] for t in video_tasks},
        "video_durations": {label: duration_counts[label] for label, _, _ in video_config.durations},
    }
    manifest["complete"] = True
    write_text_atomic(manifest_path, dump_json(manifest))
    return manifest
