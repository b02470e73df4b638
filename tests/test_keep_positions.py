"""`attach(..., keep_positions=True)`: tokens that enter the LLM keep the position ids of the full prompt.

The oracles: pruning with kept positions is the full model with the pruned tokens masked out (same logits at
every kept slot, same greedy tokens); with merging, the LLM on the kept tokens' embeddings at their original
positions; a padded batch equals each sample alone."""

from __future__ import annotations

import pytest
import torch
from conftest import make_image, prompt
from test_video_adapters import make_inputs
from tokenreduce.adapters.videollm.zoo import build_video_llm

import tokenreduce as tr
from tokenreduce.errors import InputError


def masked_full(inputs, positions: torch.Tensor) -> dict:
    """The caller's inputs with every slot the plan dropped masked out, and explicit consecutive positions."""
    mask = torch.zeros_like(inputs["attention_mask"])
    for b in range(mask.shape[0]):
        kept = positions[b][positions[b] >= 0]
        mask[b, kept] = 1
    rank = (inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
    return {**inputs, "attention_mask": mask, "position_ids": rank}


def assert_is_masking(model, inputs, plan: str, new_tokens: int) -> torch.Tensor:
    """Run `plan` with kept positions and check it against the masked full model (logits at every kept slot
    of sample 0, greedy tokens of the batch); returns the reduced logits."""
    with torch.no_grad(), tr.apply(model, plan, keep_positions=True) as run:
        out = model(**inputs).logits
        gen = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    positions = run.report.calls[0].positions
    assert positions.shape[1] < inputs["input_ids"].shape[1]  # something was pruned
    ref_in = masked_full(inputs, positions)
    with torch.no_grad():
        ref = model(**ref_in).logits
        ref_gen = model.generate(**ref_in, max_new_tokens=new_tokens, do_sample=False)
    torch.testing.assert_close(out[0], ref[0, positions[0]], atol=1e-4, rtol=1e-4)
    assert torch.equal(gen, ref_gen)
    return out


@pytest.mark.parametrize("plan", ["random(keep=0.25, seed=1)", "hired(tokens=20)", "random(tokens=7)"])
def test_pruning_with_kept_positions_is_masking_the_full_model(model, single_inputs, plan):
    out = assert_is_masking(model, single_inputs, plan, new_tokens=6)
    with torch.no_grad(), tr.apply(model, plan):  # the default gives consecutive positions: other logits
        compact = model(**single_inputs).logits
    assert not torch.allclose(compact, out, atol=1e-3)


@pytest.mark.parametrize("name", ["pool", "aim-merge"])
def test_merged_tokens_sit_at_their_slots(model, single_inputs, name):
    """Reduced forward == the vanilla LLM on the kept tokens' embeddings with the kept slots as position ids."""
    with torch.no_grad(), tr.apply(model, f"{name}(keep=0.25)", keep_positions=True) as run:
        out = model(**single_inputs).logits
    call = run.report.last
    kept = call.positions[0]
    embeds = model.get_input_embeddings()(single_inputs["input_ids"][0, kept]).clone()
    visual = call.visual[0]
    embeds[torch.isin(kept, visual.position)] = visual.features[torch.argsort(visual.position)].to(embeds.dtype)
    with torch.no_grad():
        ref = model(inputs_embeds=embeds[None], position_ids=kept[None]).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_padded_batch_equals_each_sample_alone(model, processor, batch_parts):
    texts, images = batch_parts
    plan = "pool(keep=0.25)"
    batch = processor(text=texts, images=[i for imgs in images for i in imgs], padding=True, return_tensors="pt")
    with torch.no_grad(), tr.apply(model, plan, keep_positions=True) as run:
        out_b = model(**batch).logits
        gen_b = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert len(set(run.report.calls[0].seq_llm)) > 1  # the reduced batch is padded
    n_in = batch["input_ids"].shape[1]
    for b, (text, imgs) in enumerate(zip(texts, images)):
        single = processor(text=text, images=imgs, return_tensors="pt")
        with torch.no_grad(), tr.apply(model, plan, keep_positions=True) as run1:
            out_1 = model(**single).logits
            gen_1 = model.generate(**single, max_new_tokens=5, do_sample=False)
        n = run1.report.calls[0].seq_llm[0]
        torch.testing.assert_close(out_b[b, -n:], out_1[0], atol=1e-4, rtol=1e-4)
        assert torch.equal(gen_b[b, n_in:], gen_1[0, single["input_ids"].shape[1]:])


def test_keep_everything_is_the_unreduced_model(model, single_inputs):
    with torch.no_grad():
        ref = model(**single_inputs).logits
        ref_gen = model.generate(**single_inputs, max_new_tokens=6, do_sample=False)
    with torch.no_grad(), tr.apply(model, "random(keep=1.0)", keep_positions=True):
        out = model(**single_inputs).logits
        gen = model.generate(**single_inputs, max_new_tokens=6, do_sample=False)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert torch.equal(gen, ref_gen)


def test_with_in_llm_pruning_forward_and_generate_agree(models, processor):
    """VISUAL pruning at kept positions, then PREFILL pruning: generate's first token is forward's argmax."""
    model = models["eager"]
    inputs = processor(text=prompt("Which colour is at the centre?"), images=make_image(7), return_tensors="pt")
    plan = "random(keep=0.5)+aim-prune"
    with torch.no_grad(), tr.apply(model, plan, keep_positions=True) as run:
        out = model(**inputs).logits
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert run.report.calls[0].llm_visual is not None  # the in-LLM stage ran
    assert gen[0, inputs["input_ids"].shape[1]] == out[0, -1].argmax()


@pytest.mark.parametrize("call", ["forward", "generate"])
def test_caller_position_ids_are_refused(models, single_inputs, call):
    model = models["sdpa"]
    ids = single_inputs["input_ids"]
    position_ids = torch.arange(ids.shape[1])[None]
    with tr.apply(model, "pool(keep=0.5)", keep_positions=True), pytest.raises(InputError, match="position_ids"):
        getattr(model, call)(**single_inputs, position_ids=position_ids)


@pytest.mark.parametrize("preset", ["tiny-video-llava", "tiny-onevision", "tiny-next-video"])
def test_video_adapters_keep_positions_as_masking(preset):
    """The video adapters share the mechanism: random pruning of a clip with kept positions is the full model
    with the pruned slots masked out (the extra tokens a model adds, such as frame CLS or newline, included)."""
    model, tok = build_video_llm(preset, seed=0, attn="sdpa")
    assert_is_masking(model, make_inputs(model, tok), "random(keep=0.25)", new_tokens=4)
