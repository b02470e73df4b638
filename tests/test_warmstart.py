"""Warm start (`train.py --init`): a checkpoint carried over to a new vocabulary and a new tower resolution."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenreduce.eval import models as M
from tokenreduce.eval import train as T
from tokenreduce.eval.warmstart import resize_grid, warm_start


def test_resize_grid_keeps_same_size_and_constant_grids_and_interpolates_between():
    w = torch.randn(64, 5)
    assert torch.allclose(resize_grid(w, 64), w, atol=1e-5)
    const = torch.ones(64, 3) * torch.tensor([1.0, -2.0, 0.5])
    assert torch.allclose(resize_grid(const, 144), torch.ones(144, 3) * torch.tensor([1.0, -2.0, 0.5]), atol=1e-5)
    ramp = torch.arange(8.0).repeat(8)[:, None]  # column index, an 8 x 8 grid
    big = resize_grid(ramp, 144).reshape(12, 12)
    assert (big[:, 1:] >= big[:, :-1] - 1e-5).all() and big[0, 0] < 0.5 and big[0, -1] > 6.5  # still a ramp
    assert torch.allclose(big, big[:1].expand(12, 12), atol=1e-5)  # rows still equal
    with pytest.raises(ValueError, match="square"):
        resize_grid(torch.randn(60, 3), 144)


@pytest.fixture(scope="module")
def plain_video_checkpoint(tmp_path_factory) -> Path:
    """A (random) video model at 112 px (8 x 8 patches) saved with a vocabulary of one extra word, ' zebra'."""
    tok = M.build_tokenizer([*M.vocabulary_texts(), "a zebra"])
    model = M.build_model("video", tok, seed=3, vision=dict(image_size=112))
    out = tmp_path_factory.mktemp("plain")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_warm_start_copies_weights_maps_words_and_resizes_the_position_grid(plain_video_checkpoint: Path):
    from transformers import LlavaOnevisionForConditionalGeneration

    src = LlavaOnevisionForConditionalGeneration.from_pretrained(plain_video_checkpoint)
    old_tok = M.build_tokenizer([*M.vocabulary_texts(), "a zebra"])
    tok = M.build_tokenizer()
    assert " zebra" in old_tok.get_vocab() and " zebra" not in tok.get_vocab()
    model = M.build_model("video", tok, seed=0, vision=dict(image_size=168))
    fresh_rows = model.get_input_embeddings().weight.detach().clone()
    counts = warm_start(model, tok, plain_video_checkpoint)
    assert counts["resized"] == 1 and counts["fresh"] == 0 and counts["rows"] == len(tok)
    ours, theirs = dict(model.named_parameters()), dict(src.named_parameters())
    pos = next(n for n in ours if n.endswith("position_embedding.weight"))
    assert ours[pos].shape[0] == 144 and theirs[pos].shape[0] == 64
    assert torch.equal(ours[pos], resize_grid(theirs[pos].detach(), 144))
    for name, p in ours.items():
        if p.shape == theirs[name].shape and p.shape[0] not in (len(tok), len(old_tok)):
            assert torch.equal(p, theirs[name]), name
    emb, old_emb = model.get_input_embeddings().weight, src.get_input_embeddings().weight
    old_vocab = old_tok.get_vocab()
    for word, i in tok.get_vocab().items():  # every word by its string, wherever its id moved
        assert torch.equal(emb[i], old_emb[old_vocab[word]]), word
    assert not torch.equal(emb, fresh_rows)


def test_warm_start_from_a_missing_directory_names_it(tmp_path: Path):
    tok = M.build_tokenizer()
    model = M.build_model("video", tok)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        warm_start(model, tok, tmp_path / "nowhere")


def test_init_flag_trains_from_the_checkpoint_and_the_card_says_so(plain_video_checkpoint: Path, tmp_path: Path,
                                                                    capsys):
    """`--init DIR` starts the run from DIR (once: a resumed run keeps its own weights) and records it."""
    argv = ["--model", "video", "--look", "rich", "--init", str(plain_video_checkpoint), "--out", str(tmp_path),
            "--steps", "1", "--batch", "2", "--val-size", "2", "--threads", "1", "--log-every", "1"]
    assert T.main(argv) == 0
    out = capsys.readouterr().out
    assert f"initialised from {plain_video_checkpoint}" in out and "'resized': 1" in out
    card = json.loads((tmp_path / "best" / "training.json").read_text())
    assert card["init"] == str(plain_video_checkpoint) and card["look"] == "rich"
    assert T.main([*argv[:-4], "--steps", "2", "--threads", "1"]) == 0
    assert "initialised from" not in capsys.readouterr().out  # resumed from state.pt, not warm-started again


def test_video_recipe_is_two_stages_plain_then_rich(tmp_path: Path):
    args = T.parse_args(["--recipe", "video", "--out", str(tmp_path)])
    assert (args.init_recipe, args.look, args.init) == ("video-plain", "rich", None) and args.reduce_frac > 0
    stage1 = T.parse_args(["--recipe", args.init_recipe, "--out", str(tmp_path)])
    assert stage1.look == "plain" and stage1.init_recipe is None
    assert T.data_config("video", stage1.look).size == 112 and T.data_config("video", args.look).size == 168
