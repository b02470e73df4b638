"""QuoTA: query-oriented token assignment for video (Luo et al., 2025; MAC-AutoML/QuoTA).

Spec: shared/specs/video-reducers.md section 1. Every frame of a video gets a relevance score p_t for
the question from a pluggable scorer; the sample's budget is split over frames in proportion to p_t**2
(QuoTA's `weight_scale=[100, 2]`), and each frame is reduced to its share: by bilinear resizing of its
token grid (the paper's default) or by any VISUAL reducer (`resize="pool"`, `"aim-merge"`, ...).

Scorers (`scorer=`):
- "vlm" (default): the reduced model itself answers "does this frame help answer the question?" for
  every frame, batched; p_t = P(yes) / (P(yes) + P(no)) at the answer position (QuoTA's release takes
  p("A") over the whole vocabulary; the two-way ratio does not depend on the rest of the vocabulary).
  Needs the handle's tokenizer: ``tr.apply(model, plan, tokenizer=tok)``.
- "uniform": p_t = 1 (every frame the same share: the baseline).
- a `ClipScorer` (CLIP or SigLIP from transformers), or any callable
  ``(pixels (T, 3, S, S), question: str, ctx) -> (T,) scores in [0, 1]``.
Scoring time is reported on its own (``report.times["score:quota"]``): it is QuoTA's price.

Differences from the released code, on purpose:
- budgets are exact: largest-remainder rounding, at least `floor` tokens per frame (no frame vanishes,
  so the time prompt stays true), and at most the frame's own tokens (no upsampling above the model's
  grid), with what a capped frame cannot take handed on to the others;
- the weights are an explicit argument, not smuggled through `images` (which broke batches of two).
Resizing happens on the grid the LLM sees (LLaVA-OneVision: the pooled 14x14 grid), so with uniform
scores and 196 tokens per frame it reproduces the stock sequence exactly.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import PlanError, UnsupportedModelError
from ..plan import BudgetedReducer, Context, Stage, allocate, param
from ..registry import get_reducer, register_reducer
from ..tokens import VisualTokens

#: the question put to the model about each frame (the model's chat format and the frame are added around it)
FRAME_PROMPT = "Does this frame contain information that helps to answer the question: {query} Answer yes or no."
OBJECT_PROMPT = "Does this frame contain any of the following objects: {objects}? Answer yes or no."
#: QuoTA's chain-of-thought query decoupling, text only: is detection needed, which objects, which are physical
DECOUPLE_PROMPT = (
    "Question: {query}\nTo answer the question, follow three steps. Step 1: is it necessary to detect "
    "specific physical objects in the video? Answer yes or no. Step 2: if yes, list the objects to detect as a "
    "Python list. Step 3: keep only physical objects, not abstract concepts, and output the list, or null. "
    "Answer in the form 'Step 1: ... Step 2: ... Step 3: ...'."
)


def frame_weights(scores: Tensor, power: float = 2.0) -> Tensor:
    """QuoTA's weights: scores**power (the release scales by 100 first, which cancels), fp32."""
    return scores.float().clamp(min=0.0).pow(power)


def frame_budgets(total: int, weights: list[float], counts: list[int], floor: int = 1) -> list[int]:
    """Per-frame token budgets that sum exactly to `total`.

    Every frame first gets min(floor, its tokens) when the total allows it; the rest is split in
    proportion to `weights`, never above a frame's own token count (largest remainder, see `allocate`).
    When the total is smaller than floor x frames, it is split by weight with the floor as the cap (so with
    fewer tokens than frames, the most relevant frames get one token each).
    """
    if total > sum(counts):
        raise PlanError(f"quota: budget {total} is larger than the {sum(counts)} tokens of the frames")
    base = [min(floor, c) for c in counts]
    if sum(base) > total:  # not enough for every frame's floor: shares up to the floor, by relevance
        return allocate(total, weights, base)
    rest = allocate(total - sum(base), weights, [c - b for c, b in zip(counts, base)])
    return [b + r for b, r in zip(base, rest)]


def grid_shape(n: int, h: int, w: int) -> tuple[int, int]:
    """The largest grid with at most n cells and at most h x w, close to the frame's aspect ratio."""
    best = (1, 1)
    for rows in range(1, h + 1):
        cols = min(w, n // rows)
        if cols < 1:
            break
        if rows * cols > best[0] * best[1] or (
            rows * cols == best[0] * best[1] and abs(rows / cols - h / w) < abs(best[0] / best[1] - h / w)
        ):
            best = (rows, cols)
    return best


def bilinear_resize(tokens: VisualTokens, item: int, n: int) -> tuple[Tensor, Tensor, int]:
    """Resize one item's full token grid to the largest grid of at most `n` cells (bilinear, no corners).

    Returns (assign (k,) group of each of the item's tokens, features (g, D), g groups). Each original
    token belongs to the output cell covering its centre, so origins stay exact.
    """
    idx = torch.nonzero(tokens.item == item).flatten()
    r0, c0 = int(tokens.row[idx].min()), int(tokens.col[idx].min())
    h, w = int(tokens.row[idx].max()) - r0 + 1, int(tokens.col[idx].max()) - c0 + 1
    if idx.numel() != h * w:
        raise PlanError("quota: resize='bilinear' needs every frame's full token grid; put quota first")
    order = torch.argsort((tokens.row[idx] - r0) * w + (tokens.col[idx] - c0))
    idx = idx[order]
    gh, gw = grid_shape(n, h, w)
    grid = tokens.features[idx].T.reshape(1, -1, h, w).float()
    out = F.interpolate(grid, size=(gh, gw), mode="bilinear", align_corners=False)[0].reshape(-1, gh * gw).T
    rows = (torch.arange(h, device=idx.device) * gh) // h
    cols = (torch.arange(w, device=idx.device) * gw) // w
    cell = (rows[:, None] * gw + cols[None, :]).flatten()
    assign = torch.full((len(tokens),), -1, dtype=torch.long, device=idx.device)
    assign[idx] = cell
    return assign, out.to(tokens.features.dtype), gh * gw


@register_reducer
@dataclass
class QuoTA(BudgetedReducer):
    """QuoTA per-frame budgets from query relevance (see the module docstring).

    Fields:
        tokens / keep: the sample's visual-token budget (split over its frames by relevance).
        scorer: "vlm", "uniform", a `ClipScorer`, or a callable (pixels, question, ctx) -> (T,) scores.
        power: weights are scores**power (2 in QuoTA).
        floor: tokens every frame keeps at least (when the budget allows).
        resize: "bilinear" (QuoTA v1: resize each frame's grid; may land below the budget when the
            share is not a product h x w) or the name of a VISUAL reducer ("pool", "aim-merge",
            "random", ...) that reduces each frame to exactly its share.
        prompt: the question put to the "vlm" scorer about each frame; "{query}" is the prompt's text.
        batch: frames scored per forward pass of the "vlm" scorer.
        decouple: first let the model (text only) turn the question into a list of objects (QuoTA's CoT
            query decoupling) and ask each frame about those objects; falls back to `prompt` when the
            answer names none. Its time is reported as "decouple:quota" (part of "score:quota").
    """

    name = "quota"
    stage = Stage.VISUAL
    summary = "QuoTA: per-frame budgets by query relevance (frame scorer), then resize each frame"

    scorer: Any = param("vlm", "frame relevance: 'vlm' (the model's own P(yes)), 'uniform', a ClipScorer or a function")
    power: float = param(2.0, "frame budgets are proportional to relevance ** power (2 in QuoTA)")
    floor: int = param(1, "tokens every frame keeps at least (when the budget allows)")
    resize: str = param("bilinear", "how a frame meets its share: 'bilinear' grid resize or a VISUAL reducer's name")
    prompt: str = param(FRAME_PROMPT, "the question the 'vlm' scorer asks about each frame ({query}: the prompt)",
                        shown="USER: <video>\\nDoes this frame contain information that helps to answer ...")
    batch: int = param(16, "frames scored per forward pass of the 'vlm' scorer")
    decouple: bool = param(False, "first turn the question into objects to look for (QuoTA's query decoupling)")

    def validate(self) -> None:
        super().validate()
        if not (callable(self.scorer) or self.scorer in ("vlm", "uniform")):
            raise PlanError(f"quota: scorer must be 'vlm', 'uniform' or a callable, got {self.scorer!r}")
        if not isinstance(self.power, (int, float)) or self.power < 0:
            raise PlanError(f"quota: power must be a number >= 0, got {self.power!r}")
        if isinstance(self.floor, bool) or not isinstance(self.floor, int) or self.floor < 0:
            raise PlanError(f"quota: floor must be an integer >= 0, got {self.floor!r}")
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
            raise PlanError(f"quota: batch must be an integer >= 1, got {self.batch!r}")
        if self.resize != "bilinear":
            try:
                inner = get_reducer(self.resize)
            except PlanError as e:
                raise PlanError(f"quota: resize={self.resize!r}: {e}") from None
            if inner.stage != Stage.VISUAL or not issubclass(inner, BudgetedReducer) or inner is QuoTA:
                raise PlanError(f"quota: resize must be 'bilinear' or a budgeted VISUAL reducer, got {self.resize!r}")

    def reduce_sample(self, tokens: VisualTokens, ctx: Context) -> VisualTokens:
        t0 = time.perf_counter()
        scores = self.score(tokens, ctx)
        ctx.times["score:quota"] = ctx.times.get("score:quota", 0.0) + time.perf_counter() - t0
        counts = tokens.item_counts().tolist()
        budgets = frame_budgets(self.budget(len(tokens)), frame_weights(scores, self.power).tolist(), counts,
                                self.floor)
        if self.resize != "bilinear":
            inner = get_reducer(self.resize)(tokens=max(1, sum(budgets)))
            inner.fixed_item_budgets = budgets
            return inner.reduce([tokens], [ctx])[0]
        assign = torch.full((len(tokens),), -1, dtype=torch.long, device=tokens.features.device)
        feats, offset = [], 0
        for i, k in enumerate(budgets):
            if k == 0 or counts[i] == 0:
                continue
            a, f, g = bilinear_resize(tokens, i, k)
            assign = torch.where(a >= 0, a + offset, assign)
            feats.append(f)
            offset += g
        return tokens.group(assign, offset, features=torch.cat(feats))

    def score(self, tokens: VisualTokens, ctx: Context) -> Tensor:
        """(num_items,) relevance of every frame (item) of the sample, in [0, 1]."""
        if self.scorer == "uniform":
            return torch.ones(tokens.num_items)
        if ctx.pixels is None or ctx.pixels.shape[0] != tokens.num_items:
            raise UnsupportedModelError("quota: the adapter gives no per-frame pixels to score")
        if callable(self.scorer):
            out = torch.as_tensor(self.scorer(ctx.pixels, ctx.text or "", ctx), dtype=torch.float32).flatten()
        else:
            out = self._vlm_scores(ctx)
        if out.numel() != tokens.num_items or not bool(torch.isfinite(out).all()):
            raise ValueError(f"quota: the scorer must return {tokens.num_items} finite scores, got {out.tolist()}")
        return out.cpu()

    def _vlm_scores(self, ctx: Context) -> Tensor:
        if ctx.tokenizer is None:
            raise PlanError(
                "quota(scorer='vlm') asks the model itself about every frame and needs its tokenizer: "
                "tr.apply(model, plan, tokenizer=tokenizer), or pass scorer='uniform' or a scorer object"
            )
        prompt = self.prompt.format(query=ctx.text or "")
        if self.decouple:
            t0 = time.perf_counter()
            objects = decouple_query(ctx, ctx.text or "")
            ctx.times["decouple:quota"] = ctx.times.get("decouple:quota", 0.0) + time.perf_counter() - t0
            if objects:
                prompt = OBJECT_PROMPT.format(objects=", ".join(objects))
        return vlm_yes_probability(ctx, ctx.pixels, prompt, self.batch)


def parse_decoupled(text: str) -> list[str] | None:
    """The object list of a decoupling answer ("Step 1: yes ... Step 3: ['ball', 'dog']"), or None.

    None when step 1 says no, when there is no parsable list, or when it is empty (QuoTA then scores
    frames against the question itself). Lists are read with `ast.literal_eval`, never `eval`.
    """
    import ast
    import re

    low = text.lower()
    m = re.search(r"step\s*1\s*:\s*(yes|no)", low)
    if m is None or m.group(1) == "no":
        return None
    m = re.search(r"step\s*3\s*:\s*(\[[^\]]*\])", low)
    if m is None:
        return None
    try:
        items = ast.literal_eval(m.group(1))
    except (ValueError, SyntaxError):
        return None
    out = [str(x).strip() for x in items if isinstance(x, str) and str(x).strip()] if isinstance(items, list) else []
    return out or None


def decouple_query(ctx: Context, question: str, max_new_tokens: int = 64) -> list[str] | None:
    """QuoTA step B: the unreduced model, text only, turns the question into objects to look for (or None)."""
    answer = ctx.generate(ctx.chat(DECOUPLE_PROMPT.format(query=question)), max_new_tokens=max_new_tokens)
    return parse_decoupled(answer)


def _first_id(tokenizer, word: str) -> int:
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if not ids:
        raise PlanError(f"quota: the tokenizer gives no token for {word!r}")
    return int(ids[0])


@torch.no_grad()
def vlm_yes_probability(ctx: Context, pixels: Tensor, prompt: str, batch: int = 16) -> Tensor:
    """P(yes) / (P(yes) + P(no)) of the unreduced model answering `prompt` about each frame of `pixels`; (T,) fp32.

    `prompt` is plain text: `ctx.frame_inputs` puts each frame and the model's chat format around it.
    """
    tokenizer = ctx.tokenizer
    yes = [_first_id(tokenizer, w) for w in (" yes", " Yes", "yes", "Yes")]
    no = [_first_id(tokenizer, w) for w in (" no", " No", "no", "No")]
    yes, no = sorted(set(yes) - set(no)), sorted(set(no) - set(yes))
    out = []
    for s in range(0, pixels.shape[0], batch):
        px = pixels[s:s + batch]
        logits = ctx.ask(**ctx.frame_inputs(px, prompt)).logits[:, -1].float()  # left padding: the answer slot
        logp = torch.log_softmax(logits, -1)
        p_yes, p_no = logp[:, yes].logsumexp(-1), logp[:, no].logsumexp(-1)
        out.append(torch.sigmoid(p_yes - p_no))
    return torch.cat(out)


class ClipScorer:
    """Frame relevance from a transformers `CLIPModel` or `SiglipModel`: image-text similarity per frame.

    p_t = sigmoid(scale * cos(frame_t, question) + bias), with SigLIP's learned scale and bias (CLIP:
    its logit scale, bias 0, centred on the frames' mean similarity). Frames arrive normalised for the
    VLM (`mean`, `std`) and are re-normalised and resized for the scorer's own tower.
    """

    def __init__(self, model, tokenizer, vlm_mean: tuple[float, ...], vlm_std: tuple[float, ...],
                 mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073),
                 std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711),
                 query: str | Callable[[str], str] | None = None):
        """`query`: the text to score frames against: a fixed string, a function of the prompt's text
        (e.g. to pull the question out of a chat template), or None for the prompt's text itself."""
        self.model, self.tokenizer, self.query = model.eval(), tokenizer, query
        self.vlm = (torch.tensor(vlm_mean)[:, None, None], torch.tensor(vlm_std)[:, None, None])
        self.own = (torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None])
        self.size = model.config.vision_config.image_size

    @torch.no_grad()
    def __call__(self, pixels: Tensor, question: str, ctx: Context | None = None) -> Tensor:
        x = pixels.float().cpu() * self.vlm[1] + self.vlm[0]  # back to [0, 1]
        x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False).clamp(0, 1)
        x = (x - self.own[0]) / self.own[1]
        dev = next(self.model.parameters()).device
        img = self.model.get_image_features(pixel_values=x.to(dev))
        img = F.normalize(getattr(img, "pooler_output", img), dim=-1)
        if self.query is not None:
            question = self.query(question) if callable(self.query) else self.query
        limit = self.model.config.text_config.max_position_embeddings
        enc = self.tokenizer([question], padding=True, truncation=True, max_length=limit, return_tensors="pt")
        txt = self.model.get_text_features(**{k: v.to(dev) for k, v in enc.items()})
        txt = F.normalize(getattr(txt, "pooler_output", txt), dim=-1)
        cos = (img @ txt.T).flatten().float()
        scale = float(self.model.logit_scale.exp())
        bias = getattr(self.model, "logit_bias", None)
        if bias is None:
            return torch.sigmoid(scale * (cos - cos.mean()))
        return torch.sigmoid(scale * cos + float(bias))


#: scorers are callables; this alias documents the signature
FrameScorer = Callable[[Tensor, str, Context], Tensor]

__all__ = ["ClipScorer", "FrameScorer", "QuoTA", "bilinear_resize", "decouple_query", "frame_budgets", "frame_weights",
           "grid_shape", "parse_decoupled", "vlm_yes_probability"]
