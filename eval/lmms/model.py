"""The ``tokenreduce`` model for lmms-eval: a transformers VLM with a tokenreduce plan attached around generation.

Registered through the ``lmms_eval.models`` entry point (`tokenreduce.eval.lmms.manifest`); see the package
docstring for ``model_args``. Requests are answered one at a time (batch 1, like lmms-eval's HF wrappers), greedy,
with the task's ``max_new_tokens`` and cut at its ``until`` strings; each answer returns lmms-eval's
`GenerationResult` with the tokens that really entered the LLM (after reduction) as its input tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms

from ..answer import Answerer, Sampling, canonical_plan
from ..errors import EvalError


def _unquote(value: Any) -> str:
    text = str(value).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    return text


def _flatten(visuals: Any) -> list[Any]:
    out = []
    for v in visuals if isinstance(visuals, (list, tuple)) else [visuals]:
        out += _flatten(v) if isinstance(v, (list, tuple)) else [v]
    return out


class TokenReduce(lmms):
    """lmms-eval model ``tokenreduce``: `Answerer` + a plan. `reports` keeps one efficiency record per answer
    (visual tokens entering the LLM, their per-layer average, TTFT) for whoever wants more than lmms-eval's
    token counts."""

    is_simple = True

    def __init__(self, pretrained: str = "default", kind: str = "video", plan: str = "none",
                 keep_positions: bool = False, frames: int = 8, fps: float | None = None,
                 max_frames: int | None = None, device: str | None = "cpu", dtype: str = "float32",
                 attn: str = "sdpa", batch_size: int | str = 1, max_batch_size: int | None = None, **kwargs) -> None:
        super().__init__()
        if kwargs:
            raise EvalError(f"tokenreduce model_args: unknown {', '.join(sorted(kwargs))}")
        if str(batch_size) not in ("1", "auto"):
            raise EvalError(f"tokenreduce answers one request at a time (--batch_size 1), got {batch_size}")
        if kind not in ("video", "image"):
            raise EvalError(f"tokenreduce model_args: kind must be video or image, got {kind!r}")
        plan = _unquote(plan)
        if str(keep_positions).lower() in ("true", "1") and not plan.endswith("@positions"):
            plan = f"{plan} @positions"
        self.plan = canonical_plan(plan)
        sampling = Sampling(frames=int(frames), fps=None if fps is None else float(fps),
                            max_frames=None if max_frames is None else int(max_frames))
        self.answerer = Answerer.load(_unquote(pretrained), kind, device=device or "cpu", dtype=str(dtype),
                                      attn=str(attn), sampling=sampling)
        self.kind = kind
        self.reports: list[dict[str, Any]] = []

    def _visual(self, visual: Any) -> tuple[np.ndarray, str]:
        """A video path, a list of frames or a PIL image -> (array, kind)."""
        if isinstance(visual, str):
            from tokenreduce.video import load_video

            s = self.answerer.sampling
            frames = (load_video(visual, fps=s.fps, max_frames=s.max_frames) if s.fps is not None
                      else load_video(visual, num_frames=s.frames))
            return frames.frames, "video"
        if hasattr(visual, "convert"):  # PIL image
            return np.asarray(visual.convert("RGB")), "image"
        raise EvalError(f"tokenreduce: cannot take a visual of type {type(visual).__name__}")

    def generate_until(self, requests) -> list[GenerationResult]:
        out = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            visuals = _flatten(doc_to_visual(self.task_dict[task][split][doc_id]))
            if len(visuals) != 1:
                raise EvalError(f"tokenreduce: one image or video per request, got {len(visuals)} ({task} {doc_id})")
            visual, kind = self._visual(visuals[0])
            text = self.answerer.chat_text(None, context, "", kind)
            inputs = self.answerer.encode(text, visual, kind)
            max_new = int(gen_kwargs.get("max_new_tokens", 16))
            rec = self.answerer.generate(inputs, self.plan, max_new)
            completion = rec["completion"]
            for stop in gen_kwargs.get("until") or []:
                if stop:
                    completion = completion.split(stop)[0]
            self.reports.append({"task": task, "doc_id": doc_id, **{k: rec[k] for k in (
                "tokens", "layer_avg", "ttft_s", "seq_llm")}})
            out.append(GenerationResult(completion, TokenCounts(input_tokens=rec["seq_llm"],
                                                                output_tokens=rec["new_tokens"])))
        return out

    def loglikelihood(self, requests):
        raise NotImplementedError("tokenreduce answers generate_until tasks (multiple choice by generation) only")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("tokenreduce answers single-round generate_until tasks only")
