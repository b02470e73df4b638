"""llm.py: physical token removal inside the decoder equals a hand-written reference, for forward and generate.

Tiny Llama and Qwen2 decoders built from config (4 layers, hidden 64, 4 heads over 2 KV heads), inputs as
`inputs_embeds` with a span of positions marked visual. The reference calls the decoder layers one by one,
removes rows after a layer, gathers cos/sin itself and decodes token by token from its own cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from decoders import FAMILIES, tiny  # noqa: E402,F401
from transformers import DynamicCache, StaticCache

from tokenreduce.errors import InputError, PlanError, UnsupportedModelError
from tokenreduce.llm import CacheState, DecodeReducer, LayerView, PrefillEngine, PrefillReducer, layout_mask


def embeds(length: int, seed: int) -> torch.Tensor:
    return torch.randn(1, length, 64, generator=torch.Generator().manual_seed(seed))


def visual_span(length: int, start: int, stop: int) -> torch.Tensor:
    v = torch.zeros(1, length, dtype=torch.bool)
    v[:, start:stop] = True
    return v


@dataclass
class Fixed(PrefillReducer):
    """Test reducer: after layer l, drop the given input slots of each sample (drops[l][b])."""

    name = "test-fixed"
    drops: dict = field(default_factory=dict)

    def acts_after(self, num_layers: int) -> list[int]:
        return sorted(self.drops)

    def wants_attention(self, layer: int, num_layers: int) -> bool:
        return False

    def select(self, view: LayerView, contexts) -> torch.Tensor:
        keep = torch.ones_like(view.valid)
        for b, slots in enumerate(self.drops[view.layer]):
            keep[b] &= ~torch.isin(view.positions[b], torch.tensor(slots, dtype=torch.long))
        return keep


@dataclass
class CutTo(DecodeReducer):
    """Test reducer: cut the caches of `layers` to the tokens that survived prefill."""

    name = "test-cut"
    layers: list = field(default_factory=list)

    def cut(self, state: CacheState) -> dict[int, torch.Tensor]:
        return {layer: state.survivors(layer) for layer in self.layers}


def causal(q: int, k: int, impl: str, dtype: torch.dtype) -> torch.Tensor:
    allowed = torch.ones(q, k, dtype=torch.bool).tril(k - q)[None, None]
    if impl == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


@torch.no_grad()
def reference(model, x: torch.Tensor, drops: dict[int, list[int]], steps: int = 0, cut: tuple = ()):
    """Hand-written forward of one sample: layers called one by one, rows `drops[l]` removed after layer l.

    Returns the logits of the kept rows, the cache, the input slots each layer's cache holds, and `steps`
    greedy tokens decoded from that cache (layers in `cut` first cut to the final kept set), positions
    continuing from the original length.
    """
    lm, impl, dtype = model.model, model.config._attn_implementation, x.dtype
    length = x.shape[1]
    pos = torch.arange(length)[None]
    cos, sin = lm.rotary_emb(x, pos)
    cache = DynamicCache(config=model.config)
    kept, held, h = torch.arange(length), [], x
    for i, layer in enumerate(lm.layers):
        n = kept.numel()
        held.append(kept)
        h = layer(h, attention_mask=causal(n, n, impl, dtype), position_embeddings=(cos[:, kept], sin[:, kept]),
                  position_ids=pos[:, kept], past_key_values=cache, use_cache=True)
        if i in drops:
            sel = ~torch.isin(kept, torch.tensor(drops[i], dtype=torch.long))
            h, kept = h[:, sel], kept[sel]
    logits = model.lm_head(lm.norm(h))
    for i in cut:
        rows = torch.isin(held[i], kept).nonzero().flatten()
        cache.layers[i].keys = cache.layers[i].keys[:, :, rows]
        cache.layers[i].values = cache.layers[i].values[:, :, rows]
        held[i] = held[i][rows]
    tokens, last = [], logits[:, -1]
    for t in range(steps):
        tok = last.argmax(-1)
        tokens.append(tok)
        e = lm.embed_tokens(tok[:, None])
        p = torch.tensor([[length + t]])
        c, s = lm.rotary_emb(e, p)
        for i, layer in enumerate(lm.layers):
            k = cache.layers[i].get_seq_length() + 1
            e = layer(e, attention_mask=causal(1, k, impl, dtype), position_embeddings=(c, s), position_ids=p,
                      past_key_values=cache, use_cache=True)
        last = model.lm_head(lm.norm(e))[:, -1]
    return logits, cache, held, torch.stack(tokens, 1) if tokens else None


def engine(model, prefill=(), decode=()) -> PrefillEngine:
    e = PrefillEngine(model.model, list(prefill), list(decode))
    e.install()
    return e


DROPS = {1: [4, 5, 6, 9], 2: [7, 12, 13]}  # two drop events on a 20-token input with visual slots 3..15


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_drop_equals_reference_forward_and_cache(family, attn):
    model = tiny(family, attn)
    x = embeds(20, 1)
    ref_logits, ref_cache, held, _ = reference(model, x, DROPS)
    e = engine(model, [Fixed(drops={k: [v] for k, v in DROPS.items()})])
    try:
        e.arm(visual_span(20, 3, 16))
        with torch.no_grad():
            out = model(inputs_embeds=x, use_cache=True)
    finally:
        e.remove()
    torch.testing.assert_close(out.logits, ref_logits, atol=1e-4, rtol=0)
    rec = e.last
    assert rec.drop_layers == [1, 2]
    assert rec.visual_per_layer == [[13], [13], [9], [6]]
    assert rec.tokens_per_layer == [[20], [20], [16], [13]]
    assert rec.kv_length == [20, 20, 16, 13] == [layer.keys.shape[2] for layer in out.past_key_values.layers]
    for i, layer in enumerate(out.past_key_values.layers):
        assert torch.equal(rec.positions[i][0], held[i])  # the cache holds exactly the kept slots
        torch.testing.assert_close(layer.keys, ref_cache.layers[i].keys, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.values, ref_cache.layers[i].values, atol=1e-5, rtol=0)
    assert torch.equal(rec.final_positions[0], held[3][~torch.isin(held[3], torch.tensor([7, 12, 13]))])
    assert rec.visual_layer_average == [(13 + 13 + 9 + 6) / 4]


@pytest.mark.parametrize("family,attn", [("llama", "sdpa"), ("qwen2", "eager")])
def test_greedy_continuation_equals_reference(family, attn):
    model = tiny(family, attn)
    x = embeds(20, 2)
    *_, ref_tokens = reference(model, x, DROPS, steps=6)
    e = engine(model, [Fixed(drops={k: [v] for k, v in DROPS.items()})])
    try:
        e.arm(visual_span(20, 3, 16))
        out = model.generate(inputs_embeds=x, max_new_tokens=6, do_sample=False)
    finally:
        e.remove()
    assert torch.equal(out, ref_tokens)
    with torch.no_grad():
        assert not torch.equal(model.generate(inputs_embeds=x, max_new_tokens=6, do_sample=False), out)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_decode_cut_equals_reference_including_layer0(attn):
    """A DECODE cut of layers 0..2 (layer 0 too: positions then come from the engine, not the cache length)."""
    model = tiny("llama", attn)
    x = embeds(20, 3)
    _, ref_cache, held, ref_tokens = reference(model, x, DROPS, steps=5, cut=(0, 1, 2))
    e = engine(model, [Fixed(drops={k: [v] for k, v in DROPS.items()})], [CutTo(layers=[0, 1, 2])])
    try:
        e.arm(visual_span(20, 3, 16))
        out = model.generate(inputs_embeds=x, max_new_tokens=5, do_sample=False)
        assert torch.equal(out, ref_tokens)
        assert e.last.kv_length == [13, 13, 13, 13] and e.last.cut_layers == [0, 1, 2]
        # forward with the cache, no mask and no positions: the engine gives original positions
        e.arm(visual_span(20, 3, 16))
        with torch.no_grad():
            first = model(inputs_embeds=x, use_cache=True)
            cache = first.past_key_values
            for i in range(4):
                torch.testing.assert_close(cache.layers[i].keys, ref_cache.layers[i].keys[:, :, :13], atol=1e-5, rtol=0)
            step = model(input_ids=ref_tokens[:, :1], past_key_values=cache, use_cache=True)
            assert step.logits[0, -1].argmax() == ref_tokens[0, 1]
            assert [layer.keys.shape[2] for layer in cache.layers] == [14] * 4
    finally:
        e.remove()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_keep_all_is_bit_identical(attn):
    model = tiny("llama", attn)
    x = torch.cat([embeds(14, 4), embeds(14, 5)])
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[1, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    vis = visual_span(14, 4, 10).expand(2, -1) & mask.bool()
    with torch.no_grad():
        logits = model(inputs_embeds=x, attention_mask=mask, position_ids=pos).logits
        tokens = model.generate(inputs_embeds=x, attention_mask=mask, max_new_tokens=4, do_sample=False)
    e = engine(model, [Fixed(drops={1: [[], []]})])
    try:
        with torch.no_grad():
            e.arm(vis)
            got = model(inputs_embeds=x, attention_mask=mask, position_ids=pos).logits
            e.arm(vis)
            got_tokens = model.generate(inputs_embeds=x, attention_mask=mask, max_new_tokens=4, do_sample=False)
            unarmed = model(inputs_embeds=x, attention_mask=mask, position_ids=pos).logits
    finally:
        e.remove()
    assert torch.equal(got, logits) and torch.equal(unarmed, logits) and torch.equal(got_tokens, tokens)
    assert e.last.drop_layers == [] and e.last.kv_length == [14] * 4


SAMPLES = [(20, (3, 16), {1: [4, 5, 6, 9], 2: [7, 12]}),
           (15, (2, 10), {1: [2, 3], 2: [8]}),
           (11, (1, 8), {1: [], 2: [1, 2, 3, 4, 5, 6, 7]})]


@pytest.mark.parametrize("family,attn", [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa")])
def test_batch_equals_each_sample_alone(family, attn):
    """Left-padded batch, different lengths and kept counts: last logits and greedy tokens as alone."""
    model = tiny(family, attn)
    width = max(n for n, _, _ in SAMPLES)
    xs, masks, vis, drops = [], [], [], {1: [], 2: []}
    single_logits, single_tokens, single_kv = [], [], []
    for seed, (n, (a, b), d) in enumerate(SAMPLES):
        x = embeds(n, 10 + seed)
        e = engine(model, [Fixed(drops={k: [v] for k, v in d.items()})])
        try:
            e.arm(visual_span(n, a, b))
            with torch.no_grad():
                single_logits.append(model(inputs_embeds=x).logits[0, -1])
            single_kv.append([c[0] for c in e.last.kv_tokens])
            e.arm(visual_span(n, a, b))
            single_tokens.append(model.generate(inputs_embeds=x, max_new_tokens=5, do_sample=False)[0])
        finally:
            e.remove()
        pad = width - n
        xs.append(torch.cat([torch.zeros(1, pad, 64), x], 1))
        masks.append(torch.cat([torch.zeros(pad), torch.ones(n)]).long())
        vis.append(torch.cat([torch.zeros(pad, dtype=torch.bool), visual_span(n, a, b)[0]]))
        for k in drops:
            drops[k].append([s + pad for s in d[k]])
    x, mask, vis = torch.cat(xs), torch.stack(masks), torch.stack(vis)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    e = engine(model, [Fixed(drops=drops)])
    try:
        e.arm(vis)
        with torch.no_grad():
            logits = model(inputs_embeds=x, attention_mask=mask, position_ids=pos).logits[:, -1]
        assert [list(c) for c in zip(*e.last.kv_tokens)] == single_kv
        assert len(set(single_kv[b][3] for b in range(3))) == 3  # ragged kept counts
        e.arm(vis)
        tokens = model.generate(inputs_embeds=x, attention_mask=mask, max_new_tokens=5, do_sample=False)
    finally:
        e.remove()
    torch.testing.assert_close(logits, torch.stack(single_logits), atol=1e-4, rtol=0)
    assert torch.equal(tokens, torch.stack(single_tokens))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_half_precision_is_finite(dtype, attn):
    model = tiny("llama", attn, dtype)
    x = torch.randn(2, 16, 64).to(dtype)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, :4] = 0
    e = engine(model, [Fixed(drops={1: [[5, 6, 7], [4]], 2: [[8], [6, 7, 8, 9]]})])
    try:
        e.arm(visual_span(16, 4, 12).expand(2, -1) & mask.bool())
        with torch.no_grad():
            out = model(inputs_embeds=x, attention_mask=mask, use_cache=True)
        assert torch.isfinite(out.logits).all()
        e.arm(visual_span(16, 4, 12).expand(2, -1) & mask.bool())
        with torch.no_grad():
            scores = model.generate(inputs_embeds=x, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                    output_scores=True, return_dict_in_generate=True).scores
        assert all(torch.isfinite(s).all() for s in scores)
    finally:
        e.remove()


def test_sampling_generate_is_seeded_and_reduced():
    model = tiny("qwen2", "sdpa")
    x = torch.cat([embeds(16, 6), embeds(16, 7)])
    vis = visual_span(16, 2, 12).expand(2, -1)
    e = engine(model, [Fixed(drops={1: [[2, 3, 4], [5]]})])
    try:
        runs = []
        for _ in range(2):
            e.arm(vis)
            torch.manual_seed(3)
            runs.append(model.generate(inputs_embeds=x, max_new_tokens=6, do_sample=True, top_k=20, temperature=1.5))
        assert e.last.drop_layers == [1] and e.last.kv_tokens[3] == [13, 15]
    finally:
        e.remove()
    assert runs[0].shape == (2, 6) and torch.equal(runs[0], runs[1])
    assert ((runs[0] >= 0) & (runs[0] < 100)).all()


def test_remove_restores_bit_identical_model():
    model = tiny("llama", "eager")
    x = embeds(18, 8)
    with torch.no_grad():
        before = model(inputs_embeds=x).logits
        tokens = model.generate(inputs_embeds=x, max_new_tokens=4, do_sample=False)
    # (transformers may have put its own output-capture hooks on this shared model: count only ours)
    hooks_before = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]
    e = engine(model, [Fixed(drops={1: [[4, 5, 6]]})], [CutTo(layers=[1])])
    e.arm(visual_span(18, 3, 12))
    with torch.no_grad():
        reduced = model(inputs_embeds=x).logits
    assert reduced.shape[1] == 15
    e.arm(visual_span(18, 3, 12))  # armed but never used: remove() forgets it
    e.remove()
    e.remove()  # idempotent
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()] == hooks_before
    with torch.no_grad():
        assert torch.equal(model(inputs_embeds=x).logits, before)
        assert torch.equal(model.generate(inputs_embeds=x, max_new_tokens=4, do_sample=False), tokens)


def test_unrelated_cache_and_unarmed_calls_are_untouched():
    model = tiny("llama", "sdpa")
    x = embeds(18, 9)
    with torch.no_grad():
        plain = model(inputs_embeds=x, use_cache=True)
        step = model(input_ids=torch.tensor([[5]]), past_key_values=plain.past_key_values).logits
    e = engine(model, [Fixed(drops={1: [[4, 5, 6]]})])
    try:
        e.arm(visual_span(18, 3, 12))
        with torch.no_grad():
            model(inputs_embeds=x, use_cache=True)  # reduced call; its cache is tracked
            other = model(inputs_embeds=x, use_cache=True)  # not armed
            again = model(input_ids=torch.tensor([[5]]), past_key_values=other.past_key_values).logits
    finally:
        e.remove()
    assert torch.equal(again, step)


def test_layout_mask_formats():
    valid = torch.tensor([[False, True, True, True]])
    sdpa = layout_mask(valid, 2, "sdpa", torch.float16)
    assert sdpa.dtype == torch.bool and sdpa.shape == (1, 1, 2, 4)
    assert sdpa[0, 0].tolist() == [[False, True, True, False], [False, True, True, True]]
    eager = layout_mask(valid, 4, "eager", torch.bfloat16)
    assert eager.dtype == torch.bfloat16 and eager[0, 0, 0, 0] == 0  # a padding row attends to itself only
    assert eager[0, 0, 0, 1] == torch.finfo(torch.bfloat16).min


def test_errors_are_clear():
    model = tiny("llama", "sdpa")
    x = embeds(12, 1)
    with pytest.raises(PlanError, match="acts after layer 3"):
        PrefillEngine(model.model, [Fixed(drops={3: [[]]})])
    with pytest.raises(PlanError, match="not a PREFILL reducer"):
        PrefillEngine(model.model, [CutTo()])
    e = PrefillEngine(model.model, [Fixed(drops={1: [[0]]})])
    with pytest.raises(RuntimeError, match="before install"):
        e.arm(visual_span(12, 2, 8))
    e.install()
    try:
        e.arm(visual_span(12, 2, 8))
        with pytest.raises(InputError, match="armed for"), torch.no_grad():
            model(inputs_embeds=embeds(10, 1))
        e.arm(visual_span(12, 2, 8))
        with pytest.raises(PlanError, match="dropped a text or protected token"), torch.no_grad():
            model(inputs_embeds=x)  # slot 0 is text
        e.arm(visual_span(12, 0, 8), protected=visual_span(12, 0, 1))
        with pytest.raises(PlanError, match="dropped a text or protected token"), torch.no_grad():
            model(inputs_embeds=x)  # slot 0 is protected
        e.arm(visual_span(12, 0, 8))
        cache = StaticCache(config=model.config, max_cache_len=32)
        with pytest.raises(UnsupportedModelError, match="DynamicCache"), torch.no_grad():
            model(inputs_embeds=x, past_key_values=cache, use_cache=True)
        with pytest.raises(InputError, match="visual"):
            e.arm(torch.ones(12, dtype=torch.bool))
        model.config._attn_implementation = "flex_attention"
        e.arm(visual_span(12, 0, 8))
        with pytest.raises(UnsupportedModelError, match="sdpa or eager"), torch.no_grad():
            model(inputs_embeds=x)
    finally:
        model.config._attn_implementation = "sdpa"
        e.remove()


def test_host_syncs_only_at_start_and_pruning_layers(monkeypatch):
    """`.tolist()`/`.item()` from tokenreduce: one at the start of prefill, one per acting layer, none in decode."""
    import sys

    model = tiny("llama", "sdpa")
    calls: list[str] = []
    for meth in ("tolist", "item"):
        orig = getattr(torch.Tensor, meth)

        def counting(self, *a, _orig=orig, _name=meth, **k):
            if "tokenreduce" in sys._getframe(1).f_code.co_filename:
                calls.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, meth, counting)
    e = engine(model, [Fixed(drops={1: [[4, 5]]})])
    try:
        e.arm(visual_span(16, 2, 12))
        with torch.no_grad():
            out = model(inputs_embeds=embeds(16, 1), use_cache=True)
            assert calls == ["tolist", "tolist"]
            for t in range(3):
                model(input_ids=torch.tensor([[t + 1]]), past_key_values=out.past_key_values)
        assert calls == ["tolist", "tolist"]
    finally:
        e.remove()
