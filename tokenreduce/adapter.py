"""The adapter contract, and the shared machinery for placeholder-style VLMs.

An adapter knows one model family (where its vision features come from, which ids are placeholders)
and nothing of any reducer. `PlaceholderAdapter` serves every Hugging Face VLM whose processor expands
an image into one placeholder id per visual token and whose `forward` accepts `mm_encoder_outputs`
(LLaVA-1.5, LLaVA-NeXT, Video-LLaVA, LLaVA-OneVision, ...): it encodes the images, hands the projected
tokens to the plan's VISUAL reducers, and feeds the model a genuinely shorter sequence (placeholders,
attention mask and positions rebuilt), for `forward` and `generate`.
"""

from __future__ import annotations

import abc
import functools
import inspect
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .errors import InputError, UnsupportedModelError
from .flops import TransformerDims
from .plan import Context, Plan, Stage
from .report import CallReport
from .sequence import placeholder_runs, repack, split_runs
from .tokens import VisualTokens

if TYPE_CHECKING:
    from .attach import Handle


@dataclass
class Encoded:
    """Projected visual features of every image in a call, in the order of the prompt's placeholders.

    Attributes:
        features: one (n_i, D) tensor per image (flattened over the batch).
        grids: (h, w) per image with h*w == n_i.
        seconds: time the encoder took.
    """

    features: list[Tensor]
    grids: list[tuple[int, int]]
    seconds: float = 0.0


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

    Subclasses implement `encode` (pop the visual inputs from the kwargs and return their projected
    features) and may override `placeholder_ids`, `pack` and `language_model`.
    """

    stages = frozenset({Stage.VISUAL})
    #: keyword arguments of forward/generate that carry visual inputs (popped by `encode`)
    visual_keys: tuple[str, ...] = ("pixel_values", "image_sizes", "mm_encoder_outputs")

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self._handle: Handle | None = None
        self._hooks: list[Any] = []
        self._in_generate = False
        self._call: CallReport | None = None
        self._prefill_start: float | None = None

    # -- to implement per family -------------------------------------------------------------
    @abc.abstractmethod
    def encode(self, kwargs: dict[str, Any]) -> Encoded | None:
        """Pop the visual inputs from `kwargs`; return their projected features (None if there are none)."""

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
        self._hooks.append(lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True))
        self._hooks.append(lm.register_forward_hook(self._lm_post, with_kwargs=True))

    def remove(self) -> None:
        for name in ("forward", "generate"):
            self.model.__dict__.pop(name, None)
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
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

    # -- the wrapped entry points ----------------------------------------------------------------
    def _forward(self, orig, *args, **kwargs):
        if self._in_generate:
            return orig(*args, **kwargs)
        bound = self._sig_forward.bind_partial(*args, **kwargs)
        kw = dict(bound.arguments)
        kw.update(kw.pop("kwargs", {}))
        if not self._has_visual(kw) or _cache_len(kw.get("past_key_values")) > 0:
            return orig(*args, **kwargs)
        if kw.get("position_ids") is not None:
            raise InputError(
                "position_ids cannot be combined with visual-token reduction: the reduced sequence gets "
                "its own consecutive positions; leave position_ids=None"
            )
        prep = self._prepare(kw, "forward")
        kw.update(prep)
        if kw.get("labels") is not None:
            kw["labels"] = self._map_labels(kw["labels"], self._call.positions, self._visual_mask)
        if bool((kw["attention_mask"] == 0).any()):
            kw["position_ids"] = (kw["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
        try:
            return orig(**kw)
        finally:
            self._call = None

    def _generate(self, orig, *args, **kwargs):
        bound = self._sig_generate.bind_partial(*args, **kwargs)
        kw = dict(bound.arguments)
        kw.update(kw.pop("kwargs", {}))
        if "inputs" in kw and "input_ids" not in kw:
            kw["input_ids"] = kw.pop("inputs")
        if not self._has_visual(kw):
            return orig(*args, **kwargs)
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
        return _splice(out, caller_ids, new_len)

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
        mask = kw.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(input_ids)
        enc = self.encode(kw)
        assert enc is not None
        call = CallReport(kind=kind, batch_size=input_ids.shape[0])
        self._call = call
        call.times["vision"] = enc.seconds

        # which images belong to which sample: cut each sample's placeholder runs by image size
        runs = placeholder_runs(input_ids, mask, self.placeholder_ids().to(input_ids.device))
        sizes = [f.shape[0] for f in enc.features]
        batch, contexts, img = [], [], 0
        for b, sample_runs in enumerate(runs):
            n_ph = sum(r.numel() for r in sample_runs)
            start, acc = img, 0
            while acc < n_ph and img < len(sizes):
                acc += sizes[img]
                img += 1
            pieces = split_runs(sample_runs, sizes[start:img], b)
            if not pieces:
                raise InputError(f"sample {b} has no visual placeholder tokens; every sample needs an image")
            vt = VisualTokens.from_items(enc.features[start:img], enc.grids[start:img], torch.cat(pieces))
            text = mask[b].bool().clone()
            text[vt.position] = False
            batch.append(vt)
            contexts.append(
                Context(sample=b, batch_size=len(runs), query_ids=input_ids[b, text], model=self.model)
            )
        if img != len(sizes):
            raise InputError(
                f"{len(sizes)} images were given but the prompts' placeholders account for {img}; "
                "let the model's processor expand the image token"
            )
        call.stages.append(("input", [len(v) for v in batch]))
        batch = handle._run_stage(Stage.VISUAL, batch, contexts, call)

        # tokens in prompt order, then the shorter sequences
        batch = [v.select(torch.argsort(v.position, stable=True)) for v in batch]
        keep = []
        for b, v in enumerate(batch):
            slots = mask[b].bool().clone()
            slots[torch.cat(runs[b])] = False  # drop every placeholder ...
            slots[v.position] = True  # ... and put back one per surviving token
            keep.append(torch.nonzero(slots).flatten())
        pad = self.model.config.get_text_config().pad_token_id
        ids, new_mask, positions = repack(input_ids, mask, keep, 0 if pad is None else int(pad))
        self._visual_mask = torch.isin(ids, self.placeholder_ids().to(ids.device)) & new_mask.bool()
        call.seq_in = mask.sum(1).tolist()
        call.seq_llm = new_mask.sum(1).tolist()
        call.llm_shape = tuple(ids.shape)
        call.positions = positions
        call.visual = batch
        self._estimate_flops(call)
        handle.report.calls.append(call)
        mm = self.pack([v.features for v in batch])
        return {"input_ids": ids, "attention_mask": new_mask, "mm_encoder_outputs": mm}

    def _estimate_flops(self, call: CallReport) -> None:
        dims = self.llm_dims()
        if dims is not None:
            call.flops["llm_prefill"] = sum(dims.forward_flops(n) for n in call.seq_llm)
            call.flops["llm_prefill_full"] = sum(dims.forward_flops(n) for n in call.seq_in)
        vis = self.vision_dims()
        if vis is not None:
            vdims, per_image = vis
            n_items = sum(v.num_items for v in call.visual)
            call.flops["vision"] = n_items * vdims.forward_flops(per_image)

    @staticmethod
    def _map_labels(labels: Tensor, positions: Tensor, visual: Tensor) -> Tensor:
        out = labels.gather(1, positions.clamp(min=0))
        return out.masked_fill((positions < 0) | visual, -100)


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
