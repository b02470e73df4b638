"""The adapter contract, and the shared machinery for placeholder-style VLMs.

An adapter knows one model family (where its vision features come from, which ids are placeholders)
and nothing of any reducer. `PlaceholderAdapter` serves every Hugging Face VLM whose processor expands
an image into one placeholder id per visual token and whose `forward` accepts `mm_encoder_outputs`
(LLaVA-1.5, LLaVA-NeXT, Video-LLaVA, LLaVA-OneVision, ...). For every call with visual inputs it:

1. describes each image/video as an `ImageLayout` (items, grids, which placeholder each token fills, extra
   tokens such as newlines) -> one `VisualTokens` per sample;
2. runs the vision tower layer by layer (`tokenreduce.encoder.run_tower`) with the ENCODER reducers and
   every reducer's probes, then projects (`finish_tokens`: adapters that pool frames do it here);
3. hands the projected tokens to the VISUAL reducers;
4. feeds the model a genuinely shorter sequence (placeholders, attention mask and positions rebuilt), for
   `forward` and `generate`, and arms the in-LLM engine (`tokenreduce.llm`) for PREFILL/DECODE reducers.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import inspect
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .encoder import EncoderReducer, TowerRun, VisionTower, run_tower
from .errors import InputError, UnsupportedModelError
from .flops import TransformerDims
from .plan import Context, Plan, Stage
from .report import CallReport
from .sequence import placeholder_runs, repack, split_runs
from .tokens import ItemInfo, VisualTokens

if TYPE_CHECKING:
    from .attach import Handle


@dataclass
class ImageLayout:
    """How one image (or video) of a prompt expands into placeholder tokens, item by item.

    Attributes (T = grid tokens of all the image's items, raster order item after item):
        items: what each tower item of the image is (overview, crop, frame, ...).
        grids: (h, w) token grid of each item.
        slots: (T,) long, offset of each grid token inside the image's placeholder run; -1 for a token
            with no placeholder (anyres padding), which is dropped before the VISUAL stage.
        length: number of placeholders of the image.
        extra_slots: (E,) long, offsets of tokens that are not grid tokens (e.g. row newlines).
        extra_owner: (T,) long, the extra token each grid token keeps alive (-1: none). An extra token
            enters the LLM iff one of its grid tokens survives; it is not counted in budgets.
        extra_features: (E, D) features of the extra tokens, or None.
        tower_items: tower inputs of the image when they are not the items (LLaVA-OneVision interpolates
            a large anyres mosaic into one grid); None = one tower input per item.
    """

    items: list[ItemInfo]
    grids: list[tuple[int, int]]
    slots: Tensor
    length: int
    extra_slots: Tensor | None = None
    extra_owner: Tensor | None = None
    extra_features: Tensor | None = None
    tower_items: int | None = None

    @property
    def num_tower_items(self) -> int:
        """Vision-tower inputs of the image (differs from len(grids) when the model resamples the tiles)."""
        return len(self.grids) if self.tower_items is None else self.tower_items

    @classmethod
    def single(cls, grid: tuple[int, int], info: ItemInfo | None = None) -> ImageLayout:
        """One grid, one placeholder per token (LLaVA-1.5)."""
        n = grid[0] * grid[1]
        return cls(items=[info or ItemInfo()], grids=[grid], slots=torch.arange(n), length=n)


@dataclass
class VisualInputs:
    """The visual inputs of one call, popped from the caller's kwargs by the adapter.

    Attributes:
        pixel_values: (G, C, H, W), one row per tower item, images in prompt order.
        layouts: one per image (or video), in prompt order.
    """

    pixel_values: Tensor
    layouts: list[ImageLayout]


class Adapter(abc.ABC):
    """The contract between the core and one model family."""

    #: stages this adapter can run reducers at
    stages: frozenset[Stage] = frozenset()

    def __init__(self, model: nn.Module):
        self.model = model

    def check(self, plan: Plan) -> None:
        """Raise `UnsupportedModelError` for a reducer this adapter cannot serve."""
        for r in plan.reducers:
            if r.stage not in self.stages:
                raise UnsupportedModelError(
                    f"{r.name} runs at the {r.stage} stage, which the {type(self).__name__} for "
                    f"{type(self.model).__name__} does not support yet (supported: "
                    f"{', '.join(sorted(str(s) for s in self.stages))})"
                )

    @abc.abstractmethod
    def install(self, handle: Handle) -> None:
        """Put hooks/patches on the model instance; all state goes on `self` or `handle`."""

    @abc.abstractmethod
    def remove(self) -> None:
        """Undo everything `install` did."""

    def llm_dims(self) -> TransformerDims | None:
        return None

    def vision_dims(self) -> tuple[TransformerDims, int] | None:
        """Widths of the vision tower and its tokens per image, if known."""
        return None


class PlaceholderAdapter(Adapter):
    """Shared machinery for VLMs with expanded placeholder ids and `mm_encoder_outputs` (see module doc).

    Subclasses implement `visual_inputs` (pop the visual inputs and say how each image expands into
    placeholders), `tower` and `project`, and may override `placeholder_ids`, `pack` and `language_model`.
    """

    def check(self, plan: Plan) -> None:
        super().check(plan)
        for r in plan.reducers:
            if any(p.kind == "cls" for p in r.probes()) and not self.has_cls():
                raise UnsupportedModelError(
                    f"{r.name} scores tokens by the vision tower's CLS attention, and the vision tower of "
                    f"{type(self.model).__name__} has no CLS token"
                )

    stages = frozenset({Stage.ENCODER, Stage.VISUAL, Stage.PREFILL, Stage.DECODE})

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self._handle: Handle | None = None
        self._hooks: list[Any] = []
        self._in_generate = False
        self._call: CallReport | None = None
        self._prefill_start: float | None = None
        self._engine = None

    # -- to implement per family -------------------------------------------------------------
    @abc.abstractmethod
    def visual_inputs(self, kwargs: dict[str, Any]) -> VisualInputs | None:
        """Pop the visual inputs (pixel values and their options) from `kwargs`; None if there are none."""

    @abc.abstractmethod
    def tower(self) -> VisionTower:
        """The vision tower, described for the core's layer-by-layer runner (see `tokenreduce.encoder`)."""

    @abc.abstractmethod
    def project(self, features: Tensor) -> Tensor:
        """Map vision features (..., Dv) into the LLM's embedding space (..., D)."""

    def has_cls(self) -> bool:
        return self.tower().prefix > 0

    def tower_tokens(self, vis: VisualInputs, batch: list[VisualTokens]) -> list[VisualTokens]:
        """The tokens as the vision tower produces them, per sample. Default: the same grids the LLM's
        placeholders hold. Adapters that pool after the tower (LLaVA-OneVision video) return the finer grid."""
        return batch

    def finish_tokens(
        self, vis: VisualInputs, run: TowerRun, batch: list[VisualTokens]
    ) -> list[VisualTokens]:
        """Tower features -> LLM-space tokens matching the placeholders (`batch`: the LLM-level tokens).

        Default: project every surviving token. Adapters that pool or that feed tower-computed extra
        tokens (a frame's CLS) override this, and may set `extra_features` on `vis.layouts`.
        """
        flat = self.project(torch.cat([v.features for v in run.batch]))
        return [v.with_features(f) for v, f in zip(run.batch, flat.split([len(v) for v in run.batch]))]

    def placeholder_ids(self) -> Tensor:
        return torch.tensor([self.model.config.image_token_id])

    def pack(self, features: list[Tensor]) -> dict[str, Any]:
        """`mm_encoder_outputs` for the model from the final features of every sample, in prompt order."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return {"image": BaseModelOutputWithPooling(pooler_output=tuple(features))}

    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    # -- install / remove --------------------------------------------------------------------
    def install(self, handle: Handle) -> None:
        self._handle = handle
        model = self.model
        for name in ("forward", "generate"):
            if name in model.__dict__:
                raise RuntimeError(
                    f"{type(model).__name__}.{name} is already patched on this instance "
                    "(is another plan attached? detach it first)"
                )
        engine = None
        plan = handle.plan
        if plan.at(Stage.PREFILL) or plan.at(Stage.DECODE):  # built first: it validates the plan on this model
            from .llm import PrefillEngine

            engine = PrefillEngine(self.language_model(), plan.at(Stage.PREFILL), plan.at(Stage.DECODE))
        orig_forward, orig_generate = model.forward, model.generate

        @functools.wraps(orig_forward)
        def forward(*args, **kwargs):
            return self._forward(orig_forward, *args, **kwargs)

        @functools.wraps(orig_generate)
        def generate(*args, **kwargs):
            return self._generate(orig_generate, *args, **kwargs)

        self._sig_forward = inspect.signature(orig_forward)
        self._sig_generate = inspect.signature(orig_generate)
        model.forward = forward
        model.generate = generate
        lm = self.language_model()
        if engine is not None:
            engine.install()  # before the timing hooks, so its record is ready when they run
            self._engine = engine
        self._hooks.append(lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True))
        self._hooks.append(lm.register_forward_hook(self._lm_post, with_kwargs=True))

    def remove(self) -> None:
        for name in ("forward", "generate"):
            self.model.__dict__.pop(name, None)
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if getattr(self, "_engine", None) is not None:
            self._engine.remove()
            self._engine = None
        self._handle = None

    # -- timing of the LLM prefill -------------------------------------------------------------
    def _lm_pre(self, module, args, kwargs):
        if self._call is not None and "prefill" not in self._call.times:
            self._handle._sync()
            self._prefill_start = time.perf_counter()

    def _lm_post(self, module, args, kwargs, output):
        if self._call is not None and self._prefill_start is not None:
            self._handle._sync()
            self._call.times["prefill"] = time.perf_counter() - self._prefill_start
            self._prefill_start = None
            if self._engine is not None and self._engine.last is not None:
                self._record_llm(self._call, self._engine.last)

    def _record_llm(self, call: CallReport, rec) -> None:
        """Tokens per decoder layer, KV cache sizes and the in-LLM reducers' time, from the engine's record."""
        call.llm_visual = rec.visual_per_layer
        call.llm_tokens = rec.tokens_per_layer
        call.kv_tokens = rec.kv_tokens
        call.times["reduce:prefill"] = rec.select_s
        if rec.cut_layers:
            call.times["reduce:decode"] = rec.cut_s
        if call.positions is not None:  # forward's logits cover the tokens that left the last layer
            fp = rec.final_positions
            call.positions = torch.where(fp >= 0, call.positions.gather(1, fp.clamp(min=0)), -1)
        dims = self.llm_dims()
        if dims is not None:
            per_sample = list(zip(*rec.tokens_per_layer))
            call.flops["llm_prefill"] = sum(dims.forward_flops(list(n)) for n in per_sample)

    # -- the wrapped entry points ----------------------------------------------------------------
    def _forward(self, orig, *args, **kwargs):
        if self._in_generate:
            return orig(*args, **kwargs)
        bound = self._sig_forward.bind_partial(*args, **kwargs)
        kw = dict(bound.arguments)
        kw.update(kw.pop("kwargs", {}))
        if not self._has_visual(kw) or _cache_len(kw.get("past_key_values")) > 0:
            return orig(*args, **kwargs)
        _no_position_ids(kw)
        prep = self._prepare(kw, "forward")
        kw.update(prep)
        if kw.get("labels") is not None:
            if self._engine is not None:
                raise InputError("labels cannot be combined with in-LLM (PREFILL) reduction: the loss would "
                                 "cover a shorter sequence than the labels")
            kw["labels"] = self._map_labels(kw["labels"], self._call.positions, self._visual_mask)
        if "position_ids" not in prep and bool((kw["attention_mask"] == 0).any()):
            kw["position_ids"] = _mask_positions(kw["attention_mask"])
        try:
            return orig(**kw)
        finally:
            self._call = None
            if self._engine is not None:
                self._engine.disarm()

    def _generate(self, orig, *args, **kwargs):
        bound = self._sig_generate.bind_partial(*args, **kwargs)
        kw = dict(bound.arguments)
        kw.update(kw.pop("kwargs", {}))
        if "inputs" in kw and "input_ids" not in kw:
            kw["input_ids"] = kw.pop("inputs")
        if not self._has_visual(kw):
            return orig(*args, **kwargs)
        _no_position_ids(kw)
        caller_ids = kw["input_ids"]
        prep = self._prepare(kw, "generate")
        kw.update(prep)
        new_len = kw["input_ids"].shape[1]
        self._in_generate = True
        try:
            out = orig(**kw)
        finally:
            self._in_generate = False
            self._call = None
            if self._engine is not None:
                self._engine.disarm()
        return _splice(out, caller_ids, new_len)

    def run_unreduced(self, **kwargs):
        """Run the model's own forward without the plan (for scorers that ask the model itself)."""
        # the wrapped forward passes straight through, and the prefill timing hooks stay out of it
        self._in_generate, call, self._call = True, self._call, None
        try:
            with torch.no_grad():
                return self.model(**kwargs)
        finally:
            self._in_generate, self._call = False, call

    def frame_inputs(self, tokenizer, pixels: Tensor, prompts: list[str]) -> dict[str, Any]:
        """Model inputs asking `prompts[i]` about the single image/frame `pixels[i]` (3, S, S)."""
        raise UnsupportedModelError(f"{type(self).__name__} cannot build single-frame inputs")

    def _has_visual(self, kw: dict[str, Any]) -> bool:
        return any(kw.get(k) is not None for k in ("pixel_values", "pixel_values_videos", "mm_encoder_outputs"))

    # -- the core of it: encode, reduce, repack ---------------------------------------------------
    def _prepare(self, kw: dict[str, Any], kind: str) -> dict[str, Any]:
        handle = self._handle
        input_ids = kw.get("input_ids")
        if input_ids is None:
            raise InputError(
                "visual-token reduction needs input_ids with the processor's placeholder tokens "
                "(inputs_embeds alone cannot be reduced)"
            )
        if kw.get("inputs_embeds") is not None:
            raise InputError("pass input_ids or inputs_embeds, not both, when a plan is attached")
        if kw.pop("mm_encoder_outputs", None) is not None:
            raise InputError(
                "mm_encoder_outputs cannot be reduced: tokenreduce encodes the images itself; pass pixel_values"
            )
        mask = kw.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(input_ids)
        vis = self.visual_inputs(kw)
        assert vis is not None
        call = CallReport(kind=kind, batch_size=input_ids.shape[0])
        self._call = call
        llm_batch, owners, contexts = self._original_tokens(input_ids, mask, vis)
        call.stages.append(("input", [int((v.position >= 0).sum()) for v in llm_batch]))

        # the vision tower, layer by layer, with the ENCODER reducers and every reducer's probes
        probes = list({p.name: p for r in handle.plan.reducers for p in r.probes()}.values())
        enc = [r for r in handle.plan.at(Stage.ENCODER) if isinstance(r, EncoderReducer)]
        with torch.no_grad():
            run = run_tower(self.tower(), vis.pixel_values, self.tower_tokens(vis, llm_batch), enc, probes,
                            contexts, handle._sync)
            t0 = time.perf_counter()
            batch = self.finish_tokens(vis, run, llm_batch)
            handle._sync()
        call.times["vision"] = run.seconds + time.perf_counter() - t0
        call.times.update(run.times)
        call.stages.extend(run.stages)
        extras = [self._extras(vis, own) for own in owners]
        # tokens without a placeholder (anyres padding) never reach the LLM
        batch = [v if bool((v.position >= 0).all()) else v.select(torch.nonzero(v.position >= 0).flatten())
                 for v in batch]
        batch = handle._run_stage(Stage.VISUAL, batch, contexts, call)

        # tokens (and the extra tokens they keep alive) in prompt order, then the shorter sequences
        runs_keep, feats = [], []
        for v, (ex_pos, ex_owner, ex_feat) in zip(batch, extras):
            pos, f = v.position, v.features
            if ex_pos.numel():
                alive = torch.unique(ex_owner[_original_index(v)])
                alive = alive[alive >= 0]
                pos = torch.cat([pos, ex_pos[alive]])
                f = torch.cat([f, ex_feat[alive].to(f.dtype)])
            order = torch.argsort(pos, stable=True)
            runs_keep.append(pos[order])
            feats.append(f[order])
        batch = [v.select(torch.argsort(v.position, stable=True)) for v in batch]
        placeholders = torch.isin(input_ids, self.placeholder_ids().to(input_ids.device))
        keep = []
        for b in range(input_ids.shape[0]):
            slots = mask[b].bool() & ~placeholders[b]
            slots[runs_keep[b]] = True
            keep.append(torch.nonzero(slots).flatten())
        pad = self.model.config.get_text_config().pad_token_id
        ids, new_mask, positions = repack(input_ids, mask, keep, 0 if pad is None else int(pad))
        self._visual_mask = torch.isin(ids, self.placeholder_ids().to(ids.device)) & new_mask.bool()
        call.seq_in = mask.sum(1).tolist()
        call.seq_llm = new_mask.sum(1).tolist()
        call.llm_shape = tuple(ids.shape)
        call.positions = positions
        call.visual = batch
        call.extra_tokens = [int(r.numel()) - len(v) for r, v in zip(runs_keep, batch)]
        call.vision_layers = run.layers_run
        self._estimate_flops(call)
        if self._engine is not None:
            protected = torch.zeros_like(self._visual_mask)
            for b, v in enumerate(batch):
                key = v.scores.get("key")
                if key is not None:
                    protected[b] = torch.isin(positions[b], v.position[key > 0]) & self._visual_mask[b]
            self._engine.arm(self._visual_mask, protected, contexts)
        handle.report.calls.append(call)
        out = {"input_ids": ids, "attention_mask": new_mask, "mm_encoder_outputs": self.pack(feats)}
        if handle.keep_positions:  # each slot's rank among the caller's real tokens; padding slots get 0
            rank = _mask_positions(mask)
            out["position_ids"] = torch.where(positions >= 0, rank.gather(1, positions.clamp(min=0)), 0)
        return out

    def _original_tokens(
        self, input_ids: Tensor, mask: Tensor, vis: VisualInputs
    ) -> tuple[list[VisualTokens], list[tuple[list[int], Tensor, Tensor]], list[Context]]:
        """Every grid token of every sample (features empty), where its extra tokens go, and the contexts.

        Images are matched to samples in prompt order by their placeholder counts. Returns per sample:
        the `VisualTokens`; (its layouts' indices, extra-token positions (E,), the extra token each
        original token keeps alive (T,), -1 for none); and its `Context`.
        """
        runs = placeholder_runs(input_ids, mask, self.placeholder_ids().to(input_ids.device))
        lengths = [lay.length for lay in vis.layouts]
        batch, owners, contexts, img = [], [], [], 0
        device = input_ids.device
        for b, sample_runs in enumerate(runs):
            n_ph = sum(r.numel() for r in sample_runs)
            start, acc = img, 0
            while acc < n_ph and img < len(lengths):
                acc += lengths[img]
                img += 1
            pieces = split_runs(sample_runs, lengths[start:img], b)
            if not pieces:
                raise InputError(f"sample {b} has no visual placeholder tokens; every sample needs an image")
            feats, grids, items, pos, ex_pos, ex_owner = [], [], [], [], [], []
            n_extra = 0
            for j, (lay, piece) in enumerate(zip(vis.layouts[start:img], pieces)):
                slots = lay.slots.to(device)
                pos.append(torch.where(slots >= 0, piece[slots.clamp(min=0)], -1))
                grids += lay.grids
                items += [dataclasses.replace(it, image=j) for it in lay.items]
                feats += [torch.zeros(h * w, 0) for h, w in lay.grids]
                if lay.extra_slots is not None and lay.extra_slots.numel():
                    ex_pos.append(piece[lay.extra_slots.to(device)])
                    owner = lay.extra_owner.to(device)
                    ex_owner.append(torch.where(owner >= 0, owner + n_extra, -1))
                    n_extra += lay.extra_slots.numel()
                else:
                    ex_owner.append(torch.full((slots.numel(),), -1, dtype=torch.long, device=device))
            batch.append(VisualTokens.from_items(feats, grids, torch.cat(pos), items))
            empty = torch.zeros(0, dtype=torch.long, device=device)
            owners.append((list(range(start, img)), torch.cat(ex_pos) if ex_pos else empty, torch.cat(ex_owner)))
            text = mask[b].bool().clone()
            text[torch.cat(sample_runs)] = False
            tok = self._handle.tokenizer if self._handle is not None else None
            items = sum(vis.layouts[i].num_tower_items for i in range(start, img))
            first = sum(lay.num_tower_items for lay in vis.layouts[:start])
            contexts.append(Context(
                sample=b, batch_size=len(runs), query_ids=input_ids[b, text], model=self.model,
                pixels=vis.pixel_values[first:first + items], adapter=self,
                text=None if tok is None else tok.decode(input_ids[b, text], skip_special_tokens=True),
            ))
        if img != len(lengths):
            raise InputError(
                f"{len(lengths)} images were given but the prompts' placeholders account for {img}; "
                "let the model's processor expand the image token"
            )
        return batch, owners, contexts

    @staticmethod
    def _extras(vis: VisualInputs, owner: tuple[list[int], Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(positions (E,), owner per original token (T,), features (E, D)) of one sample's extra tokens."""
        layouts, pos, own = owner
        feats = [vis.layouts[i].extra_features for i in layouts
                 if vis.layouts[i].extra_slots is not None and vis.layouts[i].extra_slots.numel()]
        if any(f is None for f in feats):
            raise RuntimeError("an extra token has no features: the adapter must set ImageLayout.extra_features")
        return pos, own, torch.cat(feats) if feats else torch.zeros(0, 0)

    def _estimate_flops(self, call: CallReport) -> None:
        dims = self.llm_dims()
        if dims is not None:
            call.flops["llm_prefill"] = sum(dims.forward_flops(n) for n in call.seq_llm)
            call.flops["llm_prefill_full"] = sum(dims.forward_flops(n) for n in call.seq_in)
        vis = self.vision_dims()
        if vis is not None:
            vdims, per_image = vis
            n_items = sum(v.num_items for v in call.visual)
            per_layer = vdims.forward_flops(per_image) / vdims.layers
            call.flops["vision"] = n_items * per_layer * call.vision_layers

    @staticmethod
    def _map_labels(labels: Tensor, positions: Tensor, visual: Tensor) -> Tensor:
        out = labels.gather(1, positions.clamp(min=0))
        return out.masked_fill((positions < 0) | visual, -100)


def _original_index(v: VisualTokens) -> Tensor:
    """(N,) index of each token's representative among the sample's original tokens (raster, item by item)."""
    sizes = torch.tensor([h * w for h, w in v.grids], device=v.item.device)
    offsets = torch.cumsum(sizes, 0) - sizes
    widths = torch.tensor([w for _, w in v.grids], device=v.item.device)
    return offsets[v.item] + v.row * widths[v.item] + v.col


def _mask_positions(mask: Tensor) -> Tensor:
    """(B, L) attention mask -> (B, L) long position ids: each slot's rank among the real tokens (padding: 0)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _no_position_ids(kw: dict[str, Any]) -> None:
    if kw.get("position_ids") is not None:
        raise InputError(
            "position_ids cannot be combined with visual-token reduction: the reduced sequence's positions are "
            "set by the plan (consecutive, or the full prompt's with attach(..., keep_positions=True)); "
            "leave position_ids=None"
        )


def _cache_len(cache) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return 0


def _splice(out, caller_ids: Tensor, new_len: int):
    """Replace the reduced prompt at the start of generated sequences by the caller's own ids."""
    seqs = out if isinstance(out, Tensor) else out.sequences
    rep = seqs.shape[0] // caller_ids.shape[0]
    prompt = caller_ids.repeat_interleave(rep, dim=0) if rep > 1 else caller_ids
    new = torch.cat([prompt.to(seqs.device), seqs[:, new_len:]], dim=1)
    if isinstance(out, Tensor):
        return new
    out.sequences = new
    return out
