"""Command line: write generated splits to a folder (`python -m tokenreduce.eval.synthetic --help`).

The lead wires `main` into the `tokenreduce` CLI; it returns an exit code (0 ok, 2 bad arguments).
"""

from __future__ import annotations

import argparse
import sys

from .images import ALL_IMAGE_TASKS, IMAGE_TASKS, ImageConfig
from .layouts import write_benchmark
from .mp4 import DEFAULT_CRF
from .scene import LOOKS, look_of
from .seeds import SPLITS
from .videos import VIDEO_TASKS, VideoConfig


def _choices(known: tuple[str, ...]):
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(t.strip() for t in text.split(",") if t.strip())
        bad = [t for t in items if t not in known]
        if not items or bad:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(known)}; got {text!r}")
        return items

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tokenreduce-synthetic",
        description="Write the generated image/video benchmark in the Video-MME and MLVU file layouts "
                    "(OUT/<split>/...). Reruns resume: finished files are kept.",
    )
    p.add_argument("out", help="output folder; each split goes to OUT/<split>/")
    p.add_argument("--splits", type=_choices(SPLITS), default=("test",),
                   help="comma-separated splits (default: test)")
    p.add_argument("--images", type=int, default=400, help="images per split (default 400)")
    p.add_argument("--videos", type=int, default=200, help="videos per split (default 200)")
    p.add_argument("--seed", type=int, default=0, help="base seed; each split derives its own (default 0)")
    p.add_argument("--image-look", choices=sorted(LOOKS), default=look_of(ImageConfig()),
                   help="rich: 168 px, patterned shapes at random offsets on a textured, cluttered backdrop; plain: "
                        "112 px, flat shapes centred on a plain backdrop (default: the shipped image model's, "
                        "%(default)s)")
    p.add_argument("--video-look", choices=sorted(LOOKS), default=look_of(VideoConfig()),
                   help="the same for video frames (default: the shipped video model's, %(default)s)")
    p.add_argument("--image-size", type=int, default=None, help="image side in pixels (default: the look's)")
    p.add_argument("--video-size", type=int, default=None, help="video frame side, even (default: the look's)")
    p.add_argument("--grid", type=int, default=3, help="cells per side (default 3)")
    p.add_argument("--fps", type=int, default=8, help="video frame rate (default 8)")
    p.add_argument("--min-sampled-frames", type=int, default=8,
                   help="every event stays visible when a model samples this many frames uniformly (default 8)")
    p.add_argument("--crf", type=int, default=DEFAULT_CRF,
                   help=f"x264 quality, lower is better (default {DEFAULT_CRF})")
    p.add_argument("--image-tasks", type=_choices(ALL_IMAGE_TASKS), default=IMAGE_TASKS,
                   help=f"comma-separated, from {','.join(ALL_IMAGE_TASKS)} (default: {','.join(IMAGE_TASKS)})")
    p.add_argument("--video-tasks", type=_choices(VIDEO_TASKS), default=VIDEO_TASKS,
                   help=f"comma-separated, from {','.join(VIDEO_TASKS)}")
    p.add_argument("--progress-every", type=int, default=50, help="print a progress line every N items (0: never)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sizes = {"image": args.image_size, "video": args.video_size}
        size = {k: {} if v is None else {"size": v} for k, v in sizes.items()}
        image_config = ImageConfig.with_look(args.image_look, grid=args.grid, **size["image"])
        video_config = VideoConfig.with_look(args.video_look, grid=args.grid, fps=args.fps,
                                             min_sampled_frames=args.min_sampled_frames, **size["video"])
        if args.images < 0 or args.videos < 0 or args.seed < 0:
            raise ValueError("--images, --videos and --seed must be >= 0")
        for split in args.splits:
            manifest = write_benchmark(
                args.out, split, args.images, args.videos, args.seed, image_config=image_config,
                video_config=video_config, crf=args.crf, image_tasks=args.image_tasks, video_tasks=args.video_tasks,
                progress_every=args.progress_every,
            )
            counts = manifest["counts"]
            print(f"{args.out}/{split}: {counts['images']} images, {counts['videos']} videos")
    except ValueError as e:
        print(f"tokenreduce-synthetic: error: {e}", file=sys.stderr)
        return 2
    return 0
