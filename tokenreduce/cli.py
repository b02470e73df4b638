"""The `tokenreduce` command: list reducers, run a plan on a model, benchmark plans."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap

from .errors import TokenReduceError


def _cmd_list(args: argparse.Namespace) -> int:
    from .plan import parameters
    from .registry import get_reducer, reducers

    chosen = reducers()
    if args.reducer:
        chosen = {name: get_reducer(name) for name in args.reducer}  # an unknown name: one line with suggestions
    if args.markdown:
        print(reducer_table(chosen))
        return 0
    if args.json:
        print(json.dumps([{"name": name, "stage": str(cls.stage), "summary": cls.summary,
                           "parameters": [p.to_dict() for p in parameters(cls)]} for name, cls in chosen.items()],
                         indent=2))
        return 0
    detail = bool(args.reducer)
    if not detail:
        print("reducer (stage): what it does; each parameter=default: what it means "
              "(tokenreduce list NAME: one in full)\n")
    for name, cls in chosen.items():
        print(textwrap.fill(f"{name} ({cls.stage}): {cls.summary}", 120, subsequent_indent="    "))
        params = parameters(cls)
        heads = [f"{p.name}={p.shown}" for p in params]
        pw = max((len(h) for h in heads if len(h) <= 28), default=0)
        for head, p in zip(heads, params):
            if len(head) > pw:  # a long default gets a line of its own
                print(f"    {head}")
                head = ""
            print(textwrap.fill(f"    {head:<{pw}}  {p.doc}", 120, subsequent_indent=" " * (pw + 6)))
        if detail and cls.__doc__:
            import inspect

            print()
            print(textwrap.indent(inspect.cleandoc(cls.__doc__), "    "))
        print()
    return 0


def reducer_table(chosen: dict | None = None) -> str:
    """The README's reducer table (markdown): name, stage, what it does, parameters with defaults. Generated from
    the registry; `tests/test_reducer_docs.py` fails when the README's copy differs (regenerate: `tokenreduce list
    --markdown`)."""
    import html

    from .plan import parameters
    from .registry import reducers

    def shown(p) -> str:
        if p.shown == repr(p.default):
            return f"`{p.name}={p.shown}`"
        return f"`{p.name}` ({html.escape(p.shown)})"  # a description, not a value: < > escaped for markdown

    rows = ["| reducer | stage | what it does | parameters (default) |", "|---|---|---|---|"]
    for name, cls in (chosen or reducers()).items():
        params = ", ".join(shown(p) for p in parameters(cls)) or "-"
        rows.append(f"| `{name}` | {cls.stage} | {cls.summary} | {params.replace('|', '&#124;')} |")
    return "\n".join(rows)


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


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def add_model_arguments(p: argparse.ArgumentParser, default_model: str | None = "default",
                        model_help: str | None = None, group=None, default_device: str = "cpu") -> None:
    """--model, --device, --dtype and --attn, as every command that loads a model takes them (`tokenreduce.loading`;
    check them with `check_model_arguments` and load with `load_for`). `group` takes --model instead of `p` (e.g. a
    mutually exclusive group beside --preset)."""
    from .loading import ATTENTION, DTYPES

    (group or p).add_argument("--model", default=default_model, help=model_help or (
        "default (the shipped trained image model, or the video model with --video), a local checkpoint folder, a "
        "hub id already in the local Hugging Face cache (org/name, never downloaded), or a built-in random-weight "
        "preset (tiny, llava-1.5-7b-shape, tiny-onevision, ...)"))
    p.add_argument("--device", default=default_device,
                   help=f"cpu, cuda, cuda:N, mps or auto (CUDA when there is one); default {default_device}")
    p.add_argument("--dtype", default="fp32", type=_dtype_name, metavar="{" + ",".join(DTYPES) + "}",
                   help="weights and activations: fp32 (default), bf16 or fp16")
    p.add_argument("--attn", default="sdpa", choices=ATTENTION,
                   help="attention implementation (default sdpa; flash_attention_2 needs flash-attn and a GPU)")


def _dtype_name(text: str) -> str:
    from .loading import DTYPE_ALIASES, DTYPES

    key = DTYPE_ALIASES.get(text, text)
    if key not in DTYPES:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(DTYPES)}, got {text!r}")
    return key


def check_model_arguments(args: argparse.Namespace, kind: str) -> None:
    """Validate --model/--device/--dtype/--attn before any slow work (one-line errors, exit 2)."""
    from .loading import check_attention, locate, resolve_device

    try:
        locate(args.model, kind)
        check_attention(args.attn, resolve_device(args.device))
    except TokenReduceError as e:
        raise CLIError(as_option(str(e))) from None


def as_option(message: str) -> str:
    """A loader message in the command's terms: "model 'x': ..." -> "--model 'x': ..."."""
    head, _, rest = message.partition(" ")
    flag = {"model": "--model", "device": "--device", "dtype": "--dtype", "attention": "--attn"}.get(head)
    return f"{flag} {rest}" if flag else message


def load_for(args: argparse.Namespace, kind: str, **kwargs):
    """`tokenreduce.loading.load_model` from the command's --model/--device/--dtype/--attn (`kwargs`: its other
    arguments, e.g. llm_layers); loader errors come back in the command's terms (--model ..., --device ...)."""
    from .loading import load_model

    try:
        return load_model(args.model, kind, device=args.device, dtype=args.dtype, attn=args.attn, **kwargs)
    except TokenReduceError as e:
        raise CLIError(as_option(str(e))) from None


def _to_model(inputs, model) -> dict:
    """Inputs on the model's device, floating-point ones in the model's dtype."""
    dtype = next(model.parameters()).dtype
    return {k: (v.to(model.device, dtype) if v.is_floating_point() else v.to(model.device)) for k, v in inputs.items()}


def _run_video(args: argparse.Namespace, plan) -> int:
    import torch

    from . import apply
    from .video import load_video

    frames = load_video(args.video, num_frames=None if args.fps else args.frames, fps=args.fps,
                        max_frames=args.frames if args.fps else None)
    loaded = load_for(args, "video")
    model, tokenizer = loaded.model, loaded.tokenizer
    from .registry import adapter_for

    adapter = adapter_for(model)(model)
    if not hasattr(adapter, "video_spec"):
        raise CLIError(f"--video: {type(model).__name__} is not a video model")
    from .adapters.videollm import video_inputs

    spec = adapter.video_spec()
    text = _choice_prompt(args, "video")
    text = f"USER: {spec.token}\n{args.prompt} ASSISTANT:" if text is None else text.replace("<video>", spec.token)
    inputs = _to_model(video_inputs(tokenizer, spec, [text], [frames.frames]), model)
    with torch.no_grad(), apply(model, plan, tokenizer=tokenizer, keep_positions=args.keep_positions or None) as run:
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    _print_run(args, answer, run, loaded, {"frames": frames.indices.tolist(), "timestamps": frames.time_prompt()})
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


def model_notes(card: dict | None, tokenizer, prompt: str, options: list[str] | None) -> list[str]:
    """What a user should know about this model's answer: read from the checkpoint's training.json
    (`eval.models.PROMPT_FORMS_KEY`, `VOCABULARY_KEY`) and the tokenizer; [] for ordinary checkpoints."""
    from .eval.models import PROMPT_FORMS_KEY, VOCABULARY_KEY

    card = card or {}
    notes = []
    forms = card.get(PROMPT_FORMS_KEY)
    if options is None and forms and "open" not in forms:
        notes.append(f"this model was trained only on multiple-choice prompts ({', '.join(forms)}) and may answer a "
                     "free-form question with nothing; give the choices with --options")
    unk = getattr(tokenizer, "unk_token_id", None)
    if card.get(VOCABULARY_KEY) == "closed" and unk is not None:
        unknown: dict[str, None] = {}
        for text in (prompt, *(options or [])):
            try:
                enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
                spans = [text[a:b].strip() for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if i == unk]
            except NotImplementedError:  # slow tokenizers have no offsets: word by word
                spans = [w for w in text.split() if unk in tokenizer(" " + w, add_special_tokens=False)["input_ids"]]
            unknown.update(dict.fromkeys(spans))
        if unknown:
            words = list(unknown)
            notes.append(f"{len(words)} word(s) of the prompt are unknown to this model ({', '.join(words[:6])}"
                         f"{', ...' if len(words) > 6 else ''}): it knows only the generated benchmark's words and "
                         "question forms, so expect an empty or meaningless answer")
    return notes


def _print_run(args: argparse.Namespace, answer: str, run, loaded, extra: dict | None = None) -> None:
    extra = dict(extra or {})
    notes = model_notes(loaded.card, loaded.tokenizer, args.prompt, args.options)
    if args.options is not None:
        from .eval.protocols import LETTERS, extract

        letter = extract(args.protocol, answer)  # the protocol's own extraction, as the benchmarks score it
        index = LETTERS.find(letter) if letter else -1
        option = args.options[index] if 0 <= index < len(args.options) else None
        extra.update(protocol=args.protocol, letter=letter or None, option=option)
    if args.json:
        print(json.dumps({"answer": answer, **extra, "model": loaded.source, "notes": notes,
                          "report": run.report.to_dict()}, indent=2))
        return
    print(f"answer: {answer!r}")
    if args.options is not None:
        print(f"choice: ({extra['letter']}) {extra['option']}" if extra["option"] else "choice: none extracted")
    for note in notes:
        print(f"note: {note}")
    print(f"model: {loaded.source}")
    print(run.report)


def _check_run(args: argparse.Namespace):
    """Every `run` input checked before any model is loaded; returns the parsed plan."""
    import os

    from .plan import Plan

    plan = Plan.parse(args.plan)
    if (args.image is None) == (args.video is None):
        raise CLIError("give exactly one of --image or --video")
    if not args.prompt.strip():
        raise CLIError("--prompt: must not be empty")
    _check_choices(args)
    media = args.image if args.image is not None else args.video
    flag = "--image" if args.image is not None else "--video"
    if not os.path.exists(media):
        raise CLIError(f"{flag} {media!r}: no such file")
    if not os.path.isfile(media):
        raise CLIError(f"{flag} {media!r}: not a file")
    if args.video is None and args.fps is not None:
        raise CLIError("--fps samples a video: use it with --video")
    check_model_arguments(args, "video" if args.video is not None else "image")
    return plan


def _cmd_run(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image

    from . import apply

    plan = _check_run(args)
    if args.video is not None:
        return _run_video(args, plan)
    try:
        image = Image.open(args.image).convert("RGB")
    except Exception as e:  # PIL raises several types for unreadable files
        raise CLIError(f"--image {args.image!r}: cannot read it as an image ({e})") from None
    loaded = load_for(args, "image")
    model, processor = loaded.model, loaded.processor
    text = _choice_prompt(args, "image")
    if processor is None:  # Qwen2-VL / Qwen2.5-VL: inputs built from the tokenizer, in Qwen's chat form
        from .adapters.qwen2vl.zoo import qwen_inputs

        if text is None:  # with --options: the protocol's prompt as the benchmarks write it (its <image> marker)
            text = f"<|im_start|>user\n<image>{args.prompt}<|im_end|>\n<|im_start|>assistant\n"
        inputs = _to_model(qwen_inputs(model, loaded.tokenizer, [text], images=[[image]]), model)
    else:
        if text is None:
            conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.prompt}]}]
            text = processor.apply_chat_template(conversation, add_generation_prompt=True)
        inputs = _to_model(processor(text=text, images=image, return_tensors="pt"), model)
    with torch.no_grad(), apply(model, plan, keep_positions=args.keep_positions or None) as run:
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    answer = loaded.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    _print_run(args, answer, run, loaded)
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
    from . import __version__

    p.add_argument("--version", action="version", version=f"tokenreduce {__version__}")
    sub = p.add_subparsers(dest="cmd")
    s = sub.add_parser("list", help="list reducers with their stage and parameters")
    s.add_argument("reducer", nargs="*", help="only these reducers, each with its docstring")
    form = s.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="name, stage, summary and parameters (name, type, default, "
                      "description) of each reducer")
    form.add_argument("--markdown", action="store_true", help="the README's reducer table")
    s.set_defaults(fn=_cmd_list)

    s = sub.add_parser("run", help="run a plan on one image or video and print the answer and the token report")
    s.add_argument("--plan", default="none", help='plan string, e.g. "aim-merge(keep=0.25)" or "none"')
    s.add_argument("--image", help="an image file")
    s.add_argument("--video", help="a video file (frames sampled uniformly, as lmms-eval does)")
    s.add_argument("--frames", type=_positive_int, default=8, help="frames to sample from --video (default 8)")
    s.add_argument("--fps", type=_positive_float, default=None,
                   help="sample --video at this rate instead (at most --frames)")
    s.add_argument("--prompt", required=True, help="the prompt, or with --options the question")
    s.add_argument("--options", nargs="+", default=None, metavar="CHOICE",
                   help="answer choices (2 to 6): build the benchmark's multiple-choice prompt around --prompt and "
                   "report the chosen letter, as the default models were trained to answer")
    s.add_argument("--protocol", choices=PROTOCOLS, default=None,
                   help="with --options: the official prompt form (default mlvu)")
    add_model_arguments(s)
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

    from .stream import demo  # the streaming demo page (the `demo` extra is imported only when it runs)

    s = sub.add_parser("demo", help="the streaming video demo web page (pip install 'tokenreduce[demo]')")
    demo.add_arguments(s)
    s.set_defaults(fn=demo.main)

    from .eval import harness

    s = sub.add_parser("eval", help="MLVU / Video-MME (or the generated benchmark) from a local folder under a plan")
    harness.add_eval_arguments(s)
    s.set_defaults(fn=harness.main_eval)
    s = sub.add_parser("sweep", help="methods x budgets with none, random and pool, on one benchmark folder")
    harness.add_sweep_arguments(s)
    s.set_defaults(fn=harness.main_sweep)
    return p


def main(argv: list[str] | None = None) -> int:
    from .eval.errors import EvalError

    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "fn", None) is None:  # bare `tokenreduce`: what it can do, not an error
        parser.print_help()
        return 0
    try:
        return int(args.fn(args) or 0)
    except BrokenPipeError:  # `tokenreduce list | head`: the reader left, nothing is wrong
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (TokenReduceError, CLIError, EvalError) as e:
        print(f"tokenreduce: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
