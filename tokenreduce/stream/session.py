"""`StreamingSession`: one video stream over a video LLM, frames encoded once as they arrive, questions at any time.

    import tokenreduce as tr
    from tokenreduce.stream import StreamingSession

    model, processor = tr.load_default("video")
    session = StreamingSession(model, processor, plan="stc-cache+stc-prune", max_tokens=2048)
    session.push(frames)                                   # (T, H, W, 3) uint8 or a list of PIL images
    session.ask("What colour was the star?", options=["red", "blue", "green", "yellow"])   # -> "B)"
    for piece in session.ask_stream("Which shape moved?", options=[...]): print(piece, end="")
    session.stats                                          # frames, visual_tokens, kv_tokens, vision_ms_saved, ...
    session.reset()                                        # a new video

**The loop.** The prompt's text before the video (``prompt``: a benchmark protocol of `tokenreduce.eval.protocols`,
or a template with "<video>" and "{question}") is prefilled once. Every pushed frame goes through the vision tower
(with `stc-cache`: against the stream's own reference frame), the projector and the model's pooling, the plan's
VISUAL reducers (each frame is a sample: `tokens=`/`keep=` budgets are per frame; `stc-prune` keeps its temporal
memory per session), and is appended to the LLM's KV cache in one forward. A question appends the video's
trailing tokens (LLaVA-OneVision's newline) and the text after the video, decodes greedily, and then crops the
cache back to the stream: a question never stays in the stream's cache, and never re-encodes the past.

**Memory.** ``max_tokens`` caps the visual entries of the KV cache (grid tokens plus in-frame extras such as a
frame's CLS; the prompt's text is not counted). Before a frame is appended, entries are evicted to make room:
``evict="oldest"`` drops the oldest entries, ``evict="score"`` the least novel ones by STC's scoring (the pruner's
own scores when the plan has `stc-prune`, else the same scoring run on the kept tokens); an in-frame extra goes
with the last grid token of its frame. So KV memory is bounded however long the stream runs.

**Positions (RoPE).** A kept token takes the next position id (``keep_positions=False``: consecutive, as a shorter
video would have them), or its slot in the full unreduced stream (``keep_positions=True``: as
`tr.apply(..., keep_positions=True)` does offline; pruned tokens leave gaps). Without eviction positions grow with
the stream: an hour at 1 fps is 57,600 positions on the default model, which was trained on sequences of 150 to
1,100 tokens. So with ``rerotate=True`` (the default) eviction closes the gaps: the surviving entries get the
positions a video made of exactly the surviving frames would give them (consecutive; or frame blocks of
`per_frame` slots with ``keep_positions``), and their cached keys are re-rotated in place by the difference,
R(p_new - p_old) R(p_old) k = R(p_new) k, as InfLLM/ReKV (contiguous positions over the assembled context) and
kvpress's key re-rotation do. Positions then never exceed prompt + ``max_tokens`` + question (with
``keep_positions``: + the frames' gaps). Values carry no position and are untouched. Re-rotation needs the
decoder's plain RoPE (checked); ``rerotate=False`` keeps every entry's original position.

**Independence.** All state (KV cache, cacher references, pruner memory, counters) lives on the session; the model
is only read. Sessions over one model in one process, in one thread or several, answer as each would alone. A
session's own calls are serialised by a lock, so a thread may push frames while another asks.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..defaults import frame_array
from ..errors import InputError, PlanError, UnsupportedModelError
from ..plan import Context, Plan, Stage
from ..tokens import ItemInfo, VisualTokens
from .cacher import CacherState, STCCache
from .model import FrameTokens, StreamModel
from .pruner import PrunerMemory, STCPrune, frame_novelty

EVICTIONS = ("oldest", "score")
_END = object()


def rotate_keys(keys: Tensor, delta: Tensor, inv_freq: Tensor) -> Tensor:
    """Rotate cached RoPE keys (B, H, N, d) by `delta` (N,) positions each: R(delta) applied to the first
    2 * len(inv_freq) channels (half-split convention, as Llama/Qwen2 rotate)."""
    r = 2 * inv_freq.numel()
    ang = delta.to(torch.float64)[:, None] * inv_freq.to(torch.float64)[None]  # (N, r/2), exact for big deltas
    emb = torch.cat([ang, ang], -1)
    cos, sin = emb.cos().to(keys.dtype), emb.sin().to(keys.dtype)
    k = keys[..., :r]
    half = r // 2
    rot = torch.cat([-k[..., half:], k[..., :half]], -1)
    out = keys.clone()
    out[..., :r] = k * cos + rot * sin
    return out


class StreamingSession:
    """One video stream over a video LLM and a plan (see the module doc).

    Args:
        model: a video LLM with a tokenreduce video adapter (LLaVA-OneVision, Video-LLaVA, LLaVA-NeXT-Video).
        processor: the processor from `tr.load_default("video")`, or any object with a `tokenizer`, or a tokenizer.
        plan: a plan string or `Plan`: `stc-cache` (ENCODER) and any query-agnostic VISUAL reducers, e.g.
            "stc-cache+stc-prune(keep=0.25)"; "none" for none.
        max_tokens: cap on the visual KV entries of the stream (None: unbounded).
        fps: the stream's frame rate (frames pushed per second of video), for `stats["seconds"]`.
        prompt: a protocol of `tokenreduce.eval.protocols` ("mlvu", "mlvu-lmms", "videomme": the benchmark's
            multiple-choice prompt when `ask` gets options) or a template holding "<video>" and "{question}".
        evict: "oldest" or "score" (see the module doc).
        keep_positions: kept tokens keep their slots of the full stream as position ids (also when the plan
            string ends in "@positions").
        rerotate: on eviction, move the surviving keys to closed-up positions (see the module doc).
        history: per-frame records kept in `history` (the most recent ones).
    """

    def __init__(self, model: nn.Module, processor: Any = None, plan: Plan | str = "none", *,
                 max_tokens: int | None = None, fps: float = 1.0, prompt: str = "mlvu", evict: str = "oldest",
                 keep_positions: bool = False, rerotate: bool = True, history: int = 4096):
        from ..eval.protocols import PROTOCOLS

        self.plan = Plan.parse(plan) if isinstance(plan, str) else plan
        if not isinstance(self.plan, Plan):
            raise PlanError(f"plan must be a plan string or a tr.Plan, got {type(plan).__name__}")
        self._check_plan()
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                       or max_tokens < 1):
            raise InputError(f"max_tokens must be a positive integer or None, got {max_tokens!r}")
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
            raise InputError(f"fps must be a positive number, got {fps!r}")
        if evict not in EVICTIONS:
            raise InputError(f"evict must be one of {', '.join(EVICTIONS)}, got {evict!r}")
        if not isinstance(prompt, str) or (prompt not in PROTOCOLS and not (
                prompt.count("<video>") == 1 and "{question}" in prompt.split("<video>")[1])):
            raise InputError(f"prompt must be one of {', '.join(PROTOCOLS)} or a template with '<video>' once and "
                             f"'{{question}}' after it, got {prompt!r}")
        tokenizer = getattr(processor, "tokenizer", processor)
        if tokenizer is None or not callable(tokenizer):
            raise InputError("a StreamingSession needs the model's processor or tokenizer")
        self.model = model
        self.tokenizer = tokenizer
        self.sm = StreamModel(model)
        self.max_tokens = max_tokens
        self.fps = float(fps)
        self.prompt = prompt
        self.evict = evict
        self.keep_positions = bool(keep_positions) or self.plan.keep_positions  # or the plan's "@positions"
        self.rerotate = bool(rerotate)
        self._inv_freq = self.sm.rope() if self.rerotate else None
        self._cacher = next((r for r in self.plan.reducers if isinstance(r, STCCache)), None)
        self._visual = self.plan.at(Stage.VISUAL)
        eos = {tokenizer.eos_token_id}
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
        self._eos = {int(e) for e in eos if e is not None}
        self._lock = threading.RLock()
        self.history: collections.deque[dict[str, Any]] = collections.deque(maxlen=history)
        self.reset()

    # -- set-up --------------------------------------------------------------------------------------------------
    def _check_plan(self) -> None:
        for r in self.plan.reducers:
            if r.stage == Stage.ENCODER and not isinstance(r, STCCache):
                raise UnsupportedModelError(
                    f"{r.name}: in a stream only stc-cache runs inside the vision tower (frames are encoded one "
                    "at a time as they arrive)"
                )
            if r.stage in (Stage.FRAMES, Stage.PREFILL, Stage.DECODE):
                raise UnsupportedModelError(
                    f"{r.name} runs at the {r.stage} stage; a stream supports stc-cache and query-agnostic VISUAL "
                    "reducers (frames are appended to the KV cache before any question exists)"
                )
            if getattr(r, "query_aware", False):
                raise UnsupportedModelError(
                    f"{r.name} needs the question before it reduces the frames; in a stream frames are reduced as "
                    "they arrive, before any question"
                )

    def _split(self, text: str) -> tuple[str, str]:
        before, _, after = text.partition("<video>")
        return before, after

    def _prefix_text(self) -> str:
        from ..eval.protocols import PROTOCOLS, build_prompt

        if self.prompt in PROTOCOLS:
            return self._split(build_prompt(self.prompt, "?", ["a", "b"], "video"))[0]
        return self._split(self.prompt)[0]

    @torch.no_grad()
    def reset(self) -> None:
        """Start a new video: empty KV cache (the prompt's text before the video prefilled), fresh cacher
        references and pruner memory, counters at zero."""
        from transformers import DynamicCache

        with self._lock:
            self.cache = DynamicCache()
            ids = self.tokenizer(self._prefix_text(), add_special_tokens=True, return_tensors="pt")["input_ids"][0]
            self._prefix_len = int(ids.numel())
            if self._prefix_len:
                self._forward(self.sm.embed(ids), torch.arange(self._prefix_len))
            self._next_pos = self._prefix_len
            empty = torch.zeros(0, dtype=torch.long)
            self._frame, self._slot, self._pos = empty, empty.clone(), empty.clone()
            self._extra = torch.zeros(0, dtype=torch.bool)
            self._score = torch.zeros(0)
            self._cacher_state = CacherState()
            self._memories = {id(r): r.new_memory() for r in self._visual if isinstance(r, STCPrune)}
            self._scorer = PrunerMemory()
            self._frames = 0
            self._full_tower_ms: collections.deque[float] = collections.deque(maxlen=16)
            self.history.clear()
            self.last_kept: dict[str, Any] | None = None
            self.last_answer_ids: list[int] = []  # the token ids of the last answer
            self._stats: dict[str, Any] = dict(
                frames=0, seconds=0.0, arrived_tokens=0, kept_tokens=0, evicted_tokens=0, vision_ms=0.0,
                tower_ms=0.0, vision_ms_saved=0.0, reference_frames=0, llm_ms=0.0, last_frame_ms=None,
                answers=0, last_answer=None, last_answer_ms=None, last_ttft_ms=None,
            )

    # -- the LLM ------------------------------------------------------------------------------------------------
    def _forward(self, embeds: Tensor, positions: Tensor) -> Tensor:
        """Append embeds (L, D) at `positions` (L,) to the cache; the last hidden state (D,)."""
        out = self.sm.lm(inputs_embeds=embeds[None], position_ids=positions[None], past_key_values=self.cache,
                         use_cache=True)
        return out.last_hidden_state[0, -1]

    def _cache_len(self) -> int:
        return int(self.cache.get_seq_length())

    def _truncate(self, length: int) -> None:
        for layer in self.cache.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                layer.keys = layer.keys[..., :length, :]
                layer.values = layer.values[..., :length, :]

    # -- frames --------------------------------------------------------------------------------------------------
    def push(self, frames: Any) -> list[dict[str, Any]]:
        """Encode and append frames: a (T, H, W, 3) uint8 array, one (H, W, 3) frame, a list of PIL images, or a
        `tokenreduce.video.Frames`. Returns one record per frame (as in `history`)."""
        from ..adapters.videollm.common import video_pixel_values

        arr = frame_array(frames, "push")
        pixels = video_pixel_values(arr, self.sm.spec)
        records = []
        for i in range(arr.shape[0]):
            with self._lock:
                records.append(self._push_one(pixels[i:i + 1]))
        return records

    @torch.no_grad()
    def _push_one(self, pixels: Tensor) -> dict[str, Any]:
        t_start = time.perf_counter()
        reference = None
        if self._cacher is not None:
            hidden, is_ref = self._cacher.encode(self.sm.tower, pixels, self._cacher_state)
            reference = bool(is_ref[0])
        else:
            hidden = self.sm.encode_plain(pixels)
        tower_ms = (time.perf_counter() - t_start) * 1e3
        saved = 0.0
        if reference:
            self._full_tower_ms.append(tower_ms)
        elif reference is False and len(self._full_tower_ms) >= 2:
            # against the lower median of the recent reference frames, and only once two are known, so one slow
            # (cold) reference frame never inflates the saving
            saved = sorted(self._full_tower_ms)[(len(self._full_tower_ms) - 1) // 2] - tower_ms
        ft: FrameTokens = self.sm.frame_tokens(hidden, pixels)[0]
        vision_ms = (time.perf_counter() - t_start) * 1e3
        tokens = ft.tokens
        arrived = len(tokens)
        tokens = VisualTokens(tokens.features, tokens.item, tokens.row, tokens.col, tokens.position, tokens.size,
                              tokens.source, tokens.grids, (ItemInfo(kind="frame", index=self._frames),),
                              tokens.scores)
        t_red = time.perf_counter()
        ctx = Context(sample=0, batch_size=1, pixels=pixels, tokenizer=self.tokenizer)
        for r in self._visual:
            tokens = r.reduce_frames(tokens, self._memories[id(r)]) if isinstance(r, STCPrune) else \
                r.reduce([tokens], [ctx])[0]
        tokens = tokens.select(torch.argsort(tokens.position, stable=True))
        if self.evict == "score":
            score = tokens.scores.get("stc")
            if score is None:
                score = frame_novelty(tokens.features, self._scorer)
        else:
            score = torch.zeros(len(tokens))
        reduce_ms = (time.perf_counter() - t_red) * 1e3

        slots = tokens.position
        feats = tokens.features
        extra = torch.zeros(len(tokens), dtype=torch.bool)
        if ft.extra.numel() and len(tokens):
            slots = torch.cat([slots, ft.extra_slots])
            feats = torch.cat([feats, ft.extra.to(feats.dtype)])
            score = torch.cat([score.float(), torch.full((ft.extra_slots.numel(),), float("inf"))])
            extra = torch.cat([extra, torch.ones(ft.extra_slots.numel(), dtype=torch.bool)])
        order = torch.argsort(slots, stable=True)
        slots, feats, score, extra = slots[order], feats[order], score[order].float(), extra[order]
        n = int(slots.numel())

        evicted = self._make_room(n)
        if self.keep_positions:
            pos = self._next_pos + slots
            self._next_pos += self.sm.per_frame
        else:
            pos = self._next_pos + torch.arange(n)
            self._next_pos += n
        t_llm = time.perf_counter()
        if n:
            self._forward(feats.to(self.sm.embed_tokens.weight.dtype), pos)
        llm_ms = (time.perf_counter() - t_llm) * 1e3
        self._frame = torch.cat([self._frame, torch.full((n,), self._frames, dtype=torch.long)])
        self._slot = torch.cat([self._slot, slots])
        self._pos = torch.cat([self._pos, pos])
        self._extra = torch.cat([self._extra, extra])
        self._score = torch.cat([self._score, score])

        s = self._stats
        s["frames"] += 1
        s["seconds"] = s["frames"] / self.fps
        s["arrived_tokens"] += arrived
        s["kept_tokens"] += len(tokens)
        s["evicted_tokens"] += evicted
        s["vision_ms"] += vision_ms
        s["tower_ms"] += tower_ms
        s["vision_ms_saved"] += saved
        s["reference_frames"] += int(bool(reference))
        s["llm_ms"] += llm_ms
        frame_ms = (time.perf_counter() - t_start) * 1e3
        s["last_frame_ms"] = frame_ms
        record = dict(frame=self._frames, arrived=arrived, kept=len(tokens), vision_ms=vision_ms, tower_ms=tower_ms,
                      saved_ms=saved, reference=reference, reduce_ms=reduce_ms, llm_ms=llm_ms, frame_ms=frame_ms,
                      evicted=evicted, kv_tokens=self._cache_len(), visual_tokens=int(self._frame.numel()))
        self.history.append(record)
        self.last_kept = dict(frame=self._frames, grid=tuple(self.sm.grid), rows=tokens.row.tolist(),
                              cols=tokens.col.tolist())
        self._frames += 1
        return record

    def _make_room(self, incoming: int) -> int:
        """Evict visual entries so that `incoming` more fit under max_tokens; returns how many were evicted."""
        if self.max_tokens is None:
            return 0
        if incoming > self.max_tokens:
            raise InputError(f"max_tokens={self.max_tokens} is smaller than one frame's {incoming} tokens")
        have = int(self._frame.numel())
        over = have + incoming - self.max_tokens
        if over <= 0:
            return 0
        drop = torch.zeros(have, dtype=torch.bool)
        if self.evict == "oldest":
            drop[:over] = True
        else:
            drop[torch.argsort(self._score, stable=True)[:over]] = True  # least novel first, then the oldest
        # an in-frame extra (a frame's CLS) leaves with the last grid token of its frame
        alive_frames = torch.unique(self._frame[~drop & ~self._extra])
        drop |= self._extra & ~torch.isin(self._frame, alive_frames)
        keep = torch.nonzero(~drop).flatten()
        index = torch.cat([torch.arange(self._prefix_len), self._prefix_len + keep])
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(-2, index)
            layer.values = layer.values.index_select(-2, index)
        self._frame, self._slot, self._pos = self._frame[keep], self._slot[keep], self._pos[keep]
        self._extra, self._score = self._extra[keep], self._score[keep]
        if self.rerotate:
            self._close_gaps()
        return int(drop.sum())

    def _close_gaps(self) -> None:
        """Give the surviving entries the positions of a video made of exactly them, re-rotating their keys."""
        p0 = self._prefix_len
        if self.keep_positions:
            frames, rank = torch.unique(self._frame, return_inverse=True)
            new = p0 + rank * self.sm.per_frame + self._slot
            self._next_pos = p0 + int(frames.numel()) * self.sm.per_frame
        else:
            new = p0 + torch.arange(self._pos.numel())
            self._next_pos = p0 + int(self._pos.numel())
        delta = new - self._pos
        if bool((delta != 0).any()):
            moved = torch.nonzero(delta).flatten()
            for layer in self.cache.layers:
                k = layer.keys[..., p0 + moved, :]
                layer.keys[..., p0 + moved, :] = rotate_keys(k, delta[moved], self._inv_freq)
        self._pos = new

    # -- questions -----------------------------------------------------------------------------------------------
    def _question_ids(self, question: str, options: Sequence[str] | None) -> Tensor:
        from ..eval.protocols import PROTOCOLS, build_prompt, open_prompt

        if not isinstance(question, str) or not question.strip():
            raise InputError("ask: the question must be a non-empty string")
        if options is not None:
            if self.prompt not in PROTOCOLS:
                raise InputError("ask: options need a benchmark protocol as the session's prompt "
                                 f"({', '.join(PROTOCOLS)})")
            options = [str(o) for o in options]
            if not 2 <= len(options) <= 6 or any(not o.strip() for o in options):
                raise InputError("ask: options must be 2 to 6 non-empty choices")
            text = build_prompt(self.prompt, question, options, "video")
        elif self.prompt in PROTOCOLS:
            text = open_prompt(question, "video")
        else:
            text = self.prompt.replace("{question}", question)
        after = self._split(text)[1]
        return self.tokenizer(after, add_special_tokens=False, return_tensors="pt")["input_ids"][0]

    @torch.no_grad()
    def _generate(self, question: str, options: Sequence[str] | None, max_new_tokens: int) -> Iterator[str]:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        ids = self._question_ids(question, options)
        t0 = time.perf_counter()
        embeds = self._question_embeds(ids)
        stream_len = self._cache_len()
        pos = self._next_pos
        generated: list[int] = []
        text = ""
        ttft = None
        try:
            h = self._forward(embeds, pos + torch.arange(embeds.shape[0]))
            pos += embeds.shape[0]
            for _ in range(max_new_tokens):
                tok = int(torch.argmax(self.sm.head(h)))
                if ttft is None:
                    ttft = (time.perf_counter() - t0) * 1e3
                if tok in self._eos:
                    break
                generated.append(tok)
                new = self.tokenizer.decode(generated, skip_special_tokens=True)
                if len(new) > len(text) and new.startswith(text):
                    yield new[len(text):]
                    text = new
                if len(generated) == max_new_tokens:
                    break
                h = self._forward(self.sm.embed(torch.tensor([tok])), torch.tensor([pos]))
                pos += 1
            final = self.tokenizer.decode(generated, skip_special_tokens=True)
            if final != text and final.startswith(text):
                yield final[len(text):]
            text = final
        finally:
            self._truncate(stream_len)  # the question and answer never stay in the stream's cache
            if self._cacher is not None and self._cacher.faithful:
                self._cacher_state.frames = 0  # the release restarts its reference cycle after a question
            s = self._stats
            s["answers"] += 1
            s["last_answer"] = text
            s["last_answer_ms"] = (time.perf_counter() - t0) * 1e3
            s["last_ttft_ms"] = ttft
            self.last_answer_ids = generated

    @torch.no_grad()
    def logits(self, question: str, options: Sequence[str] | None = None) -> Tensor:
        """The next-token logits (V,) after the question (e.g. to score options), without keeping the question."""
        with self._lock:
            ids = self._question_ids(question, options)
            embeds = self._question_embeds(ids)
            stream_len = self._cache_len()
            try:
                return self.sm.head(self._forward(embeds, self._next_pos + torch.arange(embeds.shape[0]))).float()
            finally:
                self._truncate(stream_len)

    def _question_embeds(self, ids: Tensor) -> Tensor:
        """(L, D): the video's trailing tokens (once frames exist) and the question's text after the video."""
        parts = [self.sm.embed(ids)]
        if self._frame.numel() and self.sm.trailer_features is not None:
            parts.insert(0, self.sm.trailer_features.to(parts[0].dtype))
        return torch.cat(parts)

    def ask(self, question: str, options: Sequence[str] | None = None, max_new_tokens: int = 16) -> str:
        """Answer from what has been seen so far (greedy), without re-encoding the past.

        With `options` (2 to 6 choices) the session's benchmark protocol builds its multiple-choice prompt, the
        form the default models were trained on; the answer is the raw completion (e.g. "B)"): use
        `tokenreduce.eval.protocols.extract` for the letter.
        """
        with self._lock:
            return "".join(self._generate(question, options, max_new_tokens))

    def ask_stream(self, question: str, options: Sequence[str] | None = None, max_new_tokens: int = 16
                   ) -> Iterator[str]:
        """`ask`, yielding the answer's text as it is generated. Generation runs in a worker thread holding the
        session's lock, so the iterator may be consumed from any thread."""
        self._question_ids(question, options)  # bad input fails here, in the caller's thread
        q: queue.Queue = queue.Queue()

        def work() -> None:
            try:
                with self._lock:
                    for piece in self._generate(question, options, max_new_tokens):
                        q.put(piece)
            except BaseException as e:  # handed to the consumer
                q.put(e)
            finally:
                q.put(_END)

        threading.Thread(target=work, name="tokenreduce-ask", daemon=True).start()
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    # -- reporting ------------------------------------------------------------------------------------------------
    @property
    def stats(self) -> dict[str, Any]:
        """frames, seconds, arrived/kept/evicted tokens, visual_tokens and kv_tokens in the cache now, kv_bytes,
        max_tokens, position (next position id), vision_ms (tower + projector + pooling), tower_ms,
        vision_ms_saved (the cacher's saving: each non-reference frame's tower time against the lower median of
        the recent reference frames, measured; counted from the second reference frame on), reference_frames,
        llm_ms (appending frames), last_frame_ms, answers, last_answer, last_answer_ms, last_ttft_ms, cacher_bytes."""
        with self._lock:
            kv_bytes = sum(t.numel() * t.element_size() for layer in self.cache.layers
                           for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                           if t is not None)
            return dict(self._stats, visual_tokens=int(self._frame.numel()), kv_tokens=self._cache_len(),
                        kv_bytes=kv_bytes, max_tokens=self.max_tokens, position=self._next_pos,
                        prompt_tokens=self._prefix_len, cacher_bytes=self._cacher_state.nbytes(),
                        plan=str(self.plan))

    def __repr__(self) -> str:
        s = self.stats
        return (f"StreamingSession(plan={s['plan']!r}, frames={s['frames']}, visual_tokens={s['visual_tokens']}, "
                f"max_tokens={self.max_tokens})")


