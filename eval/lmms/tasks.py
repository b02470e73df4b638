"""Task functions behind the lmms-eval task files of the generated benchmark (`write_tasks` binds them to a folder).

Everything that decides a score is lmms-eval's own code, imported from the installed lmms-eval: Video-MME's
``videomme_doc_to_text``, ``videomme_process_results`` (its ``extract_mcq_answer`` over A-D) and
``videomme_aggregate_results``; MLVU's ``mlvu_doc_to_text`` and ``mlvu_process_results``. Ours are only the video
paths (the generated folder instead of lmms-eval's HF cache), the MLVU task key (the generated lmms-eval file calls
the needle task "findNeedle", MLVU's ``question_type``; lmms-eval's key is "needle"), and the MLVU aggregate: M-Avg
as MLVU defines it (mean over the task types present, in percent like lmms-eval), because lmms-eval's
``mlvu_aggregate_results_dev`` indexes a fixed set of seven real task types and raises ``KeyError`` on the
generated benchmark's others.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

#: MLVU ``question_type`` values whose lmms-eval task key differs
MLVU_TASK_KEYS = {"findNeedle": "needle"}


def bind(root: str | Path) -> dict[str, Any]:
    """The task functions for the generated split at `root`, by the names the task YAMLs use."""
    from lmms_eval.tasks.mlvu import utils as mlvu
    from lmms_eval.tasks.videomme import utils as videomme

    root = Path(root)

    def videomme_doc_to_visual(doc: dict) -> list[str]:
        from ..datasets import _media

        path = _media([root / "videomme" / "data" / f"{doc['videoID']}.mp4"])
        if path is None:
            raise FileNotFoundError(f"no video for {doc['videoID']} under {root / 'videomme' / 'data'}")
        return [str(path)]

    def mlvu_doc_to_visual(doc: dict) -> list[str]:
        path = root / "mlvu" / doc["video_name"]
        if not path.is_file():
            raise FileNotFoundError(f"no video {path}")
        return [str(path)]

    def mlvu_process_results(doc: dict, results: list[str]) -> dict[str, Any]:
        out = mlvu.mlvu_process_results(doc, results)
        for value in out.values():
            value["task_type"] = MLVU_TASK_KEYS.get(value["task_type"], value["task_type"])
        return out

    return {
        "videomme_doc_to_visual": videomme_doc_to_visual,
        "videomme_doc_to_text": videomme.videomme_doc_to_text,
        "videomme_process_results": videomme.videomme_process_results,
        "videomme_aggregate_results": videomme.videomme_aggregate_results,
        "mlvu_doc_to_visual": mlvu_doc_to_visual,
        "mlvu_doc_to_text": mlvu.mlvu_doc_to_text,
        "mlvu_process_results": mlvu_process_results,
        "mlvu_m_avg": mlvu_m_avg,
    }


def mlvu_m_avg(results: list[dict[str, Any]]) -> float:
    """MLVU's M-Avg in percent: per task type, the share of ``pred_answer == answer``; then their mean."""
    per: dict[str, list[bool]] = defaultdict(list)
    for r in results:
        per[r["task_type"]].append(r["pred_answer"] == r["answer"])
    if not per:
        return 0.0
    return 100.0 * sum(sum(v) / len(v) for v in per.values()) / len(per)
