"""The `tokenreduce` command line: list, run, and clear errors for bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tokenreduce as tr
from tokenreduce.cli import main

SHAPES = Path(tr.__file__).resolve().parent / "assets" / "shapes.png"


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `tokenreduce argv`, whether it returns or raises SystemExit."""
    try:
        code = main(argv)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:  # SystemExit("message"): Python prints the message to stderr and exits 1
            print(e.code, file=sys.stderr)
            code = 1
    out, err = capsys.readouterr()
    return code, out, err


def assert_fails(argv: list[str], capsys, *needles: str) -> str:
    code, out, err = run_cli(argv, capsys)
    assert code != 0, f"{argv} succeeded:\n{out}"
    assert code == 2, f"{argv}: exit code {code}"
    assert "tokenreduce: error:" in err or "usage:" in err
    msg = (err + out).lower()
    for needle in needles:
        assert needle.lower() in msg, f"{argv}: {needle!r} not in the message:\n{err}{out}"
    assert "traceback" not in msg
    return msg


def test_list_names_every_reducer_with_its_stage(capsys):
    code, out, _ = run_cli(["list"], capsys)
    assert code == 0
    lines = out.splitlines()
    for name, cls in tr.reducers().items():
        assert any(line.startswith(f"{name} ({cls.stage}): ") for line in lines), f"{name} not listed:\n{out}"
    assert {"aim-merge", "random", "pool"} <= set(tr.reducers())


def test_list_json(capsys):
    code, out, _ = run_cli(["list", "--json"], capsys)
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)}
    assert set(rows) == set(tr.reducers())
    for name, cls in tr.reducers().items():
        assert rows[name]["stage"] == str(cls.stage)


def test_console_script_entry_point():
    exe = shutil.which("tokenreduce") or str(Path(sys.executable).parent / "tokenreduce")
    assert Path(exe).exists(), "the `tokenreduce` console script is not installed (pip install -e .)"
    proc = subprocess.run([exe, "list"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "aim-merge" in proc.stdout and "visual" in proc.stdout


def test_run_json_reports_the_reduction(capsys):
    code, out, err = run_cli(
        ["run", "--plan", "aim-merge(keep=0.25)", "--image", str(SHAPES), "--prompt", "What shapes?",
         "--model", "tiny", "--json", "--max-new-tokens", "4"],
        capsys,
    )
    assert code == 0, err
    data = json.loads(out)
    assert isinstance(data["answer"], str)
    report = data["report"]
    assert report["plan"] == "aim-merge(keep=0.25)"
    call = report["calls"][0]
    stages = {s["stage"]: s["tokens"] for s in call["stages"]}
    assert stages["input"] == [64]
    assert stages["aim-merge"] == [16]
    assert call["seq_in"][0] - call["seq_llm"][0] == 64 - 16
    assert call["llm_shape"] == [1, call["seq_llm"][0]]


def test_run_text_output(capsys):
    code, out, err = run_cli(
        ["run", "--plan", "pool(tokens=9)", "--image", str(SHAPES), "--prompt", "Shapes?", "--max-new-tokens", "2"],
        capsys,
    )
    assert code == 0, err
    assert "answer:" in out and "pool" in out and "9" in out


@pytest.fixture()
def image_path(tmp_path) -> str:
    path = tmp_path / "img.png"
    shutil.copy(SHAPES, path)
    return str(path)


def _run_args(plan: str, image: str, model: str = "tiny") -> list[str]:
    return ["run", "--plan", plan, "--image", image, "--prompt", "What shapes?", "--model", model]


def test_unknown_reducer(capsys, image_path):
    assert_fails(_run_args("nope", image_path), capsys, "unknown reducer", "nope")


def test_unknown_reducer_suggests(capsys, image_path):
    assert_fails(_run_args("aim-merg(keep=0.5)", image_path), capsys, "unknown reducer", "aim-merge")


def test_malformed_plan(capsys, image_path):
    assert_fails(_run_args("aim-merge(keep=", image_path), capsys, "plan")


def test_bad_budget(capsys, image_path):
    assert_fails(_run_args("aim-merge(keep=1.5)", image_path), capsys, "keep")


def test_missing_image(capsys, tmp_path):
    missing = str(tmp_path / "does-not-exist.png")
    assert_fails(_run_args("aim-merge(keep=0.25)", missing), capsys, "--image", "no such file")


def test_non_image_file(capsys, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n")
    assert_fails(_run_args("aim-merge(keep=0.25)", str(text)), capsys, "--image", "image")


def test_unknown_model(capsys, image_path, tmp_path):
    name = str(tmp_path / "no-such-model")
    assert_fails(_run_args("aim-merge(keep=0.25)", image_path, model=name), capsys, "--model", "no-such-model")


def test_usage_errors_exit_2(capsys):
    code, _, err = run_cli(["run", "--plan", "pool(keep=0.5)"], capsys)  # --image and --prompt missing
    assert code == 2 and "--image" in err


def test_folder_that_is_not_a_checkpoint(capsys, image_path, tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    assert_fails(_run_args("aim-merge(keep=0.25)", image_path, model=str(empty)), capsys, "--model", "not a checkpoint")


def test_max_new_tokens_must_be_positive(capsys, image_path):
    assert_fails(_run_args("aim-merge(keep=0.25)", image_path) + ["--max-new-tokens", "0"], capsys,
                 "positive integer")


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory) -> Path:
    import numpy as np

    from tokenreduce.video import write_video

    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    rng = np.random.default_rng(0)
    write_video(path, rng.integers(0, 256, (30, 64, 96, 3), dtype=np.uint8), fps=10)
    return path


@pytest.mark.parametrize("model", ["tiny-onevision", "tiny-video-llava", "tiny-next-video"])
def test_run_on_a_video_file(clip_file, capsys, model):
    code, out, err = run_cli(["run", "--video", str(clip_file), "--model", model, "--frames", "6", "--json",
                              "--plan", "quota(keep=0.25)+aim-prune", "--prompt", "What moves?",
                              "--max-new-tokens", "2"], capsys)
    assert code == 0, err
    rec = json.loads(out)
    assert len(rec["frames"]) == 6 and rec["frames"][0] == 0 and rec["frames"][-1] == 29
    call = rec["report"]["calls"][0]
    stages = {s["stage"]: s["tokens"] for s in call["stages"]}
    budget = round(0.25 * stages["input"][0])
    assert 0.9 * budget <= stages["quota"][0] <= budget  # bilinear grids may fall a little under the budget
    assert "score:quota" in call["times_s"]


def test_video_errors_are_one_line(clip_file, tmp_path, capsys):
    assert_fails(["run", "--video", str(tmp_path / "nope.mp4"), "--prompt", "x"], capsys, "nope.mp4")
    assert_fails(["run", "--video", str(clip_file), "--image", str(SHAPES), "--prompt", "x"], capsys, "exactly one")
    assert_fails(["run", "--prompt", "x"], capsys, "exactly one")
    assert_fails(["run", "--video", str(clip_file), "--model", "tiny", "--prompt", "x"], capsys, "video preset")


@pytest.fixture(scope="module")
def bench_files(tmp_path_factory):
    """A few test-split items written in the official layouts (PNG images, mp4 videos), as the main job reads."""
    from tokenreduce.eval import evaluate as E

    root = E.ensure_benchmark(tmp_path_factory.mktemp("bench"), "test", 4, 2)
    return {ds: E.load_items(root, ds, n) for ds, n in (("images", 4), ("mlvu", 2), ("videomme", 2))}


@pytest.mark.parametrize("dataset, plan", [("images", "none"), ("images", "hired(keep=0.5)"), ("mlvu", "none"),
                                           ("videomme", "pool(keep=0.5)"), ("images", "random(keep=0.25) @positions"),
                                           ("videomme", "pool(keep=0.5) @positions")])
def test_run_with_options_answers_as_the_main_job_does(bench_files, dataset, plan, capsys):
    """`run --options` on the default model builds the benchmark's prompt and extraction: for every item the
    chosen letter equals the one the main job's `evaluate.answer` gets for the same file, plan and protocol
    (a plan suffixed " @positions" is `run --keep-positions`)."""
    from tokenreduce.eval import evaluate as E
    from tokenreduce.eval import models as M

    kind = "image" if dataset == "images" else "video"
    model, tok = M.default_model(kind)
    cli_plan, keep = E.split_positions(plan)
    for item in bench_files[dataset]:
        want = E.answer(model, tok, item, E.load_visual(item), plan)["pred"]
        media = ["--image", str(item.path)] if kind == "image" else ["--video", str(item.path), "--frames",
                                                                     str(M.NUM_FRAMES)]
        code, out, err = run_cli(["run", *media, "--plan", cli_plan, "--prompt", item.question, "--options",
                                  *item.options, "--protocol", item.protocol, "--max-new-tokens", "4", "--json",
                                  *(["--keep-positions"] if keep else [])], capsys)
        assert code == 0, err
        got = json.loads(out)
        assert got["letter"] == (want or None) and got["protocol"] == item.protocol
        assert got["option"] == (item.options["ABCDEF".index(want)] if want else None)


@pytest.mark.parametrize("extra, needle", [
    (["--options", "red"], "2 to 6 choices"),
    (["--options", *"abcdefg"], "2 to 6 choices"),
    (["--options", "red", " "], "non-empty"),
    (["--protocol", "mlvu"], "give the choices with --options"),
])
def test_bad_options_are_clear_errors(extra, needle, capsys, image_path):
    assert_fails(["run", "--image", str(image_path), "--prompt", "q", *extra], capsys, needle)


@pytest.mark.parametrize("argv, needle", [
    (["--prompt", " "], "--prompt: must not be empty"),
    (["--prompt", "q", "--fps", "2"], "--fps samples a video"),
    (["--prompt", "q", "--fps", "-1"], "positive number"),
    (["--prompt", "q", "--frames", "0"], "positive integer"),
    (["--prompt", "q", "--plan", "pool(keep=0.5)+"], "stray '+'"),
    (["--prompt", "q", "--model", "tiny-onevision"], "video preset"),
])
def test_run_checks_every_option_before_loading_anything(argv, needle, capsys, image_path, monkeypatch):
    """Each bad option is one `tokenreduce: error:` line with exit 2, found before a model is loaded."""
    import tokenreduce.loading as loading

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(loading, "load_model", no_loading)
    assert_fails(["run", "--image", image_path, *argv], capsys, needle)


def test_list_forms_are_exclusive_and_names_are_checked(capsys):
    assert_fails(["list", "--json", "--markdown"], capsys, "not allowed with")
    assert_fails(["list", "pool", "nope"], capsys, "unknown reducer 'nope'")


def test_bench_names_the_plan_whose_budget_the_input_cannot_meet(tmp_path, capsys):
    """A MustDrop budget below what its first drop can reach is found only by running; still one line, exit 2,
    naming the plan, and no JSON."""
    out = tmp_path / "b.json"
    assert main(["bench", "--preset", "tiny", "--plans", "mustdrop-prefill(tokens=2)", "--repeats", "1",
                 "--warmup", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "plan 'mustdrop-prefill(tokens=2)'" in err and "out of reach" in err and "Traceback" not in err
    assert not out.exists()


def test_a_benchmark_folder_of_other_generator_parameters_is_named(tmp_path, capsys):
    """A folder written before the video model moved to the rich look (or with another look) is still read, but
    the main job says which parameters differ from the defaults the shipped models were trained on."""
    from tokenreduce.eval import evaluate as E
    from tokenreduce.eval import synthetic as syn

    syn.write_benchmark(tmp_path / "old", "test", n_images=1, n_videos=1, progress_every=0,
                        video_config=syn.VideoConfig.with_look("plain"))
    E.ensure_benchmark(tmp_path / "old", "test", 1, 1)
    err = capsys.readouterr().err
    assert "other generator parameters" in err and "(video)" in err and "remove the folder" in err
    E.ensure_benchmark(tmp_path / "new", "test", 1, 1)
    assert "other generator parameters" not in capsys.readouterr().err
