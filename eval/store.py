"""The results folder of one run: a header that says what the run is, and JSONL records appended as questions
finish, so a run killed at any moment (kill -9 included) resumes without redoing or duplicating a question.

Layout of ``--out DIR``::

    run.json                    the run's identity (bench, protocol, model, data, sampling, generation, dtype),
                                with fingerprints and package versions, and every session that wrote to it
    records.jsonl               one record per (plan, question), appended and flushed as each finishes
    records.rank<r>.jsonl       the same from rank r > 0 under torchrun

A **run** is one model on one data set under one protocol and one set of settings; its plans are series inside
it. Opening a folder whose ``run.json`` says another model, data set, protocol or setting is refused with an
`EvalError` naming the differences (nothing there is read or touched). Every record carries the run's id, and
records of another run id are never read as this run's.

Torn lines: a process killed while writing leaves a last line without its newline. Reading ignores it (and
says so); before appending, `RecordFile` cuts its own file back to the last complete line, so the next record
is never glued onto the torn one.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
import uuid
from pathlib import Path
from typing import Any

from .errors import EvalError

RECORD_GLOB = "records*.jsonl"


def versions() -> dict[str, str]:
    """Versions of the packages a result depends on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("tokenreduce", "torch", "transformers", "numpy", "av"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def run_id(identity: dict[str, Any]) -> str:
    """A short hash of a run's identity."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} there, {b!r} now")
    return out


def check_run(out: str | os.PathLike, identity: dict[str, Any]) -> None:
    """Raise `EvalError` if `out` holds another run (see `open_run`); create nothing."""
    path = Path(out) / "run.json"
    if path.exists():
        _compare(Path(out), path, identity)
    elif Path(out).is_dir() and any(Path(out).glob(RECORD_GLOB)):
        raise EvalError(f"--out {out} holds records but no run.json, so whose they are is unknown; use another "
                        "--out, or remove the folder")


def _compare(folder: Path, path: Path, identity: dict[str, Any]) -> dict[str, Any]:
    try:
        header = json.loads(path.read_text())
    except ValueError as e:
        raise EvalError(f"--out {folder}: run.json is unreadable ({e}); use another --out") from None
    if header.get("identity") != identity:
        diff = _differences(header.get("identity", {}), identity)
        shown = "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
        raise EvalError(f"--out {folder} holds the results of another run ({shown}); results of different "
                        "runs are never mixed: use another --out, or remove that folder to start over")
    return header


def open_run(out: str | os.PathLike, identity: dict[str, Any], about: dict[str, Any] | None = None) -> dict:
    """Create or reopen the run folder `out` for `identity`; returns the header (with ``run_id``).

    Raises:
        EvalError: `out` holds a run with another identity (another model, data set, protocol or setting), or
            an unreadable header.
    """
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.json"
    rid = run_id(identity)
    if path.exists():
        return _compare(folder, path, identity)
    check_run(folder, identity)
    header = {"run_id": rid, "identity": identity, "about": about or {}, "created": time.time(), "sessions": []}
    _write_json(path, header)
    return header


def read_header(out: str | os.PathLike) -> dict[str, Any]:
    """The run's ``run.json``."""
    return json.loads((Path(out) / "run.json").read_text())


def add_session(out: str | os.PathLike, session: dict[str, Any]) -> None:
    """Append a session (one process group writing to the run) to ``run.json``."""
    path = Path(out) / "run.json"
    header = json.loads(path.read_text())
    header.setdefault("sessions", []).append(session)
    _write_json(path, header)


def new_session(world: int = 1, device: str = "cpu") -> dict[str, Any]:
    import torch

    return {"id": uuid.uuid4().hex[:8], "started": time.time(), "world_size": world, "device": device,
            "threads": torch.get_num_threads(), "host": platform.node(), "platform": platform.platform(),
            "versions": versions()}


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def read_records(out: str | os.PathLike, rid: str | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Every complete record in the folder's record files (of run `rid` if given), the first copy of a
    (plan, question_id) kept (the first success, for a question that failed before); and notes on what was
    ignored (torn or corrupt lines, other runs' records). A record counts once its newline is written: a last
    line without one is torn and ignored."""
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    notes = []
    for path in sorted(Path(out).glob(RECORD_GLOB)):
        data = path.read_bytes()
        lines = data.split(b"\n")
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            if i == len(lines) - 1:  # no newline after it: a write cut off by a kill
                notes.append(f"{path.name}:{i + 1}: torn last line ignored (its question is redone)")
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                notes.append(f"{path.name}:{i + 1}: corrupt line ignored")
                continue
            if rid is not None and rec.get("run") != rid:
                notes.append(f"{path.name}:{i + 1}: a record of run {rec.get('run')} ignored")
                continue
            key = (rec["plan"], rec["question_id"])
            if key not in seen or ("error" in seen[key] and "error" not in rec):  # a retried error is replaced
                seen[key] = rec
    return list(seen.values()), notes


class RecordFile:
    """One process's append-only record file. Opening it cuts a torn last line (a record cut off by a kill)
    back to the last complete line; every record is written as one line and flushed."""

    def __init__(self, out: str | os.PathLike, rank: int = 0) -> None:
        self.path = Path(out) / ("records.jsonl" if rank == 0 else f"records.rank{rank}.jsonl")
        self.repaired = repair(self.path)
        self._fh = self.path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record, default=_json_default) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> RecordFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def repair(path: Path) -> int:
    """Cut `path` back to its last newline; returns the number of bytes removed (0 if it was whole)."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return 0
    keep = data.rfind(b"\n") + 1
    with path.open("r+b") as f:
        f.truncate(keep)
    return len(data) - keep


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    return str(o)
