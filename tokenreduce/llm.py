"""Physical token removal inside the decoder: hidden states, positions, mask and KV cache shrink for real.

`PrefillEngine` hooks one decoder stack (a `LlamaModel`/`Qwen2Model`-style module with `.layers` and
`.config`) and, for a call it was armed for, lets PREFILL reducers drop visual tokens after chosen layers
and DECODE reducers cut the KV cache once after prefill. Nothing is patched: forward hooks on the given
module instance and its layers only, removed by `remove()`.

    engine = PrefillEngine(model.model.language_model, plan.at(Stage.PREFILL), plan.at(Stage.DECODE))
    engine.install()
    engine.arm(visual=visual_mask)            # (B, L) bool over the sequence the next prefill receives
    out = model.generate(**inputs)            # stock call; prefill reduced, decode consistent
    engine.last.visual_per_layer              # what happened (see `EngineRecord`)
    engine.remove()

Interface for reducers:

- `PrefillReducer.acts_after(num_layers) -> list[int]`: layers after which it acts; a drop after layer l
  applies from layer l + 1 on (layer l itself and its KV cache saw the longer sequence).
- `PrefillReducer.wants_attention(layer, num_layers) -> bool`: capture q/k at that layer (attention rows are then
  available lazily through `LayerView.attention`).
- `PrefillReducer.select(view, contexts) -> (B, L) bool keep`: must keep every valid non-visual token and every
  protected token (checked; a `PlanError` names the reducer otherwise). Several reducers at one layer run in
  plan order on the same view and their keeps are AND-ed.
- `DecodeReducer.cut(state) -> {layer: (B, K_layer) bool keep}` over the cache entries of that layer, given a
  `CacheState`; run once, right after prefill; same guarantees.

Semantics:

- Kept tokens keep their ORIGINAL positions (gathered cos/sin and position ids); a dropped token stays dropped in
  all later layers; each layer's KV cache holds exactly the tokens that entered that layer.
- After a drop every sample's kept tokens are packed to the right in their original order (left padding),
  so the last position stays the last token; ragged kept counts are padded and masked.
- Decoding continues from the original length: `generate` derives new positions from the full-length 2-D mask
  (unchanged), and when the call gives no positions the engine supplies `original length + step`.

How masks are handled: the decoder stack builds one full-length mask per call; a forward pre-hook on every
decoder layer swaps in the mask, cos/sin and position ids of the layout that layer runs on. In prefill, the
gathered versions are built once per drop event and reused by the following layers (sdpa: `None` (causal)
when no sample has padding, else a bool mask; eager: an additive float mask). In decode (only for calls that
pass the very cache object this engine pruned), each layer whose cache is not the original full layout gets
a mask over its own cache entries plus the new tokens, built once per step per distinct layout; layers before
the first drop keep the model's own mask (unless the decode cut shortened layer 0, whose length the model
sizes its mask and default positions by: then every layer gets an engine mask and the engine gives positions).
A padding slot attends to itself only, so no softmax row is empty.

Host syncs: one per call at the start of prefill, one per layer where a reducer acts (to learn the new length
and check the keep rule), one after the decode cut; none on other layers or in decode steps.

Limitations: `sdpa` and `eager` attention only; `DynamicCache` with full-attention layers only (static,
sliding-window and quantized caches raise `UnsupportedModelError`); a prefill must start from an empty cache;
`arm()` describes the batch before `generate` expands it for `num_return_sequences`/beams (each sample's rows are
then identical copies with identical layouts, so beam search may reorder rows within a sample); reordering rows
across samples of a reduced cache is not supported; `generate(use_cache=False)` reduces only its first forward.
"""

from __future__ import annotations

import contextlib
import inspect
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from .attention import QKCapture, attention_probs, rotate_half
from .errors import InputError, PlanError, UnsupportedModelError
from .hooks import Hook
from .plan import Reducer, Stage

if TYPE_CHECKING:
    from .pipeline import StageRunner

SUPPORTED_ATTENTION = ("sdpa", "eager")


# --------------------------------------------------------------------------------------------------------------
# What reducers see


@dataclass
class LayerView:
    """What a PREFILL reducer sees right after decoder layer `layer` ran (the whole batch).

    B = batch, L = current (possibly already reduced) sequence length, D = hidden width.

    Attributes:
        layer: index of the layer that just ran; num_layers: depth of the decoder.
        hidden: (B, L, D) that layer's output.
        positions: (B, L) long, slot of each current token in the LLM input sequence the engine was armed for
            (-1 = padding). Kept tokens also keep their original RoPE positions.
        visual: (B, L) bool, visual token. protected: (B, L) bool, visual tokens marked never-drop.
        valid: (B, L) bool, not padding.
        n_visual0: (B,) long, visual tokens each sample had at the LLM input.
        after_visual: (B, L) bool, valid non-visual tokens after the sample's last visual token of the LLM
            input (the question and answer prefix; MustDrop's text queries).
        max_after: the largest number of `after_visual` tokens in a sample (a Python int).
    """

    layer: int
    num_layers: int
    hidden: Tensor
    positions: Tensor
    visual: Tensor
    protected: Tensor
    valid: Tensor
    n_visual0: Tensor
    after_visual: Tensor
    max_after: int
    probs_fn: Callable[[Tensor | None, float], Tensor] | None = field(default=None, repr=False)

    def attention(self, rows: Tensor | None = None, temperature: float = 1.0) -> Tensor:
        """Attention probabilities of this layer, recomputed in fp32 from captured q/k (any implementation).

        Args:
            rows: (B, R) long, query positions in the current sequence (per sample); None = all L rows.
            temperature: softmax(Z / temperature) with Z = q k^T * scale + mask (AIM uses 0.1).

        Returns:
            (B, H, R, L) fp32: causal, padding keys masked, RoPE and GQA applied; rows sum to 1 (a padding
            row attends to itself only).
        """
        if self.probs_fn is None:
            raise RuntimeError(
                f"no attention was captured at layer {self.layer}: the reducer's wants_attention({self.layer}, "
                f"{self.num_layers}) returned False"
            )
        return self.probs_fn(rows, temperature)

    @staticmethod
    def rows_of(mask: Tensor, count: int) -> tuple[Tensor, Tensor]:
        """The first `count` True positions of each row of `mask` (B, L), in order, padded.

        Returns:
            rows: (B, count) long indices; ok: (B, count) bool, False where a sample has fewer True positions.
        """
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :count]
        return order, mask.gather(1, order)


@dataclass
class CacheState:
    """What a DECODE reducer sees right after prefill. K_l = cache length of layer l (padded).

    Attributes:
        num_layers: depth of the decoder.
        positions: per layer, (B, K_l) long slot in the LLM input of each cache entry (-1 = padding).
        visual, protected, valid: per layer, (B, K_l) bool flags of the cache entries.
        final: (B, L0) bool over the LLM input slots: the tokens that survived the last prefill drop.
        prefill_layers: layers after which the plan's PREFILL reducers act (sorted).
        drop_layers: layers after which tokens were actually dropped in this call.
        contexts: what `arm()` was given.
    """

    num_layers: int
    positions: list[Tensor]
    visual: list[Tensor]
    protected: list[Tensor]
    valid: list[Tensor]
    final: Tensor
    prefill_layers: list[int]
    drop_layers: list[int]
    contexts: Any = None

    def survivors(self, layer: int) -> Tensor:
        """(B, K_layer) bool: cache entries of `layer` that survived the final prefill stage."""
        pos = self.positions[layer]
        return self.final.gather(1, pos.clamp(min=0)) & self.valid[layer]


@dataclass
class PrefillReducer(Reducer):
    """A reducer acting inside the decoder during prefill (stage PREFILL); see the module docstring."""

    stage: ClassVar[Stage] = Stage.PREFILL

    def acts_after(self, num_layers: int) -> list[int]:
        """Layers after which this reducer acts (a drop after layer l applies from layer l + 1)."""
        raise NotImplementedError(f"{type(self).__name__} must say after which decoder layers it acts (acts_after)")

    def wants_attention(self, layer: int, num_layers: int) -> bool:
        """Whether `select` at `layer` reads `view.attention` (q/k are captured only then)."""
        return True

    def select(self, view: LayerView, contexts: Any) -> Tensor:
        """(B, L) bool keep over the current tokens."""
        raise NotImplementedError(f"{type(self).__name__} must implement select")


@dataclass
class DecodeReducer(Reducer):
    """A reducer that cuts the KV cache once, right after prefill (stage DECODE)."""

    stage: ClassVar[Stage] = Stage.DECODE

    def cut(self, state: CacheState) -> dict[int, Tensor]:
        """Per layer index: (B, K_layer) bool keep over that layer's cache entries (absent layers: untouched)."""
        raise NotImplementedError


@dataclass
class EngineRecord:
    """What one armed call did (the engine's `last`). Counts are real tensor contents, per sample.

    Attributes:
        batch_size, num_layers: of the call.
        visual_per_layer: [layer][sample] visual tokens entering each layer during prefill.
        tokens_per_layer: [layer][sample] tokens (not padding) entering each layer during prefill.
        kv_length: per layer, the length of that layer's cache tensors after prefill and the decode cut
            (padded length of the batch; equals the real tensor shape when a cache was used).
        kv_tokens: [layer][sample] real (non-padding) entries in each layer's cache.
        positions: per layer, (B, K) long slot in the LLM input of each cache entry (-1 = padding).
        final_positions: (B, L_out) long, slot of each position of the prefill output (-1 = padding);
            `forward` returns logits for these positions.
        drop_layers: layers after which tokens were dropped; cut_layers: layers the decode cut shrank.
        select_s: seconds spent in the reducers' `select` (attention rows included); cut_s: in the decode cut.
    """

    batch_size: int
    num_layers: int
    visual_per_layer: list[list[int]]
    tokens_per_layer: list[list[int]]
    kv_length: list[int]
    kv_tokens: list[list[int]]
    positions: list[Tensor]
    final_positions: Tensor
    drop_layers: list[int] = field(default_factory=list)
    cut_layers: list[int] = field(default_factory=list)
    select_s: float = 0.0
    cut_s: float = 0.0

    @property
    def visual_layer_average(self) -> list[float]:
        """Per sample, the visual tokens averaged over layers (the count MustDrop and AIM papers report)."""
        return [sum(col) / self.num_layers for col in zip(*self.visual_per_layer)]


# --------------------------------------------------------------------------------------------------------------
# Internals


class _Layout:
    """One arrangement of the sequence: which LLM input slot sits in which row (all tensors (B, K))."""

    def __init__(self, index: Tensor, valid: Tensor, visual: Tensor, protected: Tensor, after: Tensor,
                 counts: list[int], vis_counts: list[int], stock: bool = False):
        self.index, self.valid, self.visual, self.protected, self.after = index, valid, visual, protected, after
        self.counts, self.vis_counts = counts, vis_counts
        self.stock = stock  # the model's own, unreduced arrangement
        self.has_pad = min(counts) < index.shape[1]
        self.cos: Tensor | None = None
        self.sin: Tensor | None = None
        self.pos_ids: Tensor | None = None
        self.mask: Tensor | None = None  # prefill mask of this layout (None under sdpa without padding)

    def select(self, order: Tensor, keep: Tensor, counts: list[int], vis_counts: list[int]) -> _Layout:
        """The layout of rows `order` (B, K') of this one; `keep` (B, K) marks the rows that stay valid."""
        valid = keep.gather(1, order)
        return _Layout(
            self.index.gather(1, order).masked_fill(~valid, -1),
            valid,
            self.visual.gather(1, order) & valid,
            self.protected.gather(1, order) & valid,
            self.after.gather(1, order) & valid,
            counts,
            vis_counts,
        )


def pack_order(keep: Tensor, length: int) -> Tensor:
    """(B, length) row indices that pack each sample's kept rows to the right, in order (left padding).

    `keep` is (B, K) bool with at most `length` True per row; padding rows point at dropped rows.
    """
    order = torch.argsort(keep.to(torch.int8), dim=1, stable=True)
    return order[:, keep.shape[1] - length:]


def take_seq(t: Tensor, index: Tensor, seq_dim: int) -> Tensor:
    """Gather dimension `seq_dim` of `t` at `index` (B, K); the dimension before it is the batch (1 or B)."""
    seq_dim %= t.dim()
    b, k = index.shape
    shape = list(t.shape)
    shape[seq_dim - 1] = b
    t = t.expand(shape)
    view = [1] * t.dim()
    view[seq_dim - 1], view[seq_dim] = b, k
    shape[seq_dim] = k
    return t.gather(seq_dim, index.clamp(min=0).view(view).expand(shape))


def layout_mask(key_valid: Tensor, q: int, impl: str, dtype: torch.dtype) -> Tensor:
    """(B, 1, q, K) mask for `q` queries that are the last `q` of `K` keys: causal, invalid keys masked.

    A query also always sees its own key, so a padding row is never empty. sdpa: bool (True = attend);
    eager: additive float of `dtype` (0 or the dtype's minimum), as transformers builds them.
    """
    k = key_valid.shape[1]
    kpos = torch.arange(k, device=key_valid.device)
    qpos = torch.arange(k - q, k, device=key_valid.device)
    allowed = (kpos[None, :] <= qpos[:, None])[None] & key_valid[:, None, :]
    allowed = (allowed | (kpos[None, :] == qpos[:, None])[None])[:, None]
    if impl == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


class _Attention:
    """Lazy fp32 attention probabilities of one layer from captured pre-RoPE q (B, H, L, d) and k (B, H_kv, L, d)."""

    def __init__(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, valid: Tensor, scaling: float):
        self.q, self.k, self.cos, self.sin, self.valid, self.scaling = q, k, cos, sin, valid, scaling
        self._rotated: tuple[Tensor, Tensor] | None = None

    def __call__(self, rows: Tensor | None, temperature: float) -> Tensor:
        if self._rotated is None:
            cos, sin = self.cos.float().unsqueeze(1), self.sin.float().unsqueeze(1)
            q, k = self.q.float(), self.k.float()
            self._rotated = (q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin)
        q, k = self._rotated
        b, h, length, d = q.shape
        kpos = torch.arange(length, device=q.device)
        if rows is None:
            qpos = kpos.expand(b, length)
        else:
            qpos = rows.to(device=q.device, dtype=torch.long)
            q = q.gather(2, qpos[:, None, :, None].expand(b, h, qpos.shape[1], d))
        allowed = (kpos <= qpos[..., None]) & self.valid[:, None, :] | (kpos == qpos[..., None])
        mask = torch.zeros(allowed.shape, device=q.device).masked_fill_(~allowed, float("-inf"))
        return attention_probs(q, k, self.scaling / temperature, mask=mask[:, None])


@dataclass
class _Armed:
    visual: Tensor
    protected: Tensor
    contexts: Any
    runner: StageRunner | None = None


class _Prefill:
    """State of one armed prefill call."""

    def __init__(self, layout: _Layout, n_visual0: Tensor, max_after: int, impl: str, contexts: Any, n: int,
                 runner: StageRunner | None = None):
        self.runner = runner
        self.layout = layout
        self.length0 = layout.index.shape[1]
        self.n_visual0 = n_visual0
        self.max_after = max_after
        self.impl = impl
        self.contexts = contexts
        self.started = False
        self.full: tuple[Tensor, Tensor, Tensor | None] | None = None
        self.cache: Any = None
        self.layer_layouts: list[_Layout | None] = [None] * n
        self.capture: QKCapture | None = None
        self.drops: list[int] = []
        self.select_s = 0.0


class _Track:
    """Decode-time bookkeeping for the one cache object this engine reduced."""

    def __init__(self, cache: Any, layouts: list[_Layout], total: int, impl: str, stock_mask_ok: bool):
        self.cache = weakref.ref(cache)
        self.layouts = layouts
        self.total = total  # original tokens so far (input length + decoded tokens)
        self.impl = impl
        self.stock_mask_ok = stock_mask_ok  # layer 0 holds the full sequence, so the model's own mask fits it


class _Step:
    def __init__(self, track: _Track, new_valid: Tensor, q: int, mask_free: bool):
        self.track, self.new_valid, self.q, self.mask_free = track, new_valid, q, mask_free
        self.masks: dict[int, Tensor | None] = {}


# --------------------------------------------------------------------------------------------------------------
# The engine


class PrefillEngine:
    """Physical in-LLM token removal for one decoder stack; see the module docstring.

    Args:
        language_model: the decoder stack (has `.layers`, `.config`; decoder layers are called with keyword
            `position_embeddings`, `attention_mask`, `past_key_values`), e.g. `LlamaModel`, `Qwen2Model`.
        prefill: PREFILL reducers in plan order.
        decode: DECODE reducers in plan order.
    """

    def __init__(self, language_model: nn.Module, prefill: Sequence[Reducer] = (), decode: Sequence[Reducer] = ()):
        layers = getattr(language_model, "layers", None)
        if not isinstance(layers, nn.ModuleList) or not hasattr(language_model, "config"):
            raise UnsupportedModelError(
                f"PrefillEngine needs a decoder stack with .layers and .config, got {type(language_model).__name__}"
            )
        config = language_model.config
        types = getattr(config, "layer_types", None) or []
        if any(t != "full_attention" for t in types) or getattr(config, "use_sliding_window", False):
            raise UnsupportedModelError(
                f"{type(language_model).__name__} uses sliding-window layers; in-LLM token removal supports "
                "full-attention decoders only"
            )
        for r in prefill:
            if not isinstance(r, PrefillReducer):
                raise PlanError(f"{getattr(r, 'name', r)!r} is not a PREFILL reducer (PrefillReducer)")
        for r in decode:
            if not isinstance(r, DecodeReducer):
                raise PlanError(f"{getattr(r, 'name', r)!r} is not a DECODE reducer (DecodeReducer)")
        self.language_model = language_model
        self.layers = layers
        self.num_layers = len(layers)
        self.prefill = list(prefill)
        self.decode = list(decode)
        self._acts: dict[int, list[PrefillReducer]] = {}
        for r in self.prefill:
            for layer in r.acts_after(self.num_layers):
                if not 0 <= layer < self.num_layers - 1:
                    raise PlanError(
                        f"{r.name}: acts after layer {layer}, but the decoder has {self.num_layers} layers "
                        f"(valid: 0..{self.num_layers - 2}; a drop after the last layer saves nothing)"
                    )
                self._acts.setdefault(layer, []).append(r)
        self._capture = {
            layer for layer, rs in self._acts.items() if any(r.wants_attention(layer, self.num_layers) for r in rs)
        }
        self._signature = inspect.signature(language_model.forward)
        self._handles: list[Any] = []
        self._armed: _Armed | None = None
        self._session: _Prefill | None = None
        self._track: _Track | None = None
        self._step: _Step | None = None
        self.last: EngineRecord | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def install(self) -> None:
        """Register the hooks (idempotent)."""
        if self._handles:
            return
        lm = self.language_model
        self._handles.append(lm.register_forward_pre_hook(Hook(self._on_call), with_kwargs=True))
        self._handles.append(lm.register_forward_hook(Hook(self._on_return), with_kwargs=True))
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(Hook(self._layer_pre(i)), with_kwargs=True))
            if i in self._acts:
                self._handles.append(layer.register_forward_hook(Hook(self._layer_post(i))))

    def hook_handles(self) -> list[Any]:
        """The handles of every hook this engine registered (for `hooks.strip_copies`)."""
        return list(self._handles)

    def remove(self) -> None:
        """Remove every hook and forget all state; the model is as if never touched."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._session is not None and self._session.capture is not None:
            self._session.capture.__exit__(None, None, None)
        self._armed = self._session = self._track = self._step = None

    def arm(self, visual: Tensor, protected: Tensor | None = None, contexts: Any = None,
            runner: StageRunner | None = None) -> None:
        """Reduce the next prefill call of the decoder stack.

        Args:
            visual: (B, L) bool, visual tokens of the exact sequence (B, L) the next prefill will receive.
            protected: (B, L) bool, visual tokens no reducer may drop (e.g. MustDrop's key set); default none.
            contexts: passed to every reducer's `select` (and the decode `CacheState`).
            runner: times every reducer's `select`/`cut` into a call report (`pipeline.StageRunner`).
        """
        if not self._handles:
            raise RuntimeError("PrefillEngine.arm() before install()")
        if not isinstance(visual, Tensor) or visual.dim() != 2:
            raise InputError(f"arm(visual=...) must be a (batch, length) bool tensor, got {_describe(visual)}")
        if protected is None:
            protected = torch.zeros_like(visual, dtype=torch.bool)
        elif not isinstance(protected, Tensor) or protected.shape != visual.shape:
            raise InputError(
                f"arm(protected=...) must have the shape of visual {tuple(visual.shape)}, got {_describe(protected)}"
            )
        self._armed = _Armed(visual.bool(), protected.bool() & visual.bool(), contexts, runner)

    def disarm(self) -> None:
        """Forget a pending arm()."""
        self._armed = None

    # -- call-level hooks ------------------------------------------------------------------------------------

    def _on_call(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self._session is not None and self._session.capture is not None:  # a previous call raised midway
            self._session.capture.__exit__(None, None, None)
        self._session = None
        self._step = None
        if self._armed is None and self._track is None:
            return None
        call = self._signature.bind_partial(*args, **kwargs).arguments
        cache = call.get("past_key_values")
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        x = call.get("inputs_embeds")
        if x is None:
            x = call.get("input_ids")
        if x is None:
            return None
        track = self._track
        if track is not None and track.cache() is None:  # the reduced cache is gone
            self._track = track = None
        if track is not None and cache is not None and cache is track.cache():
            return self._start_step(track, call, x, args, kwargs)
        if self._armed is None:
            return None
        if past:
            raise InputError(
                f"PrefillEngine is armed for a prefill, but the call continues a cache of {past} tokens; "
                "in-LLM reduction needs a prefill from an empty cache"
            )
        self._start_prefill(call, x)
        return None

    def _on_return(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        step, self._step = self._step, None
        if step is not None:
            for lay in _distinct(step.track.layouts):
                lay.valid = torch.cat([lay.valid, step.new_valid], dim=1)
            step.track.total += step.q
            return
        s, self._session = self._session, None
        if s is None:
            return
        if s.capture is not None:
            s.capture.__exit__(None, None, None)
        cache = s.cache if s.cache is not None else getattr(output, "past_key_values", None)
        layouts = [lay if lay is not None else s.layout for lay in s.layer_layouts]
        cut_layers: list[int] = []
        cut_s = 0.0
        if self.decode and cache is not None:
            t0 = time.perf_counter()
            cut_layers = self._cut(s, layouts, cache)
            cut_s = time.perf_counter() - t0
        self.last = self._record(s, layouts, cut_layers, cut_s)
        reduced = any(not lay.stock for lay in layouts)
        if cache is not None and reduced:
            self._track = _Track(cache, layouts, total=s.length0, impl=s.impl, stock_mask_ok=layouts[0].stock)
        else:
            self._track = None

    # -- prefill ---------------------------------------------------------------------------------------------

    def _start_prefill(self, call: dict, x: Tensor) -> None:
        armed, self._armed = self._armed, None
        b, length = x.shape[:2]
        b0 = armed.visual.shape[0]
        if b != b0 and b0 and b % b0 == 0 and armed.visual.shape[1] == length:
            # generate expanded every sample into b // b0 identical rows (beams, num_return_sequences), in order
            k = b // b0
            contexts = armed.contexts
            if isinstance(contexts, (list, tuple)) and len(contexts) == b0:
                contexts = [c for c in contexts for _ in range(k)]
            armed = _Armed(armed.visual.repeat_interleave(k, 0), armed.protected.repeat_interleave(k, 0), contexts,
                           armed.runner)
        if tuple(armed.visual.shape) != (b, length):
            raise InputError(
                f"PrefillEngine was armed for a (batch, length) = {tuple(armed.visual.shape)} sequence, "
                f"but the decoder received {(b, length)}"
            )
        impl = self.language_model.config._attn_implementation
        if impl not in SUPPORTED_ATTENTION:
            raise UnsupportedModelError(
                f"in-LLM token removal supports attn_implementation {' or '.join(SUPPORTED_ATTENTION)}, got {impl!r}"
            )
        mask = call.get("attention_mask")
        if mask is not None and (not isinstance(mask, Tensor) or mask.dim() != 2):
            raise InputError(
                f"in-LLM token removal needs a 2-D attention_mask (batch, length), got {_describe(mask)}"
            )
        cache = call.get("past_key_values")
        if cache is not None:
            _check_cache(cache)
        device = x.device
        valid = mask.to(device).bool() if mask is not None else torch.ones(b, length, dtype=torch.bool, device=device)
        visual = armed.visual.to(device) & valid
        protected = armed.protected.to(device) & visual
        slot = torch.arange(length, device=device).expand(b, length)
        last_visual = torch.where(visual, slot, -1).amax(dim=1)
        after = valid & ~visual & (slot > last_visual[:, None])
        counts, vis_counts, after_counts = torch.stack([valid.sum(1), visual.sum(1), after.sum(1)]).tolist()
        layout = _Layout(slot.masked_fill(~valid, -1), valid, visual, protected, after, counts, vis_counts, stock=True)
        self._session = _Prefill(layout, visual.sum(1), max(after_counts), impl, armed.contexts, self.num_layers,
                                 armed.runner)
        self._session.cache = cache

    def _layer_pre(self, i: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if self._session is not None:
                return self._prefill_enter(self._session, i, module, args, kwargs)
            if self._step is not None:
                return self._decode_enter(self._step, i, args, kwargs)
            return None

        return hook

    def _layer_post(self, i: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            s = self._session
            if s is None:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            cap, s.capture = s.capture, None
            try:
                new = self._drop(s, i, hidden, cap)
            except BaseException:
                self._session = None  # the call is abandoned; later calls start clean
                raise
            finally:
                if cap is not None:
                    cap.__exit__(None, None, None)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook

    def _prefill_enter(self, s: _Prefill, i: int, module: nn.Module, args: tuple, kwargs: dict):
        if not s.started:
            s.started = True
            if "position_embeddings" not in kwargs:
                raise UnsupportedModelError(
                    f"{type(module).__name__} is not called with keyword position_embeddings; in-LLM token "
                    "removal needs Llama/Qwen2-style decoder layers"
                )
            cos, sin = kwargs["position_embeddings"]
            s.full = (cos, sin, kwargs.get("position_ids"))
            lay = s.layout
            lay.cos, lay.sin, lay.pos_ids = s.full
            cache = kwargs.get("past_key_values")
            if cache is not None and s.cache is None:
                _check_cache(cache)
                s.cache = cache
        lay = s.layout
        s.layer_layouts[i] = lay
        hidden = args[0] if args else kwargs.get("hidden_states")
        if hidden is not None and hidden.shape[1] != lay.index.shape[1]:
            raise RuntimeError(
                f"layer {i} received {hidden.shape[1]} tokens but the engine expected {lay.index.shape[1]}; "
                "the decoder loop must feed each layer the previous layer's output"
            )
        if i in self._capture:
            s.capture = QKCapture({i: module.self_attn}).__enter__()
        if lay.stock:
            return None
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = lay.mask
        kwargs["position_embeddings"] = (lay.cos, lay.sin)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = lay.pos_ids
        return args, kwargs

    def _drop(self, s: _Prefill, i: int, hidden: Tensor, cap: QKCapture | None) -> Tensor | None:
        lay = s.layout
        probs = None
        if cap is not None and i in cap.q:
            probs = _Attention(cap.q[i], cap.k[i], lay.cos, lay.sin, lay.valid, cap.scaling(i))
        view = LayerView(
            layer=i, num_layers=self.num_layers, hidden=hidden, positions=lay.index, visual=lay.visual,
            protected=lay.protected, valid=lay.valid, n_visual0=s.n_visual0, after_visual=lay.after,
            max_after=s.max_after, probs_fn=probs,
        )
        reducers = self._acts[i]
        t0 = time.perf_counter()
        with torch.no_grad():
            keeps = []
            for r in reducers:
                with _timed(s.runner, r):
                    k = r.select(view, s.contexts)
                if not isinstance(k, Tensor) or k.shape != lay.valid.shape:
                    raise PlanError(
                        f"{r.name}: select() must return a (batch, length) = {tuple(lay.valid.shape)} bool "
                        f"tensor, got {_describe(k)}"
                    )
                keeps.append(k.to(device=lay.valid.device, dtype=torch.bool))
            keep = lay.valid.clone()
            for k in keeps:
                keep &= k
            must = lay.valid & (~lay.visual | lay.protected)
            bad = torch.stack([(must & ~k).any(1) for k in keeps]).long().flatten()
            host = torch.cat([keep.sum(1), (keep & lay.visual).sum(1), bad]).tolist()
        s.select_s += time.perf_counter() - t0
        b = keep.shape[0]
        counts, vis_counts, bad_flags = host[:b], host[b: 2 * b], host[2 * b:]
        for j, flag in enumerate(bad_flags):
            if flag:
                raise PlanError(
                    f"{reducers[j // b].name}: dropped a text or protected token of sample {j % b} after layer {i}; "
                    "a PREFILL reducer must keep every non-visual token and every protected token"
                )
        if counts == lay.counts:
            return None
        if min(counts) == 0:
            raise PlanError(f"after layer {i}, sample {counts.index(0)} would keep no token at all")
        s.drops.append(i)
        length = max(counts)
        order = pack_order(keep, length)
        new = lay.select(order, keep, counts, vis_counts)
        cos, sin, pos = s.full
        new.cos, new.sin = take_seq(cos, new.index, -2), take_seq(sin, new.index, -2)
        new.pos_ids = take_seq(pos, new.index, -1) if pos is not None else None
        if s.impl == "eager" or new.has_pad:
            new.mask = layout_mask(new.valid, length, s.impl, hidden.dtype)
        s.layout = new
        return hidden.gather(1, order[..., None].expand(-1, -1, hidden.shape[-1]))

    # -- decode cut ------------------------------------------------------------------------------------------

    def _cut(self, s: _Prefill, layouts: list[_Layout], cache: Any) -> list[int]:
        b, length0 = s.layout.index.shape[0], s.length0
        final = s.layout
        slots = final.index.masked_fill(~final.valid, length0)
        final_mask = torch.zeros(b, length0 + 1, dtype=torch.bool, device=slots.device)
        final_mask.scatter_(1, slots, True)
        state = CacheState(
            num_layers=self.num_layers,
            positions=[lay.index for lay in layouts],
            visual=[lay.visual for lay in layouts],
            protected=[lay.protected for lay in layouts],
            valid=[lay.valid for lay in layouts],
            final=final_mask[:, :length0],
            prefill_layers=sorted(self._acts),
            drop_layers=list(s.drops),
            contexts=s.contexts,
        )
        cuts: dict[int, Tensor] = {}
        owner: dict[int, str] = {}
        with torch.no_grad():
            for r in self.decode:
                with _timed(s.runner, r):
                    cut = r.cut(state)
                for layer, k in cut.items():
                    if not 0 <= layer < self.num_layers:
                        raise PlanError(f"{r.name}: cut layer {layer} is outside 0..{self.num_layers - 1}")
                    lay = layouts[layer]
                    if not isinstance(k, Tensor) or k.shape != lay.valid.shape:
                        raise PlanError(
                            f"{r.name}: cut()[{layer}] must be a {tuple(lay.valid.shape)} bool tensor, "
                            f"got {_describe(k)}"
                        )
                    k = k.to(device=lay.valid.device, dtype=torch.bool)
                    cuts[layer] = cuts[layer] & k if layer in cuts else k & lay.valid
                    owner[layer] = r.name
            if not cuts:
                return []
            order_layers = sorted(cuts)
            parts = []
            for layer in order_layers:
                lay, k = layouts[layer], cuts[layer]
                must = lay.valid & (~lay.visual | lay.protected)
                parts += [k.sum(1), (k & lay.visual).sum(1), (must & ~k).any(1).long()]
            host = torch.cat(parts).tolist()
        done: list[int] = []
        made: list[_Layout] = [s.layout]
        for n, layer in enumerate(order_layers):
            chunk = host[3 * b * n: 3 * b * (n + 1)]
            counts, vis_counts, bad = chunk[:b], chunk[b: 2 * b], chunk[2 * b:]
            if any(bad):
                raise PlanError(
                    f"{owner[layer]}: cut a text or protected token from the cache of layer {layer} "
                    f"(sample {bad.index(1)}); a DECODE reducer must keep them"
                )
            lay = layouts[layer]
            if counts == lay.counts:
                continue
            if min(counts) == 0:
                raise PlanError(f"{owner[layer]}: the cache of layer {layer} would keep no entry for a sample")
            length = max(counts)
            order = pack_order(cuts[layer], length)
            entry = cache.layers[layer]
            if entry.keys is None or entry.keys.shape[-2] != lay.index.shape[1]:
                raise RuntimeError(f"the KV cache of layer {layer} does not hold the prefill tokens")
            idx = order[:, None, :, None]
            entry.keys = entry.keys.gather(2, idx.expand(-1, entry.keys.shape[1], -1, entry.keys.shape[3]))
            entry.values = entry.values.gather(2, idx.expand(-1, entry.values.shape[1], -1, entry.values.shape[3]))
            new = lay.select(order, cuts[layer], counts, vis_counts)
            for other in made:  # share layouts with identical contents: one decode mask per distinct layout
                if other.index.shape == new.index.shape and torch.equal(other.index, new.index):
                    new = other
                    break
            else:
                made.append(new)
            layouts[layer] = new
            done.append(layer)
        return done

    # -- decode steps ----------------------------------------------------------------------------------------

    def _start_step(self, track: _Track, call: dict, x: Tensor, args: tuple, kwargs: dict):
        q = x.shape[1]
        b = track.layouts[0].valid.shape[0]
        if x.shape[0] != b:
            raise InputError(
                f"the reduced KV cache holds {b} samples but the call has {x.shape[0]} (reordering or expanding "
                "the batch of a reduced cache is not supported)"
            )
        mask = call.get("attention_mask")
        if mask is None:
            new_valid = torch.ones(b, q, dtype=torch.bool, device=x.device)
        elif isinstance(mask, Tensor) and mask.dim() == 2 and mask.shape[1] == track.total + q:
            new_valid = mask[:, -q:].to(device=x.device, dtype=torch.bool)
        else:
            raise InputError(
                f"decoding from a reduced KV cache needs a 2-D attention_mask over the original sequence "
                f"({track.total} + {q} columns), got {_describe(mask)}"
            )
        self._step = _Step(track, new_valid, q, mask_free=mask is None)
        if call.get("position_ids") is None and not track.stock_mask_ok:
            # the model would count positions from layer 0's (cut) cache length: give the original ones
            positions = (torch.arange(q, device=x.device) + track.total)[None]
            names = list(self._signature.parameters)[: len(args)]
            if "position_ids" in names:
                args = tuple(positions if n == "position_ids" else a for n, a in zip(names, args))
            else:
                kwargs = {**kwargs, "position_ids": positions}
            return args, kwargs
        return None

    def _decode_enter(self, st: _Step, i: int, args: tuple, kwargs: dict):
        tr = st.track
        lay = tr.layouts[i]
        if lay.stock and tr.stock_mask_ok:
            return None
        cache = tr.cache()
        if cache is not None and cache.layers[i].get_seq_length() != lay.valid.shape[1]:
            raise RuntimeError(
                f"the KV cache of layer {i} holds {cache.layers[i].get_seq_length()} entries, the engine expected "
                f"{lay.valid.shape[1]}: the reduced cache was changed outside the engine"
            )
        key = id(lay)
        if key not in st.masks:
            if tr.impl == "sdpa" and st.q == 1 and st.mask_free and not lay.has_pad:
                st.masks[key] = None
            else:
                hidden = args[0] if args else kwargs["hidden_states"]
                key_valid = torch.cat([lay.valid, st.new_valid], dim=1)
                st.masks[key] = layout_mask(key_valid, st.q, tr.impl, hidden.dtype)
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = st.masks[key]
        return args, kwargs

    # -- record ----------------------------------------------------------------------------------------------

    def _record(self, s: _Prefill, layouts: list[_Layout], cut_layers: list[int], cut_s: float) -> EngineRecord:
        entered = [lay if lay is not None else s.layout for lay in s.layer_layouts]
        return EngineRecord(
            batch_size=s.layout.index.shape[0],
            num_layers=self.num_layers,
            visual_per_layer=[list(lay.vis_counts) for lay in entered],
            tokens_per_layer=[list(lay.counts) for lay in entered],
            kv_length=[lay.index.shape[1] for lay in layouts],
            kv_tokens=[list(lay.counts) for lay in layouts],
            positions=[lay.index for lay in layouts],
            final_positions=s.layout.index,
            drop_layers=list(s.drops),
            cut_layers=cut_layers,
            select_s=s.select_s,
            cut_s=cut_s,
        )


def _timed(runner: StageRunner | None, reducer: Reducer) -> Any:
    """The runner's timer for `reducer` (its "reduce:<name>" time), or nothing when the engine runs alone."""
    if runner is None:
        return contextlib.nullcontext()
    return runner.timed(f"reduce:{reducer.name}")


def _distinct(layouts: list[_Layout]) -> list[_Layout]:
    seen: dict[int, _Layout] = {}
    for lay in layouts:
        seen.setdefault(id(lay), lay)
    return list(seen.values())


def _check_cache(cache: Any) -> None:
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if not isinstance(cache, DynamicCache) or any(type(layer) is not DynamicLayer for layer in cache.layers):
        kinds = sorted({type(layer).__name__ for layer in getattr(cache, "layers", [])})
        raise UnsupportedModelError(
            f"in-LLM token removal needs a DynamicCache of full-attention layers, got {type(cache).__name__}"
            + (f" with {', '.join(kinds)}" if kinds else "")
        )


def _describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return repr(x) if x is None else type(x).__name__
