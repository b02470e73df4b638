"""The README's commands are real (issue 23 #4).

Every shell command in the README's ```bash blocks goes through the parser of the program it names, so a renamed
option, a bad plan or an unknown reducer fails here; the extras and files it names exist; and the quick ones run
and show what the README says they show. A command this test does not recognise fails it too, so a new kind of
command in the README needs a line here.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tokenreduce as tr
from tokenreduce.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: programs the README runs that are not ours: nothing to parse, they only have to be what the README says
EXTERNAL = {("python3", "-m", "venv"), (".",), ("python", "-m", "pytest"), ("apt-get",)}


def readme_commands() -> list[list[str]]:
    """argv of every command in the README's bash blocks (continuations joined, `&&` chains split, comments cut)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in re.split(r"\s&&\s", line):
                argv = shlex.split(part, comments=True)
                if argv:
                    out.append([a for a in argv if a != "..."])  # "run ... --model X": the elided part
    return out


def _extras() -> set[str]:
    import tomllib

    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def _check_plans(args) -> None:
    for attr, sep in (("plan", None), ("plans", ";")):
        value = getattr(args, attr, None)
        if isinstance(value, str):
            for plan in value.split(sep) if sep else [value]:
                tr.Plan.parse(plan)
    methods = getattr(args, "methods", None)
    if isinstance(methods, str):
        for method in methods.split(","):
            for name in method.split("+"):
                tr.get_reducer(name)


def check(argv: list[str]) -> None:
    """Parse `argv` with the parser of the program it names; raises on anything that program would refuse."""
    if argv[0] == "tokenreduce":
        _check_plans(build_parser().parse_args(argv[1:]))
    elif argv[0] == "torchrun":
        i = argv.index("-m")
        assert argv[i + 1] == "tokenreduce.cli", argv
        _check_plans(build_parser().parse_args(argv[i + 2:]))
    elif argv[:3] == ["python", "-m", "tokenreduce.stream.bench"]:
        from tokenreduce.stream import bench

        _check_plans(bench.parse_args(argv[3:]))
    elif argv[:3] == ["python", "-m", "tokenreduce.eval.synthetic"]:
        from tokenreduce.eval.synthetic.cli import build_parser as synthetic_parser

        synthetic_parser().parse_args(argv[3:])
    elif argv[:3] == ["python", "-m", "tokenreduce.eval.train"]:
        from tokenreduce.eval import train

        train.parse_args(argv[3:])
    elif argv[:2] == ["pip", "install"]:
        for arg in argv[2:]:
            m = re.fullmatch(r"\.\[([a-z0-9,_-]+)\]", arg)
            if m:
                missing = set(m.group(1).split(",")) - _extras()
                assert not missing, f"{argv}: pyproject.toml has no extra {sorted(missing)}"
    elif argv[0] == "bash":
        assert (ROOT / argv[1]).is_file(), f"{argv}: {argv[1]} does not exist"
    else:
        assert any(tuple(argv[: len(e)]) == e for e in EXTERNAL), f"a README command this test does not know: {argv}"


COMMANDS = readme_commands()


def test_the_readme_has_its_commands():
    """The README opens with the two commands (install + main job, install + tests)."""
    first = README.read_text().split("```bash\n")[1:3]
    assert "tokenreduce evaluate" in first[0] and "pytest" in first[1]
    assert re.search(r'pip install -e "\.\[[a-z,]*eval[a-z,]*\]"', first[0]), "the main job's plots need the eval extra"
    assert len(COMMANDS) > 20


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(a)[:60] for a in COMMANDS])
def test_every_readme_command_parses(argv, capsys):
    try:
        check(argv)
    except SystemExit as e:  # argparse refused it
        pytest.fail(f"README command {' '.join(argv)!r} is refused: {capsys.readouterr().err.strip()} (exit {e.code})")


def test_list_shows_every_reducer(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in tr.reducers())


def test_the_run_example_answers_as_the_readme_says(capsys):
    """README, Command line: on shapes.png the image model chooses (B) white unreduced and under
    pool(keep=0.111), and (D) yellow under hired(keep=0.111), the command the README shows."""
    argv = next(a for a in COMMANDS if a[:2] == ["tokenreduce", "run"] and "shapes.png" in " ".join(a))
    assert "hired(keep=0.111)" in argv
    text = README.read_text()
    for plan, choice in (("hired(keep=0.111)", "(D) yellow"), ("none", "(B) white"), ("pool(keep=0.111)", "(B) white")):
        args = list(argv[1:])
        args[args.index("--plan") + 1] = plan
        assert main(args) == 0
        assert f"choice: {choice}" in capsys.readouterr().out, plan
        assert choice in text


PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _block(first_line_contains: str) -> str:
    found = [b for b in PYTHON_BLOCKS if first_line_contains in b]
    assert len(found) == 1, f"README: expected one python block with {first_line_contains!r}, found {len(found)}"
    return found[0]


def _run_python(code: str, cwd: Path) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_every_python_block_compiles():
    assert len(PYTHON_BLOCKS) >= 4
    for block in PYTHON_BLOCKS:
        compile(block, "README.md", "exec")


def test_the_python_example_runs():
    """README, Python: the tiny model with a plan, a handle, detach, kept positions, as written."""
    out = _run_python(_block("build_llava_with_processor"), ROOT)
    assert "aim-merge" in out and "mustdrop" in out  # the report, then tr.reducers()


def test_the_video_example_runs(tmp_path):
    """README, Video: load_video of a clip.mp4 in the working folder, QuoTA at 25% on the tiny OneVision model."""
    from tokenreduce.video import write_video

    rng = np.random.default_rng(0)
    write_video(tmp_path / "clip.mp4", rng.integers(0, 255, (40, 64, 64, 3), dtype=np.uint8), fps=8)
    check = "\nassert out.shape[1] > inputs['input_ids'].shape[1]\n"  # it generated after the prompt
    _run_python(_block('build_video_llm("tiny-onevision")') + check, tmp_path)


def test_the_streaming_example_answers_as_the_readme_says():
    """README, Streaming: the bundled needle sample at 1 fps through STC with a KV cap; the answer is B) (purple)."""
    block = _block("StreamingSession(model, processor")
    assert "# B)" in block
    out = _run_python(block, ROOT).splitlines()
    assert out[0].strip() == "B)" and out[1].strip() == "B)", out[:3]  # ask, then ask_stream piece by piece
    assert "vision_ms_saved" in out[2]
