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
- the weights are an explicit argument, not smuggled through `images` (which broke batches of two);
- a frame's share n becomes the largest grid within n (`grid="fill"`: 130 tokens of a 14x14 frame -> 10x13,
  30 -> 5x6); the release takes floor(sqrt(n)) rows and columns plus one row if it fits (130 -> 11x11 = 121,
  30 -> 6x5), leaving up to sqrt(n) of the share unused: `grid="release"` reproduces it (tested against a
  transcription);
- frame sampling (`tokenreduce.video`, ``dynamic=True``): the release samples T = 96 + ... frames even from
  a shorter clip, repeating frames (60 frames -> 96 with repeats); we sample at most the clip's frames, so a
  budget is not spent twice on one frame: ``DynamicSampling(repeat=True)`` reproduces the release.
Resizing starts from the finest grid the model has, as the release does: LLaVA-OneVision's projected 27x27
frames before its 2x2 pooling (`Context.raw_grids`), else the grid the LLM sees. A frame whose share is its
whole pooled grid keeps the model's own pooled tokens, so with uniform scores and 196 tokens per frame the
stock sequence comes out exactly. All frames resized to the same grid are interpolated in one call.
"""

from __future__ import annotations

import difflib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError, PlanError, UnsupportedModelError
from ..params import clip, short
from ..plan import BudgetedReducer, Context, Stage, allocate, param
from ..registry import get_reducer, reducers, register_reducer
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


def grid_shape(n: int, h: int, w: int, rule: str = "fill") -> tuple[int, int]:
    """The grid a frame of h x w tokens is resized to for a share of n tokens (never larger than h x w).

    rule "fill" (default): the largest grid with at most n cells, closest to the frame's aspect ratio (130 of
    a 14 x 14 frame -> 10 x 13 = 130). rule "release": QuoTA's, s = floor(sqrt(n)), then s + 1 rows if
    (s + 1) x s <= n (130 -> 11 x 11 = 121; 30 -> 6 x 5); it assumes a square frame, so a non-square frame
    uses "fill". Where the release would upsample (n > h x w) the frame keeps its own grid.
    """
    if rule not in ("fill", "release"):
        raise PlanError(f"quota: grid must be 'fill' or 'release', got {rule!r}")
    if n >= h * w:
        return h, w
    if rule == "release" and h == w:
        s = math.isqrt(n)
        return (s + 1, s) if s * s < n and (s + 1) * s <= n else (s, s)
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


def resize_frames(tokens: VisualTokens, budgets: list[int], rule: str = "fill",
                  raw: Tensor | None = None) -> tuple[Tensor, Tensor, int]:
    """Resize every frame's token grid to the grid of its share (QuoTA v1), all frames of one shape at once.

    Args:
        tokens: the sample's tokens; every frame with a share must still be its full grid (or a full rectangle).
        budgets: tokens per item (0: the item is dropped).
        rule: `grid_shape` rule, "fill" or "release".
        raw: optional (n_items, H, W, D) projected features before the model pooled them (`Context.raw_grids`):
            frames are resized from these, as QuoTA's release does (27x27 for LLaVA-OneVision), instead of from
            the pooled grid the tokens hold. A share equal to the whole pooled grid keeps the pooled tokens.

    Returns:
        assign: (N,) long, the output token of every token (-1: dropped).
        features: (M, D) the resized frames, item after item, each in raster order.
        M: output tokens.
    """
    dev = tokens.features.device
    n_items = tokens.num_items
    r0, c0, hs, ws = tokens.item_boxes()
    counts = tokens.item_counts().tolist()
    order = torch.argsort(tokens.item * (1 << 40) + tokens.row * (1 << 20) + tokens.col, stable=True)
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    shapes: dict[tuple[int, int, int, int], list[int]] = {}
    offset, out_first = 0, []
    for i, k in enumerate(budgets):
        out_first.append(offset)
        if k == 0 or counts[i] == 0:
            continue
        h, w = hs[i], ws[i]
        if counts[i] != h * w:
            raise PlanError("quota: resize='bilinear' needs every frame's full token grid; put quota first")
        gh, gw = grid_shape(k, h, w, rule)
        shapes.setdefault((h, w, gh, gw), []).append(i)
        offset += gh * gw
    d = tokens.features.shape[1]
    feats = tokens.features.new_empty(offset, d)
    assign = torch.full((len(tokens),), -1, dtype=torch.long, device=dev)
    if raw is not None and (raw.dim() != 4 or raw.shape[0] != n_items):
        raise UnsupportedModelError(f"quota: the model's raw grids {tuple(raw.shape)} do not match the sample's "
                                    f"{n_items} frames")
    for (h, w, gh, gw), items in shapes.items():
        idx = torch.stack([order[starts[i]:starts[i + 1]] for i in items])  # (U, h*w) raster order
        base = torch.tensor([out_first[i] for i in items], device=dev)
        rows = (torch.arange(h, device=dev) * gh) // h
        cols = (torch.arange(w, device=dev) * gw) // w
        cell = (rows[:, None] * gw + cols[None, :]).flatten()
        assign[idx.flatten()] = (base[:, None] + cell).flatten()
        slots = (base[:, None] + torch.arange(gh * gw, device=dev)).flatten()
        if (gh, gw) == (h, w):  # the whole grid: the tokens themselves (the model's own pooling)
            feats[slots] = tokens.features[idx.flatten()]
            continue
        src = raw[items].to(dev) if raw is not None else tokens.features[idx].view(len(items), h, w, d)
        grid = src.permute(0, 3, 1, 2).float()
        out = F.interpolate(grid, size=(gh, gw), mode="bilinear", align_corners=False)
        feats[slots] = out.flatten(2).transpose(1, 2).flatten(0, 1).to(feats.dtype)
    return assign, feats, offset


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
        grid: the bilinear grid for a frame's share (`grid_shape`): "fill" (the largest grid within the share,
            default) or "release" (QuoTA's near-square grids, which leave up to sqrt(share) tokens unused).
    """

    name = "quota"
    stage = Stage.VISUAL
    summary = "QuoTA: per-frame budgets by query relevance (frame scorer), then resize each frame"
    query_aware = True

    scorer: Any = param("vlm", "frame relevance: 'vlm' (the model's own P(yes)), 'uniform', a ClipScorer or a function")
    power: float = param(2.0, "frame budgets are proportional to relevance ** power (2 in QuoTA)")
    floor: int = param(1, "tokens every frame keeps at least (when the budget allows)")
    resize: str = param("bilinear", "how a frame meets its share: 'bilinear' grid resize or a VISUAL reducer's name")
    prompt: str = param(FRAME_PROMPT, "the question the 'vlm' scorer asks about each frame ({query}: the prompt)",
                        shown="USER: <video>\\nDoes this frame contain information that helps to answer ...")
    batch: int = param(16, "frames scored per forward pass of the 'vlm' scorer")
    decouple: bool = param(False, "first turn the question into objects to look for (QuoTA's query decoupling)")
    grid: str = param("fill", "a share's bilinear grid: 'fill' (largest within it) or 'release' (near-square, "
                      "as QuoTA)")

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
        if self.grid not in ("fill", "release"):
            raise PlanError(f"quota: grid must be 'fill' or 'release', got {self.grid!r}")
        if self.resize != "bilinear":
            try:
                inner = get_reducer(self.resize)
            except PlanError as e:
                raise PlanError(f"quota: resize={self.resize!r}: {e}") from None
            if inner.stage != Stage.VISUAL or not issubclass(inner, BudgetedReducer) or not inner.item_budgeted:
                usable = sorted(n for n, c in reducers().items() if getattr(c, "item_budgeted", False)
                                and c.stage == Stage.VISUAL)
                raise PlanError(
                    f"quota: resize={self.resize!r} cannot reduce each frame to the share quota gives it; use "
                    f"'bilinear' or one of {', '.join(usable)}"
                )
        try:
            self.prompt.format(query="")
        except (KeyError, IndexError, ValueError, AttributeError, TypeError) as e:
            raise PlanError(
                f"quota: prompt= may hold only the field {{query}} (double other braces), got {short(self.prompt)} "
                f"({type(e).__name__}: {e})"
            ) from None

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
        assign, feats, total = resize_frames(tokens, budgets, self.grid, ctx.raw_grids)
        return tokens.group(assign, total, features=feats)

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
    frames against the question itself). Lists are read with `ast.literal_eval`, never `eval`; no model output
    makes it raise (fuzzed in tests/test_bad_input.py).
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
    except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
        # model output can be anything: unhashable keys ({{}: 1}), thousands of nested operators, huge numbers
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


_OPEN_CLIP_PRECISIONS = ("fp32", "fp16", "bf16", "pure_fp16", "pure_bf16")


class ClipScorer:
    """Frame relevance from a CLIP-style model: image-text similarity per frame, in [0, 1].

    Three ways to get one:

    - ``ClipScorer(model, tokenizer, vlm_mean, vlm_std)``: a transformers `CLIPModel` or `SiglipModel` with its
      tokenizer (frames resized bicubically to the tower's size and normalised with `mean`/`std`);
    - ``ClipScorer.open_clip(name, pretrained=None|path, vlm_mean=..., vlm_std=...)``: an open_clip model
      (``pip install 'tokenreduce[clip]'``) with open_clip's own tokenizer and preprocessing;
    - ``ClipScorer.from_open_clip(model, tokenizer, preprocess, ...)``: an open_clip model already built.

    p_t = sigmoid(scale * cos(frame_t, question) + bias), with SigLIP's learned scale and bias (CLIP:
    its logit scale, bias 0, centred on the frames' mean similarity). Frames arrive normalised for the
    VLM (`vlm_mean`, `vlm_std`), (T, 3, S, S); they are taken back to [0, 1] and prepared for the scorer's
    own tower. Returns (T,) fp32 scores.
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
        self.preprocess: Callable | None = None  # set for open_clip models: PIL image -> (3, s, s) tensor

    @classmethod
    def open_clip(cls, name: str, pretrained: str | os.PathLike[str] | None = None, *,
                  vlm_mean: tuple[float, ...], vlm_std: tuple[float, ...],
                  query: str | Callable[[str], str] | None = None, device: str | torch.device = "cpu",
                  precision: str = "fp32") -> ClipScorer:
        """An open_clip model as a frame scorer; nothing is downloaded.

        Args:
            name: an open_clip architecture (``open_clip.list_models()``, e.g. "ViT-B-32", or one added with
                ``open_clip.add_model_config``), or ``"local-dir:<folder>"`` (open_clip_config.json + weights).
            pretrained: None (random weights: plumbing only) or a local checkpoint file of that architecture.
                open_clip's download tags ("openai", "laion2b_s34b_b79k", ...) are refused: pass the file.
            vlm_mean, vlm_std: the VLM's pixel normalisation (frames arrive normalised with it).
            query: as in the constructor. device, precision: passed to open_clip ("fp32", "bf16", ...).
        """
        try:
            import open_clip
        except ImportError as e:
            raise UnsupportedModelError(
                f"ClipScorer.open_clip needs open_clip: pip install 'tokenreduce[clip]' ({e})") from None
        if not isinstance(name, str) or not name:
            raise InputError(f"ClipScorer.open_clip: name must be an open_clip model name, got {short(name)}")
        if name.startswith("hf-hub:"):
            raise InputError(f"ClipScorer.open_clip: {name!r} would download from the hub; tokenreduce never "
                             "downloads: save it locally and pass 'local-dir:<folder>'")
        if not name.startswith("local-dir:") and name not in open_clip.list_models():
            close = difflib.get_close_matches(name, open_clip.list_models(), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else " (see open_clip.list_models())"
            raise InputError(f"ClipScorer.open_clip: unknown model {name!r}{hint}")
        if precision not in _OPEN_CLIP_PRECISIONS:
            raise InputError(f"ClipScorer.open_clip: precision must be one of {', '.join(_OPEN_CLIP_PRECISIONS)}, "
                             f"got {short(precision)}")
        path = None
        if pretrained is not None:
            path = os.fspath(pretrained)
            if not os.path.isfile(path):
                raise InputError(
                    f"ClipScorer.open_clip: pretrained={path!r} is not a file; give a local checkpoint file or "
                    "None (tokenreduce never downloads, so open_clip's tags cannot be used)")
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=path, device=device, precision=precision, pretrained_text=False)
            tokenizer = open_clip.get_tokenizer(name)
        except Exception as e:  # a checkpoint of another architecture, a bad folder: open_clip raises many kinds
            raise InputError(f"ClipScorer.open_clip({name!r}, pretrained={path!r}): {clip(str(e), 300)}") from None
        return cls.from_open_clip(model, tokenizer, preprocess, vlm_mean=vlm_mean, vlm_std=vlm_std, query=query)

    @classmethod
    def from_open_clip(cls, model, tokenizer, preprocess: Callable, *, vlm_mean: tuple[float, ...],
                       vlm_std: tuple[float, ...], query: str | Callable[[str], str] | None = None) -> ClipScorer:
        """Wrap an open_clip model already built: `tokenizer` (list of str -> (n, context) ids) and `preprocess`
        (PIL image -> (3, s, s) tensor) are open_clip's (``get_tokenizer``, ``create_model_and_transforms``)."""
        self = cls.__new__(cls)
        self.model, self.tokenizer, self.query, self.preprocess = model.eval(), tokenizer, query, preprocess
        self.vlm = (torch.tensor(vlm_mean)[:, None, None], torch.tensor(vlm_std)[:, None, None])
        return self

    @torch.no_grad()
    def __call__(self, pixels: Tensor, question: str, ctx: Context | None = None) -> Tensor:
        if not isinstance(pixels, Tensor) or pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[0] == 0:
            raise InputError(f"ClipScorer: frames must be a (T, 3, S, S) tensor with T >= 1, got "
                             f"{getattr(pixels, 'shape', type(pixels).__name__)}")
        x = (pixels.float().cpu() * self.vlm[1] + self.vlm[0]).clamp(0, 1)  # back to [0, 1]
        if self.query is not None:
            question = self.query(question) if callable(self.query) else self.query
        img, txt = self._open_clip_features(x, question) if self.preprocess else self._hf_features(x, question)
        cos = (F.normalize(img.float(), dim=-1) @ F.normalize(txt.float(), dim=-1).T).flatten()
        scale = float(self.model.logit_scale.exp())
        bias = getattr(self.model, "logit_bias", None)
        if bias is None:
            return torch.sigmoid(scale * (cos - cos.mean()))
        return torch.sigmoid(scale * cos + float(bias))

    def _hf_features(self, x: Tensor, question: str) -> tuple[Tensor, Tensor]:
        """transformers CLIP/SigLIP: (T, D) image and (1, D) text embeddings of [0, 1] frames (T, 3, S, S)."""
        x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False).clamp(0, 1)
        x = (x - self.own[0]) / self.own[1]
        dev = next(self.model.parameters()).device
        img = self.model.get_image_features(pixel_values=x.to(dev))
        limit = self.model.config.text_config.max_position_embeddings
        enc = self.tokenizer([question], padding=True, truncation=True, max_length=limit, return_tensors="pt")
        txt = self.model.get_text_features(**{k: v.to(dev) for k, v in enc.items()})
        return getattr(img, "pooler_output", img), getattr(txt, "pooler_output", txt)

    def _open_clip_features(self, x: Tensor, question: str) -> tuple[Tensor, Tensor]:
        """open_clip: each frame through the model's own preprocessing (as a PIL image, as open_clip expects)."""
        from PIL import Image

        param = next(self.model.parameters())
        frames = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (T, S, S, 3)
        batch = torch.stack([self.preprocess(Image.fromarray(f)) for f in frames]).to(param.device, param.dtype)
        img = self.model.encode_image(batch)
        txt = self.model.encode_text(self.tokenizer([question]).to(param.device))
        return img, txt


#: scorers are callables; this alias documents the signature
FrameScorer = Callable[[Tensor, str, Context], Tensor]

__all__ = ["ClipScorer", "FrameScorer", "QuoTA", "decouple_query", "frame_budgets", "frame_weights",
           "grid_shape", "parse_decoupled", "resize_frames", "vlm_yes_probability"]
