"""Train the default image or video model on generated data (CPU, minutes).

    python -m tokenreduce.eval.train --recipe image --out runs/image --export   # the shipped image model (66 min)
    python -m tokenreduce.eval.train --recipe video --out runs/video --export   # the shipped video model (2 stages)
    python -m tokenreduce.eval.train --model image --minutes 20 --out runs/try  # anything else: flags

A recipe (`RECIPES`) is a fixed set of flags (steps, batch, learning rate, auxiliary weights): the same command
sees the same data and schedule. Floating-point reduction order (thread count, hardware) still makes two runs
drift apart; a 2-thread rerun of the first video recipe left its chance plateau 250 steps later than the
1-thread run and ended 0.017 lower on validation. Explicit flags override a recipe's values.
`--task-weights relation=3` changes the training mix (validation stays uniform); `--vision-lr-scale` scales the
vision tower's and projector's learning rate. `--stop-at` ends a run early at a step of its schedule (the
`video-plain` recipe stops at 1750 of 2000, where its validation peaked); `--stop-score` ends it at the first
validation that reaches an unreduced accuracy. `--export` copies the best checkpoint into the package
(`tokenreduce/assets/models/<kind>/`) when training ends.

`--init DIR` starts from a saved model (`warmstart.py`: vocabulary matched by word, the tower's position grid
resized). A recipe with a first stage (`video`: `init_recipe="video-plain"`) trains that stage into OUT/stage1
first, then starts from its best checkpoint; `--init` names another start instead.

Data is drawn on the fly from the synthetic generator's **train** split (never validation or test); every sample
is one question in one of the official prompt protocols (`protocols`: MLVU official and lmms-eval for images; plus
Video-MME for videos), and the loss is on the answer completion only ("B)" / " B" + end of sequence).

Auxiliary targets (training only; the heads are discarded, the shipped model is stock):

- `TokenProbe` (`--probe-weight`): a linear probe on every visual token the LLM receives predicts what is drawn
  under it (colour, shape or nothing) and its grid cell, so perception is explicit at each token.
- `--open-frac`: a share of samples asks the question without options, answered in words.
- `StepHeads` (`--step-weight`): at the question's "?" a head predicts the answer in words; at the end of each
  option a head predicts whether that option is correct.
- `attention_loss` (`--attn-weight`, `--attn-layer`): the "?" token attends to the visual tokens of the objects
  the question is about; `route_loss` (`--route-weight`): each option's last token attends to its letter and to
  the "?", and the answer position attends to the correct option (attention supervision; eager attention).
- `Teacher` (`--teacher-frac`, `--teacher-steps`, `--teacher-weight`; image model): on a share of samples that
  decays linearly to zero over `--teacher-steps`, the LLM receives symbolic visual tokens instead of the
  projector's output (each token = the word embeddings of the colour and shape drawn under it), so it learns to
  read and compare the scene while perception is still poor; the projector regresses onto the same symbolic
  tokens throughout, so by the time the teacher is gone the real tokens say the same thing.

Precision: `--precision bf16` (default) runs forward and backward under bfloat16 autocast with float32 master
weights (1.7x faster per step on this AVX512-BF16 CPU); the saved model is float32.

Measured here: with the answer loss alone (plus the probe) a tiny LLaVA stays at chance for 1000+ steps; binding
the question to the right tokens and the answer to the right letter is the hard part. A curriculum starts the
image model on the one-hop tasks (colour_of, shape_of) before adding present and count_colour.

Checkpoints: `OUT/state.pt` (model, optimiser, schedule, step, data position, best score), written atomically
every `--save-every` steps and after each validation, so a killed run resumes where it stopped; `OUT/best/` is
the best model on the validation split so far (`save_pretrained` + tokenizer), also replaced atomically.
Progress: one line every `--log-every` steps; validation accuracy per task every `--val-every` steps.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import re
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import augment as A
from . import models as M
from . import protocols as P
from . import synthetic as syn
from .synthetic.scene import COLOURS, SHAPES, Geometry, all_names, position_phrase, shape_mask
from .warmstart import warm_start

COLOUR_NAMES = list(COLOURS)
N_COLOUR, N_SHAPE = len(COLOURS) + 1, len(SHAPES) + 1  # + "nothing"
#: the one-hop image tasks the curriculum starts with (`--easy-steps`), of whichever task set is trained
EASY_IMAGE_TASKS = ("colour_of", "shape_of", "colour_at", "shape_at")


# --- per-token labels ------------------------------------------------------------------------------------------


def id_map(placements: list[tuple[float, float, str, str, int, int]], geometry: Geometry) -> tuple[np.ndarray, list]:
    """Which object covers each pixel: (H, W) int (0 = background, k = placements[k-1]), painted in order like
    the renderer. `placements` are (row, col, colour, shape, dy, dx) with fractional cells allowed and the
    object's pixel offset."""
    out = np.zeros((geometry.size, geometry.size), dtype=np.int16)
    px = geometry.object_px
    for k, (row, col, _, shape, dy, dx) in enumerate(placements, start=1):
        y, x = geometry.top_left(row, col, dy, dx)
        mask = shape_mask(shape, px)
        y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + px, geometry.size), min(x + px, geometry.size)
        if y0 < y1 and x0 < x1:
            out[y0:y1, x0:x1][mask[y0 - y:y1 - y, x0 - x:x1 - x]] = k
    return out, placements


def token_labels(ids: np.ndarray, placements: list, geometry: Geometry, side: int, min_pixels: int) -> np.ndarray:
    """(side*side, 4) int64 per token of a `side` x `side` grid: colour (0 = none), shape (0 = none), cell row,
    cell col (of the token's centre). A token shows the object covering most of its pixels, if >= `min_pixels`."""
    p = geometry.size // side
    blocks = ids[: side * p, : side * p].reshape(side, p, side, p).transpose(0, 2, 1, 3).reshape(side * side, -1)
    out = np.zeros((side * side, 4), dtype=np.int64)
    for t, b in enumerate(blocks):
        counts = np.bincount(b, minlength=len(placements) + 1)
        counts[0] = 0
        k = int(counts.argmax())
        if counts[k] >= min_pixels:
            colour, shape = placements[k - 1][2:4]
            out[t, 0] = COLOUR_NAMES.index(colour) + 1
            out[t, 1] = SHAPES.index(shape) + 1
        r, c = divmod(t, side)
        centre = lambda i: min(max(int((i * p + p / 2 - geometry.origin) // geometry.cell), 0), geometry.grid - 1)
        out[t, 2], out[t, 3] = centre(r), centre(c)
    return out


def image_token_labels(sample: syn.ImageSample, side: int) -> np.ndarray:
    geometry = Geometry(sample.image.shape[0], syn.ImageConfig().grid)
    placements = [(o.row, o.col, o.colour, o.shape, o.dy, o.dx) for o in sample.objects]
    ids, _ = id_map(placements, geometry)
    return token_labels(ids, placements, geometry, side, min_pixels=(geometry.size // side) ** 2 // 8)


def video_token_labels(sample: syn.VideoSample, frames: np.ndarray, side: int) -> np.ndarray:
    """(T, side*side, 4) labels of the sampled `frames` (indices) of a video."""
    out = []
    for t in frames:
        placements = []
        for sp in sample.sprites:
            for a in sp.appearances:
                if a.start <= t < a.stop:
                    f = (t - a.start) / max(a.stop - a.start - 1, 1) if a.moving else 0.0
                    placements.append((a.row + f * (a.row_end - a.row), a.col + f * (a.col_end - a.col), sp.colour,
                                       sp.shape, sp.dy, sp.dx))
        ids, _ = id_map(placements, sample.geometry)
        out.append(token_labels(ids, placements, sample.geometry, side, min_pixels=(sample.geometry.size // side) ** 2
                                // 8))
    return np.stack(out)


# --- batches ----------------------------------------------------------------------------------------------------


def grid_side(model) -> int:
    """Side of the token grid the LLM receives per image or frame (12 at 168 px / patch 14; the video model pools
    it 2x2 to 6)."""
    vc = model.config.vision_config
    side = vc.image_size // vc.patch_size
    return -(-side // 2) if model.config.model_type == "llava_onevision" else side


class Batches:
    """Deterministic training batches: item `i` of the train split; each batch's prompt protocol is drawn from a
    seeded stream (one per batch, so the batch's prompts have similar lengths and little padding)."""

    def __init__(self, kind: str, seed: int, batch: int, tasks: tuple[str, ...], open_frac: float = 0.0,
                 look: str | None = None) -> None:
        self.kind, self.seed, self.batch, self.tasks, self.open_frac = kind, seed, batch, tasks, open_frac
        self.protocols = M_PROTOCOLS[kind]
        self.config = data_config(kind, look)

    def make(self, step: int, tasks: tuple[str, ...], tokenizer, model, reduction: A.Reduction | None = None
             ) -> dict[str, torch.Tensor]:
        """The batch of `step`: model inputs, `labels`, per-token labels of the full grid, the answer-step
        targets, `relevant` (B, K) over the tokens the LLM receives, `objects` (B, 30) the names in the scene, and
        with a `reduction`, `reduce` (B, K, N): the averaging matrix that shortens the N visual tokens to K."""
        start = step * self.batch
        rng = np.random.default_rng([self.seed, step])
        side = grid_side(model)
        if self.kind == "image":
            samples = syn.generate_images(self.batch, seed=self.seed, split="train", start=start, tasks=tasks,
                                          config=self.config)
            visuals = np.stack([s.image for s in samples])
            labels = np.stack([image_token_labels(s, side) for s in samples])
            frames = 1
        else:
            samples = syn.generate_videos(self.batch, seed=self.seed, split="train", start=start, tasks=tasks,
                                          config=self.config)
            idx = [np.linspace(0, s.n_frames - 1, M.NUM_FRAMES, dtype=np.int64) for s in samples]
            visuals = np.stack([s.frames[i] for s, i in zip(samples, idx)])
            labels = np.stack([video_token_labels(s, i, side) for s, i in zip(samples, idx)])
            frames = M.NUM_FRAMES
        prompts, targets = [], []
        protocol = self.protocols[int(rng.integers(len(self.protocols)))]  # one per batch: less padding
        for s in samples:
            q = s.question
            if rng.random() < self.open_frac:  # auxiliary: the answer in words, no options
                prompts.append(P.open_prompt(q.question, self.kind))
                targets.append(" " + q.answer_text)
                continue
            prompts.append(P.build_prompt(protocol, q.question, q.options, self.kind))
            targets.append(P.target(protocol, q.letter))
        flat = labels.reshape(len(samples), -1, 4)
        relevant = torch.from_numpy(np.stack([relevant_tokens(s, f) for s, f in zip(samples, flat)]))
        n_visual = None
        extra = 1 if self.kind == "video" else 0  # LLaVA-OneVision's newline after the frames
        if reduction is not None:
            a = A.matrix(reduction, len(samples), frames, side, np.random.default_rng([self.seed, step, 17]))
            relevant = A.reduce_mask(a, relevant)
            n_visual = a.shape[1] + extra
        inputs = M.encode(tokenizer, model, prompts, visuals, targets, n_visual=n_visual)
        inputs["token_labels"] = torch.from_numpy(labels)
        inputs.update(step_targets(tokenizer, inputs["input_ids"], samples))
        inputs["relevant"] = relevant
        inputs["objects"] = torch.from_numpy(np.stack([scene_names(s) for s in samples]))
        if reduction is not None:
            inputs["reduce"] = a
        return inputs


def scene_names(sample) -> np.ndarray:
    """(30,) float: 1 for each "colour shape" name shown in the image or video (the CLS head's target)."""
    names = all_names()
    out = np.zeros(len(names), dtype=np.float32)
    things = sample.objects if hasattr(sample, "objects") else sample.sprites
    for o in things:
        out[names.index(o.name)] = 1.0
    return out


M_PROTOCOLS = {"image": P.IMAGE_PROTOCOLS, "video": P.VIDEO_PROTOCOLS}
_NAME = re.compile(rf"\b({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})\b")


def relevant_objects(sample) -> list[tuple[str | None, str | None]]:
    """(colour, shape) of the objects a question is about (None: any), for the attention target."""
    q = sample.question
    out = [(c, s) for c, s in _NAME.findall(q.question)]
    if q.task in ("colour_at", "shape_at"):
        out += [(o.colour, o.shape) for o in sample.objects if position_phrase(o.row, o.col, 3) in q.question]
    elif q.task == "colour_of":
        out.append((None, q.question.rstrip("?").split()[-1]))
    elif q.task == "shape_of":
        out.append((q.question.split()[4], None))
    elif q.task == "count_colour":
        out.append((q.question.split()[2], None))
    elif q.task == "needle":
        out.append((q.answer_text, q.question.split()[1]))
    m = _NAME.fullmatch(q.answer_text)
    if m:
        out.append((m.group(1), m.group(2)))
    return out


def relevant_tokens(sample, labels: np.ndarray) -> np.ndarray:
    """(N,) bool over the visual tokens ((N, 4) labels): the tokens showing an object the question is about."""
    out = np.zeros(len(labels), dtype=bool)
    for colour, shape in relevant_objects(sample):
        hit = labels[:, 0] > 0
        if colour is not None:
            hit &= labels[:, 0] == COLOUR_NAMES.index(colour) + 1
        if shape is not None:
            hit &= labels[:, 1] == SHAPES.index(shape) + 1
        out |= hit
    return out


def attention_loss(attentions: torch.Tensor, input_ids: torch.Tensor, visual_id: int, q_pos: torch.Tensor,
                   relevant: torch.Tensor) -> torch.Tensor:
    """-log of the attention mass (mean over heads) the question's "?" puts on the relevant visual tokens.

    attentions (B, H, L, L) of one decoder layer; relevant (B, N) over the grid tokens in sequence order (a
    trailing extra placeholder, LLaVA-OneVision's newline, is never relevant)."""
    b = input_ids.shape[0]
    ok = (q_pos >= 0) & relevant.any(dim=1)
    if not ok.any():
        return attentions.new_zeros(())
    pos = (input_ids == visual_id).nonzero()[:, 1].view(b, -1)[:, : relevant.shape[1]]  # (B, N)
    rows = torch.arange(b)
    a = attentions[rows, :, q_pos.clamp(min=0)].float()  # (B, H, L): only these rows in float32
    mass = (a.gather(2, pos[:, None].expand(-1, a.shape[1], -1)) * relevant[:, None]).sum(-1).mean(1)  # (B,)
    return -torch.log(mass[ok] + 1e-6).mean()


def step_targets(tokenizer, input_ids: torch.Tensor, samples) -> dict[str, torch.Tensor]:
    """Targets of the intermediate steps of a multiple-choice answer (training-only heads, see `StepHeads`).

    Returns q_pos (B,) the position of the question's "?" (-1 if none), q_target (B,) the first token of the
    answer in words, opt_pos (B, 4) the last token of each option text in the prompt (-1: no options, an
    open-answer sample) and opt_target (B, 4) 1.0 for the correct option.
    """
    ids = tokenizer.convert_tokens_to_ids
    qmark, newline, paren, close, dot = ids("?"), ids("\n"), ids("("), ids(")"), ids(".")
    letters = {ids(c): i for i, c in enumerate("ABCD")}
    b = input_ids.shape[0]
    q_pos = torch.full((b,), -1, dtype=torch.long)
    opt_pos = torch.full((b, 4), -1, dtype=torch.long)
    letter_pos = torch.full((b, 4), -1, dtype=torch.long)
    opt_target = torch.zeros(b, 4)
    q_target = torch.tensor([tokenizer(" " + s.question.answer_text, add_special_tokens=False)["input_ids"][0]
                             for s in samples])
    for r in range(b):
        row = input_ids[r].tolist()
        if qmark in row:
            q_pos[r] = row.index(qmark)
        for i in range(1, len(row) - 2):
            k = letters.get(row[i])
            if k is None:
                continue
            mlvu = row[i - 1] == paren and row[i + 1] == close
            videomme = row[i - 1] == newline and row[i + 1] == dot
            if mlvu or videomme:
                j = i + 2
                while j < len(row) and row[j] != newline:
                    j += 1
                opt_pos[r, k] = j - 1
                letter_pos[r, k] = i
        opt_target[r, samples[r].question.answer] = 1.0
    return {"q_pos": q_pos, "q_target": q_target, "opt_pos": opt_pos, "opt_target": opt_target,
            "letter_pos": letter_pos}


def route_loss(attentions: tuple[torch.Tensor, ...], t: dict[str, torch.Tensor], answer_pos: torch.Tensor,
               layers: tuple[int, int, int]) -> torch.Tensor:
    """Attention targets for the rest of a multiple-choice answer (training only): each option's last token
    attends to its letter (layer `layers[0]`) and to the question's "?" (`layers[1]`); the answer position
    attends to the correct option's last token (`layers[2]`). -log of the attention mass, mean over heads."""
    has = (t["opt_pos"] >= 0).all(dim=1) & (t["q_pos"] >= 0)
    if not has.any():
        return attentions[0].new_zeros(())
    rows = torch.arange(len(has))[has]
    op, lp = t["opt_pos"][has], t["letter_pos"][has]
    r4 = rows[:, None].expand_as(op)

    def mass(layer: int, r, q, k) -> torch.Tensor:
        return -torch.log(attentions[layer][r, :, q, k].float().mean(-1) + 1e-6).mean()

    correct = t["opt_target"][has].argmax(dim=1)
    q = t["q_pos"][has][:, None].expand_as(op)
    return (mass(layers[0], r4, op, lp) + mass(layers[1], r4, op, q)
            + mass(layers[2], rows, answer_pos[has], op[torch.arange(len(rows)), correct]))


class StepHeads(nn.Module):
    """Training-only linear heads on the decoder's hidden states that supervise the steps of a multiple-choice
    answer: at the question's "?" (after `q_layer` layers) the answer in words; at the end of each option
    (after `opt_layer` layers) whether that option is the correct one. The letter is then a lookup."""

    def __init__(self, dim: int, vocab: int, q_layer: int = 3, opt_layer: int = 4) -> None:
        super().__init__()
        self.q_head, self.opt_head = nn.Linear(dim, vocab), nn.Linear(dim, 1)
        self.q_layer, self.opt_layer = q_layer, opt_layer

    def loss(self, hidden: tuple[torch.Tensor, ...], t: dict[str, torch.Tensor]) -> torch.Tensor:
        rows = torch.arange(t["q_pos"].shape[0])
        ok = t["q_pos"] >= 0
        out = hidden[0].new_zeros(())
        if ok.any():
            h = hidden[self.q_layer][rows[ok], t["q_pos"][ok]]
            out = out + F.cross_entropy(self.q_head(h), t["q_target"][ok])
        has = t["opt_pos"] >= 0
        if has.any():
            r = rows[:, None].expand_as(t["opt_pos"])[has]
            h = hidden[self.opt_layer][r, t["opt_pos"][has]]
            out = out + F.binary_cross_entropy_with_logits(self.opt_head(h).squeeze(-1), t["opt_target"][has])
        return out


# --- the probe --------------------------------------------------------------------------------------------------


class TokenProbe(nn.Module):
    """Linear heads on the visual tokens the LLM receives: colour, shape, cell row, cell col (training only)."""

    def __init__(self, dim: int, grid: int = 3) -> None:
        super().__init__()
        self.head = nn.Linear(dim, N_COLOUR + N_SHAPE + 2 * grid)
        self.grid = grid

    def loss(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """feats (N, D) and labels (N, 4) -> the summed cross-entropy of the four heads."""
        z = self.head(feats)
        sizes = [N_COLOUR, N_SHAPE, self.grid, self.grid]
        return sum(F.cross_entropy(part, labels[:, i]) for i, part in enumerate(z.split(sizes, dim=-1)))


class Teacher(nn.Module):
    """Symbolic visual tokens from per-token labels (training only): a token showing a red circle in the top-left
    cell is the sum of the LLM's word embeddings of " red", " circle", " top" and " left" (row words top / middle /
    bottom, column words left / middle / right); a background token is one learned vector plus its cell's words.
    The cell is part of the token, as the vision tower's position embeddings make it part of a real token, so a
    token says where it is wherever it sits in the sequence."""

    ROWS = (" top", " middle", " bottom")
    COLS = (" left", " middle", " right")

    def __init__(self, tokenizer, dim: int) -> None:
        super().__init__()
        ids = tokenizer.convert_tokens_to_ids
        self.register_buffer("colour_ids", torch.tensor([ids(" " + c) for c in COLOUR_NAMES]), persistent=False)
        self.register_buffer("shape_ids", torch.tensor([ids(" " + s) for s in SHAPES]), persistent=False)
        self.register_buffer("row_ids", torch.tensor([ids(w) for w in self.ROWS]), persistent=False)
        self.register_buffer("col_ids", torch.tensor([ids(w) for w in self.COLS]), persistent=False)
        self.background = nn.Parameter(torch.zeros(dim))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """embeddings (V, D) word embedding table, labels (B, N, 4) -> (B, N, D) symbolic tokens."""
        colour, shape = labels[..., 0], labels[..., 1]
        obj = colour > 0
        tok = embeddings[self.colour_ids[(colour - 1).clamp(min=0)]] + embeddings[self.shape_ids[(shape - 1).clamp(
            min=0)]]
        where = embeddings[self.row_ids[labels[..., 2]]] + embeddings[self.col_ids[labels[..., 3]]]
        return torch.where(obj[..., None], tok, self.background.to(tok.dtype).expand_as(tok)) + where


def teacher_share(step: int, frac: float, steps: int) -> float:
    """Share of samples that get the teacher's tokens at `step`: `frac`, decaying linearly to 0 at `steps`."""
    return 0.0 if steps <= 0 else frac * max(0.0, 1.0 - step / steps)


class ClsHead(nn.Module):
    """A training-only head on the vision tower's pooled CLS token: which "colour shape" names the scene shows
    (multi-label). Real CLIP towers learn a CLS that summarises the salient objects from image-text pre-training;
    this gives the small tower's CLS the same job, so its attention (what HiRED and MustDrop read) falls on the
    objects rather than anywhere."""

    def __init__(self, dim: int, n_names: int) -> None:
        super().__init__()
        self.head = nn.Linear(dim, n_names)

    def loss(self, cls: torch.Tensor, names: torch.Tensor) -> torch.Tensor:
        """cls (B, Dv) pooled CLS and names (B, n_names) 0/1 targets -> mean binary cross-entropy."""
        return F.binary_cross_entropy_with_logits(self.head(cls).float(), names)


def visual_tokens(model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                    torch.Tensor | None]:
    """The visual tokens the stock forward would place in the LLM, split for reduction: the grid tokens (B, N, D)
    (N = 144 per image; 8 frames x 36 for video, pooled as the model pools them), the tokens after them that no
    reduction touches ((B, 1, D): LLaVA-OneVision's newline; None for LLaVA) and the vision tower's pooled CLS
    ((B, Dv); None for SigLIP, which has no CLS)."""
    inner = model.model
    if model.config.model_type == "llava_onevision":
        pv = inputs["pixel_values_videos"]
        b, t = pv.shape[:2]
        out = inner.vision_tower(pv.flatten(0, 1), output_hidden_states=True)
        feats = inner.apply_pooling(inner.multi_modal_projector(out.hidden_states[model.config.vision_feature_layer]))
        newline = inner.image_newline[None, None, :].expand(b, 1, -1)
        return feats.reshape(b, t * feats.shape[1], -1), newline, None
    out = inner.vision_tower(inputs["pixel_values"], output_hidden_states=True)
    hidden = out.hidden_states[model.config.vision_feature_layer]
    return inner.multi_modal_projector(hidden[:, 1:]), None, out.pooler_output


def embed(model, input_ids: torch.Tensor, visual: torch.Tensor, visual_id: int) -> torch.Tensor:
    """(B, L, D) input embeddings: the text's, with the placeholders (`visual_id`) replaced in order by `visual`
    (B, K, D), exactly as the stock forward scatters its features."""
    embeds = model.get_input_embeddings()(input_ids)
    mask = (input_ids == visual_id)[..., None].expand_as(embeds)
    return embeds.masked_scatter(mask, visual.to(embeds.dtype))


# --- validation --------------------------------------------------------------------------------------------------


def data_config(kind: str, look: str | None = None) -> syn.ImageConfig | syn.VideoConfig:
    """The generator config of `kind` in `look` (`scene.LOOKS`; None: the config's defaults)."""
    cls = syn.ImageConfig if kind == "image" else syn.VideoConfig
    return cls() if look is None else cls.with_look(look)


def validation_set(kind: str, n: int, seed: int = 0, look: str | None = None,
                   tasks: Sequence[str] | None = None):
    """`n` validation items of the training look and tasks (each task once in the cycle, whatever its weight)."""
    config = data_config(kind, look)
    if kind == "image":
        return syn.generate_images(n, seed=seed, split="validation", config=config,
                                   tasks=tuple(dict.fromkeys(tasks or syn.IMAGE_TASKS)))
    return syn.generate_videos(n, seed=seed, split="validation", config=config,
                               tasks=tuple(dict.fromkeys(tasks or syn.VIDEO_TASKS)))


#: generic reductions validation also scores (on the MLVU protocol): a random half, and pooling to about 11%
VAL_REDUCTIONS: dict[str, A.Reduction] = {"drop50": A.Reduction("drop", 0.5), "pool11": A.Reduction("pool", 0.111)}


@torch.no_grad()
def validate(model, tokenizer, kind: str, samples, batch: int = 32, device: str = "cpu",
             reductions: dict[str, A.Reduction] | None = None) -> dict[str, float]:
    """Accuracy of the first answer token (the letter) under every protocol, per task and overall ("all", greedy =
    argmax over the whole vocabulary); then, on the first protocol, under each generic reduction of
    `reductions` (default `VAL_REDUCTIONS`, tokens packed at consecutive positions); "score", the model-selection
    metric, is the mean of "all" and the reduced accuracies."""
    model.eval()
    reductions = VAL_REDUCTIONS if reductions is None else reductions
    hits: dict[str, list[int]] = defaultdict(list)
    side, frames = grid_side(model), (1 if kind == "image" else M.NUM_FRAMES)
    visual_id = tokenizer.convert_tokens_to_ids("<image>" if kind == "image" else "<video>")
    runs = [(p, None, "") for p in M_PROTOCOLS[kind]] + [(M_PROTOCOLS[kind][0], r, n) for n, r in reductions.items()]
    for protocol, reduction, name in runs:
        for b in range(0, len(samples), batch):
            chunk = samples[b:b + batch]
            if kind == "image":
                visuals = np.stack([s.image for s in chunk])
            else:
                visuals = np.stack([s.frames[np.linspace(0, s.n_frames - 1, M.NUM_FRAMES, dtype=np.int64)]
                                    for s in chunk])
            prompts = [P.build_prompt(protocol, s.question.question, s.question.options, kind) for s in chunk]
            targets = [P.target(protocol, s.question.letter) for s in chunk]
            a = None
            if reduction is not None:
                a = A.matrix(reduction, len(chunk), frames, side, np.random.default_rng([b, 23]))
            n_visual = None if a is None else a.shape[1] + (kind == "video")
            inputs = {k: v.to(device) for k, v in M.encode(tokenizer, model, prompts, visuals, targets,
                                                            n_visual=n_visual).items()}
            labels = inputs.pop("labels")
            if a is None:
                logits = model(**inputs).logits
            else:
                feats, extra, _ = visual_tokens(model, inputs)
                vis = A.apply(a.to(device), feats)
                vis = vis if extra is None else torch.cat([vis, extra.to(vis.dtype)], dim=1)
                logits = model(inputs_embeds=embed(model, inputs["input_ids"], vis, visual_id),
                               attention_mask=inputs["attention_mask"]).logits
            first = (labels != -100).float().argmax(dim=1)  # first target position
            rows = torch.arange(len(chunk))
            pred = logits[rows, first - 1].argmax(-1)
            for s, p_, y in zip(chunk, pred.tolist(), labels[rows, first].tolist()):
                if reduction is None:
                    hits[s.task].append(int(p_ == y))
                    hits[f"@{protocol}"].append(int(p_ == y))
                else:
                    hits[f"~{name}"].append(int(p_ == y))
    model.train()
    out = {k: float(np.mean(v)) for k, v in sorted(hits.items())}
    out["all"] = float(np.mean([np.mean(v) for k, v in hits.items() if not k.startswith(("@", "~"))]))
    out["score"] = float(np.mean([out["all"], *(out[f"~{n}"] for n in reductions)]))
    return out


# --- checkpoints -------------------------------------------------------------------------------------------------


def load_state(path: Path, device: str | torch.device = "cpu") -> dict:
    """The training state `main` checkpoints (`OUT/state.pt`), loaded without running code: `torch.load` with
    `weights_only=True` accepts tensors and plain containers only, so a planted or corrupted state file is refused
    with a one-line error instead of being unpickled (which can execute anything)."""
    try:
        state = torch.load(path, weights_only=True, map_location=device)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError or EOFError here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SystemExit(f"train: error: {path} is not a training state this script wrote (refused to load it: "
                         f"{first}); move it away to start afresh") from None
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise SystemExit(f"train: error: {path} is not a training state this script wrote (no model and step); "
                         f"move it away to start afresh")
    return state


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".partial")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_pretrained_atomic(model, tokenizer, path: Path, card: dict) -> None:
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "training.json").write_text(json.dumps(card, indent=1) + "\n")
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


# --- memory ------------------------------------------------------------------------------------------------------


def _libc(name: str):
    try:
        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):  # not glibc (macOS, musl): the allocator is left as it is
        return None


_MALLOC_TRIM, _MALLOPT = _libc("malloc_trim"), _libc("mallopt")
if _MALLOPT is not None:
    _MALLOPT.argtypes = [ctypes.c_int, ctypes.c_int]  # mallopt(int, int): a larger value would wrap, not fail
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}
_kept = 0  # open heap_kept() contexts (a recipe's stage 1 runs inside its stage 2's)


@contextlib.contextmanager
def heap_kept() -> Iterator[bool]:
    """While open, glibc serves every allocation from its heap and keeps what is freed there (`mallopt`: no
    `mmap` per large block, no automatic trim); yields False where libc has no `mallopt`.

    By default each block over the mmap threshold (a step's attention maps, activations and gradients) is mapped
    fresh and unmapped when freed, so every step faults all its pages in again: on the video recipe that kernel
    time was 40% of a step (4.8 s a step, 2 minutes of system time in 4; kept heap: 3.0 s a step, 18 s). The
    memory a step frees is instead reused by the next and handed back by `trim_heap` every `--trim-every` steps.
    The defaults are restored on exit (the process may go on to do other work)."""
    global _kept
    if _MALLOPT is None:
        yield False
        return
    _MALLOPT(_M_MMAP_MAX, 0)
    _MALLOPT(_M_TRIM_THRESHOLD, 2**31 - 1)  # the largest int: freed memory stays until trim_heap
    _kept += 1
    try:
        yield True
    finally:
        _kept -= 1
        if not _kept:
            for param, value in _GLIBC_DEFAULTS.items():
                _MALLOPT(param, value)


def trim_heap() -> bool:
    """Hand the heap memory freed so far back to the OS (glibc's `malloc_trim(0)`); False where libc has none.

    Steps differ in shape (prompt lengths, the token counts of reduced batches), and glibc keeps the blocks one
    step freed mapped for later, scattered over an ever larger address range that later steps touch again: on the
    video recipe a run's resident memory grew to 10 GB in three hours while its live tensors needed 2.5 GB (one
    `malloc_trim` from outside brought it back to 2.5 GB; on a 24 GB machine shared by several people that growth
    is what runs out first). Trimming every `--trim-every` steps bounds a run to its working set."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


def rss_gib() -> float:
    """This process's resident memory in GiB (Linux `/proc/self/statm`; NaN elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, IndexError):
        return float("nan")


# --- main ------------------------------------------------------------------------------------------------------


#: the shipped models' recipes: fixed flags, so one command reproduces them (explicit flags override)
RECIPES: dict[str, dict] = {
    "image": dict(model="image", seed=0, steps=2500, stop_at=1800, batch=32, lr=1e-3, warmup=150, easy_steps=300,
                  attn_weight=1.0, route_weight=0.3, teacher_frac=0.5, teacher_steps=1600, teacher_weight=1.0,
                  reduce_frac=0.5, cls_weight=0.5, val_size=256, val_every=200),
    # stage 1 of the video model: the first shipped video model's recipe (the plain 112-px look, 8 x 8 patches a
    # frame), a 2000-step schedule stopped at 1750, where its validation peaked: here the decoder learns to read the
    # questions and answer them, the slow part from scratch. Stopped earlier (1500, validation 0.79, the learning
    # rate still at 20% of its peak) it was a worse start: stage 2 stood at 0.54 after 320 steps; from 1750, at
    # 0.76 after 280
    "video-plain": dict(model="video", look="plain", seed=0, steps=2000, stop_at=1750, batch=32, lr=1.5e-3,
                        warmup=150, attn_weight=1.0, route_weight=0.3, val_every=250),
    # stage 2: from stage 1's best checkpoint (run first, into OUT/stage1, unless --init names one) on the rich
    # 168-px look (12 x 12 patches a frame), reduction-aware; no teacher (stage 1's projector is far from the
    # symbolic tokens, and the decoder already reads and answers). 1000 steps fill the 90 minutes (74.7 for both
    # stages measured); 700 ended 0.006 lower on validation and weaker under reduction (random half 0.625 vs 0.708)
    "video": dict(model="video", look="rich", init_recipe="video-plain", seed=0, steps=1000, batch=32, lr=1e-3,
                  warmup=50, attn_weight=1.0, route_weight=0.3, reduce_frac=0.5, val_every=200),
}


def learning_rate(step: int, lr: float, warmup: int, main_end: int,
                  restarts: Sequence[tuple[int, float]] = ()) -> float:
    """Linear warmup over `warmup` steps, then cosine to 5% of `lr` at `main_end`. Each `(steps, peak)` of
    `restarts` is a warm restart after the previous cycle: the same shape again (25-step warmup to `peak`,
    cosine to 5% of it) over `steps` steps. Past the last cycle the rate stays at its floor."""
    peak, start, end = lr, 0, main_end
    for n, restart_peak in restarts:
        if step < end:
            break
        peak, start, end, warmup = restart_peak, end, end + n, 25
    if step - start < warmup:
        return peak * (step - start + 1) / warmup
    frac = min((step - start - warmup) / max(end - start - warmup, 1), 1.0)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))


def param_groups(model: nn.Module, heads: Sequence[nn.Module], weight_decay: float,
                 vision_lr_scale: float = 1.0) -> list[dict]:
    """AdamW groups: weight decay on matrices only; with `vision_lr_scale` != 1 the vision tower and projector
    get their own groups whose learning rate is the schedule's times that scale (`lr_scale`). Groups keep the
    parameters' order (model, then heads), so at scale 1 they are the two groups older state files hold."""
    inner = model.model
    vision = set() if vision_lr_scale == 1.0 else {
        id(p) for m in (inner.vision_tower, inner.multi_modal_projector) for p in m.parameters()}
    params = [p for m in (model, *heads) for p in m.parameters()]
    groups = []
    for in_vision in (False, True):
        for matrix in (True, False):
            ps = [p for p in params if (id(p) in vision) == in_vision and (p.ndim >= 2) == matrix]
            if ps:
                groups.append({"params": ps, "weight_decay": weight_decay if matrix else 0.0,
                               "lr_scale": vision_lr_scale if in_vision else 1.0})
    return groups


def task_mix(tasks: Sequence[str], weights: Sequence[str]) -> tuple[str, ...]:
    """The training task cycle: each of `tasks` repeated by its weight from `weights` ("TASK=N", default 1).
    The generator cycles through the tuple by item index, so a task's share of the samples is N / sum."""
    share = dict.fromkeys(tasks, 1)
    for item in weights:
        name, _, n = item.partition("=")
        if name not in share:
            raise ValueError(f"--task-weights: unknown task {name!r} (tasks: {', '.join(tasks)})")
        if not n.isdigit() or int(n) < 1:
            raise ValueError(f"--task-weights: {item!r} needs a positive integer weight, as in {name}=2")
        share[name] = int(n)
    return tuple(t for t in tasks for _ in range(share[t]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tokenreduce.eval.train", description=__doc__.split("\n")[0])
    p.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="a shipped model's recipe (sets --model and the training flags below)")
    p.add_argument("--model", choices=M.KINDS, default=None, help="required unless --recipe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--look", choices=sorted(syn.LOOKS), default=None,
                   help="the generated data's look (default: the one the shipped model of --model was trained on)")
    p.add_argument("--tasks", type=lambda s: tuple(t.strip() for t in s.split(",") if t.strip()), default=None,
                   help="comma-separated tasks to train on (default: the shipped model's; --task-weights weighs them)")
    p.add_argument("--minutes", type=float, default=50.0, help="training time budget (sets the schedule length)")
    p.add_argument("--steps", type=int, default=None, help="fixed number of steps instead of --minutes")
    p.add_argument("--out", required=True)
    p.add_argument("--init", default=None, metavar="DIR",
                   help="start from this saved model (eval/warmstart.py: vocabulary and position grid adapted)")
    p.add_argument("--export", nargs="?", const="package", default=None, metavar="DIR",
                   help="at the end, copy OUT/best into DIR (default: the package, tokenreduce/assets/models/<kind>/)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the data stream is the same on both)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                   help="autocast dtype of forward/backward (master weights and the saved model are float32)")
    p.add_argument("--batch", type=int, default=None, help="default 32 (image), 16 (video)")
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--probe-weight", type=float, default=0.5)
    p.add_argument("--open-frac", type=float, default=0.25, help="share of auxiliary open-answer samples")
    p.add_argument("--step-weight", type=float, default=0.5, help="weight of the answer-step heads (StepHeads)")
    p.add_argument("--attn-weight", type=float, default=0.0,
                   help="weight of the attention target: the question's '?' attends to the objects it is about")
    p.add_argument("--attn-layer", type=int, default=2, help="decoder layer of the attention target")
    p.add_argument("--route-weight", type=float, default=0.0,
                   help="weight of the attention targets of the option -> letter steps (`route_loss`)")
    p.add_argument("--teacher-frac", type=float, default=0.0,
                   help="image model: share of samples fed the teacher's symbolic tokens at step 0 (`Teacher`)")
    p.add_argument("--teacher-steps", type=int, default=0, help="steps over which that share decays to 0")
    p.add_argument("--teacher-weight", type=float, default=1.0,
                   help="weight of the projector's regression onto the teacher's tokens")
    p.add_argument("--restart-steps", type=int, nargs="+", default=[],
                   help="after --steps, warm restarts of this many steps each: cosine cycles peaking at --restart-lr "
                   "after a 25-step warmup (part of the run: resumable, the same on every machine)")
    p.add_argument("--stop-score", type=float, default=None, metavar="SCORE",
                   help="end the run at the first validation whose unreduced accuracy ('all') reaches SCORE (a first "
                        "stage that only has to be good enough to start from; --stop-at still bounds it)")
    p.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="end the run at this step of the schedule (early stop: the learning rate and teacher "
                        "schedules keep the length --steps and --restart-steps give them)")
    p.add_argument("--restart-lr", type=float, nargs="+", default=None,
                   help="peak learning rate of each restart (one per --restart-steps, or one for all; default --lr/2)")
    p.add_argument("--total-steps", type=int, default=None, help="on resume: change the schedule's length")
    p.add_argument("--easy-steps", type=int, default=None, help="image curriculum: steps on one-hop tasks only")
    p.add_argument("--vision-lr-scale", type=float, default=1.0,
                   help="the vision tower's and projector's learning rate is the schedule's times this")
    p.add_argument("--task-weights", nargs="+", default=[], metavar="TASK=N",
                   help="training mix: task TASK gets N shares of the samples (a positive integer; others get 1); "
                        "validation stays uniform over tasks")
    p.add_argument("--reduce-frac", type=float, default=0.0,
                   help="reduction-aware training: share of batches whose visual tokens are randomly dropped, pooled "
                        "or merged (`augment`), the rest packed at consecutive positions")
    p.add_argument("--reduce-start", type=int, default=0, help="the step from which reductions are drawn")
    p.add_argument("--reduce-keep", type=float, nargs=2, default=(0.08, 0.8), metavar=("LO", "HI"),
                   help="keep ratios are drawn log-uniformly in [LO, HI] (default 0.08 0.8)")
    p.add_argument("--reduce-methods", nargs="+", choices=A.METHODS, default=None,
                   help="default: drop pool merge (image), drop pool merge time (video)")
    p.add_argument("--cls-weight", type=float, default=0.0,
                   help="image model: weight of the CLS head (`ClsHead`: which objects the scene shows)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--val-every", type=int, default=250)
    p.add_argument("--val-size", type=int, default=None, help="validation items (default 256 image, 120 video)")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--trim-every", type=int, default=50,
                   help="return freed heap memory to the OS every N steps (`trim_heap`; between trims the heap "
                        "keeps it for the next steps, `heap_kept`; 0: never trim, the allocator's defaults)")
    p.set_defaults(init_recipe=None)  # a recipe's stage 1 (a recipe name), run into OUT/stage1 unless --init
    first, _ = p.parse_known_args(argv)
    if first.recipe:
        p.set_defaults(**RECIPES[first.recipe])
    args = p.parse_args(argv)
    if args.model is None:
        p.error("--model is required (or give --recipe)")
    if not 0.0 <= args.teacher_frac <= 1.0:
        p.error(f"--teacher-frac must be in [0, 1], got {args.teacher_frac}")
    if args.restart_steps and args.steps is None:
        p.error("--restart-steps needs --steps (a --minutes run has no fixed end to restart after)")
    if any(n < 26 for n in args.restart_steps):
        p.error(f"each --restart-steps must be at least 26 (25 warmup steps and one more), got {args.restart_steps}")
    # `first` was parsed before the recipe's defaults, so it holds only what the command line gave
    if first.recipe and first.stop_at is None and (first.steps is not None or first.restart_steps):
        args.stop_at = None  # a recipe's early stop belongs to its schedule, not to one the flags replaced
    if args.stop_at is not None:
        if args.steps is None:
            p.error("--stop-at needs --steps (a --minutes run already ends on its time budget)")
        length = args.steps + sum(args.restart_steps)
        if not 0 < args.stop_at <= length:
            p.error(f"--stop-at must be in 1..{length} (the schedule's length), got {args.stop_at}")
    if args.stop_score is not None and not 0.0 < args.stop_score <= 1.0:
        p.error(f"--stop-score must be in (0, 1] (a validation accuracy), got {args.stop_score}")
    if not 0.0 <= args.reduce_frac <= 1.0:
        p.error(f"--reduce-frac must be in [0, 1], got {args.reduce_frac}")
    lo, hi = args.reduce_keep
    if not 0.0 < lo <= hi <= 1.0:
        p.error(f"--reduce-keep needs 0 < LO <= HI <= 1, got {lo} {hi}")
    args.reduce_keep = (lo, hi)
    if args.reduce_methods is None:
        args.reduce_methods = ("drop", "pool", "merge") + (("time",) if args.model == "video" else ())
    args.reduce_methods = tuple(args.reduce_methods)
    try:
        known = syn.ALL_IMAGE_TASKS if args.model == "image" else syn.VIDEO_TASKS
        base = args.tasks or (syn.IMAGE_TASKS if args.model == "image" else syn.VIDEO_TASKS)
        unknown = [t for t in base if t not in known]
        if unknown:
            raise ValueError(f"--tasks: unknown {args.model} task {unknown[0]!r} (tasks: {', '.join(known)})")
        args.tasks = task_mix(base, args.task_weights)
    except ValueError as e:
        p.error(str(e))
    peaks = args.restart_lr or [args.lr / 2]
    if len(peaks) not in (1, len(args.restart_steps)):
        p.error(f"--restart-lr takes one value or one per --restart-steps ({len(args.restart_steps)}), "
                f"got {len(peaks)}")
    if len(peaks) == 1:
        peaks = peaks * len(args.restart_steps)
    args.restarts = list(zip(args.restart_steps, peaks))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with heap_kept() if args.trim_every else contextlib.nullcontext():
        return train(args, argv)


def train(args: argparse.Namespace, argv: list[str] | None) -> int:
    """The run `args` describe (`parse_args`); `argv` is recorded in the card as the command."""
    torch.set_num_threads(args.threads)
    kind, device = args.model, torch.device(args.device)
    batch = args.batch or (32 if kind == "image" else 16)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = M.build_tokenizer()
    state_path = out / "state.pt"
    fresh = not state_path.exists()  # a resumed run keeps its own weights: no stage 1, no warm start
    init = args.init
    if init is None and args.init_recipe and fresh:
        stage1 = out / "stage1"
        print(f"stage 1: --recipe {args.init_recipe} into {stage1}", flush=True)
        main(["--recipe", args.init_recipe, "--out", str(stage1), "--threads", str(args.threads),
              "--device", args.device, "--precision", args.precision])
        init = stage1 / "best"
    # the tower's input size is the training look's frame size (168 px rich: 12 x 12 patches; 112 px plain: 8 x 8)
    model = M.build_model(kind, tokenizer, seed=args.seed, vision=dict(image_size=data_config(kind, args.look).size))
    if init is not None and fresh:
        counts = warm_start(model, tokenizer, init)
        print(f"initialised from {init}: {counts}", flush=True)
    model.train()
    dim = model.config.text_config.hidden_size
    probe = TokenProbe(dim)
    n_layers = model.config.text_config.num_hidden_layers
    steps_heads = StepHeads(dim, len(tokenizer), q_layer=n_layers // 2, opt_layer=n_layers - 2)
    teacher = Teacher(tokenizer, dim)
    cls_head = ClsHead(model.config.vision_config.hidden_size, len(all_names()))
    heads = {"probe": probe, "steps_heads": steps_heads, "teacher": teacher, "cls_head": cls_head}
    for m in (model, *heads.values()):
        m.to(device)
    opt = torch.optim.AdamW(param_groups(model, tuple(heads.values()), args.weight_decay, args.vision_lr_scale),
                            lr=args.lr, betas=(0.9, 0.98))
    params = [p for g in opt.param_groups for p in g["params"]]  # for gradient clipping
    visual_id = tokenizer.convert_tokens_to_ids("<image>" if kind == "image" else "<video>")
    if args.attn_weight > 0 or args.route_weight > 0:  # attention probabilities needed; export reloads with sdpa
        model.set_attn_implementation("eager")
    data = Batches(kind, args.seed, batch, args.tasks, args.open_frac, args.look)
    val = validation_set(kind, args.val_size or (256 if kind == "image" else 120), look=args.look, tasks=args.tasks)
    n_params = sum(p.numel() for p in model.parameters())
    step, best, elapsed, history = 0, -1.0, 0.0, []
    total = None if args.steps is None else args.steps + sum(args.restart_steps)
    if state_path.exists():
        st = load_state(state_path, device)
        for name, m in (("model", model), *heads.items()):
            m.load_state_dict(st[name])
        opt.load_state_dict(st["opt"])
        step, best, elapsed, history = st["step"], st["best"], st["elapsed"], st["history"]
        if args.steps is None:  # a --minutes run keeps the length it measured; a fixed-step run is its flags
            total = st["total"]
        if args.total_steps:
            total = args.total_steps
        print(f"resumed at step {step}/{total} (best validation {best:.3f})", flush=True)
    print(f"{kind} model: {n_params / 1e6:.2f}M parameters, vocab {len(tokenizer)}, batch {batch}, "
          f"threads {args.threads}, {device} {args.precision}", flush=True)
    if args.stop_at is not None and args.stop_at < total:
        print(f"early stop: the run ends at step {args.stop_at} of its {total}-step schedule", flush=True)
    easy = args.easy_steps if args.easy_steps is not None else (300 if kind == "image" else 0)
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    command = "python -m tokenreduce.eval.train " + " ".join(sys.argv[1:] if argv is None else argv)

    def lr_at(s: int, total_steps: int) -> float:
        main_end = args.steps if args.steps is not None else total_steps
        return learning_rate(s, args.lr, args.warmup, main_end, args.restarts)

    def checkpoint() -> None:
        save_atomic({"model": model.state_dict(), **{k: m.state_dict() for k, m in heads.items()},
                     "opt": opt.state_dict(), "step": step, "total": total, "best": best, "elapsed": elapsed,
                     "history": history, "args": {k: v for k, v in vars(args).items()}}, state_path)

    def evaluate_now() -> None:
        nonlocal best
        t = time.perf_counter()
        acc = validate(model, tokenizer, kind, val, device=args.device)
        history.append({"step": step, "minutes": round(elapsed / 60, 2), **{k: float(v) for k, v in acc.items()}})
        line = " ".join(f"{k}={v:.3f}" for k, v in acc.items())
        print(f"[val] step {step} {line} ({time.perf_counter() - t:.0f}s)", flush=True)
        if acc["score"] > best:
            best = acc["score"]
            card = {"command": command, "step": step, "minutes": round(elapsed / 60, 2), "validation": acc,
                    "batch": batch, "parameters": n_params, "seed": args.seed, "device": args.device,
                    "precision": args.precision, "threads": args.threads,
                    M.PROMPT_FORMS_KEY: [*M_PROTOCOLS[kind], *(["open"] if args.open_frac > 0 else [])],
                    M.VOCABULARY_KEY: "closed", "look": args.look or syn.look_of(data.config),
                    "tasks": list(dict.fromkeys(args.tasks)), "init": None if init is None else str(init)}
            save_pretrained_atomic(model, tokenizer, out / "best", card)
            print(f"[val] new best {best:.3f} saved to {out / 'best'}", flush=True)
        (out / "history.json").write_text(json.dumps(history, indent=1) + "\n")

    t_last = time.perf_counter()
    window = defaultdict(list)

    def end() -> int | None:  # the step the run ends at: the schedule's end, or --stop-at before it
        return total if total is None or args.stop_at is None else min(total, args.stop_at)

    def good_enough() -> bool:  # --stop-score reached (checked after each validation, and on resume)
        return args.stop_score is not None and bool(history) and history[-1]["all"] >= args.stop_score

    while (total is None or step < end()) and not good_enough():
        easy_tasks = [t for t in data.tasks if t in EASY_IMAGE_TASKS] or data.tasks
        tasks = easy_tasks if (kind == "image" and step < easy) else data.tasks
        frac = args.reduce_frac if step >= args.reduce_start else 0.0
        reduction = A.draw(np.random.default_rng([args.seed, 31, step]), frac, args.reduce_methods, args.reduce_keep)
        inputs = {k: v.to(device) for k, v in data.make(step, tasks, tokenizer, model, reduction).items()}
        labels = inputs.pop("labels")
        tok_labels = inputs.pop("token_labels")
        targets = {k: inputs.pop(k) for k in ("q_pos", "q_target", "opt_pos", "opt_target", "letter_pos")}
        relevant, names, a = inputs.pop("relevant"), inputs.pop("objects"), inputs.pop("reduce", None)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total or 10**9) * g.get("lr_scale", 1.0)
        share = teacher_share(step, args.teacher_frac, args.teacher_steps)
        with torch.autocast(**autocast):
            projected, extra, cls = visual_tokens(model, inputs)  # (B, N, D): what the probe and teacher see
            vis = projected
            symbolic = None
            if args.teacher_frac > 0:
                symbolic = teacher(model.get_input_embeddings().weight,
                                   tok_labels.flatten(1, -2))  # (B, N, D): frames in sequence order
                gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
                mask = torch.rand(labels.shape[0], generator=gen) < share  # drawn on the host: no device sync
                if mask.any():
                    vis = torch.where(mask.to(device)[:, None, None], symbolic.to(vis.dtype), vis)
            if a is not None:
                vis = A.apply(a, vis)
            if extra is not None:
                vis = torch.cat([vis, extra.to(vis.dtype)], dim=1)
            outputs = model(inputs_embeds=embed(model, inputs["input_ids"], vis, visual_id),
                            attention_mask=inputs["attention_mask"], output_hidden_states=True,
                            output_attentions=args.attn_weight + args.route_weight > 0)
        logits = outputs.logits.float()
        tokens = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        first = (labels != -100).float().argmax(dim=1)  # the letter (or the first word of an open answer)
        rows = torch.arange(labels.shape[0], device=device)
        answer = F.cross_entropy(logits[rows, first - 1], labels[rows, first]) + 0.3 * tokens
        feats = projected.float()
        with torch.autocast(**autocast):
            probe_loss = probe.loss(feats.flatten(0, -2), tok_labels.reshape(-1, 4)).float()
            step_loss = steps_heads.loss(outputs.hidden_states, targets).float()
        loss = answer + args.probe_weight * probe_loss + args.step_weight * step_loss
        cls_loss = torch.zeros((), device=device)
        if cls is not None and args.cls_weight > 0:
            cls_loss = cls_head.loss(cls.float(), names)
            loss = loss + args.cls_weight * cls_loss
        teach_loss = torch.zeros((), device=device)
        if symbolic is not None:
            target = symbolic.detach().float()
            teach_loss = F.mse_loss(feats, target) / target.pow(2).mean()
            loss = loss + args.teacher_weight * teach_loss
        attn_loss = torch.zeros((), device=device)
        if args.attn_weight > 0:
            attn_loss = attention_loss(outputs.attentions[args.attn_layer], inputs["input_ids"], visual_id,
                                       targets["q_pos"], relevant)
            loss = loss + args.attn_weight * attn_loss
        if args.route_weight > 0:
            route = route_loss(outputs.attentions, targets, first - 1,
                               (1, args.attn_layer + 1, n_layers - 1))
            attn_loss = attn_loss + route
            loss = loss + args.route_weight * route
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if args.trim_every and step % args.trim_every == 0:
            del outputs, logits, loss, inputs  # the step's tensors go before the trim, not after it
            trim_heap()
        now = time.perf_counter()
        elapsed += now - t_last
        t_last = now
        for name, value in (("answer", answer), ("probe", probe_loss), ("steps", step_loss), ("attn", attn_loss),
                            ("teacher", teach_loss), ("cls", cls_loss)):
            window[name].append(value.detach())  # read back once per log line, not once per step
        if total is None and step == 20:
            total = max(int(args.minutes * 60 / (elapsed / step)), step + 1)
            print(f"{elapsed / step:.2f} s/step -> {total} steps in {args.minutes:g} minutes", flush=True)
        if step % args.log_every == 0:
            losses = " ".join(f"{k} {torch.stack(v).mean().item():.3f}" for k, v in window.items())
            print(f"step {step}/{total} loss {losses} teacher share {share:.2f} lr {opt.param_groups[0]['lr']:.2e} "
                  f"{elapsed / 60:.1f} min rss {rss_gib():.1f} GiB", flush=True)
            window.clear()
        overtime = args.steps is None and elapsed > 1.1 * 60 * args.minutes  # slower than measured: stop anyway
        if overtime:
            print(f"time budget spent at step {step}/{total}; stopping", flush=True)
            total = step
        if step % args.val_every == 0 or step == end():
            evaluate_now()
            t_last = time.perf_counter()  # validation time does not count against the training budget
            checkpoint()
            if good_enough():
                print(f"validation accuracy {history[-1]['all']:.3f} reached --stop-score {args.stop_score:g}: "
                      f"the run ends at step {step}", flush=True)
        elif step % args.save_every == 0:
            checkpoint()
    print(f"done: {step} steps, {elapsed / 60:.1f} min, best validation {best:.3f}", flush=True)
    if args.export:
        dest = M.export(out / "best", kind, None if args.export == "package" else args.export)
        print(f"exported {out / 'best'} -> {dest}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
