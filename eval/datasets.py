"""Benchmarks read from local folders in their real layouts: Video-MME, MLVU dev, MLVU test, and the generated
image set. Items are keyed by question id, never by video (real benchmarks ask several questions per video).

=============  =================================================================================================
bench          ``--data DIR`` holds
=============  =================================================================================================
``videomme``   the rows as parquet (``videomme/test-00000-of-00001.parquet``, as the dataset ships) or JSON/JSONL
               (``videomme.json``), fields ``question_id, videoID, duration, domain, sub_category, task_type,
               question, options ["A. ...", ...], answer``; videos ``data/<videoID>.mp4`` (lmms-eval's
               ``.MP4`` and ``.mkv`` fallbacks); optional subtitles ``subtitle/<videoID>.srt``.
``mlvu``       MLVU dev's official per-task JSON (``json/1_plotQA.json`` ...: ``video, duration, question,
               candidates, answer`` (the answer's text), ``question_type``) with videos under
               ``video/<file stem>/`` (or ``video/<task>/``, ``video/``); or, without those, lmms-eval's form
               (``sy1998/MLVU_dev``: ``video_name, question, candidates, answer`` (a letter), ``task_type``).
``mlvu-test``  MLVU-Test's official JSON (``question_id, question_type, video, question, candidates`` with up
               to six options, ``answer`` when the ground truth is present) with videos under ``video/``.
``images``     the generated image set (MLVU-like per-task JSON with ``image`` and ``image/<stem>/``).
=============  =================================================================================================

Each may sit directly in DIR or in a subfolder named like the bench (``DIR/videomme/``, ``DIR/mlvu/``), so the
generated benchmark's split folders (``bench-results/data/test``) and their subfolders are valid ``--data``.

Question ids: ``question_id`` where the format has one, else ``<file stem>/<row index>``. MLVU's task is its file
name without the number (``2_needle`` -> ``needle``, the official scorer's key and lmms-eval's), not the
record's ``question_type`` (``findNeedle``).

Quirks of real data, handled as the official scorers handle them, and reported with the question ids:

- an MLVU answer that is not among the candidates: MLVU's ``qa_template`` leaves the answer index at -1, so the
  ground-truth letter is ``chr(ord('A') - 1)`` = ``"@"``, which no answer matches (2 questions of MLVU dev);
- duplicated MLVU candidates: ``qa_template`` keeps the *last* matching index (16 questions of MLVU dev);
- a Video-MME answer letter beyond the options: kept, never matched;
- malformed rows (missing or mistyped fields) and missing videos stop the run with every bad id listed, or with
  ``skip_missing=True`` are counted and left out (`Dataset.skipped`); nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import EvalError
from .protocols import LETTERS

BENCHES = ("videomme", "mlvu", "mlvu-test", "images")
VIDEO_SUFFIXES = (".mp4", ".MP4", ".mkv")
#: lmms-eval's MLVU task sets (its aggregation indexes these fixed sets)
MLVU_LMMS_TASKS = {"mlvu": ("anomaly_reco", "count", "ego", "needle", "order", "plotQA", "topic_reasoning"),
                   "mlvu-test": ("anomaly_reco", "count", "ego", "needleQA", "order", "plotQA", "sportsQA",
                                 "topic_reasoning", "tutorialQA")}


@dataclass
class Item:
    """One question.

    Attributes:
        qid: the question id (unique within the data set).
        bench: one of `BENCHES`.
        task: the task type results are grouped by.
        question: the question text; options: the option texts in letter order (no letters).
        answer: the ground-truth letter ("@" for an MLVU answer outside the candidates, as MLVU scores it), or
            None when the data has no ground truth (MLVU-Test without answers: predictions only).
        media: the video or image file.
        kind: "video" or "image".
        meta: the record's other fields people group by (Video-MME: duration, domain, sub_category, task_type,
            videoID; MLVU: question_type, duration, video).
        raw_question: lmms-eval's MLVU ``question`` field (candidates already in it), when read from that form.
        raw_options: Video-MME's option strings as the data has them ("A. ...").
        subtitle: Video-MME's ``.srt`` file, if there is one.
    """

    qid: str
    bench: str
    task: str
    question: str
    options: tuple[str, ...]
    answer: str | None
    media: Path
    kind: str = "video"
    meta: dict[str, Any] = field(default_factory=dict)
    raw_question: str | None = None
    raw_options: tuple[str, ...] | None = None
    subtitle: Path | None = None

    @property
    def path(self) -> Path:
        """The media file (`media`)."""
        return self.media

    @property
    def protocol(self) -> str:
        """The bench's default protocol (`protocols.BENCH_PROTOCOL`)."""
        from .protocols import BENCH_PROTOCOL

        return BENCH_PROTOCOL[self.bench]


@dataclass
class Problem:
    """Something wrong with one question of the data: `kind` is "malformed", "missing-media",
    "answer-not-in-candidates", "duplicate-candidates", "answer-beyond-options" or "duplicate-id"."""

    qid: str
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.qid}: {self.message}"


@dataclass
class Dataset:
    """Items of one benchmark folder, with what was wrong in it.

    Attributes:
        bench: one of `BENCHES`.
        root: the folder the annotation files were found in.
        items: the questions, in file order (tasks interleaved for MLVU and images, so a prefix covers them all).
        warnings: quirks handled as the official scorer does (the questions stay in).
        skipped: malformed rows and missing media left out (only with ``skip_missing``).
        files: the annotation files read.
        fingerprint: sha256 of the annotation files' bytes and the bench name (videos are not hashed).
    """

    bench: str
    root: Path
    items: list[Item]
    warnings: list[Problem]
    skipped: list[Problem]
    files: list[Path]
    fingerprint: str

    def summary(self) -> dict[str, Any]:
        return {"bench": self.bench, "root": str(self.root), "files": [str(f) for f in self.files],
                "items": len(self.items), "fingerprint": self.fingerprint,
                "warnings": [vars(p) for p in self.warnings], "skipped": [vars(p) for p in self.skipped]}


# --- reading files ------------------------------------------------------------------------------------------------


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a ``.parquet``, ``.json`` (a list, or an object with one list) or ``.jsonl`` file."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise EvalError(f"{path}: reading parquet needs pyarrow (pip install 'tokenreduce[bench]')") from None
        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for bad files
            raise EvalError(f"{path}: not a readable parquet file ({e})") from None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"{path}: cannot read it ({e})") from None
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except ValueError as e:
        raise EvalError(f"{path}: not valid JSON ({e})") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1:
            data = lists[0]
    if not isinstance(data, list):
        raise EvalError(f"{path}: expected a list of question records")
    return data


def _natural(path: Path) -> tuple:
    """Sort key: "2_needle.json" before "10_direction.json"."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name))


def _files(folder: Path, patterns: Sequence[str]) -> list[Path]:
    found = {p for pat in patterns for p in folder.glob(pat) if p.is_file() and not p.name.startswith(".")}
    return sorted(found, key=_natural)


def _find(data: Path, subfolders: Sequence[str], patterns: Sequence[str]) -> tuple[Path, list[Path]]:
    """The first of `data/<sub>` (in order) holding files matching `patterns`: (folder, files)."""
    for sub in subfolders:
        folder = data / sub if sub else data
        if folder.is_dir():
            files = _files(folder, patterns)
            if files:
                return folder, files
    return data, []


def _holds(path: Path, key: str) -> bool:
    """Whether `path` reads as a list of records with a `key` field (other JSON files in a folder are not data)."""
    try:
        rows = read_rows(path)
    except EvalError:
        return False
    return bool(rows) and isinstance(rows[0], dict) and key in rows[0]


def _fingerprint(bench: str, files: Iterable[Path]) -> str:
    h = hashlib.sha256(bench.encode())
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _interleave(groups: Sequence[list[Item]]) -> list[Item]:
    """Round-robin over groups (then the rest of the longer ones), so any prefix covers every group."""
    out: list[Item] = []
    longest = max((len(g) for g in groups), default=0)
    for i in range(longest):
        out += [g[i] for g in groups if i < len(g)]
    return out


class _Collector:
    """Collects items and problems while reading; `finish` applies the skip policy."""

    def __init__(self, bench: str) -> None:
        self.bench = bench
        self.warnings: list[Problem] = []
        self.fatal: list[Problem] = []
        self.ids: set[str] = set()

    def bad(self, qid: str, kind: str, message: str) -> None:
        self.fatal.append(Problem(qid, kind, message))

    def warn(self, qid: str, kind: str, message: str) -> None:
        self.warnings.append(Problem(qid, kind, message))

    def unique(self, qid: str) -> bool:
        if qid in self.ids:
            self.bad(qid, "duplicate-id", "the question id appears twice")
            return False
        self.ids.add(qid)
        return True


def _checked_choices(col: _Collector, qid: str, row: dict[str, Any], fields: tuple[str, ...], key: str,
                     types: tuple[type, ...]) -> list[str] | None:
    """`row[key]`, the question's answer choices, after the checks every reader makes: the text `fields` present,
    at least two string choices, the question id not seen before, at most six choices. None, reported to `col`,
    when one fails."""
    choices = row.get(key)
    missing = [k for k in fields if _text(row, k) is None]
    if not isinstance(choices, types) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        missing.append(key)
    if missing:
        col.bad(qid, "malformed", f"missing or empty {', '.join(missing)}")
        return None
    if not col.unique(qid):
        return None
    if len(choices) > len(LETTERS):
        col.bad(qid, "malformed", f"{len(choices)} {key} (at most {len(LETTERS)})")
        return None
    return list(choices)


def _text(row: dict[str, Any], key: str) -> str | None:
    v = row.get(key)
    return v if isinstance(v, str) and v.strip() else None


def _media(candidates: Sequence[Path]) -> Path | None:
    """The first existing file among `candidates`; an ``.mp4`` name also tries ``.MP4`` then ``.mkv`` (lmms-eval's
    Video-MME fallbacks, applied to the file name only)."""
    for c in candidates:
        tries = [c, c.with_suffix(".MP4"), c.with_suffix(".mkv")] if c.suffix == ".mp4" else [c]
        for p in tries:
            if p.is_file():
                return p
    return None


def _mlvu_letter(candidates: Sequence[str], answer: str) -> tuple[str, list[int]]:
    """MLVU's ``qa_template``: the index of the *last* candidate equal to the answer (-1 if none) as a letter
    (``chr(ord('A') + index)``, so "@" when absent); and the indices of every match."""
    matches = [i for i, c in enumerate(candidates) if c == answer]
    index = matches[-1] if matches else -1
    return chr(ord("A") + index), matches


# --- the benchmarks ---------------------------------------------------------------------------------------------


def _videomme(data: Path, col: _Collector) -> tuple[Path, list[Path], list[Item]]:
    root, files = _find(data, ("videomme", ""), ("*.parquet",))
    if not files:
        root, files = _find(data, ("", "videomme"), ("videomme.json", "videomme.jsonl"))
    if not files:
        root, files = _find(data, ("", "videomme"), ("*.json", "*.jsonl"))
        files = [f for f in files if _holds(f, "videoID")]
    if not files:
        raise EvalError(f"--data {data}: no Video-MME annotations (videomme/test-*.parquet or videomme.json)")
    video_dirs = list(dict.fromkeys([data / "data", root / "data", root.parent / "data"]))
    items = []
    for f in files:
        for i, row in enumerate(read_rows(f)):
            qid = str(row.get("question_id") or f"{f.stem}/{i}") if isinstance(row, dict) else f"{f.stem}/{i}"
            if not isinstance(row, dict):
                col.bad(qid, "malformed", "the row is not an object")
                continue
            options = _checked_choices(col, qid, row, ("videoID", "question", "answer"), "options", (list, tuple))
            if options is None:
                continue
            texts = tuple(re.sub(r"^[A-F]\.\s?", "", o, count=1) for o in options)
            answer = row["answer"].strip()
            if answer not in LETTERS[:len(options)]:
                col.warn(qid, "answer-beyond-options", f"answer {answer!r} is not one of the {len(options)} option "
                         "letters; kept, and never matched (as lmms-eval scores it)")
            video = _media([d / f"{row['videoID']}.mp4" for d in video_dirs])
            if video is None:
                col.bad(qid, "missing-media", f"no video data/{row['videoID']}.mp4 (.MP4, .mkv) under "
                        f"{' or '.join(str(d) for d in video_dirs)}")
                continue
            sub = next((p for p in (d.parent / "subtitle" / f"{row['videoID']}.srt" for d in video_dirs)
                        if p.is_file()), None)
            meta = {k: row.get(k) for k in ("duration", "domain", "sub_category", "task_type", "videoID")}
            items.append(Item(qid, "videomme", str(row.get("task_type") or "all"), row["question"], texts, answer,
                              video, "video", meta, raw_options=tuple(options), subtitle=sub))
    return root, files, items


def _task_of(stem: str) -> str:
    """MLVU's task key from a per-task file name: "2_needle" -> "needle", "6_anomaly_reco" -> "anomaly_reco"."""
    return re.sub(r"^\d+_", "", stem)


def _mlvu_official(data: Path, bench: str, col: _Collector, media_key: str) -> tuple[Path, list[Path], list[Item]]:
    sub = {"mlvu": ("json", "mlvu/json", "", "mlvu"), "mlvu-test": ("json", "", "mlvu-test", "mlvu_test"),
           "images": ("json", "images/json", "", "images")}[bench]
    root, files = _find(data, sub, ("*.json", "*.jsonl"))
    files = [f for f in files if _holds(f, media_key)]
    if not files:
        return data, [], []
    base = root.parent if root.name == "json" else root
    folder = "image" if bench == "images" else "video"
    kind = "image" if bench == "images" else "video"
    groups = []
    for f in files:
        rows = read_rows(f)
        task_default = _task_of(f.stem)
        group = []
        for i, row in enumerate(rows):
            qid = str(row.get("question_id") or f"{f.stem}/{i}") if isinstance(row, dict) else f"{f.stem}/{i}"
            if not isinstance(row, dict):
                col.bad(qid, "malformed", "the row is not an object")
                continue
            cands = _checked_choices(col, qid, row, (media_key, "question"), "candidates", (list,))
            if cands is None:
                continue
            answer: str | None
            raw = row.get("answer")
            if raw is None and bench == "mlvu-test":
                answer = None
            elif not isinstance(raw, str):
                col.bad(qid, "malformed", "missing answer")
                continue
            else:
                answer, matches = _mlvu_letter(cands, raw)
                if not matches and bench == "mlvu-test" and raw.strip() in LETTERS[:len(cands)]:
                    answer = raw.strip()  # a test ground truth given as the letter
                elif not matches:
                    col.warn(qid, "answer-not-in-candidates", f"answer {raw!r} is not among the candidates; scored "
                             "as MLVU does (ground truth '@', never matched)")
                elif len(matches) > 1:
                    col.warn(qid, "duplicate-candidates", f"answer {raw!r} is candidate {matches}; the last copy "
                             f"({answer}) is the ground truth, as MLVU's qa_template takes it")
            name = row[media_key]
            task = task_default if bench == "mlvu" else str(row.get("question_type") or task_default)
            candidates = [base / folder / f.stem / name, base / folder / task / name, base / folder / name,
                          base / f"{folder}s" / name, base / name]
            media = _media(candidates)
            if media is None:
                col.bad(qid, "missing-media", f"no {folder} {name!r} under {base / folder}")
                continue
            meta = {k: row[k] for k in ("question_type", "duration", media_key) if k in row}
            group.append(Item(qid, bench, task, row["question"], tuple(cands), answer, media, kind, meta))
        groups.append(group)
    return root, files, _interleave(groups)


def _mlvu_lmms(data: Path, bench: str, col: _Collector) -> tuple[Path, list[Path], list[Item]]:
    """lmms-eval's MLVU form (``sy1998/MLVU_dev`` / ``MLVU_Test``): ``video_name`` relative to the folder."""
    root, files = _find(data, ("", "mlvu", "dev", "test"), ("mlvu_lmms_eval.json", "*.parquet"))
    if not files:
        return data, [], []
    items = []
    for f in files:
        for i, row in enumerate(read_rows(f)):
            qid = f"{f.stem}/{i}"
            if not isinstance(row, dict) or _text(row, "video_name") is None or _text(row, "question") is None \
                    or _text(row, "answer") is None:
                col.bad(qid, "malformed", "missing or empty video_name, question or answer")
                continue
            cands = row.get("candidates")
            cands = tuple(cands) if isinstance(cands, (list, tuple)) else ()
            first = row["question"].split("\n")[0]
            media = _media([root / row["video_name"]])
            if media is None:
                col.bad(qid, "missing-media", f"no video {row['video_name']!r} under {root}")
                continue
            col.unique(qid)
            items.append(Item(qid, bench, str(row.get("task_type") or "all"), first, cands, row["answer"].strip(),
                              media, "video", {"task_type": row.get("task_type")}, raw_question=row["question"]))
    return root, files, items


def load(bench: str, data: str | os.PathLike, *, skip_missing: bool = False, limit: int | None = None) -> Dataset:
    """Read `bench` from the folder `data` (layouts in the module docstring).

    Args:
        bench: one of `BENCHES`.
        data: the folder.
        skip_missing: leave out malformed rows and questions whose media is missing (they are counted and listed
            in `Dataset.skipped`) instead of raising.
        limit: keep the first `limit` items (tasks interleaved, so every task is in a prefix).

    Raises:
        EvalError: unknown bench, no annotations found, or (without `skip_missing`) malformed rows or missing
            media, with the first ids and the count.
    """
    if bench not in BENCHES:
        raise EvalError(f"unknown bench {bench!r}; choose from {', '.join(BENCHES)}")
    folder = Path(data)
    if not folder.is_dir():
        raise EvalError(f"--data {str(data)!r}: no such folder")
    col = _Collector(bench)
    if bench == "videomme":
        root, files, items = _videomme(folder, col)
    else:
        key = "image" if bench == "images" else "video"
        root, files, items = _mlvu_official(folder, bench, col, key)
        if not files and bench != "images":
            root, files, items = _mlvu_lmms(folder, bench, col)
        if not files:
            where = {"mlvu": "json/<n>_<task>.json", "mlvu-test": "<name>.json with question_id", "images":
                     "images/json/<n>_<task>.json"}[bench]
            raise EvalError(f"--data {folder}: no {bench} annotations ({where})")
    if col.fatal and not skip_missing:
        kinds = sorted({p.kind for p in col.fatal})
        shown = "; ".join(str(p) for p in col.fatal[:5])
        more = f" (and {len(col.fatal) - 5} more)" if len(col.fatal) > 5 else ""
        raise EvalError(f"--data {folder}: {len(col.fatal)} bad question(s) ({', '.join(kinds)}): {shown}{more}; "
                        "fix the data or pass --skip-missing to count and leave them out")
    if limit is not None:
        items = items[:limit]
    return Dataset(bench, root, items, col.warnings, col.fatal, files, _fingerprint(bench, files))


# --- Video-MME subtitles (lmms-eval's videomme_w_subtitle) --------------------------------------------------------


def _srt_time(text: str) -> float:
    h, m, rest = text.split(":")
    s, ms = rest.split(",")
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000


def read_srt(path: Path) -> dict[tuple[float, float], str]:
    """lmms-eval's ``load_subtitles``: blocks split on blank lines; blocks of 3+ lines give (start, end) -> the
    text lines joined with spaces (a repeated time span keeps its first place and its last text)."""
    out: dict[tuple[float, float], str] = {}
    for block in path.read_text(encoding="utf-8").split("\n\n"):
        if not block.strip():
            continue
        lines = block.split("\n")
        if len(lines) >= 3:
            start, end = lines[1].split(" --> ")
            out[(_srt_time(start), _srt_time(end))] = " ".join(lines[2:])
    return out


_FONT = re.compile(r'<font color="white" size=".72c">(.*?)</font>')


def videomme_subtitles(item: Item, frame_num: int = 32) -> str:
    """The subtitle text lmms-eval's ``videomme_w_subtitle`` puts in the prompt: for ``frame_num`` frames spread
    with ``np.linspace`` over the video, the subtitles showing at those frames (set order), the text inside
    ``<font color="white" size=".72c">``, one per line; "No subtitles available" without a subtitle file."""
    if item.subtitle is None:
        return "No subtitles available"
    from tokenreduce.video import probe

    info = probe(item.media)
    fps, total = float(info.fps), int(info.num_frames)
    spans = [(int(a * fps), int(b * fps), text) for (a, b), text in read_srt(item.subtitle).items()]
    picked = []
    for f in np.linspace(0, total - 1, frame_num, dtype=int).tolist():
        picked += [i for i, (a, b, _) in enumerate(spans) if a <= f < b]
    lines = []
    for i in list(set(picked)):
        found = _FONT.findall(spans[i][2])
        if found:
            lines.append(found[0])
    return "\n".join(lines)


def task_counts(items: Sequence[Item]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for it in items:
        counts[it.task] += 1
    return dict(sorted(counts.items()))
