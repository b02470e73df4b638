"""Still images with four-option questions that need one specific region.

Tasks (one question per image, cycling through the chosen tasks by item index; `IMAGE_TASKS`, the default, are
the ones the shipped image model answers, `ALL_IMAGE_TASKS` every one):

- `colour_of`: "What colour is the circle?" (a shape the scene has once); options are colours, the scene's
  other colours first.
- `shape_of`: "What shape is the red object?" (a colour the scene has once); options are shapes, the scene's
  other shapes first.
- `present`: "Which of these objects is in the picture?"; options are object names, one in the scene, and three
  that are not, those sharing a colour or a shape with a scene object first (so colour and shape must be read
  together).
- `count_colour`: "How many blue objects are there?"; options are counts 0..max(max_objects, 3); the colour
  asked about is in the scene in about 3 of 4 questions.

These four are about what the picture shows, wherever it is, as most questions to real VLMs are: any patch of
the object answers, so they stay answerable when a reducer keeps part of an object, and fail when it keeps
none. The generator's first version asked by position (the shipped models before issue 17 were trained on
these; a model has to read a token's place in the grid to answer them):

- `colour_at`: "What colour is the object at the top left?"; options are colours, the scene's other colours
  first, then absent ones.
- `shape_at`: "What shape is the object at the centre?"; options are shapes, the scene's other shapes first.
- `relation`: "Which object is left of the red circle?" (left of / right of / above / below); options are object
  names, first scene objects for which the relation is false, then objects not in the scene: exactly one
  option is true.

"left of" compares columns only (any row), "above" rows only. Objects in one scene have distinct names
("red circle"), so a name identifies an object. Every sample also carries a caption naming every object with
its position in reading order, a target for teaching perception.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np

from .questions import Question, arrange, shuffled
from .scene import (
    COLOURS,
    SHAPES,
    Backdrop,
    Geometry,
    Obj,
    all_names,
    caption,
    check_geometry,
    dress,
    look_fields,
    position_phrase,
    render_objects,
)
from .seeds import balanced_letter, check_split, item_rng, scene_split

IMAGE_TASKS: tuple[str, ...] = ("colour_of", "shape_of", "present", "count_colour")
#: the first version's tasks (questions by position)
POSITION_TASKS: tuple[str, ...] = ("colour_at", "shape_at", "relation", "count_colour")

RELATIONS: dict[str, Callable[[Obj, Obj], bool]] = {
    "left of": lambda a, b: a.col < b.col,
    "right of": lambda a, b: a.col > b.col,
    "above": lambda a, b: a.row < b.row,
    "below": lambda a, b: a.row > b.row,
}


@dataclass(frozen=True)
class ImageConfig:
    """`size` x `size` pixels, a `grid` x `grid` cell layout, `min_objects`..`max_objects` objects per image;
    `textured`: a textured, cluttered backdrop (`scene.Backdrop`) instead of a plain one; `jitter`: objects sit
    at random pixel offsets inside their cells instead of at the centre; `patterned`: each shape filled with its
    pattern (`scene.fill_mask`). The defaults are the look the shipped image model was trained on,
    `scene.LOOKS["rich"]`; `ImageConfig.with_look("plain")` is the generator's first version."""

    size: int = 168
    grid: int = 3
    min_objects: int = 2
    max_objects: int = 5
    textured: bool = True
    jitter: bool = True
    patterned: bool = True

    def __post_init__(self) -> None:
        check_geometry(self.size, self.grid)
        if not 2 <= self.min_objects <= self.max_objects <= min(self.grid * self.grid, 10):
            raise ValueError(
                f"need 2 <= min_objects <= max_objects <= min(grid*grid, 10), got min_objects={self.min_objects}, "
                f"max_objects={self.max_objects}, grid={self.grid}"
            )

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.size, self.grid)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def with_look(cls, look: str, **overrides) -> ImageConfig:
        """A config with the fields of `scene.LOOKS[look]` ("plain" or "rich"), then `overrides`."""
        return cls(**{**look_fields(look), **overrides})


@dataclass(frozen=True)
class ImageSample:
    """One generated image and its question. `image` is (size, size, 3) uint8 RGB; `backdrop` is the textured
    background it was drawn on (None: plain)."""

    uid: str
    split: str
    index: int
    objects: tuple[Obj, ...]
    question: Question
    caption: str
    image: np.ndarray
    backdrop: Backdrop | None = None

    @property
    def task(self) -> str:
        return self.question.task


def sample_objects(rng: np.random.Generator, config: ImageConfig) -> tuple[Obj, ...]:
    """2-5 objects (by default) in distinct cells with distinct names, sorted in reading order."""
    n = int(rng.integers(config.min_objects, config.max_objects + 1))
    cells = rng.choice(config.grid * config.grid, size=n, replace=False)
    kinds = rng.choice(len(COLOURS) * len(SHAPES), size=n, replace=False)
    colours = list(COLOURS)
    objs = [
        Obj(int(c) // config.grid, int(c) % config.grid, colours[int(k) // len(SHAPES)], SHAPES[int(k) % len(SHAPES)])
        for c, k in zip(cells, kinds)
    ]
    return tuple(sorted(objs))


def scene_key(objects: Sequence[Obj], grid: int) -> str:
    """Canonical description of a still scene (what split disjointness is decided on)."""
    return f"image|{grid}|" + ";".join(f"{o.row},{o.col},{o.colour},{o.shape}" for o in sorted(objects))


def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def _ask_attribute_at(objects: Sequence[Obj], config: ImageConfig, rng: np.random.Generator, letter: int,
                      attr: str, vocabulary: Sequence[str]) -> Question:
    """"What <attr> is the object at <position>?"; distractors: the scene's other values first, then absent ones."""
    target = _pick(rng, objects)
    answer = getattr(target, attr)
    in_scene = [v for v in dict.fromkeys(getattr(o, attr) for o in objects) if v != answer]
    absent = [v for v in vocabulary if v not in in_scene and v != answer]
    text = f"What {attr} is the object {position_phrase(target.row, target.col, config.grid)}?"
    return arrange(f"{attr}_at", text, answer, shuffled(in_scene, rng) + shuffled(absent, rng), letter, rng)


def ask_colour_at(objects: Sequence[Obj], config: ImageConfig, rng: np.random.Generator, letter: int) -> Question:
    return _ask_attribute_at(objects, config, rng, letter, "colour", COLOURS)


def ask_shape_at(objects: Sequence[Obj], config: ImageConfig, rng: np.random.Generator, letter: int) -> Question:
    return _ask_attribute_at(objects, config, rng, letter, "shape", SHAPES)


def ask_relation(objects: Sequence[Obj], config: ImageConfig, rng: np.random.Generator,
                 letter: int) -> Question | None:
    usable = [r for r, holds in RELATIONS.items() if any(holds(a, b) for a in objects for b in objects)]
    if not usable:
        return None
    rel = _pick(rng, usable)
    holds = RELATIONS[rel]
    pairs = [(a, b) for a in objects for b in objects if a != b and holds(a, b)]
    a, b = _pick(rng, pairs)
    false_in_scene = [o.name for o in objects if o != b and not holds(o, b)]
    present = {o.name for o in objects}
    absent = [n for n in all_names() if n not in present]
    text = f"Which object is {rel} the {b.name}?"
    return arrange("relation", text, a.name, shuffled(false_in_scene, rng) + shuffled(absent, rng), letter, rng)


def ask_count_colour(objects: Sequence[Obj], config: ImageConfig, rng: np.random.Generator,
                     letter: int) -> Question:
    present = list(dict.fromkeys(o.colour for o in objects))
    absent = [c for c in COLOURS if c not in present]
    colour = _pick(rng, present) if (not absent or rng.random() < 0.75) else _pick(rng, absent)
    count = sum(o.colour == colour for o in objects)
    numbers = [str(n) for n in range(max(config.max_objects, 3) + 1)]
    text = f"How many {colour} objects are there?"
    return arrange("count_colour", text, str(count), shuffled(numbers, rng), letter, rng)


def _ask_attribute_of(objects: Sequence[Obj], rng: np.random.Generator, letter: int, attr: str, by: str,
                      vocabulary: Sequence[str]) -> Question | None:
    """"What <attr> is the <by-value> ...?" about an object whose `by` value the scene has once; None when no
    object has a unique one. Distractors: the scene's other `attr` values first, then absent ones."""
    counts: dict[str, int] = {}
    for o in objects:
        counts[getattr(o, by)] = counts.get(getattr(o, by), 0) + 1
    unique = [o for o in objects if counts[getattr(o, by)] == 1]
    if not unique:
        return None
    target = _pick(rng, unique)
    answer = getattr(target, attr)
    in_scene = [v for v in dict.fromkeys(getattr(o, attr) for o in objects) if v != answer]
    absent = [v for v in vocabulary if v not in in_scene and v != answer]
    key = getattr(target, by)
    text = f"What colour is the {key}?" if attr == "colour" else f"What shape is the {key} object?"
    return arrange(f"{attr}_of", text, answer, shuffled(in_scene, rng) + shuffled(absent, rng), letter, rng)


def ask_colour_of(objects: Sequence[Obj], config: ImageConfig, rng: np.random.Generator,
                  letter: int) -> Question | None:
    return _ask_attribute_of(objects, rng, letter, "colour", "shape", COLOURS)


def ask_shape_of(objects: Sequence[Obj], config: ImageConfig, rng: np.random.Generator,
                 letter: int) -> Question | None:
    return _ask_attribute_of(objects, rng, letter, "shape", "colour", SHAPES)


def ask_present(objects: Sequence[Obj], config: ImageConfig, rng: np.random.Generator, letter: int) -> Question:
    target = _pick(rng, objects)
    names = {o.name for o in objects}
    colours, shapes = {o.colour for o in objects}, {o.shape for o in objects}
    absent = [n for n in all_names() if n not in names]
    near = [n for n in absent if n.split()[0] in colours or n.split()[1] in shapes]
    far = [n for n in absent if n not in near]
    text = "Which of these objects is in the picture?"
    return arrange("present", text, target.name, shuffled(near, rng) + shuffled(far, rng), letter, rng)


ASK: dict[str, Callable[..., Question | None]] = {
    "colour_of": ask_colour_of,
    "shape_of": ask_shape_of,
    "present": ask_present,
    "count_colour": ask_count_colour,
    "colour_at": ask_colour_at,
    "shape_at": ask_shape_at,
    "relation": ask_relation,
}
#: every task the generator can ask
ALL_IMAGE_TASKS: tuple[str, ...] = tuple(ASK)


def check_tasks(tasks: Sequence[str], known: Sequence[str]) -> tuple[str, ...]:
    tasks = tuple(tasks)
    bad = [t for t in tasks if t not in known]
    if not tasks or bad:
        raise ValueError(f"tasks must be a non-empty selection of {tuple(known)}, got {tasks}")
    return tasks


def make_image(index: int, seed: int = 0, split: str = "train", config: ImageConfig | None = None,
               tasks: Sequence[str] = IMAGE_TASKS) -> ImageSample:
    """Item `index` of the image set of `split` (deterministic; independent of every other item)."""
    config = config or ImageConfig()
    check_split(split)
    tasks = check_tasks(tasks, ALL_IMAGE_TASKS)
    task = tasks[index % len(tasks)]
    rng = item_rng(seed, split, "image", index)
    letter = balanced_letter(seed, split, "image", index)
    for _ in range(10_000):
        objects = sample_objects(rng, config)
        if scene_split(scene_key(objects, config.grid)) != split:
            continue
        question = ASK[task](objects, config, rng, letter)
        if question is not None:
            break
    else:  # pragma: no cover - every task is feasible on most scenes
        raise RuntimeError(f"no scene for task {task!r} in 10000 draws")
    objects, backdrop = dress(objects, config.geometry, config.jitter, config.textured, rng)
    return ImageSample(
        uid=f"{split}_{task}_{index:06d}",
        split=split,
        index=index,
        objects=objects,
        question=question,
        caption=caption(objects, config.grid),
        image=render_objects(objects, config.geometry, backdrop, config.patterned),
        backdrop=backdrop,
    )


def generate_images(n: int, seed: int = 0, split: str = "train", size: int | None = None, *, start: int = 0,
                    config: ImageConfig | None = None, tasks: Sequence[str] = IMAGE_TASKS) -> list[ImageSample]:
    """Items `start` .. `start + n - 1` of the image set, in memory (no disk). `size` overrides `config.size`.

    Thousands per second on one core (see the package docstring), so training can draw fresh batches.
    """
    config = config or ImageConfig()
    if size is not None:
        config = replace(config, size=size)
    return [make_image(i, seed, split, config, tasks) for i in range(start, start + n)]
