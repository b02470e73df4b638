"""The training script's machinery: the teacher's symbolic tokens, the visual-token path that reduction-aware
training feeds (equal to the stock forward when nothing is reduced), the generic random reductions, the recipes'
flags, safe resuming and the export into a model folder. Fresh (untrained) models, real forward passes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenreduce.eval import augment as A
from tokenreduce.eval import models as M
from tokenreduce.eval import synthetic as syn
from tokenreduce.eval import train as T
from transformers import AutoProcessor, LlavaForConditionalGeneration


@pytest.fixture(scope="module")
def image_model():
    tok = M.build_tokenizer()
    return M.build_model("image", tok, seed=0).eval(), tok


def test_teacher_tokens_are_word_embeddings_of_what_is_drawn(image_model):
    model, tok = image_model
    teacher = T.Teacher(tok, model.config.text_config.hidden_size)
    with torch.no_grad():
        teacher.background.normal_()
    emb = model.get_input_embeddings().weight
    colours, shapes = list(syn.COLOURS), list(syn.SHAPES)
    labels = torch.zeros(1, 3, 4, dtype=torch.long)
    labels[0, 0] = torch.tensor([colours.index("red") + 1, shapes.index("circle") + 1, 0, 0])  # top left
    labels[0, 1] = torch.tensor([colours.index("white") + 1, shapes.index("cross") + 1, 2, 1])  # bottom middle
    labels[0, 2, 2:] = torch.tensor([1, 2])  # background, middle right
    out = teacher(emb, labels)
    e = lambda *words: sum(emb[tok.convert_tokens_to_ids(w)] for w in words)
    torch.testing.assert_close(out[0, 0], e(" red", " circle") + e(" top", " left"), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[0, 1], e(" white", " cross") + e(" bottom", " middle"), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[0, 2], teacher.background + e(" middle", " right"), rtol=0, atol=1e-6)


def test_teacher_share_decays_linearly_to_zero():
    assert T.teacher_share(0, 0.5, 100) == 0.5
    assert T.teacher_share(50, 0.5, 100) == pytest.approx(0.25)
    assert T.teacher_share(100, 0.5, 100) == 0.0 and T.teacher_share(500, 0.5, 100) == 0.0
    assert T.teacher_share(0, 0.5, 0) == 0.0  # no teacher steps: no teacher


@pytest.mark.parametrize("kind", M.KINDS)
def test_visual_path_equals_the_stock_forward(kind):
    """What training feeds the LLM (`visual_tokens` then `embed`) is, unreduced, exactly the stock forward: same
    logits; reduced, its input holds exactly the averaged tokens (and the video newline last)."""
    tok = M.build_tokenizer()
    model = M.build_model(kind, tok, seed=0).eval()
    if kind == "image":
        visuals = np.stack([s.image for s in syn.generate_images(2, split="train")])
    else:
        visuals = np.stack([v.frames[np.linspace(0, v.n_frames - 1, M.NUM_FRAMES).astype(int)]
                            for v in syn.generate_videos(2, split="train")])
    token = "<image>" if kind == "image" else "<video>"
    vid = tok.convert_tokens_to_ids(token)
    inputs = M.encode(tok, model, [f"USER: {token}\nWhat is there? ASSISTANT:"] * 2, visuals)
    with torch.no_grad():
        ref = model(**inputs).logits
        feats, extra, cls = T.visual_tokens(model, inputs)
        full = feats if extra is None else torch.cat([feats, extra], dim=1)
        logits = model(inputs_embeds=T.embed(model, inputs["input_ids"], full, vid),
                       attention_mask=inputs["attention_mask"]).logits
        torch.testing.assert_close(logits, ref, rtol=0, atol=1e-5)
        assert feats.shape[1] == (144 if kind == "image" else M.NUM_FRAMES * 36)
        assert (cls is not None) == (kind == "image")
        a = A.matrix(A.Reduction("drop", 0.25), 2, 1 if kind == "image" else M.NUM_FRAMES, T.grid_side(model),
                     np.random.default_rng(0))
        short = M.encode(tok, model, [f"USER: {token}\nWhat is there? ASSISTANT:"] * 2, visuals,
                         n_visual=a.shape[1] + (extra is not None))
        vis = A.apply(a, feats)
        vis = vis if extra is None else torch.cat([vis, extra], dim=1)
        embeds = T.embed(model, short["input_ids"], vis, vid)
        slots = short["input_ids"] == vid
        assert int(slots.sum(1)[0]) == vis.shape[1] < full.shape[1]
        torch.testing.assert_close(embeds[slots].view_as(vis), vis)


def test_drop_pool_merge_and_time_reductions_are_averaging_matrices():
    rng = np.random.default_rng(0)
    side, frames = 12, 4
    n = frames * side * side
    x = torch.randn(3, n, 5)
    drop = A.matrix(A.Reduction("drop", 0.25), 3, frames, side, rng)
    assert drop.shape == (3, round(0.25 * n), n) and set(drop.unique().tolist()) == {0.0, 1.0}
    kept = drop.argmax(-1)
    assert all(torch.equal(k, k.sort().values) and len(set(k.tolist())) == len(k) for k in kept)  # order kept
    assert not torch.equal(kept[0], kept[1])  # each sample its own subset
    torch.testing.assert_close(A.apply(drop, x), torch.stack([x[b, kept[b]] for b in range(3)]))
    pool = A.matrix(A.Reduction("pool", 1 / 9), 1, 1, side, np.random.default_rng(1))
    grid = torch.randn(1, side * side, 5)
    h = w = int(round(pool.shape[1] ** 0.5))
    ref = F.adaptive_avg_pool2d(grid.view(1, side, side, 5).permute(0, 3, 1, 2), (h, w)).permute(0, 2, 3, 1)
    if h * w == pool.shape[1]:  # a square draw: torch's adaptive pooling is the reference
        torch.testing.assert_close(A.apply(pool, grid), ref.reshape(1, h * w, 5))
    time = A.matrix(A.Reduction("time", 0.5), 2, frames, side, rng)
    assert time.shape[1] % (frames // 2) == 0  # consecutive frame pairs, each pooled alike
    merge = A.matrix(A.Reduction("merge", 0.1), 2, frames, side, rng)
    for a in (drop, pool, time, merge):
        torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:2]))  # every kept token is an average
    assert torch.equal((merge > 0).sum(1), torch.ones(2, n, dtype=torch.long))  # a token joins exactly one group
    mask = torch.zeros(2, n, dtype=torch.bool)
    mask[:, :10] = True
    assert torch.equal(A.reduce_mask(merge, mask), (merge[:, :, :10] > 0).any(-1))
    again = A.matrix(A.Reduction("merge", 0.1), 2, frames, side, np.random.default_rng(5))
    assert torch.equal(again, A.matrix(A.Reduction("merge", 0.1), 2, frames, side, np.random.default_rng(5)))
    with pytest.raises(ValueError, match="method"):
        A.Reduction("hired", 0.5)  # never a reducer under test
    with pytest.raises(ValueError, match="keep"):
        A.Reduction("drop", 0.0)
    draws = [A.draw(np.random.default_rng(i), 0.5, ("drop", "pool"), (0.1, 0.8)) for i in range(400)]
    assert 0.4 < np.mean([d is None for d in draws]) < 0.6
    assert all(0.1 <= d.keep <= 0.8 for d in draws if d is not None)


def test_a_reduced_batch_has_its_tokens_and_targets_shortened_alike(image_model):
    """A reduced training batch: K placeholders instead of 144, `relevant` marks the kept tokens that show an
    object the question is about, per-token labels stay those of the full grid (the probe reads the full grid)."""
    model, tok = image_model
    data = T.Batches("image", 0, 4, syn.IMAGE_TASKS)
    full = data.make(3, syn.IMAGE_TASKS, tok, model)
    red = data.make(3, syn.IMAGE_TASKS, tok, model, A.Reduction("drop", 0.5))
    vid = tok.convert_tokens_to_ids("<image>")
    assert ((full["input_ids"] == vid).sum(1) == 144).all() and ((red["input_ids"] == vid).sum(1) == 72).all()
    assert red["reduce"].shape == (4, 72, 144) and red["relevant"].shape == (4, 72)
    kept = red["reduce"].argmax(-1)
    assert torch.equal(red["relevant"], torch.gather(full["relevant"], 1, kept))
    assert torch.equal(red["token_labels"], full["token_labels"]) and full["relevant"].any(1).all()


def test_recipes_set_flags_and_explicit_flags_win(tmp_path: Path):
    for name, recipe in T.RECIPES.items():
        args = T.parse_args(["--recipe", name, "--out", str(tmp_path)])
        assert {k: getattr(args, k) for k in recipe} == recipe, name
    args = T.parse_args(["--recipe", "video", "--steps", "7", "--out", str(tmp_path)])
    assert args.model == "video" and args.steps == 7 and args.attn_weight == T.RECIPES["video"]["attn_weight"]
    assert args.stop_at is None  # the recipe's early stop belongs to the schedule that --steps replaced
    for name in ("image", "video"):  # a recipe's early stop lies on its schedule
        args = T.parse_args(["--recipe", name, "--out", str(tmp_path)])
        assert args.stop_at is None or args.stop_at < args.steps, name
        assert args.reduce_frac > 0, "the shipped models are trained reduction-aware"
    for stop in ("--stop-at", "--stop-a"):  # an explicit stop, abbreviated or not, is kept
        args = T.parse_args(["--recipe", "video", "--steps=1800", stop, "1700", "--out", str(tmp_path)])
        assert (args.steps, args.stop_at) == (1800, 1700)


def test_vision_lr_scale_gives_the_vision_tower_and_projector_their_own_rate(image_model):
    model, _ = image_model
    heads = [T.TokenProbe(8)]
    everything = {id(p) for p in model.parameters()} | {id(p) for p in heads[0].parameters()}
    for scale in (1.0, 3.0):
        groups = T.param_groups(model, heads, 0.01, scale)
        ids = [id(p) for g in groups for p in g["params"]]
        assert sorted(ids) == sorted(everything)  # every parameter exactly once
        for g in groups:
            assert g["weight_decay"] == (0.01 if all(p.ndim >= 2 for p in g["params"]) else 0.0)
        scaled = {id(p) for g in groups if g["lr_scale"] == scale for p in g["params"]}
        vision = {id(p) for n, p in model.named_parameters() if "vision_tower" in n or "multi_modal_projector" in n}
        assert scaled == (everything if scale == 1.0 else vision)
    assert len(T.param_groups(model, heads, 0.01)) == 2  # scale 1: the two groups older state files hold


def test_task_weights_set_each_tasks_share_of_the_training_samples(tmp_path: Path):
    args = T.parse_args(["--model", "image", "--out", str(tmp_path), "--task-weights", "present=3",
                         "count_colour=2"])
    assert args.tasks == ("colour_of", "shape_of", "present", "present", "present", "count_colour", "count_colour")
    drawn = [s.task for s in syn.generate_images(14, split="train", start=70, tasks=args.tasks)]
    assert {t: drawn.count(t) for t in syn.IMAGE_TASKS} == {"colour_of": 2, "shape_of": 2, "present": 6,
                                                           "count_colour": 4}
    assert T.parse_args(["--model", "image", "--out", str(tmp_path)]).tasks == syn.IMAGE_TASKS  # uniform default


def test_stop_at_ends_the_run_early_on_the_full_schedule(tmp_path: Path, capsys):
    """--stop-at 3 of a 6-step schedule: three steps, a validation and a checkpoint at step 3, and the learning
    rate of the 6-step schedule (a 3-step schedule would already be decaying faster)."""
    argv = ["--model", "image", "--out", str(tmp_path), "--steps", "6", "--stop-at", "3", "--warmup", "1",
            "--batch", "2", "--val-size", "4", "--val-every", "1000", "--log-every", "1", "--threads", "1"]
    assert T.main(argv) == 0
    log = capsys.readouterr().out
    assert "early stop: the run ends at step 3 of its 6-step schedule" in log
    steps = [line for line in log.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["1/6", "2/6", "3/6"] and "[val] step 3 " in log
    logged_lr = float(steps[-1].split(" lr ")[1].split()[0])  # the rate step 3 trained with (schedule index 2)
    assert logged_lr == pytest.approx(T.learning_rate(2, 1.5e-3, 1, 6), rel=1e-2)
    assert logged_lr != pytest.approx(T.learning_rate(2, 1.5e-3, 1, 3), rel=1e-2)
    assert T.load_state(tmp_path / "state.pt")["step"] == 3
    assert T.main(argv) == 0  # the same command again resumes at its end and trains nothing more
    again = capsys.readouterr().out
    assert "resumed at step 3/6" in again and not any(line.startswith("step ") for line in again.splitlines())


def test_stop_score_ends_the_run_at_the_first_good_enough_validation(tmp_path: Path, capsys, monkeypatch):
    """--stop-score 0.5 with validations scripted to 0.3, 0.6, 0.9 (unreduced) at steps 1, 2, 3 of 6: the run
    ends at step 2, keeps that checkpoint, and a resume of the same command trains nothing more."""
    scores = iter([0.3, 0.6, 0.9])

    def scripted(*args, **kwargs) -> dict[str, float]:
        a = next(scores)
        return {"all": a, "~drop50": 0.0, "score": a / 2}  # the stop reads 'all', not the selection score

    monkeypatch.setattr(T, "validate", scripted)
    argv = ["--model", "image", "--out", str(tmp_path), "--steps", "6", "--stop-score", "0.5", "--warmup", "1",
            "--batch", "2", "--val-size", "2", "--val-every", "1", "--log-every", "1", "--threads", "1"]
    assert T.main(argv) == 0
    log = capsys.readouterr().out
    assert "validation accuracy 0.600 reached --stop-score 0.5: the run ends at step 2" in log
    assert [line.split()[1] for line in log.splitlines() if line.startswith("step ")] == ["1/6", "2/6"]
    assert T.load_state(tmp_path / "state.pt")["step"] == 2
    assert json.loads((tmp_path / "best" / "training.json").read_text())["step"] == 2
    assert T.main(argv) == 0
    again = capsys.readouterr().out
    assert "resumed at step 2/6" in again and not any(line.startswith("step ") for line in again.splitlines())
    assert next(scores) == 0.9  # the resume validated nothing either


HEAP_PROBE = """
import numpy as np
from tokenreduce.eval import train as T
n = 256 * 2**20
T.trim_heap()
base = T.rss_gib()
with T.heap_kept() as kept:
    with T.heap_kept():  # a nested run ends (a recipe's stage 1 inside its stage 2): the outer one keeps on
        pass
    block = np.ones(n, np.uint8)
    del block
    held = T.rss_gib() - base
    assert T.trim_heap()
    trimmed = T.rss_gib() - base
block = np.ones(n, np.uint8)
del block
print(kept, held, trimmed, T.rss_gib() - base)
"""


def test_heap_kept_holds_freed_memory_until_trimmed_then_restores_the_defaults():
    """Inside `heap_kept` a freed 256 MiB block stays resident (the next step reuses it instead of faulting it in
    again) until `trim_heap`; outside, glibc's defaults are back and a freed large block leaves at once.

    Run in a fresh interpreter: glibc serves a large block from a free chunk already in the heap before it maps
    one, so in a process whose heap other work has fragmented (this test session) the last step would measure the
    heap's history, not the settings."""
    if T._MALLOPT is None:  # not glibc: heap_kept leaves the allocator alone and says so
        with T.heap_kept() as kept:
            assert kept is False
        return
    out = subprocess.run([sys.executable, "-c", HEAP_PROBE], capture_output=True, text=True, check=True).stdout
    kept, held, trimmed, after = out.split()
    held, trimmed, after = float(held), float(trimmed), float(after)
    assert kept == "True" and held > 0.2 and trimmed < 0.1 and after < 0.1, (held, trimmed, after)


def test_look_and_tasks_choose_the_training_data(tmp_path: Path):
    """--look and --tasks pick what the batches and the validation set are drawn from (the shipped video model's
    retraining on the rich look is this); the defaults are the shipped models' own."""
    args = T.parse_args(["--model", "image", "--out", str(tmp_path), "--look", "plain", "--tasks",
                         "colour_at,relation", "--task-weights", "relation=2"])
    assert args.tasks == ("colour_at", "relation", "relation")
    val = T.validation_set("image", 4, look=args.look, tasks=args.tasks)
    assert [s.task for s in val] == ["colour_at", "relation"] * 2 and val[0].image.shape == (112, 112, 3)
    assert T.Batches("image", 0, 2, args.tasks, look="plain").config == syn.ImageConfig.with_look("plain")
    default = T.parse_args(["--model", "video", "--out", str(tmp_path)])
    assert default.look is None and default.tasks == syn.VIDEO_TASKS
    assert T.data_config("video", "rich").size == 168 and T.data_config("video").size == syn.VideoConfig().size


@pytest.mark.parametrize("argv, message", [
    (["--out", "x"], "--model is required"),
    (["--model", "image", "--reduce-frac", "2", "--out", "x"], "--reduce-frac must be in [0, 1]"),
    (["--model", "image", "--reduce-keep", "0.5", "0.2", "--out", "x"], "0 < LO <= HI <= 1"),
    (["--model", "image", "--reduce-methods", "hired", "--out", "x"], "invalid choice"),
    (["--model", "image", "--teacher-frac", "1.5", "--out", "x"], "must be in [0, 1]"),
    (["--model", "image", "--out", "x", "--steps", "100", "--restart-steps", "50", "60",
      "--restart-lr", "1e-3", "5e-4", "2e-4"], "one value or one per --restart-steps"),
    (["--model", "image", "--out", "x", "--restart-steps", "50"], "needs --steps"),
    (["--model", "image", "--out", "x", "--steps", "100", "--restart-steps", "10"], "at least 26"),
    (["--model", "image", "--out", "x", "--stop-at", "5"], "--stop-at needs --steps"),
    (["--model", "image", "--out", "x", "--steps", "10", "--stop-at", "11"], "must be in 1..10"),
    (["--model", "image", "--out", "x", "--steps", "10", "--restart-steps", "30", "--stop-at", "0"],
     "must be in 1..40"),
    (["--model", "video", "--out", "x", "--task-weights", "relation=2"], "unknown task 'relation'"),
    (["--model", "image", "--out", "x", "--task-weights", "present=0"], "positive integer weight"),
    (["--model", "image", "--out", "x", "--task-weights", "present"], "positive integer weight"),
    (["--model", "image", "--out", "x", "--tasks", "colour_at,needle"], "unknown image task 'needle'"),
    (["--model", "image", "--out", "x", "--look", "glossy"], "invalid choice: 'glossy'"),
])
def test_bad_training_flags_are_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        T.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_teacher_run_trains_and_exports_a_stock_checkpoint(tmp_path: Path, capsys):
    """Two steps of the image recipe's machinery (teacher on every sample, attention targets, bf16 autocast),
    then --export into a folder: a stock checkpoint with its processor."""
    dest = tmp_path / "exported"
    argv = ["--model", "image", "--out", str(tmp_path / "run"), "--steps", "2", "--batch", "4", "--val-size", "4",
            "--teacher-frac", "1", "--teacher-steps", "100", "--attn-weight", "1", "--route-weight", "0.3",
            "--log-every", "1", "--threads", "1", "--export", str(dest)]
    assert T.main(argv) == 0
    log = capsys.readouterr().out
    teacher_losses = [float(line.split(" teacher ")[1].split()[0]) for line in log.splitlines()
                      if line.startswith("step ")]
    assert len(teacher_losses) == 2 and all(np.isfinite(teacher_losses)) and teacher_losses[0] > 0
    model = LlavaForConditionalGeneration.from_pretrained(dest)
    assert next(model.parameters()).dtype == torch.float32
    assert AutoProcessor.from_pretrained(dest).tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id
    assert (dest / "training.json").exists()


class _Planted:
    """What an attacker pickles: unpickling it calls `touch` on a path (any code could run instead)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_resume_never_unpickles_code(tmp_path: Path):
    """Issue 22 #14: a planted OUT/state.pt whose unpickling would run code is refused with a one-line error and
    the code does not run (resume used torch.load(weights_only=False)); a real state file still resumes."""
    out, marker = tmp_path / "run", tmp_path / "pwned"
    out.mkdir()
    torch.save({"model": {}, "step": 1, "payload": _Planted(marker)}, out / "state.pt")
    argv = ["--model", "image", "--out", str(out), "--steps", "2", "--batch", "2", "--threads", "1"]
    with pytest.raises(SystemExit) as e:
        T.main(argv)
    message = str(e.value.code)
    assert "is not a training state this script wrote" in message and "\n" not in message
    assert not marker.exists()
    torch.save(["not", "a", "state"], out / "state.pt")
    with pytest.raises(SystemExit, match="no model and step"):
        T.main(argv)
    (out / "state.pt").write_bytes(b"garbage")
    with pytest.raises(SystemExit, match="refused to load it"):
        T.main(argv)


def test_schedule_warms_up_decays_and_restarts():
    lr, warm, main, restarts = 2e-3, 100, 1300, [(300, 1e-3), (400, 5e-4)]
    total = main + 300 + 400
    sched = [T.learning_rate(s, lr, warm, main, restarts) for s in range(total)]
    assert sched[0] == pytest.approx(lr / warm) and sched[warm - 1] == pytest.approx(lr)
    assert all(a >= b for a, b in zip(sched[warm:main], sched[warm + 1:main]))  # cosine decay, never up
    assert sched[main - 1] == pytest.approx(0.05 * lr, rel=1e-3)
    assert sched[main] == pytest.approx(1e-3 / 25) and sched[main + 24] == pytest.approx(1e-3)  # first restart
    assert sched[main + 299] == pytest.approx(0.05 * 1e-3, rel=1e-2)
    second = main + 300
    assert sched[second] == pytest.approx(5e-4 / 25) and sched[second + 24] == pytest.approx(5e-4)
    assert all(a >= b for a, b in zip(sched[second + 24:total], sched[second + 25:total]))
    assert sched[total - 1] == pytest.approx(0.05 * 5e-4, rel=1e-2)
    assert T.learning_rate(total + 50, lr, warm, main, restarts) == pytest.approx(0.05 * 5e-4)  # stays at the floor
    # a restart only changes what comes after it: fewer cycles give the same schedule up to their end
    one = [T.learning_rate(s, lr, warm, main, restarts[:1]) for s in range(second)]
    plain = [T.learning_rate(s, lr, warm, main) for s in range(main)]
    assert one == sched[:second] and plain == sched[:main]


def test_restart_flags_pair_steps_with_peaks():
    args = T.parse_args(["--model", "image", "--out", "x", "--steps", "100", "--restart-steps", "50", "60",
                         "--restart-lr", "1e-3", "5e-4"])
    assert args.restarts == [(50, 1e-3), (60, 5e-4)]
    shared = T.parse_args(["--model", "image", "--out", "x", "--steps", "100", "--lr", "2e-3",
                           "--restart-steps", "50", "60"])
    assert shared.restarts == [(50, 1e-3), (60, 1e-3)]  # default peak: half of --lr, for every cycle
