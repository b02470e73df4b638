"""Videos of coloured shapes appearing, vanishing and moving on the grid, with four-option questions.

Tasks (one question per video, cycling through `VIDEO_TASKS` by item index; durations cycle too):

- `needle`: 1-3 objects stay all along; one more object shows up once, briefly. "A triangle appeared only
  briefly. What colour was it?"; options are colours, the static objects' colours first (the needle's colour
  is never one of them).
- `order`: 2-4 objects appear one after another, once each, for a short while (0-2 static objects stay all
  along). "Which of these objects appeared first?"; options are the objects that appeared, then objects absent
  from the video.
- `count`: an object blinks on 1-5 times (each time in any free cell); half the time a decoy object blinks
  too, in a cell of its own. "How many times did the red circle appear?"; options are counts 1-6.
- `direction`: an object crosses the picture along one row (or column), edge to edge, over the whole video;
  1-3 static objects elsewhere. "In which direction did the blue square move?"; options: left, right, up, down.
- `final_corner`: 2-4 objects take turns in the top-left cell; 1-3 others stay all along. "What was in the top
  left corner at the end of the video?"; options are the earlier top-left objects first, then the static
  ones, then absent ones.

**Visible to a sparse sampler.** Every event (an appearance, and a gap between two appearances of the
`count` object) lasts at least `event_length(T, k) = ceil((T - 1) / (k - 1)) + 1` frames, `k` being
`VideoConfig.min_sampled_frames` (8): uniform sampling of k or more frames (`np.linspace` indices, rounded
or floored, or segment midpoints as MLVU does) leaves gaps of at most ceil((T - 1) / (k - 1)) frames, so it
sees every event (with one frame to spare) and every question is answerable from the frames a model is
given. With k = 8, a 256-frame needle lasts 38-64 frames; an 8-frame one lasts 2.

**Durations** (Video-MME's `duration` field): short = 8-32 frames, medium = 33-96, long = 97-256; at the default
8 fps that is 1-4 s, 4-12 s and 12-32 s. The real benchmark's minutes become seconds here; the labels keep their
meaning (relative length), and the frame counts are in `VideoConfig.durations`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from .images import check_tasks
from .questions import Question, arrange, shuffled
from .scene import (
    COLOURS,
    SHAPES,
    Backdrop,
    Geometry,
    all_names,
    backdrop_image,
    check_geometry,
    dress,
    look_fields,
    paint,
)
from .seeds import balanced_letter, check_split, item_rng, scene_split

VIDEO_TASKS: tuple[str, ...] = ("needle", "order", "count", "direction", "final_corner")
DURATIONS: tuple[tuple[str, int, int], ...] = (("short", 8, 32), ("medium", 33, 96), ("long", 97, 256))
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")


@dataclass(frozen=True)
class VideoConfig:
    """Frame size and grid, frame rate, the fewest frames a model samples, the frame counts per duration label as
    (label, min frames, max frames), and the look: `textured` (a textured, cluttered backdrop, the same in every
    frame), `jitter` (each object at its own pixel offset inside its cells) and `patterned` (each shape filled
    with its pattern, `scene.fill_mask`).

    The defaults are the look the shipped video model was trained on, `scene.LOOKS["rich"]` (the images' look:
    168 px, 12 x 12 patches a frame); `VideoConfig.with_look("plain")` is the generator's first version,
    reproduced exactly (the video model's first training stage)."""

    size: int = 168
    grid: int = 3
    fps: int = 8
    min_sampled_frames: int = 8
    durations: tuple[tuple[str, int, int], ...] = field(default=DURATIONS)
    textured: bool = True
    jitter: bool = True
    patterned: bool = True

    @classmethod
    def with_look(cls, look: str, **overrides) -> VideoConfig:
        """A config with the fields of `scene.LOOKS[look]` ("plain" or "rich"), then `overrides`."""
        return cls(**{**look_fields(look), **overrides})

    def __post_init__(self) -> None:
        check_geometry(self.size, self.grid)
        if self.size % 2:
            raise ValueError(f"size must be even (yuv420p video), got {self.size}")
        if self.grid < 3:
            raise ValueError(f"video tasks need grid >= 3, got {self.grid}")
        if not isinstance(self.fps, int) or not 1 <= self.fps <= 120:
            raise ValueError(f"fps must be an integer in 1..120, got {self.fps!r}")
        if not isinstance(self.min_sampled_frames, int) or self.min_sampled_frames < 4:
            raise ValueError(f"min_sampled_frames must be an integer >= 4, got {self.min_sampled_frames!r}")
        durations = tuple(tuple(d) for d in self.durations)
        object.__setattr__(self, "durations", durations)
        if not durations or any(len(d) != 3 or not 8 <= d[1] <= d[2] <= 4096 for d in durations):
            raise ValueError(f"durations must be (label, min frames, max frames) with 8 <= min <= max, got {durations}")

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.size, self.grid)

    def to_dict(self) -> dict:
        return {"size": self.size, "grid": self.grid, "fps": self.fps, "min_sampled_frames": self.min_sampled_frames,
                "durations": {label: [lo, hi] for label, lo, hi in self.durations}, "textured": self.textured,
                "jitter": self.jitter, "patterned": self.patterned}


@dataclass(frozen=True)
class Appearance:
    """Frames `start` .. `stop - 1` show the object; it moves in a straight line from cell (row, col) at `start`
    to (row_end, col_end) at `stop - 1` (fractional cells in between; equal ends = it stands still)."""

    start: int
    stop: int
    row: float
    col: float
    row_end: float
    col_end: float

    @property
    def moving(self) -> bool:
        return (self.row, self.col) != (self.row_end, self.col_end)


@dataclass(frozen=True)
class Sprite:
    """An object of one colour and shape and the times it is on screen, drawn (dy, dx) pixels off its cells'
    centres."""

    colour: str
    shape: str
    appearances: tuple[Appearance, ...]
    dy: int = 0
    dx: int = 0

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class VideoSample:
    """One generated video and its question. `frames` is (n_frames, size, size, 3) uint8 RGB, or None when
    made with `render=False` (call `render`); `backdrop` is the textured background (None: plain)."""

    uid: str
    split: str
    index: int
    duration: str
    n_frames: int
    fps: int
    sprites: tuple[Sprite, ...]
    question: Question
    geometry: Geometry
    frames: np.ndarray | None = None
    backdrop: Backdrop | None = None
    patterned: bool = True

    @property
    def task(self) -> str:
        return self.question.task

    @property
    def seconds(self) -> float:
        return self.n_frames / self.fps

    def render(self) -> np.ndarray:
        """The frames: (n_frames, size, size, 3) uint8."""
        if self.frames is not None:
            return self.frames
        return render_video(self.sprites, self.n_frames, self.geometry, self.backdrop, self.patterned)


def event_length(n_frames: int, min_sampled_frames: int) -> int:
    """Shortest event (in frames) that uniform sampling of `min_sampled_frames` frames always hits."""
    return math.ceil((n_frames - 1) / (min_sampled_frames - 1)) + 1


def render_video(sprites: Sequence[Sprite], n_frames: int, geometry: Geometry,
                 backdrop: Backdrop | None = None, patterned: bool = True) -> np.ndarray:
    """Render frames over `backdrop` (plain background for None), shapes filled with their patterns unless
    `patterned` is False: (n_frames, size, size, 3) uint8 RGB."""
    frames = backdrop_image(backdrop, geometry.size, n_frames)
    px = geometry.object_px
    for sp in sprites:
        for a in sp.appearances:
            if not a.moving:
                y, x = geometry.top_left(a.row, a.col, sp.dy, sp.dx)
                paint(frames[a.start : a.stop], sp.colour, sp.shape, y, x, px, patterned)
                continue
            span = max(a.stop - a.start - 1, 1)
            for t in range(a.start, a.stop):
                f = (t - a.start) / span
                y, x = geometry.top_left(a.row + f * (a.row_end - a.row), a.col + f * (a.col_end - a.col), sp.dy,
                                         sp.dx)
                paint(frames[t], sp.colour, sp.shape, y, x, px, patterned)
    return frames


def video_key(task: str, n_frames: int, sprites: Sequence[Sprite], grid: int) -> str:
    """Canonical description of a video scene (what split disjointness is decided on)."""
    parts = []
    for sp in sprites:
        apps = ",".join(f"{a.start}-{a.stop}@{a.row}/{a.col}>{a.row_end}/{a.col_end}" for a in sp.appearances)
        parts.append(f"{sp.colour} {sp.shape}[{apps}]")
    return f"video|{grid}|{task}|{n_frames}|" + ";".join(sorted(parts))


# --- building blocks ----------------------------------------------------------------------------------------------


class _Board:
    """Which cells are taken when, so objects never overlap."""

    def __init__(self, grid: int) -> None:
        self.grid = grid
        self.busy: list[tuple[int, int, int, int]] = []  # (row, col, start, stop)

    def free(self, start: int, stop: int, exclude: Sequence[tuple[int, int]] = ()) -> list[tuple[int, int]]:
        cells = [(r, c) for r in range(self.grid) for c in range(self.grid) if (r, c) not in exclude]
        return [
            (r, c) for r, c in cells
            if not any(br == r and bc == c and bs < stop and start < be for br, bc, bs, be in self.busy)
        ]

    def take(self, cell: tuple[int, int], start: int, stop: int) -> tuple[int, int]:
        self.busy.append((cell[0], cell[1], start, stop))
        return cell

    def pick(self, rng: np.random.Generator, start: int, stop: int,
             exclude: Sequence[tuple[int, int]] = ()) -> tuple[int, int]:
        cells = self.free(start, stop, exclude)
        if not cells:
            raise _Infeasible
        return self.take(cells[int(rng.integers(len(cells)))], start, stop)


class _Infeasible(Exception):
    """This draw cannot host the task; draw again."""


def _names(rng: np.random.Generator, n: int, avoid_names: Sequence[str] = (),
           avoid_colours: Sequence[str] = ()) -> list[tuple[str, str]]:
    """`n` distinct (colour, shape) pairs, none named in `avoid_names`, none of a colour in `avoid_colours`."""
    pool = [(c, s) for c in COLOURS for s in SHAPES if f"{c} {s}" not in avoid_names and c not in avoid_colours]
    if len(pool) < n:
        raise _Infeasible
    return [pool[int(i)] for i in rng.choice(len(pool), size=n, replace=False)]


def _static(colour: str, shape: str, cell: tuple[int, int], n_frames: int) -> Sprite:
    r, c = cell
    return Sprite(colour, shape, (Appearance(0, n_frames, r, c, r, c),))


def _spans(rng: np.random.Generator, n_frames: int, n: int, lo: int, hi: int, gap: int) -> list[tuple[int, int]]:
    """`n` (start, stop) intervals inside [0, n_frames), in time order, each lo..hi frames long, separated by at
    least `gap` frames; placed at random."""
    lengths = rng.integers(lo, hi + 1, size=n)
    if lengths.sum() + gap * (n - 1) > n_frames:
        lengths[:] = lo
    slack = n_frames - int(lengths.sum()) - gap * (n - 1)
    if slack < 0:
        raise _Infeasible
    cuts = np.sort(rng.integers(0, slack + 1, size=n))
    spans, t = [], 0
    for i in range(n):
        start = t + int(cuts[i] - (cuts[i - 1] if i else 0)) + (gap if i else 0)
        spans.append((start, start + int(lengths[i])))
        t = start + int(lengths[i])
    return spans


def _statics(rng: np.random.Generator, board: _Board, n_frames: int, n: int, avoid_names: Sequence[str] = (),
             avoid_colours: Sequence[str] = (), exclude: Sequence[tuple[int, int]] = ()) -> list[Sprite]:
    return [_static(c, s, board.pick(rng, 0, n_frames, exclude), n_frames)
            for c, s in _names(rng, n, avoid_names, avoid_colours)]


# --- tasks ----------------------------------------------------------------------------------------------------------


def build_needle(n_frames: int, config: VideoConfig, rng: np.random.Generator,
                 letter: int) -> tuple[list[Sprite], Question]:
    length_min = event_length(n_frames, config.min_sampled_frames)
    board = _Board(config.grid)
    statics = _statics(rng, board, n_frames, int(rng.integers(1, 4)))
    colour, shape = _names(rng, 1, avoid_colours=[s.colour for s in statics])[0]
    length = int(rng.integers(length_min, max(length_min, n_frames // 4) + 1))
    start = int(rng.integers(0, n_frames - length + 1))
    r, c = board.pick(rng, start, start + length)
    needle = Sprite(colour, shape, (Appearance(start, start + length, r, c, r, c),))
    static_colours = list(dict.fromkeys(s.colour for s in statics))
    others = [k for k in COLOURS if k != colour and k not in static_colours]
    question = arrange("needle", f"A {shape} appeared only briefly. What colour was it?", colour,
                       shuffled(static_colours, rng) + shuffled(others, rng), letter, rng)
    return [*statics, needle], question


def build_order(n_frames: int, config: VideoConfig, rng: np.random.Generator,
                letter: int) -> tuple[list[Sprite], Question]:
    length = event_length(n_frames, config.min_sampled_frames)
    k = int(rng.integers(2, min(4, n_frames // length) + 1))
    board = _Board(config.grid)
    statics = _statics(rng, board, n_frames, int(rng.integers(0, 3)))
    names = _names(rng, k, avoid_names=[s.name for s in statics])
    events, previous = [], None
    for (colour, shape), (start, stop) in zip(names, _spans(rng, n_frames, k, length, length + length // 2, 0)):
        cell = board.pick(rng, start, stop, exclude=[previous] if previous else ())
        previous = cell
        events.append(Sprite(colour, shape, (Appearance(start, stop, *cell, *cell),)))
    present = {s.name for s in statics} | {e.name for e in events}
    absent = [n for n in all_names() if n not in present]
    question = arrange("order", "Which of these objects appeared first?", events[0].name,
                       shuffled([e.name for e in events[1:]], rng) + shuffled(absent, rng), letter, rng)
    return [*statics, *events], question


def build_count(n_frames: int, config: VideoConfig, rng: np.random.Generator,
                letter: int) -> tuple[list[Sprite], Question]:
    length = event_length(n_frames, config.min_sampled_frames)
    n_max = max(1, min(5, (n_frames + length) // (2 * length)))
    board = _Board(config.grid)
    (colour, shape), (d_colour, d_shape) = _names(rng, 2)
    sprites = _statics(rng, board, n_frames, int(rng.integers(0, 3)), avoid_names=[f"{colour} {shape}",
                                                                                   f"{d_colour} {d_shape}"])
    if rng.random() < 0.5:  # a decoy that blinks too, in a cell of its own
        cell = board.pick(rng, 0, n_frames)
        m = int(rng.integers(1, n_max + 1))
        apps = tuple(Appearance(a, b, *cell, *cell)
                     for a, b in _spans(rng, n_frames, m, length, length + length // 2, length))
        sprites.append(Sprite(d_colour, d_shape, apps))
    n = int(rng.integers(1, n_max + 1))
    apps = []
    for start, stop in _spans(rng, n_frames, n, length, length + length // 2, length):
        cell = board.pick(rng, start, stop)
        apps.append(Appearance(start, stop, *cell, *cell))
    sprites.append(Sprite(colour, shape, tuple(apps)))
    numbers = [str(i) for i in range(1, 7)]
    question = arrange("count", f"How many times did the {colour} {shape} appear?", str(n),
                       shuffled(numbers, rng), letter, rng)
    return sprites, question


def build_direction(n_frames: int, config: VideoConfig, rng: np.random.Generator,
                    letter: int) -> tuple[list[Sprite], Question]:
    g = config.grid
    direction = DIRECTIONS[int(rng.integers(4))]
    line = int(rng.integers(g))
    if direction in ("left", "right"):
        path = [(line, c) for c in range(g)]
        a, b = (line, 0), (line, g - 1)
    else:
        path = [(r, line) for r in range(g)]
        a, b = (0, line), (g - 1, line)
    if direction in ("left", "up"):
        a, b = b, a
    board = _Board(g)
    for cell in path:
        board.take(cell, 0, n_frames)
    colour, shape = _names(rng, 1)[0]
    mover = Sprite(colour, shape, (Appearance(0, n_frames, *a, *b),))
    statics = _statics(rng, board, n_frames, int(rng.integers(1, 4)), avoid_colours=[colour])
    others = [d for d in DIRECTIONS if d != direction]
    question = arrange("direction", f"In which direction did the {colour} {shape} move?", direction,
                       shuffled(others, rng), letter, rng)
    return [*statics, mover], question


def build_final_corner(n_frames: int, config: VideoConfig, rng: np.random.Generator,
                       letter: int) -> tuple[list[Sprite], Question]:
    length = event_length(n_frames, config.min_sampled_frames)
    m = int(rng.integers(2, min(4, n_frames // length) + 1))
    board = _Board(config.grid)
    board.take((0, 0), 0, n_frames)
    names = _names(rng, m)
    extra = n_frames - m * length
    cuts = np.sort(rng.integers(0, extra + 1, size=m - 1))
    bounds = [0, *(int(c) + (i + 1) * length for i, c in enumerate(cuts)), n_frames]
    corner = [Sprite(c, s, (Appearance(bounds[i], bounds[i + 1], 0, 0, 0, 0),)) for i, (c, s) in enumerate(names)]
    statics = _statics(rng, board, n_frames, int(rng.integers(1, 4)), avoid_names=[s.name for s in corner])
    present = {s.name for s in corner} | {s.name for s in statics}
    absent = [n for n in all_names() if n not in present]
    distractors = shuffled([s.name for s in corner[:-1]], rng) + shuffled([s.name for s in statics], rng)
    question = arrange("final_corner", "What was in the top left corner at the end of the video?", corner[-1].name,
                       distractors + shuffled(absent, rng), letter, rng)
    return [*corner, *statics], question


BUILD: dict[str, Callable[..., tuple[list[Sprite], Question]]] = {
    "needle": build_needle,
    "order": build_order,
    "count": build_count,
    "direction": build_direction,
    "final_corner": build_final_corner,
}


def make_video(index: int, seed: int = 0, split: str = "train", config: VideoConfig | None = None,
               tasks: Sequence[str] = VIDEO_TASKS, render: bool = True) -> VideoSample:
    """Item `index` of the video set of `split` (deterministic; independent of every other item).

    Task = `tasks[index % len(tasks)]`; duration label = the `(index // len(tasks)) % 3`-th, so every task gets
    every duration equally often; frame count uniform within the label's range.
    """
    config = config or VideoConfig()
    check_split(split)
    tasks = check_tasks(tasks, VIDEO_TASKS)
    task = tasks[index % len(tasks)]
    label, lo, hi = config.durations[(index // len(tasks)) % len(config.durations)]
    rng = item_rng(seed, split, "video", index)
    letter = balanced_letter(seed, split, "video", index)
    for _ in range(10_000):
        n_frames = int(rng.integers(lo, hi + 1))
        try:
            sprites, question = BUILD[task](n_frames, config, rng, letter)
        except _Infeasible:
            continue
        if scene_split(video_key(task, n_frames, sprites, config.grid)) == split:
            break
    else:
        raise RuntimeError(f"no {task!r} video with {lo}-{hi} frames fits a {config.grid}x{config.grid} grid "
                           f"with min_sampled_frames={config.min_sampled_frames}")
    sprites, backdrop = dress(sprites, config.geometry, config.jitter, config.textured, rng)
    sample = VideoSample(
        uid=f"{split}_{task}_{index:06d}", split=split, index=index, duration=label, n_frames=n_frames,
        fps=config.fps, sprites=tuple(sprites), question=question, geometry=config.geometry, backdrop=backdrop,
        patterned=config.patterned,
    )
    return replace(sample, frames=sample.render()) if render else sample


def generate_videos(n: int, seed: int = 0, split: str = "train", size: int | None = None, *, start: int = 0,
                    config: VideoConfig | None = None, tasks: Sequence[str] = VIDEO_TASKS,
                    render: bool = True) -> list[VideoSample]:
    """Items `start` .. `start + n - 1` of the video set, in memory, frames as uint8 arrays (no mp4 round trip).
    `size` overrides `config.size`."""
    config = config or VideoConfig()
    if size is not None:
        config = replace(config, size=size)
    return [make_video(i, seed, split, config, tasks, render) for i in range(start, start + n)]
