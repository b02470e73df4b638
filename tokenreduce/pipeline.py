"""The per-call flow of an attached plan: encode -> stages -> repack -> arm the LLM -> splice.

`Pipeline` is what `tr.attach` installs on one model instance. It wraps the instance's `forward` and
`generate` (nothing global), and for every call that carries visual inputs it:

1. asks the adapter (a stateless description of the model family) for the call's `VisualInputs`: every
   image or video as an `ImageLayout` (items, grids, which placeholder each token fills, extra tokens);
2. builds each sample's original `VisualTokens` and `Context` (facts and services for reducers);
3. runs the vision tower layer by layer (`encoder.run_tower`) with the ENCODER reducers and every reducer's
   probes, and lets the adapter project (and pool) the result;
4. runs the VISUAL reducers (one `StageRunner` times and counts every stage: VISUAL here, ENCODER inside the
   tower, PREFILL/DECODE inside the LLM engine);
5. repacks a genuinely shorter sequence (placeholders, mask, per-token inputs such as Qwen2-VL's
   `mm_token_type_ids`, positions: the adapter's own position scheme, or consecutive / kept 1-D ids);
6. arms the in-LLM engine (`tokenreduce.llm`) for PREFILL/DECODE reducers, runs the model, and splices the
   caller's own prompt back in front of what `generate` returns.

The report (`report.CallReport`) is filled here: token counts per stage, real sequence lengths, FLOPs and
times.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .encoder import EncoderReducer, run_tower
from .errors import InputError, UnsupportedModelError
from .hooks import Hook, strip_copies
from .plan import Context, Plan, Reducer, Stage
from .report import CallReport, Report
from .sequence import placeholder_runs, repack, split_runs
from .tokens import VisualTokens

if TYPE_CHECKING:
    from .adapter import Adapter, VisualInputs

#: one lock for every check-and-patch, so two threads attaching to one model cannot both succeed
_ATTACH_LOCK = threading.Lock()
_PATCHED = ("forward", "generate", "__deepcopy__")


@dataclass
class Options:
    """How a pipeline runs (the `attach` options).

    Attributes:
        sync_timing: synchronise CUDA around timed stages (accurate times, slower).
        tokenizer: for reducers that read the prompt's text or ask the model (QuoTA's scorer).
        keep_positions: tokens that enter the LLM keep their full-prompt 1-D position ids (see `attach`).
    """

    sync_timing: bool = False
    tokenizer: Any = None
    keep_positions: bool = False


class StageRunner:
    """Times reducers and records what they leave, into one `CallReport` (or a private record).

    The one place where reducers are run and accounted for: the VISUAL loop (`run_stage`), the vision tower
    (`encoder.run_tower`) and the LLM engine (`llm.PrefillEngine`) all go through `timed`, `check` and
    `record`. Times add up under "reduce:<label>"; sub-steps a reducer puts in `Context.times` (e.g.
    "score:quota") are moved into the report after each reducer.
    """

    def __init__(self, call: CallReport | None = None, sync: Callable[[], None] | None = None):
        self.call = call if call is not None else CallReport(kind="standalone", batch_size=0)
        self._sync = sync
        self._reduce_s = 0.0

    def sync(self) -> None:
        if self._sync is not None:
            self._sync()

    @contextlib.contextmanager
    def timed(self, key: str, contexts: Sequence[Context] = ()) -> Iterator[None]:
        """Add the wall time of the block to `times[key]`, and the contexts' sub-step times to theirs."""
        self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            dt = time.perf_counter() - t0
            times = self.call.times
            times[key] = times.get(key, 0.0) + dt
            if key.startswith("reduce:"):
                self._reduce_s += dt
            for c in contexts:
                for k, v in c.times.items():
                    times[k] = times.get(k, 0.0) + v
                c.times.clear()

    def reduce_seconds(self) -> float:
        """Seconds spent in reducers so far (everything timed under "reduce:...")."""
        return self._reduce_s

    def label(self, reducer: Reducer) -> str:
        """A stage label for a new run of `reducer`: its name, or name#n when it already ran in this call."""
        name = reducer.name
        n = sum(1 for s, _ in self.call.stages if s == name or s.startswith(name + "#"))
        return f"{name}#{n + 1}" if n else name

    def record(self, label: str, counts: list[int], repeat: bool = True) -> None:
        """Append (label, visual tokens per sample); with repeat=False an identical last entry is not repeated."""
        if repeat or (label, counts) not in self.call.stages[-1:]:
            self.call.stages.append((label, counts))

    @staticmethod
    def check(reducer: Reducer, out: Any, batch: Sequence[Any]) -> None:
        if not isinstance(out, (list, tuple)) or len(out) != len(batch):
            n = len(out) if isinstance(out, (list, tuple)) else type(out).__name__
            raise RuntimeError(f"{reducer.name} returned {n} samples for a batch of {len(batch)}")

    def run_stage(
        self, reducers: Sequence[Reducer], batch: list[VisualTokens], contexts: list[Context]
    ) -> list[VisualTokens]:
        """Run `reducers` (one stage, plan order) on the batch, recording counts and times."""
        for r in reducers:
            label = self.label(r)
            with self.timed(f"reduce:{label}", contexts):
                out = r.reduce(batch, contexts)
            self.check(r, out, batch)
            batch = list(out)
            self.record(label, [len(v) for v in batch])
        return batch


class _Entry:
    """The wrapped `forward`/`generate` of one model instance (an object, so a deep copy can drop it)."""

    def __init__(self, run: Callable[..., Any], orig: Callable[..., Any]):
        self._run, self._orig = run, orig
        functools.update_wrapper(self, orig)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(self._orig, *args, **kwargs)


class _Services:
    """`Context` services of one pipeline (see `plan.Context`)."""

    def __init__(self, pipeline: Pipeline):
        self._p = pipeline

    def ask(self, inputs: dict[str, Any]) -> Any:
        return self._p.run_unreduced(**inputs)

    def generate(self, prompt: str, max_new_tokens: int) -> str:
        tok = self._p.options.tokenizer
        if tok is None:
            raise UnsupportedModelError("generate() needs the tokenizer: tr.attach(model, plan, tokenizer=...)")
        enc = tok([prompt], return_tensors="pt")
        device = next(self._p.model.parameters()).device
        with self._p.unreduced(), torch.no_grad():
            out = self._p.model.generate(**{k: v.to(device) for k, v in enc.items()}, max_new_tokens=max_new_tokens,
                                         do_sample=False)
        return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    def frame_inputs(self, pixels: Tensor, prompts: list[str]) -> dict[str, Any]:
        tok = self._p.options.tokenizer
        if tok is None:
            raise UnsupportedModelError("frame_inputs() needs the tokenizer: tr.attach(model, plan, tokenizer=...)")
        return self._p.adapter.frame_inputs(tok, pixels, prompts)

    def chat(self, text: str, media: str | None) -> str:
        return self._p.adapter.chat(text, media)


class Pipeline:
    """Runs `plan` on every call of `model` (see the module docstring); `install`/`remove` put it on/off."""

    def __init__(self, model: nn.Module, adapter: Adapter, plan: Plan, report: Report, options: Options):
        self.model, self.adapter, self.plan, self.report, self.options = model, adapter, plan, report, options
        self.engine = None
        if plan.at(Stage.PREFILL) or plan.at(Stage.DECODE):  # built first: it validates the plan on this model
            from .llm import PrefillEngine

            self.engine = PrefillEngine(adapter.language_model(), plan.at(Stage.PREFILL), plan.at(Stage.DECODE))
        self.services = _Services(self)
        self._hooks: list[Any] = []
        self._unreduced = 0  # > 0: calls run without the plan (text-only generate, scorers asking the model)
        self._in_generate = False  # generate's own forward calls run the inputs the pipeline prepared
        self._call: CallReport | None = None  # the call whose LLM prefill is about to run or running
        self._runner: StageRunner | None = None
        self._prefill_start: float | None = None
        self._visual_mask: Tensor | None = None

    # -- install / remove -------------------------------------------------------------------------------------
    def install(self) -> None:
        model = self.model
        with _ATTACH_LOCK:
            for name in ("forward", "generate"):
                if name in model.__dict__:
                    raise RuntimeError(
                        f"{type(model).__name__}.{name} is already patched on this instance "
                        "(is another plan attached? detach it first)"
                    )
            model.forward = _Entry(self._forward, model.forward)
            model.generate = _Entry(self._generate, model.generate)
            model.__deepcopy__ = self._deepcopy
        self._sig_forward = inspect.signature(model.forward)
        self._sig_generate = inspect.signature(model.generate)
        lm = self.adapter.language_model()
        if self.engine is not None:
            self.engine.install()  # before the timing hooks, so its record is ready when they run
        self._hooks.append(lm.register_forward_pre_hook(Hook(self._lm_pre), with_kwargs=True))
        self._hooks.append(lm.register_forward_hook(Hook(self._lm_post), with_kwargs=True))

    def remove(self) -> None:
        for name in _PATCHED:
            self.model.__dict__.pop(name, None)
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self.engine is not None:
            self.engine.remove()
        self._call = self._runner = None

    def _deepcopy(self, memo: dict) -> nn.Module:
        """`copy.deepcopy(model)` while attached: a copy of the model as it was, with no plan on it."""
        d = self.model.__dict__
        saved = {k: d.pop(k) for k in _PATCHED if k in d}
        try:
            new = copy.deepcopy(self.model, memo)
        finally:
            d.update(saved)
        handles = list(self._hooks) + (self.engine.hook_handles() if self.engine is not None else [])
        strip_copies(handles, memo)
        return new

    # -- unreduced runs ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def unreduced(self) -> Iterator[None]:
        """Inside the block the model runs without the plan (timing hooks and engine stay out of it)."""
        self._unreduced += 1
        try:
            yield
        finally:
            self._unreduced -= 1

    def run_unreduced(self, **kwargs: Any) -> Any:
        """The model's own forward on `kwargs`, without the plan (for scorers that ask the model itself)."""
        with self.unreduced(), torch.no_grad():
            return self.model(**kwargs)

    # -- timing of the LLM prefill -----------------------------------------------------------------------------
    def _sync(self) -> None:
        if self.options.sync_timing and torch.cuda.is_available():
            torch.cuda.synchronize()

    def _lm_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._unreduced == 0 and self._call is not None and "prefill" not in self._call.times:
            self._sync()
            self._prefill_start = time.perf_counter()

    def _lm_post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._unreduced == 0 and self._call is not None and self._prefill_start is not None:
            self._sync()
            call = self._call
            call.times["prefill"] = time.perf_counter() - self._prefill_start
            self._prefill_start = None
            if self.engine is not None and self.engine.last is not None:
                self._record_llm(call, self.engine.last)

    def _record_llm(self, call: CallReport, rec: Any) -> None:
        """Tokens per decoder layer and KV cache sizes, from the engine's record (its times went to the runner).

        When generate expanded every sample into k identical rows (beams, num_return_sequences), the record is
        read at each sample's first row, so the report stays per sample."""
        k = max(1, rec.batch_size // max(1, call.batch_size))
        rows = lambda per_layer: [layer[::k] for layer in per_layer]  # noqa: E731
        call.llm_visual = rows(rec.visual_per_layer)
        call.llm_tokens = rows(rec.tokens_per_layer)
        call.kv_tokens = rows(rec.kv_tokens)
        if call.positions is not None:  # forward's logits cover the tokens that left the last layer
            fp = rec.final_positions[::k]
            call.positions = torch.where(fp >= 0, call.positions.gather(1, fp.clamp(min=0)), -1)
        dims = self.adapter.llm_dims()
        if dims is not None:
            per_sample = list(zip(*call.llm_tokens))
            call.flops["llm_prefill"] = sum(dims.forward_flops(list(n)) for n in per_sample)

    # -- the wrapped entry points ------------------------------------------------------------------------------
    def _has_visual(self, kw: dict[str, Any]) -> bool:
        mm = kw.get("mm_encoder_outputs")
        if isinstance(mm, dict) and any(v is not None for v in mm.values()):
            return True
        return any(kw.get(k) is not None for k in self.adapter.visual_keys)

    def _bind(self, sig: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
        kw = dict(sig.bind_partial(*args, **kwargs).arguments)
        kw.update(kw.pop("kwargs", {}))
        return kw

    def _forward(self, orig: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self._unreduced or self._in_generate:
            return orig(*args, **kwargs)
        kw = self._bind(self._sig_forward, args, kwargs)
        if not self._has_visual(kw) or _cache_len(kw.get("past_key_values")) > 0:
            return orig(*args, **kwargs)
        _no_position_ids(kw)
        prep, call = self._prepare(kw, "forward")
        kw.update(prep)
        if kw.get("labels") is not None:
            if self.engine is not None:
                raise InputError("labels cannot be combined with in-LLM (PREFILL) reduction: the loss would "
                                 "cover a shorter sequence than the labels")
            kw["labels"] = _map_labels(kw["labels"], call.positions, self._visual_mask)
        if "position_ids" not in prep and bool((kw["attention_mask"] == 0).any()):
            kw["position_ids"] = mask_positions(kw["attention_mask"])
        try:
            return orig(**kw)
        finally:
            self._end_call()

    def _generate(self, orig: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self._unreduced:
            return orig(*args, **kwargs)
        kw = self._bind(self._sig_generate, args, kwargs)
        if "inputs" in kw and "input_ids" not in kw:
            kw["input_ids"] = kw.pop("inputs")
        if not self._has_visual(kw):  # text only: the model's own generate, every step unreduced
            with self.unreduced():
                return orig(*args, **kwargs)
        _no_position_ids(kw)
        caller_ids = kw["input_ids"]
        prep, _ = self._prepare(kw, "generate")
        kw.update(prep)
        new_len = kw["input_ids"].shape[1]
        try:
            with self._generating():
                out = orig(**kw)
        finally:
            self._end_call()
        return _splice(out, caller_ids, new_len)

    @contextlib.contextmanager
    def _generating(self) -> Iterator[None]:
        """generate's own forward calls run the reduced inputs as they are (the pipeline prepared them)."""
        outer, self._in_generate = self._in_generate, True
        try:
            yield
        finally:
            self._in_generate = outer

    def _end_call(self) -> None:
        self._call = self._runner = None
        self._prefill_start = None
        if self.engine is not None:
            self.engine.disarm()

    # -- the core of it: encode, reduce, repack ----------------------------------------------------------------
    def _prepare(self, kw: dict[str, Any], kind: str) -> tuple[dict[str, Any], CallReport]:
        input_ids = kw.get("input_ids")
        if input_ids is None:
            raise InputError(
                "visual-token reduction needs input_ids with the processor's placeholder tokens "
                "(inputs_embeds alone cannot be reduced)"
            )
        if kw.get("inputs_embeds") is not None:
            raise InputError("pass input_ids or inputs_embeds, not both, when a plan is attached")
        mm = kw.pop("mm_encoder_outputs", None)
        if isinstance(mm, dict) and any(v is not None for v in mm.values()):
            raise InputError(
                "mm_encoder_outputs cannot be reduced: tokenreduce encodes the images itself; pass pixel_values"
            )
        mask = kw.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(input_ids)
        adapter = self.adapter
        vis = adapter.visual_inputs(kw)
        if vis is None:
            raise InputError("the call has no visual inputs the adapter can read")
        call = CallReport(kind=kind, batch_size=input_ids.shape[0])
        runner = StageRunner(call, self._sync)
        self._call, self._runner = call, runner
        llm_batch, owners, contexts = self._original_tokens(input_ids, mask, vis)
        call.stages.append(("input", [int((v.position >= 0).sum()) for v in llm_batch]))

        # the vision tower, layer by layer, with the ENCODER reducers and every reducer's probes
        plan = self.plan
        probes = list({p.name: p for r in plan.reducers for p in r.probes()}.values())
        enc = [r for r in plan.at(Stage.ENCODER) if isinstance(r, EncoderReducer)]
        tower = adapter.tower(vis)
        tower_batch = adapter.tower_tokens(vis, llm_batch)
        with torch.no_grad():
            run = run_tower(tower, vis.pixel_values, tower_batch, enc, probes, contexts, runner)
            t0 = time.perf_counter()
            batch = adapter.finish_tokens(vis, run, llm_batch)
            self._sync()
        call.times["vision"] = run.seconds + time.perf_counter() - t0
        extras = [_extras(vis, own) for own in owners]
        if vis.raw_grids is not None:
            for c, g in zip(contexts, vis.raw_grids):
                c.raw_grids = g
        # tokens without a placeholder (anyres padding) never reach the LLM
        batch = [v if bool((v.position >= 0).all()) else v.select(torch.nonzero(v.position >= 0).flatten())
                 for v in batch]
        batch = runner.run_stage(plan.at(Stage.VISUAL), batch, contexts)

        # tokens (and the extra tokens they keep alive) in prompt order, then the shorter sequences
        runs_keep, feats = [], []
        for v, (ex_pos, ex_owner, ex_feat) in zip(batch, extras):
            pos, f = v.position, v.features
            if ex_pos.numel():
                alive = torch.unique(ex_owner[_original_index(v)])
                orphan = torch.ones(ex_pos.numel(), dtype=torch.bool, device=ex_pos.device)
                orphan[ex_owner[ex_owner >= 0]] = False  # an extra token no grid token owns is always kept
                alive = torch.unique(torch.cat([alive[alive >= 0], torch.nonzero(orphan).flatten()]))
                pos = torch.cat([pos, ex_pos[alive]])
                f = torch.cat([f, ex_feat[alive].to(f.dtype)])
            order = torch.argsort(pos, stable=True)
            runs_keep.append(pos[order])
            feats.append(f[order])
        batch = [v.select(torch.argsort(v.position, stable=True)) for v in batch]
        ph_ids = adapter.placeholder_ids(vis).to(input_ids.device)
        placeholders = torch.isin(input_ids, ph_ids)
        keep = []
        for b in range(input_ids.shape[0]):
            slots = mask[b].bool() & ~placeholders[b]
            slots[runs_keep[b]] = True
            keep.append(torch.nonzero(slots).flatten())
        pad = self.model.config.get_text_config().pad_token_id
        ids, new_mask, positions = repack(input_ids, mask, keep, 0 if pad is None else int(pad))
        self._visual_mask = torch.isin(ids, ph_ids) & new_mask.bool()
        call.seq_in = mask.sum(1).tolist()
        call.seq_llm = new_mask.sum(1).tolist()
        call.llm_shape = tuple(ids.shape)
        call.positions = positions
        call.visual = batch
        call.extra_tokens = [int(r.numel()) - len(v) for r, v in zip(runs_keep, batch)]
        call.vision_layers = run.layers_run
        self._estimate_flops(call, [tower.prefix + h * w for v in tower_batch for h, w in v.grids])
        out: dict[str, Any] = {"input_ids": ids, "attention_mask": new_mask, **adapter.pack(vis, feats)}
        for name in adapter.per_token_inputs:  # inputs shaped like input_ids shorten with it (padding: 0)
            value = kw.get(name)
            if isinstance(value, Tensor) and value.shape == input_ids.shape:
                out[name] = torch.where(positions >= 0, value.gather(1, positions.clamp(min=0)), 0)
        own = adapter.position_ids(vis, {**kw, "input_ids": input_ids, "attention_mask": mask}, positions)
        if own is not None:  # the model's own position scheme (Qwen2-VL's 3-D M-RoPE), selected at the kept slots
            out["position_ids"] = own
        elif self.options.keep_positions:  # each slot's rank among the caller's real tokens; padding slots get 0
            rank = mask_positions(mask)
            out["position_ids"] = torch.where(positions >= 0, rank.gather(1, positions.clamp(min=0)), 0)
        if self.engine is not None:
            protected = torch.zeros_like(self._visual_mask)
            for b, v in enumerate(batch):
                key = v.scores.get("key")
                if key is not None:
                    protected[b] = torch.isin(positions[b], v.position[key > 0]) & self._visual_mask[b]
            self.engine.arm(self._visual_mask, protected, contexts, runner=runner)
        self.report.add(call)
        return out, call

    def visual_tokens(self, inputs: dict[str, Any]) -> list[int]:
        """Visual tokens per sample of `inputs`, as budgets count them (grid tokens the LLM would see; extra
        tokens such as newlines not counted), without running the model."""
        kw = dict(inputs)
        input_ids = kw.get("input_ids")
        if input_ids is None:
            raise InputError("visual_tokens needs input_ids with the processor's placeholder tokens")
        mask = kw.get("attention_mask")
        vis = self.adapter.visual_inputs(kw)
        if vis is None:
            return [0] * input_ids.shape[0]
        batch, _, _ = self._original_tokens(input_ids, torch.ones_like(input_ids) if mask is None else mask, vis)
        return [int((v.position >= 0).sum()) for v in batch]

    def _original_tokens(
        self, input_ids: Tensor, mask: Tensor, vis: VisualInputs
    ) -> tuple[list[VisualTokens], list[tuple[list[int], Tensor, Tensor]], list[Context]]:
        """Every grid token of every sample (features empty), where its extra tokens go, and the contexts.

        Images are matched to samples in prompt order by their placeholder counts. Returns per sample:
        the `VisualTokens`; (its layouts' indices, extra-token positions (E,), the extra token each
        original token keeps alive (T,), -1 for none); and its `Context`.
        """
        runs = placeholder_runs(input_ids, mask, self.adapter.placeholder_ids(vis).to(input_ids.device))
        lengths = [lay.length for lay in vis.layouts]
        batch, owners, contexts, img = [], [], [], 0
        device = input_ids.device
        tok = self.options.tokenizer
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
            contexts.append(Context(
                sample=b, batch_size=len(runs), query_ids=input_ids[b, text], pixels=vis.pixels(start, img),
                text=None if tok is None else tok.decode(input_ids[b, text], skip_special_tokens=True),
                tokenizer=tok, services=self.services,
            ))
        if img != len(lengths):
            raise InputError(
                f"{len(lengths)} images were given but the prompts' placeholders account for {img}; "
                "let the model's processor expand the image token"
            )
        return batch, owners, contexts

    def _estimate_flops(self, call: CallReport, tower_items: list[int]) -> None:
        """LLM prefill FLOPs (reduced and unreduced) and the vision tower's, from `tower_items` (tokens per
        tower input, prefix included) over the layers that ran."""
        dims = self.adapter.llm_dims()
        if dims is not None:
            call.flops["llm_prefill"] = sum(dims.forward_flops(n) for n in call.seq_llm)
            call.flops["llm_prefill_full"] = sum(dims.forward_flops(n) for n in call.seq_in)
        vdims = self.adapter.vision_dims()
        if vdims is not None:
            call.flops["vision"] = sum(vdims.layer_flops(n) for n in tower_items) * call.vision_layers


def _extras(vis: VisualInputs, owner: tuple[list[int], Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(positions (E,), owner per original token (T,), features (E, D)) of one sample's extra tokens."""
    layouts, pos, own = owner
    feats = [vis.layouts[i].extra_features for i in layouts
             if vis.layouts[i].extra_slots is not None and vis.layouts[i].extra_slots.numel()]
    if any(f is None for f in feats):
        raise RuntimeError("an extra token has no features: the adapter must set ImageLayout.extra_features")
    return pos, own, torch.cat(feats) if feats else torch.zeros(0, 0)


def _original_index(v: VisualTokens) -> Tensor:
    """(N,) index of each token's representative among the sample's original tokens (raster, item by item)."""
    sizes = torch.tensor([h * w for h, w in v.grids], device=v.item.device)
    offsets = torch.cumsum(sizes, 0) - sizes
    widths = torch.tensor([w for _, w in v.grids], device=v.item.device)
    return offsets[v.item] + v.row * widths[v.item] + v.col


def _map_labels(labels: Tensor, positions: Tensor, visual: Tensor) -> Tensor:
    out = labels.gather(1, positions.clamp(min=0))
    return out.masked_fill((positions < 0) | visual, -100)


def mask_positions(mask: Tensor) -> Tensor:
    """(B, L) attention mask -> (B, L) long position ids: each slot's rank among the real tokens (padding: 0)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _no_position_ids(kw: dict[str, Any]) -> None:
    if kw.get("position_ids") is not None:
        raise InputError(
            "position_ids cannot be combined with visual-token reduction: the reduced sequence's positions are "
            "set by the plan (consecutive, or the full prompt's with attach(..., keep_positions=True)); "
            "leave position_ids=None"
        )


def _cache_len(cache: Any) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return 0


def _splice(out: Any, caller_ids: Tensor, new_len: int) -> Any:
    """Replace the reduced prompt at the start of generated sequences by the caller's own ids."""
    seqs = out if isinstance(out, Tensor) else out.sequences
    rep = seqs.shape[0] // caller_ids.shape[0]
    prompt = caller_ids.repeat_interleave(rep, dim=0) if rep > 1 else caller_ids
    new = torch.cat([prompt.to(seqs.device), seqs[:, new_len:]], dim=1)
    if isinstance(out, Tensor):
        return new
    out.sequences = new
    return out
