"""The `tokenreduce` command: list reducers, run a plan on a model, benchmark plans."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap


def _cmd_list(args: argparse.Namespace) -> int:
    import dataclasses

    from .registry import reducers

    rows = []
    for name, cls in reducers().items():
        params = ", ".join(
            f"{f.name}={f.default!r}" for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
        )
        rows.append((name, str(cls.stage), cls.summary, params))
    if args.json:
        print(json.dumps([dict(zip(("name", "stage", "summary", "params"), r)) for r in rows], indent=2))
        return 0
    w = max(len(r[0]) for r in rows)
    print(f"{'reducer':<{w}}  {'stage':<8}  description")
    for name, stage, summary, params in rows:
        print(f"{name:<{w}}  {stage:<8}  {summary}")
        print(f"{'':<{w}}  {'':<8}  params: {params}")
    return 0


class CLIError(Exception):
    """A bad command-line input; printed as one line, exit code 2."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _load(spec: str, attn: str, presets, build, companion: str, what: str, kind: str):
    """(model, companion) from "default" (the shipped trained `kind` model), a built-in preset
    (`build(spec, attn=...)`, random weights) or a local checkpoint folder, where `companion` names the
    transformers auto class to load beside the model."""
    import os

    if spec == "default":
        from .eval.models import model_dir

        spec = str(model_dir(kind))
    elif spec in presets:
        return build(spec, attn=attn)
    if not os.path.isdir(spec):
        raise CLIError(
            f"--model {spec!r}: not a local checkpoint folder nor a built-in {what} "
            f"(default, {', '.join(presets)}); no download is attempted"
        )
    import transformers

    try:
        model = transformers.AutoModelForImageTextToText.from_pretrained(spec, attn_implementation=attn).eval()
        other = getattr(transformers, companion).from_pretrained(spec)
    except (OSError, ValueError, KeyError) as e:
        raise CLIError(f"--model {spec!r}: cannot load a model and {companion} from it ({e})") from None
    return model, other


def load_model(spec: str, attn: str = "sdpa"):
    """(model, processor) from a local checkpoint folder or a built-in preset name (random weights)."""
    from .adapters.llava.zoo import NEXT_PRESETS, PRESETS, build_llava_with_processor

    return _load(spec, attn, [*PRESETS, *NEXT_PRESETS], build_llava_with_processor, "AutoProcessor", "preset", "image")


def load_video_model(spec: str, attn: str = "sdpa"):
    """(model, tokenizer) of a video LLM from a local checkpoint folder or a built-in video preset."""
    from .adapters.videollm.zoo import PRESETS, build_video_llm

    return _load(spec, attn, list(PRESETS), build_video_llm, "AutoTokenizer", "video preset", "video")


def _run_video(args: argparse.Namespace, plan) -> int:
    import torch

    from . import apply
    from .registry import adapter_for
    from .video import load_video

    frames = load_video(args.video, num_frames=None if args.fps else args.frames, fps=args.fps,
                        max_frames=args.frames if args.fps else None)
    model, tokenizer = load_video_model(args.model, args.attn)
    adapter = adapter_for(model)(model)
    if not hasattr(adapter, "video_spec"):
        raise CLIError(f"--video: {type(model).__name__} is not a video model")
    from .adapters.videollm import video_inputs

    spec = adapter.video_spec()
    text = _choice_prompt(args, "video")
    text = f"USER: {spec.token}\n{args.prompt} ASSISTANT:" if text is None else text.replace("<video>", spec.token)
    inputs = video_inputs(tokenizer, spec, [text], [frames.frames])
    with torch.no_grad(), apply(model, plan, tokenizer=tokenizer, keep_positions=args.keep_positions or None) as run:
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    _print_run(args, answer, run, {"frames": frames.indices.tolist(), "timestamps": frames.time_prompt()})
    return 0


def _check_choices(args: argparse.Namespace) -> None:
    if args.options is None:
        if args.protocol is not None:
            raise CLIError("--protocol builds a multiple-choice prompt: give the choices with --options")
        return
    from .eval.protocols import LETTERS

    if not 2 <= len(args.options) <= len(LETTERS):
        raise CLIError(f"--options takes 2 to {len(LETTERS)} choices, got {len(args.options)}")
    if any(not o.strip() for o in args.options):
        raise CLIError("--options: every choice must be non-empty")
    args.protocol = args.protocol or "mlvu"


def _choice_prompt(args: argparse.Namespace, kind: str) -> str | None:
    """With --options: the benchmark's multiple-choice prompt for --prompt as the question (one `<image>` or
    `<video>` placeholder), in --protocol's official form; None without --options."""
    if args.options is None:
        return None
    from .eval.protocols import build_prompt

    return build_prompt(args.protocol, args.prompt, args.options, kind)


def _print_run(args: argparse.Namespace, answer: str, run, extra: dict | None = None) -> None:
    extra = dict(extra or {})
    if args.options is not None:
        from .eval.protocols import LETTERS, extract

        letter = extract(args.protocol, answer)  # the protocol's own extraction, as the benchmarks score it
        index = LETTERS.find(letter) if letter else -1
        option = args.options[index] if 0 <= index < len(args.options) else None
        extra.update(protocol=args.protocol, letter=letter or None, option=option)
    if args.json:
        print(json.dumps({"answer": answer, **extra, "report": run.report.to_dict()}, indent=2))
        return
    print(f"answer: {answer!r}")
    if args.options is not None:
        print(f"choice: ({extra['letter']}) {extra['option']}" if extra["option"] else "choice: none extracted")
    print(run.report)


def _cmd_run(args: argparse.Namespace) -> int:
    import os

    import torch
    from PIL import Image

    from . import apply
    from .plan import Plan

    plan = Plan.parse(args.plan)
    if (args.image is None) == (args.video is None):
        raise CLIError("give exactly one of --image or --video")
    _check_choices(args)
    if args.video is not None:
        return _run_video(args, plan)
    if not os.path.isfile(args.image):
        raise CLIError(f"--image {args.image!r}: no such file")
    try:
        image = Image.open(args.image).convert("RGB")
    except Exception as e:  # PIL raises several types for unreadable files
        raise CLIError(f"--image {args.image!r}: cannot read it as an image ({e})") from None
    model, processor = load_model(args.model, args.attn)
    text = _choice_prompt(args, "image")
    if text is None:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.prompt}]}]
        text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(text=text, images=image, return_tensors="pt")
    with torch.no_grad(), apply(model, plan, keep_positions=args.keep_positions or None) as run:
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    answer = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    _print_run(args, answer, run)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .eval.bench import main as bench_main

    return bench_main(args)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import os

    from .eval.evaluate import main as evaluate_main

    if args.model_dir is not None and not os.path.isdir(args.model_dir):
        raise CLIError(f"--model-dir {args.model_dir!r}: no such checkpoint folder")
    try:
        return evaluate_main(args)
    except FileNotFoundError as e:
        raise CLIError(
            f"{e}; train one with `python -m tokenreduce.eval.train --recipe image --out runs/image` and pass "
            "--model-dir runs/image/best (or --export it into the package)"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    from .eval.protocols import PROTOCOLS

    p = argparse.ArgumentParser(
        prog="tokenreduce",
        description="Remove the visual tokens a VLM does not need.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent(
            """\
            examples:
              tokenreduce list
              tokenreduce run --plan "aim-merge(keep=0.25)" --image cat.png --prompt "What is this?"
              tokenreduce run --plan "quota(keep=0.25)" --video clip.mp4 --frames 16 --prompt "What happens?"
              tokenreduce bench --out bench.json
            """
        ),
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("list", help="list reducers with their stage and parameters")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_cmd_list)

    s = sub.add_parser("run", help="run a plan on one image or video and print the answer and the token report")
    s.add_argument("--plan", default="none", help='plan string, e.g. "aim-merge(keep=0.25)" or "none"')
    s.add_argument("--image", help="an image file")
    s.add_argument("--video", help="a video file (frames sampled uniformly, as lmms-eval does)")
    s.add_argument("--frames", type=_positive_int, default=8, help="frames to sample from --video (default 8)")
    s.add_argument("--fps", type=float, default=None, help="sample --video at this rate instead (at most --frames)")
    s.add_argument("--prompt", required=True, help="the prompt, or with --options the question")
    s.add_argument("--options", nargs="+", default=None, metavar="CHOICE",
                   help="answer choices (2 to 6): build the benchmark's multiple-choice prompt around --prompt and "
                   "report the chosen letter, as the default models were trained to answer")
    s.add_argument("--protocol", choices=PROTOCOLS, default=None,
                   help="with --options: the official prompt form (default mlvu)")
    s.add_argument("--model", default="default",
                   help="default (the shipped trained image model, or video model with --video), a local checkpoint "
                   "folder, or a built-in random-weight preset (tiny, tiny-onevision, ...)")
    s.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    s.add_argument("--max-new-tokens", type=_positive_int, default=16)
    s.add_argument("--keep-positions", action="store_true",
                   help="the kept visual tokens keep the position ids of the full prompt (default: consecutive)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_cmd_run)

    s = sub.add_parser("bench", help="time to first token and peak memory, reduced vs unreduced")
    from .eval.bench import add_arguments

    add_arguments(s)
    s.set_defaults(fn=_cmd_bench)

    s = sub.add_parser("evaluate", help="accuracy vs visual tokens of every reducer on the default models' test split")
    from .eval.evaluate import add_arguments as add_evaluate_arguments

    add_evaluate_arguments(s)
    s.set_defaults(fn=_cmd_evaluate)

    from .eval import harness

    s = sub.add_parser("eval", help="MLVU / Video-MME (or the generated benchmark) from a local folder under a plan")
    harness.add_eval_arguments(s)
    s.set_defaults(fn=harness.main_eval)
    s = sub.add_parser("sweep", help="methods x budgets with none, random and pool, on one benchmark folder")
    harness.add_sweep_arguments(s)
    s.set_defaults(fn=harness.main_sweep)
    return p


def main(argv: list[str] | None = None) -> int:
    from .errors import TokenReduceError
    from .eval.errors import EvalError

    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except (TokenReduceError, CLIError, EvalError) as e:
        print(f"tokenreduce: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
