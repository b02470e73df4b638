"""`StreamingSession` (issue 19): a stream pushed frame by frame answers as the offline model does on the same frames
(with no reduction, and with the STC plans against the same plans run offline by `tr.apply`); memory stays under
`max_tokens` over thousands of frames; eviction and key re-rotation against independent references; questions
never stay in the cache; sessions in two threads answer as each alone."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from tokenreduce.adapters.videollm import video_inputs
from tokenreduce.adapters.videollm.zoo import build_video_llm
from tokenreduce.eval import evaluate as E
from tokenreduce.eval import protocols as P
from tokenreduce.eval import synthetic as syn

import tokenreduce as tr
from tokenreduce.registry import adapter_for
from tokenreduce.stream import StreamingSession
from tokenreduce.stream.model import StreamModel

TEMPLATE = "USER: <video>\n{question} ASSISTANT:"


@pytest.fixture(scope="module")
def zoo():
    out = {}
    for preset in ("tiny-onevision", "tiny-video-llava"):
        for attn in ("sdpa", "eager"):
            out[preset, attn] = build_video_llm(preset, seed=0, attn=attn)
    return out


@pytest.fixture(scope="module")
def default_video():
    return tr.load_default("video")


def clip(frames: int, seed: int = 0) -> np.ndarray:
    """(T, 112, 112, 3) uint8: a fixed blocky scene where one cell changes colour each frame, plus mild noise."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    out = np.repeat(base[None], frames, 0).copy()
    for t in range(frames):
        out[t, t % 4, (t // 4) % 4] = rng.integers(0, 256, 3, dtype=np.uint8)
    big = np.repeat(np.repeat(out, 28, axis=1), 28, axis=2).astype(np.int16)
    return np.clip(big + rng.integers(-8, 9, big.shape), 0, 255).astype(np.uint8)


def offline(model, tok, frames: np.ndarray, question: str, plan: str = "none", keep_positions: bool = False,
            new: int = 6):
    """Greedy tokens and last-position logits of the whole prompt run at once by the model (with `plan` attached)."""
    spec = adapter_for(model)(model).video_spec()
    x = video_inputs(tok, spec, [TEMPLATE.format(question=question)], [frames])
    with torch.no_grad(), tr.apply(model, plan, keep_positions=keep_positions):
        logits = model(**x).logits[0, -1]
        out = model.generate(**x, max_new_tokens=new, do_sample=False)
    return out[0, x["input_ids"].shape[1]:].tolist(), logits


def streamed(model, tok, frames: np.ndarray, question: str, plan: str = "none", keep_positions: bool = False,
             new: int = 6, **kw):
    s = StreamingSession(model, tok, plan, prompt=TEMPLATE, keep_positions=keep_positions, **kw)
    for f in frames:  # one frame at a time, as a stream arrives
        s.push(f)
    s.ask(question, max_new_tokens=new)
    return s.last_answer_ids, s.logits(question), s


def same_tokens(a: list[int], b: list[int], tok) -> None:
    eos = tok.eos_token_id
    assert a == (b[: b.index(eos)] if eos in b else b)


@pytest.mark.parametrize("preset", ["tiny-onevision", "tiny-video-llava"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_stream_without_reduction_equals_the_offline_model(zoo, preset, attn):
    model, tok = zoo[preset, attn]
    frames = clip(5)
    ref_ids, ref_logits = offline(model, tok, frames, "What changed?")
    ids, logits, _ = streamed(model, tok, frames, "What changed?")
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    same_tokens(ids, ref_ids, tok)


CASES = [(preset, plan, False) for preset in ("tiny-onevision", "tiny-video-llava")
         for plan in ("stc-cache", "stc-prune(keep=0.25)", "stc-cache(ratio=0.5, interval=3)+stc-prune",
                      "pool(keep=0.5)+stc-prune(keep=0.5)")]
CASES += [(preset, "stc-cache+stc-prune(keep=0.25)", True) for preset in ("tiny-onevision", "tiny-video-llava")]


@pytest.mark.parametrize("preset, plan, keep_positions", CASES)
def test_stream_with_a_plan_equals_the_plan_run_offline(zoo, preset, plan, keep_positions):
    model, tok = zoo[preset, "sdpa"]
    frames = clip(6, seed=1)
    ref_ids, ref_logits = offline(model, tok, frames, "Which cell?", plan, keep_positions)
    ids, logits, s = streamed(model, tok, frames, "Which cell?", plan, keep_positions)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    same_tokens(ids, ref_ids, tok)
    if "stc-cache" in plan:
        assert s.stats["reference_frames"] == (3 if "interval=3" not in plan else 2)


def test_default_model_answers_as_the_main_job(default_video):
    model, processor = default_video
    items, visuals = E.items_from_samples(syn.generate_videos(3, seed=0, split="test"), "videomme")
    for item, frames in zip(items, visuals):
        s = StreamingSession(model, processor, prompt=item.protocol)
        s.push(frames)
        assert s.ask(item.question, item.options, max_new_tokens=4) == E.answer(
            model, processor.tokenizer, item, frames)["completion"]


def test_a_question_never_stays_in_the_cache_and_answers_repeat(zoo):
    model, tok = zoo["tiny-onevision", "sdpa"]
    s = StreamingSession(model, tok, prompt=TEMPLATE)
    s.push(clip(3))
    before = [(layer.keys.clone(), layer.values.clone()) for layer in s.cache.layers]
    first = s.ask("What?", max_new_tokens=5)
    assert s.ask("What?", max_new_tokens=5) == first
    for (k, v), layer in zip(before, s.cache.layers):
        assert torch.equal(k, layer.keys) and torch.equal(v, layer.values)
    assert "".join(s.ask_stream("What?", max_new_tokens=5)) == first
    assert s.stats["answers"] == 3 and s.stats["last_answer"] == first and s.stats["last_answer_ms"] > 0


def test_reset_starts_a_new_video(zoo):
    model, tok = zoo["tiny-onevision", "sdpa"]
    a, b = clip(4, seed=2), clip(4, seed=3)
    s = StreamingSession(model, tok, "stc-cache+stc-prune", prompt=TEMPLATE)
    s.push(a)
    s.reset()
    s.push(b)
    fresh = StreamingSession(model, tok, "stc-cache+stc-prune", prompt=TEMPLATE)
    fresh.push(b)
    torch.testing.assert_close(s.logits("Why?"), fresh.logits("Why?"), atol=1e-5, rtol=1e-5)
    assert s.stats["frames"] == 4


def test_two_sessions_in_two_threads_equal_each_alone(zoo):
    model, tok = zoo["tiny-onevision", "sdpa"]
    videos = [clip(6, seed=4), clip(6, seed=5)]
    plans = ["stc-cache+stc-prune(keep=0.5)", "stc-cache(ratio=0.5)+stc-prune(keep=0.25)"]
    alone = []
    for v, p in zip(videos, plans):
        s = StreamingSession(model, tok, p, prompt=TEMPLATE, max_tokens=40)
        s.push(v)
        alone.append((s.ask("Which?", max_new_tokens=6), s.logits("Which?")))
    sessions = [StreamingSession(model, tok, p, prompt=TEMPLATE, max_tokens=40) for p in plans]
    results: dict[int, tuple] = {}
    start = threading.Barrier(2)

    def run(i):
        start.wait()
        for f in videos[i]:
            sessions[i].push(f)
        results[i] = (sessions[i].ask("Which?", max_new_tokens=6), sessions[i].logits("Which?"))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        assert results[i][0] == alone[i][0]
        torch.testing.assert_close(results[i][1], alone[i][1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(alone[0][1], alone[1][1])  # the two streams really differ


def test_pushing_while_another_thread_asks(zoo):
    """One session, one thread pushing, another asking: every answer is one the session gives at some frame count."""
    model, tok = zoo["tiny-onevision", "sdpa"]
    frames = clip(8, seed=6)
    s = StreamingSession(model, tok, prompt=TEMPLATE)
    pusher = threading.Thread(target=lambda: [s.push(f) for f in frames])
    pusher.start()
    answers = [s.ask("Now?", max_new_tokens=3) for _ in range(3)]
    pusher.join()
    assert s.stats["frames"] == 8 and s.stats["kv_tokens"] == s.stats["prompt_tokens"] + 8 * 16
    assert all(isinstance(a, str) for a in answers)


# --- memory: eviction, positions, re-rotation ---------------------------------------------------------------------


def masked_reference(model, tok, frames: np.ndarray, question: str, cap: int) -> torch.Tensor:
    """The last-position logits of one forward over the whole stream with a 4D mask that hides from each frame the
    entries evicted (oldest first, `cap` visual entries at most) before it arrived, at the original positions."""
    sm = StreamModel(model)
    from tokenreduce.adapters.videollm.common import video_pixel_values

    px = video_pixel_values(frames, sm.spec)
    feats = [ft.tokens.features for ft in sm.frame_tokens(sm.encode_plain(px), px)]
    n = feats[0].shape[0]
    before, after = TEMPLATE.split("<video>")
    pre = tok(before, return_tensors="pt")["input_ids"][0]
    post = tok(after.format(question=question), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    trailer = sm.trailer_features
    emb = torch.cat([sm.embed(pre), *feats, trailer, sm.embed(post)])
    length = emb.shape[0]
    p0, v = pre.numel(), n * len(feats)
    visible = torch.tril(torch.ones(length, length, dtype=torch.bool))
    for f in range(len(feats)):
        rows = slice(p0 + f * n, p0 + (f + 1) * n)
        gone = max(0, f * n - (cap - n))  # the oldest entries evicted to make room for frame f
        visible[rows, p0:p0 + gone] = False
    gone = max(0, v - cap)
    visible[p0 + v:, p0:p0 + gone] = False
    mask = torch.zeros(1, 1, length, length).masked_fill(~visible, torch.finfo(torch.float32).min)
    with torch.no_grad():
        h = sm.lm(inputs_embeds=emb[None], attention_mask=mask, position_ids=torch.arange(length)[None])
        return sm.head(h.last_hidden_state[0, -1])


def test_oldest_eviction_at_original_positions_equals_a_masked_forward(zoo):
    model, tok = zoo["tiny-onevision", "eager"]
    frames = clip(7, seed=7)
    cap = 40  # 16 tokens a frame: evictions cut frames in the middle
    s = StreamingSession(model, tok, prompt=TEMPLATE, max_tokens=cap, rerotate=False)
    for f in frames:
        s.push(f)
        assert s.stats["visual_tokens"] <= cap
    ref = masked_reference(model, tok, frames, "Where?", cap)
    torch.testing.assert_close(s.logits("Where?"), ref, atol=1e-4, rtol=1e-4)
    assert s.stats["evicted_tokens"] == 7 * 16 - cap


@pytest.mark.parametrize("keep_positions", [False, True])
@pytest.mark.parametrize("evict", ["oldest", "score"])
def test_rerotated_keys_equal_a_fresh_prefill_at_the_closed_up_positions(zoo, keep_positions, evict):
    """Layer 0's keys depend on a token's own embedding and position only, so after eviction and re-rotation they
    must equal those of a fresh forward over the prompt plus exactly the surviving tokens at their new positions."""
    model, tok = zoo["tiny-onevision", "sdpa"]
    frames = clip(6, seed=8)
    s = StreamingSession(model, tok, "stc-prune(keep=0.5)", prompt=TEMPLATE, max_tokens=20, evict=evict,
                         keep_positions=keep_positions)
    sm = StreamModel(model)
    from tokenreduce.adapters.videollm.common import video_pixel_values

    px = video_pixel_values(frames, sm.spec)
    full = [ft.tokens.features for ft in sm.frame_tokens(sm.encode_plain(px), px)]
    for f in frames:
        s.push(f)
    p0 = s.stats["prompt_tokens"]
    surv = torch.stack([full[f][slot] for f, slot in zip(s._frame.tolist(), s._slot.tolist())])
    pre = tok(TEMPLATE.split("<video>")[0], return_tensors="pt")["input_ids"][0]
    emb = torch.cat([sm.embed(pre), surv])
    pos = torch.cat([torch.arange(p0), s._pos])
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        sm.lm(inputs_embeds=emb[None], position_ids=pos[None], past_key_values=cache, use_cache=True)
    torch.testing.assert_close(s.cache.layers[0].keys, cache.layers[0].keys, atol=1e-5, rtol=1e-5)
    # the positions are closed up: a video made of exactly the survivors
    if keep_positions:
        frames_left = torch.unique(s._frame).numel()
        assert s.stats["position"] == p0 + frames_left * 16
        assert int(s._pos.max()) < p0 + frames_left * 16
    else:
        assert s._pos.tolist() == list(range(p0, p0 + 20))
    assert s.stats["visual_tokens"] == 20


def test_score_eviction_drops_the_least_novel_tokens(zoo):
    model, tok = zoo["tiny-onevision", "sdpa"]
    s = StreamingSession(model, tok, "stc-prune(keep=0.5)", prompt=TEMPLATE, max_tokens=20, evict="score",
                         rerotate=False)
    frames = clip(3, seed=9)
    s.push(frames[:2])
    scores_before = s._score.clone()
    before = list(zip(s._frame.tolist(), s._slot.tolist()))
    s.push(frames[2])  # 16 in the cache + 8 arriving > 20: the 4 least novel go
    gone = {before[i] for i in torch.argsort(scores_before, stable=True)[:4].tolist()}
    kept = set(zip(s._frame.tolist(), s._slot.tolist()))
    assert len(gone) == 4 and not kept & gone and set(before) - gone <= kept
    assert s.stats["visual_tokens"] == 20 and s.stats["evicted_tokens"] == 4


@pytest.mark.slow
def test_memory_stays_bounded_over_thousands_of_frames(zoo):
    model, tok = zoo["tiny-onevision", "sdpa"]
    cap = 64
    s = StreamingSession(model, tok, "stc-cache+stc-prune(keep=0.5)", prompt=TEMPLATE, max_tokens=cap)
    rng = np.random.default_rng(0)
    base = clip(1, seed=10)[0]
    p0 = s.stats["prompt_tokens"]
    kv = []
    for t in range(2000):
        frame = base.copy()
        frame[:, (t * 3) % 100:(t * 3) % 100 + 12] = rng.integers(0, 256, 3, dtype=np.uint8)  # a moving bar
        rec = s.push(frame)[0]
        assert rec["visual_tokens"] <= cap and rec["kv_tokens"] <= p0 + cap
        if t >= 100:
            kv.append(s.stats["kv_bytes"])
    st = s.stats
    assert st["frames"] == 2000 and st["kept_tokens"] == 2000 * 8 and st["evicted_tokens"] == 2000 * 8 - cap
    assert st["position"] == p0 + cap  # positions closed up: never past the prompt plus the cap
    assert max(kv) == min(kv)  # the KV cache stays exactly at its cap
    assert len(s.history) == 2000 and st["cacher_bytes"] > 0
    answer = s.ask("What moved?", max_new_tokens=3)
    assert isinstance(answer, str) and s.stats["kv_tokens"] == p0 + cap


# --- errors and reporting -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("plan, match", [
    ("quota(keep=0.5)", "needs the question"),
    ("mustdrop-prefill", "prefill stage"),
    ("mustdrop-vision", "only stc-cache"),
])
def test_plans_a_stream_cannot_serve_are_refused(zoo, plan, match):
    model, tok = zoo["tiny-onevision", "sdpa"]
    with pytest.raises(tr.UnsupportedModelError, match=match):
        StreamingSession(model, tok, plan)


def test_bad_input_gets_a_clear_error(zoo):
    model, tok = zoo["tiny-onevision", "sdpa"]
    with pytest.raises(tr.InputError, match="max_tokens"):
        StreamingSession(model, tok, max_tokens=0)
    with pytest.raises(tr.InputError, match="evict"):
        StreamingSession(model, tok, evict="newest")
    with pytest.raises(tr.InputError, match="prompt"):
        StreamingSession(model, tok, prompt="no placeholder {question}")
    with pytest.raises(tr.InputError, match="fps"):
        StreamingSession(model, tok, fps=0)
    s = StreamingSession(model, tok, prompt=TEMPLATE, max_tokens=8)
    with pytest.raises(tr.InputError, match="smaller than one frame"):
        s.push(clip(1))
    s = StreamingSession(model, tok, prompt=TEMPLATE)
    with pytest.raises(tr.InputError, match="uint8"):
        s.push(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(tr.InputError, match="question"):
        s.ask("")
    with pytest.raises(tr.InputError, match="protocol"):
        s.ask("Which?", options=["a", "b"])
    with pytest.raises(tr.UnsupportedModelError, match="video"):
        from tokenreduce.adapters.llava.zoo import build_llava

        StreamingSession(build_llava("tiny"), tok)


def test_stats_account_for_the_stream(zoo):
    model, tok = zoo["tiny-onevision", "sdpa"]
    s = StreamingSession(model, tok, "stc-cache+stc-prune(keep=0.25)", prompt=TEMPLATE, fps=2)
    recs = s.push(clip(4, seed=11))
    st = s.stats
    assert st["frames"] == 4 and st["seconds"] == 2.0
    assert st["arrived_tokens"] == 64 and st["kept_tokens"] == st["visual_tokens"] == 16
    assert st["kv_tokens"] == st["prompt_tokens"] + 17 - 1  # the newline enters only with a question
    assert st["reference_frames"] == 2 and [r["reference"] for r in recs] == [True, False, True, False]
    assert st["vision_ms_saved"] == pytest.approx(sum(r["saved_ms"] for r in recs))
    assert recs[1]["saved_ms"] == 0.0  # one reference frame timed so far: no saving is claimed yet
    assert s.last_kept["grid"] == (4, 4) and len(s.last_kept["rows"]) == 4
    assert st["kv_bytes"] > 0 and st["last_answer_ms"] is None


def test_faithful_cacher_restarts_its_reference_cycle_after_a_question(zoo):
    model, tok = zoo["tiny-onevision", "sdpa"]
    frames = clip(4, seed=12)
    for faithful, expected in ((False, [True, False, True, False]), (True, [True, True, False, True])):
        s = StreamingSession(model, tok, f"stc-cache(faithful={faithful})", prompt=TEMPLATE)
        refs = [s.push(frames[0])[0]["reference"]]
        s.ask("?", max_new_tokens=1)
        refs += [r["reference"] for r in s.push(frames[1:])]
        assert refs == expected, faithful


def test_options_use_the_benchmark_prompt(default_video):
    model, processor = default_video
    s = StreamingSession(model, processor, prompt="mlvu")
    frames = E.items_from_samples(syn.generate_videos(1, seed=1, split="test"), "mlvu")[1][0]
    s.push(frames)
    answer = s.ask("What colour was it?", options=["red", "green", "blue", "yellow"], max_new_tokens=4)
    assert P.extract("mlvu", answer) in "ABCD"
