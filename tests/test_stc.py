"""STC's two parts (issue 19): the cacher's selective layer forward (spec 2.3) and the pruner's scoring (spec 2.4),
each against a hand-written reference, plus the oracles: recompute-everything equals the full encoder, a frame
equal to its reference comes out exactly as the reference, and per-stream state never mixes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tokenreduce.adapters.llava.llava15 import hf_vision_tower
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

import tokenreduce as tr
from tokenreduce.stream.cacher import (
    CacherState,
    STCCache,
    cached_layer,
    full_layer,
    recompute_count,
    selective_layer,
)
from tokenreduce.stream.pruner import PrunerMemory, STCPrune, frame_novelty

VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, image_size=56,
              patch_size=14)


def tower_model(kind: str, attn: str = "sdpa"):
    torch.manual_seed(0)
    if kind == "siglip":
        cfg = SiglipVisionConfig(**VISION)
        cfg._attn_implementation = attn
        return SiglipVisionModel(cfg).eval()
    cfg = CLIPVisionConfig(**VISION)
    cfg._attn_implementation = attn
    return CLIPVisionModel(cfg).eval()


def frames(n: int, seed: int = 0, size: int = 56, noise: float = 0.0) -> torch.Tensor:
    """(n, 3, size, size) pixel values of a slowly changing scene: a fixed background, one block moving, and
    `noise` (std) added to every pixel of every frame."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(3, size, size)).astype(np.float32)
    out = []
    for i in range(n):
        f = base.copy()
        x = (7 * i) % (size - 14)
        f[:, 14:28, x:x + 14] = rng.normal(size=(3, 14, 14))
        out.append(f + noise * rng.normal(size=f.shape).astype(np.float32))
    return torch.from_numpy(np.stack(out))


def reference_selective(layer, x: torch.Tensor, ref, ratio: float) -> torch.Tensor:
    """spec 2.3 written token by token and head by head (no batching, no scatter), for one frame x (T, C)."""
    attn = layer.self_attn
    t, c = x.shape
    h1 = layer.layer_norm1(x)
    k = attn.k_proj(h1)
    sims = [float(torch.dot(k[i], ref.k[0, i]) / (k[i].norm() * ref.k[0, i].norm())) for i in range(t)]
    u = max(1, int(t * ratio))
    chosen = sorted(range(t), key=lambda i: (sims[i], i))[:u]
    v = ref.v[0].clone()
    for i in chosen:
        v[i] = attn.v_proj(h1[i])
    a = ref.a[0].clone()
    heads, d = attn.num_heads, attn.head_dim
    for i in chosen:
        q = attn.q_proj(h1[i])
        o = []
        for hd in range(heads):
            sl = slice(hd * d, (hd + 1) * d)
            w = torch.softmax(k[:, sl] @ q[sl] / math.sqrt(d), 0)
            o.append(w @ v[:, sl])
        a[i] = attn.out_proj(torch.cat(o))
    h = x + a
    m = ref.m[0].clone()
    for i in chosen:
        m[i] = layer.mlp(layer.layer_norm2(h[i]))
    return h + m


@pytest.mark.parametrize("kind", ["siglip", "clip"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_full_layer_equals_the_stock_layer(kind, attn):
    vm = tower_model(kind, attn)
    tower = hf_vision_tower(vm, -1)
    with torch.no_grad():
        x = tower.embed(frames(3))
        for layer in tower.layers:
            out, parts = full_layer(layer, x)
            torch.testing.assert_close(out, layer(x, None), atol=1e-5, rtol=1e-5)
            assert parts.k.shape == parts.v.shape == parts.a.shape == parts.m.shape == x.shape
            x = out


@pytest.mark.parametrize("kind", ["siglip", "clip"])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.05])
def test_selective_layer_equals_a_token_by_token_reference(kind, ratio):
    vm = tower_model(kind)
    tower = hf_vision_tower(vm, -1)
    with torch.no_grad():
        x = tower.embed(frames(2, noise=0.3))  # every patch changes a little: no ties in the similarities
        layer = tower.layers[0]
        _, ref = full_layer(layer, x[:1])
        out, sel = selective_layer(layer, x[1:], ref, ratio)
        assert sel.shape == (1, recompute_count(x.shape[1], ratio))
        expected = reference_selective(layer, x[1], ref, ratio)
        torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_recompute_everything_equals_the_full_encoder(kind):
    """ratio=1.0 (every token recomputed on every frame) and interval=1 (every frame a reference) both give the
    stock tower's hidden states at its feature layer."""
    vm = tower_model(kind)
    tower = hf_vision_tower(vm, -1)
    pv = frames(5)
    with torch.no_grad():
        full = vm(pixel_values=pv, output_hidden_states=True).hidden_states[-1]
        for cache in (STCCache(ratio=1.0), STCCache(ratio=0.25, interval=1)):
            feats, is_ref = cache.encode(tower, pv, CacherState())
            torch.testing.assert_close(feats, full, atol=1e-5, rtol=1e-5)
        # and frame by frame, as a stream pushes them
        state, cache = CacherState(), STCCache(ratio=1.0)
        one = torch.cat([cache.encode(tower, pv[i:i + 1], state)[0] for i in range(5)])
        torch.testing.assert_close(one, full, atol=1e-5, rtol=1e-5)


def test_reference_frames_are_periodic_and_a_static_frame_is_its_reference():
    vm = tower_model("siglip")
    tower = hf_vision_tower(vm, -1)
    pv = frames(1).repeat(5, 1, 1, 1)
    with torch.no_grad():
        feats, is_ref = STCCache(ratio=0.1, interval=3).encode(tower, pv, CacherState())
    assert is_ref.tolist() == [True, False, False, True, False]
    # every non-reference frame equals the reference: keys unchanged, so whatever is recomputed is the same
    for i in range(1, 5):
        torch.testing.assert_close(feats[i], feats[0], atol=1e-5, rtol=1e-5)


def test_changed_patches_are_recomputed_first():
    """In layer 0 a token's key depends only on its own patch: the patches that differ from the reference are
    exactly the ones selected when U equals their number, and the others come out as the reference's."""
    vm = tower_model("siglip")
    tower = hf_vision_tower(vm, -1)
    pv = frames(2)  # frame 1 moves the block: patches in rows 1, cols 0 and 1 (frame 0) / cols 0..1 (frame 1)
    with torch.no_grad():
        x = tower.embed(pv)
        differs = torch.nonzero((x[1] - x[0]).abs().amax(-1) > 1e-6).flatten()
        layer = tower.layers[0]
        _, ref = full_layer(layer, x[:1])
        ratio = differs.numel() / x.shape[1]
        out, sel = selective_layer(layer, x[1:], ref, ratio)
    assert sorted(sel[0].tolist()) == differs.tolist()


def test_cached_layer_uses_the_latest_reference_across_calls():
    """Frames pushed one call at a time equal one call over all frames (the stored reference carries over)."""
    vm = tower_model("siglip")
    tower = hf_vision_tower(vm, -1)
    pv = frames(7, seed=3)
    with torch.no_grad():
        cache = STCCache(ratio=0.3, interval=3)
        together, _ = cache.encode(tower, pv, CacherState())
        state = CacherState()
        parts = [cache.encode(tower, pv[a:b], state)[0] for a, b in ((0, 2), (2, 3), (3, 7))]
    torch.testing.assert_close(torch.cat(parts), together, atol=1e-5, rtol=1e-5)
    assert state.frames == 7 and set(state.refs) == {0, 1, 2}


def test_two_streams_interleaved_equal_each_alone():
    vm = tower_model("siglip")
    tower = hf_vision_tower(vm, -1)
    a, b = frames(4, seed=1), frames(4, seed=2)
    cache = STCCache(ratio=0.25)
    with torch.no_grad():
        alone_a = cache.encode(tower, a, CacherState())[0]
        alone_b = cache.encode(tower, b, CacherState())[0]
        sa, sb = CacherState(), CacherState()
        mixed_a, mixed_b = [], []
        for i in range(4):
            mixed_a.append(cache.encode(tower, a[i:i + 1], sa)[0])
            mixed_b.append(cache.encode(tower, b[i:i + 1], sb)[0])
    torch.testing.assert_close(torch.cat(mixed_a), alone_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(mixed_b), alone_b, atol=1e-5, rtol=1e-5)


def test_first_frame_must_be_a_reference():
    vm = tower_model("siglip")
    layer = hf_vision_tower(vm, -1).layers[0]
    x = torch.zeros(2, 16, 48)
    with pytest.raises(RuntimeError, match="reference"):
        cached_layer(layer, x, torch.tensor([False, True]), None, 0.25)


@pytest.mark.parametrize("bad, match", [
    ("stc-cache(ratio=0)", "ratio"), ("stc-cache(ratio=1.5)", "ratio"), ("stc-cache(interval=0)", "interval"),
    ("stc-cache(metric='l3')", "metric"), ("stc-prune(channel_keep=0)", "channel_keep"),
    ("stc-prune(strategy='x')", "strategy"), ("stc-prune(keep=0.5, tokens=4)", "either"),
    ("stc-prune(alpha=2)", "alpha"),
])
def test_bad_parameters_name_themselves(bad, match):
    with pytest.raises(tr.TokenReduceError, match=match):
        tr.Plan.parse(bad)


# --- pruner -----------------------------------------------------------------------------------------------------


def reference_gaussian(x: torch.Tensor, history: list[torch.Tensor], keep: float = 0.5) -> torch.Tensor:
    """spec 2.4's steps for one frame x (P, D), written out: the similarity (P,) (lower = more novel)."""
    d = x.shape[1]
    var = x.var(0, unbiased=False)
    ch = sorted(range(d), key=lambda j: (float(var[j]), j))[: int(d * keep)]
    f = x[:, ch]
    mem = torch.stack([h for h in history]).mean(0)[ch]
    f_hat = f / f.norm(dim=1, keepdim=True)
    anchor = f_hat.mean(0)
    mem = mem / mem.norm()
    out = torch.zeros(x.shape[0])
    for p in range(x.shape[0]):
        for a in (1 / 8, 1 / 4, 1 / 2, 1, 2):
            out[p] += math.exp(-float(((f_hat[p] - anchor) ** 2).sum()) / (2 * a))
            out[p] += math.exp(-float(((f_hat[p] - mem) ** 2).sum()) / (2 * a))
    return out


def video_tokens(n_frames: int, p: int = 16, d: int = 24, seed: int = 0) -> tr.VisualTokens:
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(p, d, generator=g) + torch.randn(d, generator=g) for _ in range(n_frames)]
    side = int(math.isqrt(p))
    items = [tr.ItemInfo(kind="frame", index=i) for i in range(n_frames)]
    return tr.VisualTokens.from_items(feats, [(side, side)] * n_frames, torch.arange(n_frames * p), items)


def test_gaussian_scores_equal_the_written_out_steps():
    v = video_tokens(4)
    memory = PrunerMemory()
    history = []
    for i in range(4):
        x = v.features[v.item == i]
        history.append(x.mean(0))
        ours = frame_novelty(x, memory)
        torch.testing.assert_close(-ours, reference_gaussian(x, history), atol=1e-5, rtol=1e-5)


def test_pruner_keeps_the_most_novel_tokens_per_frame_in_raster_order():
    v = video_tokens(5)
    out = STCPrune(keep=0.25).reduce_sample(v, tr.Context())
    assert out.item_counts().tolist() == [4] * 5
    assert torch.equal(out.position, torch.sort(out.position).values)
    memory = PrunerMemory()
    for i in range(5):
        nov = frame_novelty(v.features[v.item == i], memory)
        best = set(torch.argsort(-nov, stable=True)[:4].tolist())
        kept = set((out.position[out.item == i] - 16 * i).tolist())
        assert kept == best
        torch.testing.assert_close(out.scores["stc"][out.item == i], nov[sorted(best)])


def test_an_outlier_token_is_kept():
    """A token unlike the rest of its frame and unlike the past is the first one the pruner keeps."""
    v = video_tokens(3, seed=1)
    f = v.features.clone()
    f[2 * 16 + 5] = -5 * f[2 * 16:3 * 16].mean(0)
    out = STCPrune(tokens=3).reduce_sample(v.with_features(f), tr.Context())
    assert 2 * 16 + 5 in out.position.tolist()


def test_clean_memory_is_per_sample_and_faithful_memory_leaks_across_samples():
    v, w = video_tokens(3, seed=1), video_tokens(3, seed=2)
    clean = STCPrune(keep=0.25)
    first = clean.reduce_sample(v, tr.Context())
    clean.reduce_sample(w, tr.Context())
    again = clean.reduce_sample(v, tr.Context())
    assert torch.equal(first.position, again.position)
    faithful = STCPrune(keep=0.25, faithful=True)
    first = faithful.reduce_sample(v, tr.Context())
    clean_first = STCPrune(keep=0.25).reduce_sample(v, tr.Context())
    # the first frame of the first sample is the same; later frames mix channel subsets in the memory
    assert torch.equal(first.position[first.item == 0], clean_first.position[clean_first.item == 0])
    for _ in range(3):
        faithful.reduce_sample(w, tr.Context())
    assert faithful._memory.count == 12  # the release's never-reset memory: 4 samples x 3 frames
    assert not torch.equal(faithful.reduce_sample(v, tr.Context()).scores["stc"], first.scores["stc"])


def test_clean_memory_is_in_full_width_coordinates():
    v = video_tokens(3)
    memory = PrunerMemory()
    for i in range(3):
        frame_novelty(v.features[v.item == i], memory)
    torch.testing.assert_close(memory.total, sum(v.features[v.item == i].mean(0) for i in range(3)))
    faithful = PrunerMemory()
    for i in range(3):
        frame_novelty(v.features[v.item == i], faithful, faithful=True)
    assert faithful.total.shape == (12,)  # means in each frame's own channel subset, mixed


def test_frame_by_frame_equals_a_whole_sample():
    v = video_tokens(4, seed=5)
    whole = STCPrune(keep=0.5).reduce_sample(v, tr.Context())
    memory = PrunerMemory()
    pr = STCPrune(keep=0.5)
    for i in range(4):
        one = v.select(torch.nonzero(v.item == i).flatten())
        got = pr.reduce_frames(one, memory)
        assert torch.equal(got.position, whole.position[whole.item == i])


def test_dual_anchor_strategy():
    v = video_tokens(2)
    out = STCPrune(keep=0.5, strategy="dual-anchor", alpha=0.5).reduce_sample(v, tr.Context())
    memory = PrunerMemory()
    for i in range(2):
        x = v.features[v.item == i]
        ch = torch.argsort(x.var(0, unbiased=False), stable=True)[:12]
        m = memory.add(x.mean(0))[ch]
        f = x[:, ch]
        nov = 0.5 * (1 - torch.cosine_similarity(f, m[None], -1)) + 0.5 * (1 - torch.cosine_similarity(
            f, f.mean(0)[None], -1))
        best = sorted(torch.argsort(-nov, stable=True)[:8].tolist())
        assert (out.position[out.item == i] - 16 * i).tolist() == best


# --- both as ordinary plan stages, offline -------------------------------------------------------------------


@pytest.fixture(scope="module")
def video_zoo():
    from tokenreduce.adapters.videollm.zoo import build_video_llm

    return {p: build_video_llm(p, seed=0) for p in ("tiny-onevision", "tiny-video-llava")}


def video_batch(model, tok, n: int = 2, frames_: int = 5):
    from tokenreduce.adapters.videollm import video_inputs

    from tokenreduce.registry import adapter_for

    rng = np.random.default_rng(0)
    clips = []
    for _ in range(n):
        base = rng.integers(0, 256, (1, 4, 4, 3), dtype=np.uint8).repeat(frames_, 0)
        base[np.arange(frames_), np.arange(frames_) % 4, 1] = rng.integers(0, 256, (frames_, 3), dtype=np.uint8)
        clips.append(np.repeat(np.repeat(base, 28, axis=1), 28, axis=2))  # (T, 112, 112, 3), one cell changes
    spec = adapter_for(model)(model).video_spec()
    texts = ["USER: <video>\nWhat happens? ASSISTANT:", "USER: <video>\nWhich colour? ASSISTANT:"][:n]
    return video_inputs(tok, spec, texts, clips)


def logits_of(model, x, plan):
    with torch.no_grad(), tr.apply(model, plan) as run:
        return model(**x).logits, run.report.calls[0]


@pytest.mark.parametrize("preset", ["tiny-onevision", "tiny-video-llava"])
def test_offline_cacher_recomputing_everything_is_the_unreduced_model(video_zoo, preset):
    model, tok = video_zoo[preset]
    x = video_batch(model, tok)
    ref, _ = logits_of(model, x, "none")
    for plan in ("stc-cache(ratio=1.0)", "stc-cache(interval=1)"):
        out, _ = logits_of(model, x, plan)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    cached, call = logits_of(model, x, "stc-cache(ratio=0.25)")
    assert not torch.allclose(cached, ref, atol=1e-4)  # it really reuses the reference's values
    assert call.seq_llm == call.seq_in  # it never changes what enters the LLM


@pytest.mark.parametrize("preset", ["tiny-onevision", "tiny-video-llava"])
@pytest.mark.parametrize("plan", ["stc-cache", "stc-prune(keep=0.25)", "stc-cache+stc-prune(tokens=10)"])
def test_offline_batch_equals_each_sample_alone(video_zoo, preset, plan):
    model, tok = video_zoo[preset]
    x = video_batch(model, tok)
    both, call = logits_of(model, x, plan)
    lengths = call.seq_llm
    for i in range(2):
        one = video_batch(model, tok)
        one = {"input_ids": x["input_ids"][i:i + 1], "attention_mask": x["attention_mask"][i:i + 1],
               "pixel_values_videos": one["pixel_values_videos"][i:i + 1]}
        alone, _ = logits_of(model, one, plan)
        torch.testing.assert_close(both[i, -lengths[i]:][-1], alone[0, -1], atol=1e-4, rtol=1e-4)


def test_offline_pruner_meets_its_budget_per_frame(video_zoo):
    model, tok = video_zoo["tiny-onevision"]
    x = video_batch(model, tok)
    _, call = logits_of(model, x, "stc-prune(keep=0.25)")
    for v in call.visual:
        assert v.item_counts().tolist() == [4] * 5  # 16 pooled tokens per frame on the tiny model


def test_a_probe_at_an_overridden_layer_is_refused(video_zoo):
    model, tok = video_zoo["tiny-video-llava"]
    x = video_batch(model, tok)
    with pytest.raises(tr.UnsupportedModelError, match="runs vision layer"):
        logits_of(model, x, "stc-cache+hired(keep=0.5, final_layer=0)")
