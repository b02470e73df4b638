"""The lmms-eval plugin: a ``tokenreduce`` model for lmms-eval, and lmms-eval task files for the generated benchmark.

Install lmms-eval beside tokenreduce (``pip install "tokenreduce[lmms]"``; its full dependency set conflicts with the
CPU torch of the README's install, so on such a machine install it with ``pip install --no-deps lmms-eval==0.7.3``
plus the few packages its task modules import, as .ci/run does). The model registers through lmms-eval's
``lmms_eval.models`` entry-point group (`manifest`), so nothing in lmms-eval is patched:

    python -m tokenreduce.eval.lmms tasks --data bench-results/data/test --out lmms-tasks
    lmms-eval --model tokenreduce --model_args 'pretrained=default,plan=pool(keep=0.5)' \\
        --tasks tokenreduce_videomme,tokenreduce_mlvu --include_path lmms-tasks --batch_size 1

``model_args``: ``pretrained`` (default: the shipped model of ``kind``, or a checkpoint folder), ``kind`` (video or
image, for "default"), ``plan`` (quote a plan with commas: ``plan="aim-merge(tokens=16, frames=2)"``),
``keep_positions``, ``frames``/``fps``/``max_frames``, ``device``, ``dtype``, ``attn``. It wraps
`tokenreduce.eval.answer.Answerer`, so prompts go into the model's chat template exactly as ``tokenreduce eval`` puts
them, and each answer reports its input tokens (what entered the LLM) to lmms-eval's token accounting.

The task files (`write_tasks`) read the generated benchmark's Video-MME layout (``tokenreduce_videomme``: lmms-eval's
own Video-MME prompt, extraction and aggregation; only the video path is ours) and its lmms-eval MLVU form
(``tokenreduce_mlvu``: lmms-eval's own MLVU prompt and extraction; the aggregate is MLVU's M-Avg, because lmms-eval's
aggregator only knows the real benchmark's seven task types and raises ``KeyError`` on the generated ones).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

TASKS = ("tokenreduce_videomme", "tokenreduce_mlvu")
MODEL_ID = "tokenreduce"


def manifest():
    """The ``lmms_eval.models`` entry point: lmms-eval's `ModelManifest` for the ``tokenreduce`` model."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path="tokenreduce.eval.lmms.model.TokenReduce")


def write_tasks(data: str | Path, out: str | Path) -> list[Path]:
    """Write the lmms-eval task files for the generated benchmark split at `data` into `out`: one YAML per task
    (`TASKS`) with the data's absolute paths, and ``utils.py`` with the task functions bound to that folder."""
    from importlib import resources

    from ..errors import EvalError

    root = Path(data).expanduser().resolve()
    videomme = root / "videomme" / "videomme.json"
    mlvu = root / "mlvu" / "mlvu_lmms_eval.json"
    missing = [str(p) for p in (videomme, mlvu) if not p.is_file()]
    if missing:
        raise EvalError(f"--data {data}: not a generated benchmark split (no {', '.join(missing)}); write one with "
                        "python -m tokenreduce.eval.synthetic")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    templates = resources.files("tokenreduce.eval.lmms") / "templates"
    for name in TASKS:
        text = (templates / f"{name}.yaml").read_text(encoding="utf-8")
        text = text.replace("@VIDEOMME_JSON@", str(videomme)).replace("@MLVU_JSON@", str(mlvu))
        path = out / f"{name}.yaml"
        path.write_text(text, encoding="utf-8")
        written.append(path)
    utils = out / "utils.py"
    utils.write_text(
        f'"""lmms-eval task functions for the generated benchmark at {root} (written by tokenreduce)."""\n\n'
        "from tokenreduce.eval.lmms.tasks import bind\n\n"
        f"globals().update(bind({str(root)!r}))\n", encoding="utf-8")
    written.append(utils)
    return written


def main(argv: list[str] | None = None) -> int:
    """``python -m tokenreduce.eval.lmms tasks --data DIR --out DIR``."""
    from tokenreduce.errors import TokenReduceError

    p = argparse.ArgumentParser(prog="python -m tokenreduce.eval.lmms", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("tasks", help="write lmms-eval task files (YAML + utils.py) for a generated benchmark split")
    s.add_argument("--data", required=True, help="a generated split folder, e.g. bench-results/data/test")
    s.add_argument("--out", required=True, help="the folder to pass to lmms-eval's --include_path")
    args = p.parse_args(argv)
    try:
        for path in write_tasks(args.data, args.out):
            print(path)
    except TokenReduceError as e:
        print(f"tokenreduce: error: {e}", file=sys.stderr)
        return 2
    return 0
