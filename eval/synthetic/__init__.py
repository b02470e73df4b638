"""Generated images and videos whose questions need specific visual detail, in the Video-MME / MLVU layouts.

The embedded benchmark and training data of tokenreduce (DESIGN.md section 7): coloured shapes on a coarse grid
(`scene`), still-image questions (`images`), video questions (`videos`), mp4 files (`mp4`), the on-disk
layouts (`layouts`) and a command line (`cli`). Everything is deterministic from a seed; splits are disjoint
(`seeds`).

In memory, for training without disk::

    from tokenreduce.eval import synthetic as syn
    batch = syn.generate_images(32, seed=0, split="train", start=step * 32)   # list[ImageSample]
    batch[0].image            # (168, 168, 3) uint8: shapes on a textured, cluttered backdrop
    batch[0].question         # Question(task, question, options (4 texts), answer index); .letter, .lettered()
    batch[0].caption          # "red circle at the top left, blue square at the centre."
    clips = syn.generate_videos(4, seed=0, split="train")                     # list[VideoSample]
    clips[0].frames           # (T, 168, 168, 3) uint8, 8 <= T <= 256; clips[0].duration in short/medium/long

On disk (Video-MME and MLVU layouts; see `layouts` for every file and field)::

    syn.write_benchmark("bench", "test", n_images=400, n_videos=200, seed=0)
    python -m tokenreduce.eval.synthetic bench --splits validation,test --images 400 --videos 200

Throughput on this 2-core CPU, one process: about 5,000 images/s in memory at 112 px (2,400 at 224 px); about
150 videos/s rendered in memory (13,000 frames/s; default durations, mean 81 frames); about 40 videos/s written
as mp4 (both layouts) and 1,000 images/s as PNG.
"""

from .images import (
    ALL_IMAGE_TASKS,
    IMAGE_TASKS,
    POSITION_TASKS,
    RELATIONS,
    ImageConfig,
    ImageSample,
    generate_images,
    make_image,
)
from .layouts import (
    GENERATOR_VERSION,
    IMAGE_FIELDS,
    MLVU_FIELDS,
    MLVU_LMMS_FIELDS,
    MLVU_TASKS,
    VIDEOMME_FIELDS,
    write_benchmark,
)
from .mp4 import read_mp4, write_mp4
from .questions import Question
from .scene import (
    BACKGROUND,
    CLUTTER,
    COLOURS,
    LOOKS,
    SHAPES,
    Backdrop,
    Geometry,
    Obj,
    caption,
    look_of,
    position_phrase,
    render_objects,
)
from .seeds import LETTERS, SPLITS, scene_split, split_seed
from .videos import (
    DIRECTIONS,
    DURATIONS,
    VIDEO_TASKS,
    Appearance,
    Sprite,
    VideoConfig,
    VideoSample,
    event_length,
    generate_videos,
    make_video,
    render_video,
)


def main(argv: list[str] | None = None) -> int:
    """The command line (see `cli`); returns the exit code."""
    from .cli import main as _main

    return _main(argv)


__all__ = [
    "BACKGROUND",
    "CLUTTER",
    "COLOURS",
    "LOOKS",
    "DIRECTIONS",
    "DURATIONS",
    "GENERATOR_VERSION",
    "IMAGE_FIELDS",
    "ALL_IMAGE_TASKS",
    "IMAGE_TASKS",
    "POSITION_TASKS",
    "LETTERS",
    "MLVU_FIELDS",
    "MLVU_LMMS_FIELDS",
    "MLVU_TASKS",
    "RELATIONS",
    "SHAPES",
    "SPLITS",
    "VIDEOMME_FIELDS",
    "VIDEO_TASKS",
    "Appearance",
    "Backdrop",
    "Geometry",
    "ImageConfig",
    "ImageSample",
    "Obj",
    "Question",
    "Sprite",
    "VideoConfig",
    "VideoSample",
    "caption",
    "look_of",
    "event_length",
    "generate_images",
    "generate_videos",
    "main",
    "make_image",
    "make_video",
    "position_phrase",
    "read_mp4",
    "render_objects",
    "render_video",
    "scene_split",
    "split_seed",
    "write_benchmark",
    "write_mp4",
]
