"""The training script's recipe machinery: the teacher's symbolic tokens, their substitution on the way to the
LLM, the recipes' flags and the export into a model folder. Fresh (untrained) models, real forward passes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
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
    labels[0, 0, :2] = torch.tensor([colours.index("red") + 1, shapes.index("circle") + 1])
    labels[0, 1, :2] = torch.tensor([colours.index("white") + 1, shapes.index("cross") + 1])
    out = teacher(emb, labels)
    ids = tok.convert_tokens_to_ids
    assert torch.equal(out[0, 0], emb[ids(" red")] + emb[ids(" circle")])
    assert torch.equal(out[0, 1], emb[ids(" white")] + emb[ids(" cross")])
    assert torch.equal(out[0, 2], teacher.background)  # nothing drawn under token 2


def test_teacher_share_decays_linearly_to_zero():
    assert T.teacher_share(0, 0.5, 100) == 0.5
    assert T.teacher_share(50, 0.5, 100) == pytest.approx(0.25)
    assert T.teacher_share(100, 0.5, 100) == 0.0 and T.teacher_share(500, 0.5, 100) == 0.0
    assert T.teacher_share(0, 0.5, 0) == 0.0  # no teacher steps: no teacher


def test_substituted_rows_reach_the_llm_as_given(image_model):
    """Row 0 fed image A's projected tokens while its pixels are image B gives exactly image A's logits; row 1
    (not substituted) stays image B's."""
    model, tok = image_model
    a, b = (s.image for s in syn.generate_images(2, seed=0, split="train"))
    prompts = ["USER: <image>\nWhat is there? ASSISTANT:"] * 2
    capture = T.VisualCapture(model)
    try:
        with torch.no_grad():
            ref = M.encode(tok, model, prompts, np.stack([a, b]))
            ref_logits = model(**ref).logits
            projected_a = capture.out[:1].clone()
            swapped = M.encode(tok, model, prompts, np.stack([b, b]))
            capture.substitute = (torch.tensor([True, False]), projected_a.expand(2, -1, -1))
            logits = model(**swapped).logits
            capture.substitute = None
            plain_b = model(**swapped).logits
    finally:
        capture.handle.remove()
    torch.testing.assert_close(logits[0], ref_logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1], plain_b[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain_b[0], ref_logits[0], atol=1e-3)  # the swap changed something to restore


def test_recipes_set_flags_and_explicit_flags_win(tmp_path: Path):
    for name, recipe in T.RECIPES.items():
        args = T.parse_args(["--recipe", name, "--out", str(tmp_path)])
        assert {k: getattr(args, k) for k in recipe} == recipe, name
    args = T.parse_args(["--recipe", "video", "--steps", "7", "--out", str(tmp_path)])
    assert args.model == "video" and args.steps == 7 and args.attn_weight == T.RECIPES["video"]["attn_weight"]
    assert args.stop_at is None  # the recipe's early stop belongs to the schedule that --steps replaced
    for name in ("image", "video"):  # both shipped recipes end early on their schedules (where validation peaked)
        args = T.parse_args(["--recipe", name, "--out", str(tmp_path)])
        assert args.stop_at == T.RECIPES[name]["stop_at"] < args.steps, name
    for stop in ("--stop-at", "--stop"):  # an explicit stop, abbreviated or not, is kept
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
    args = T.parse_args(["--model", "image", "--out", str(tmp_path), "--task-weights", "relation=3",
                         "count_colour=2"])
    assert args.tasks == ("colour_at", "shape_at", "relation", "relation", "relation", "count_colour", "count_colour")
    drawn = [s.task for s in syn.generate_images(14, split="train", start=70, tasks=args.tasks)]
    assert {t: drawn.count(t) for t in syn.IMAGE_TASKS} == {"colour_at": 2, "shape_at": 2, "relation": 6,
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
    assert torch.load(tmp_path / "state.pt", weights_only=True)["step"] == 3
    assert T.main(argv) == 0  # the same command again resumes at its end and trains nothing more
    again = capsys.readouterr().out
    assert "resumed at step 3/6" in again and not any(line.startswith("step ") for line in again.splitlines())


@pytest.mark.parametrize("argv, message", [
    (["--out", "x"], "--model is required"),
    (["--model", "video", "--teacher-frac", "0.5", "--out", "x"], "image model only"),
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
    (["--model", "image", "--out", "x", "--task-weights", "relation=0"], "positive integer weight"),
    (["--model", "image", "--out", "x", "--task-weights", "relation"], "positive integer weight"),
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


class _Planted:
    """What a planted state file holds: unpickling it would create `marker` (any code could run instead)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_resume_refuses_a_state_file_that_would_run_code(tmp_path: Path):
    """Resume loads tensors and plain values only (weights_only): a state file with a pickled callable is refused
    with one message, and the callable never runs (issue 22 #14)."""
    marker = tmp_path / "ran"
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"model": _Planted(marker), "step": 1}, out / "state.pt")
    with pytest.raises(SystemExit, match="refusing .*state.pt: it holds more than tensors"):
        T.main(["--model", "image", "--out", str(out), "--steps", "2", "--batch", "2", "--val-size", "4",
                "--threads", "1"])
    assert not marker.exists()
