"""Scenes: coloured shapes on a coarse grid over a textured backdrop, and their rendering to uint8 RGB arrays.

The picture is `grid x grid` square cells (3x3 by default). An object is one shape of one colour,
`OBJECT_FRACTION` of the cell wide, placed in its cell with a pixel offset (`Obj.dy`, `Obj.dx`, at most
`Geometry.max_jitter` either way, so it never leaves its cell); every shape covers the pixel at its own centre.
Colours are far apart in RGB (and in YUV 4:2:0, so an mp4 round trip keeps them apart: measured error <= 3 per
channel at crf 12).

The backdrop (`Backdrop`) is like real content, not a flat fill: a dark-grey texture (stripes, checks or
blotches plus fine grain) and a few small clutter specks in muted colours that no question is about. Every
backdrop pixel stays far from every palette colour (more than 60 in RGB), so objects remain readable, but
neighbouring background tokens are no longer identical and distinctive specks compete for a reducer's budget.

Positions are named in words on the default 3x3 grid ("top left", "centre", "bottom middle", ...) and as
"row R column C" (1-based) on any other grid; `position_phrase` gives the phrase questions and captions use.
At 168 px (the default) and a 3x3 grid a cell is 56 px and an object 43 px: it spans 3 to 4 patches of a
patch-14 tower each way (9 to 16 of its 144 tokens); at 112 px they are 37 and 28 px.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

#: name -> RGB. Pairwise distances >= 120 in RGB and none close to the background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 180, 50),
    "blue": (40, 80, 240),
    "yellow": (240, 220, 30),
    "purple": (160, 50, 210),
    "white": (245, 245, 245),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
BACKGROUND: tuple[int, int, int] = (40, 40, 40)
#: muted colours of the backdrop's clutter specks (each more than 100 from every palette colour in RGB)
CLUTTER: tuple[tuple[int, int, int], ...] = ((120, 95, 70), (105, 105, 110), (50, 95, 95), (95, 70, 95))
#: backdrop pixel values stay within this range (per channel)
BACKDROP_RANGE: tuple[int, int] = (18, 90)
#: object width / cell width
OBJECT_FRACTION = 0.76

#: the generator's looks, as config fields: "plain" is version 1's (flat shapes centred in their cells on the
#: plain background, 112 px: 8x8 patches of 14 px); "rich" is like real content (168 px: 12x12 patches, objects
#: of 9 to 16 patches at random offsets, each shape with its own fill pattern, textured and cluttered backdrop)
LOOKS: dict[str, dict] = {
    "plain": dict(size=112, textured=False, jitter=False, patterned=False),
    "rich": dict(size=168, textured=True, jitter=True, patterned=True),
}

_ROW_WORDS = ("top", "middle", "bottom")
_COL_WORDS = ("left", "middle", "right")


@dataclass(frozen=True, order=True)
class Obj:
    """One object in a still scene: a coloured shape in cell (`row`, `col`), 0-based from the top left."""

    row: int
    col: int
    colour: str
    shape: str
    dy: int = 0
    dx: int = 0

    @property
    def name(self) -> str:
        """"red circle": how questions and options refer to the object."""
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Geometry:
    """Pixel layout of a `size` x `size` picture cut into `grid` x `grid` cells."""

    size: int
    grid: int

    @property
    def cell(self) -> int:
        """Cell width in pixels."""
        return self.size // self.grid

    @property
    def origin(self) -> int:
        """Pixel offset of the grid (the size need not be a multiple of the grid; the rest is split evenly)."""
        return (self.size - self.cell * self.grid) // 2

    @property
    def object_px(self) -> int:
        """Object width in pixels."""
        return max(3, int(round(self.cell * OBJECT_FRACTION)))

    @property
    def max_jitter(self) -> int:
        """The largest pixel offset of an object from its cell's centre that keeps it inside the cell."""
        return (self.cell - self.object_px) // 2

    def top_left(self, row: float, col: float, dy: int = 0, dx: int = 0) -> tuple[int, int]:
        """Pixel (y, x) of the top-left corner of an object centred in cell (row, col) and moved by (dy, dx)
        pixels; fractional cells move an object between cells."""
        inset = (self.cell - self.object_px) / 2
        y = self.origin + row * self.cell + inset
        x = self.origin + col * self.cell + inset
        return int(round(y)) + dy, int(round(x)) + dx

    def centre(self, row: int, col: int) -> tuple[int, int]:
        """Pixel (y, x) of the centre of cell (row, col)."""
        y, x = self.top_left(row, col)
        half = self.object_px // 2
        return y + half, x + half


def look_fields(look: str) -> dict:
    """The config fields of a look (`LOOKS`); ValueError naming the looks for anything else."""
    if look not in LOOKS:
        raise ValueError(f"unknown look {look!r}; expected one of {sorted(LOOKS)}")
    return dict(LOOKS[look])


def look_of(config) -> str:
    """The name of the look (`LOOKS`) an image or video config has, or "custom" when it matches none."""
    for name, fields in LOOKS.items():
        if all(getattr(config, k) == v for k, v in fields.items()):
            return name
    return "custom"


def check_geometry(size: int, grid: int) -> None:
    """Raise ValueError for a picture too small or a grid too coarse/fine to draw recognisable shapes."""
    if not isinstance(grid, int) or grid < 2:
        raise ValueError(f"grid must be an integer >= 2, got {grid!r}")
    if not isinstance(size, int) or size < 8 * grid:
        raise ValueError(f"size must be an integer >= 8 * grid = {8 * grid} pixels, got {size!r}")


def position_phrase(row: int, col: int, grid: int) -> str:
    """How a question names a cell: "at the top left", "at the centre" (3x3 grid) or "in row 2 column 3"."""
    if grid == 3:
        if (row, col) == (1, 1):
            return "at the centre"
        return f"at the {_ROW_WORDS[row]} {_COL_WORDS[col]}"
    return f"in row {row + 1} column {col + 1}"


@lru_cache(maxsize=64)
def shape_mask(shape: str, px: int) -> np.ndarray:
    """Boolean (px, px) mask of `shape`; True inside. Every mask covers its centre pixel."""
    c = (px - 1) / 2
    y, x = np.mgrid[0:px, 0:px].astype(np.float64)
    if shape == "circle":
        mask = (y - c) ** 2 + (x - c) ** 2 <= (px / 2) ** 2
    elif shape == "square":
        mask = np.ones((px, px), dtype=bool)
    elif shape == "triangle":  # apex at the top, base along the bottom row
        mask = np.abs(x - c) <= (y + 1) / px * (px / 2)
    elif shape == "diamond":
        mask = np.abs(x - c) + np.abs(y - c) <= px / 2
    elif shape == "cross":  # a plus sign, bars one third of the width
        mask = (np.abs(x - c) <= px / 6) | (np.abs(y - c) <= px / 6)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    mask.setflags(write=False)
    return mask


#: period (pixels) of a shape's fill pattern; every 14-px patch of an object sees at least two periods
FILL_PERIOD = 6
#: brightness of a pattern's dark stripes relative to the object's colour
FILL_SHADE = 0.55


@lru_cache(maxsize=64)
def fill_mask(shape: str, px: int) -> np.ndarray:
    """Boolean (px, px) mask of the dark part of `shape`'s fill pattern (True = shaded).

    Each shape has its own fill, so that every patch inside an object shows what it is, as a patch of a real
    object shows its texture: circle solid, square horizontal stripes, triangle vertical stripes, diamond
    checks, cross diagonal stripes. The outline still differs too.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    half = FILL_PERIOD // 2
    y, x = np.mgrid[0:px, 0:px]
    mask = {
        "circle": np.zeros((px, px), dtype=bool),
        "square": (y // half) % 2 == 1,
        "triangle": (x // half) % 2 == 1,
        "diamond": (y // half + x // half) % 2 == 1,
        "cross": ((x + y) // half) % 2 == 1,
    }[shape]
    mask.setflags(write=False)
    return mask


def blank(size: int, frames: int | None = None) -> np.ndarray:
    """Background-filled (size, size, 3) uint8 image, or (frames, size, size, 3) when `frames` is given."""
    shape = (size, size, 3) if frames is None else (frames, size, size, 3)
    out = np.empty(shape, dtype=np.uint8)
    out[...] = BACKGROUND
    return out


def paint(canvas: np.ndarray, colour: str | tuple[int, int, int], shape: str, y: int, x: int, px: int,
          patterned: bool = True) -> None:
    """Paint a `px`-wide `shape` in `colour` (a palette name or an RGB triple) with its top-left corner at pixel
    (y, x), in place. A palette colour gets the shape's fill pattern (`fill_mask`) when `patterned`; an RGB
    triple (the backdrop's clutter) is always painted flat.

    `canvas` is (H, W, 3) or (T, H, W, 3) (then every frame gets the object). Pixels outside are clipped.
    """
    h, w = canvas.shape[-3], canvas.shape[-2]
    y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + px, h), min(x + px, w)
    if y0 >= y1 or x0 >= x1:
        return
    window = (slice(y0 - y, y1 - y), slice(x0 - x, x1 - x))
    m = shape_mask(shape, px)[window]
    region = canvas[..., y0:y1, x0:x1, :]
    if isinstance(colour, str) and not patterned:
        region[..., m, :] = COLOURS[colour]
    elif isinstance(colour, str):
        rgb = np.asarray(COLOURS[colour], dtype=np.float64)
        shade = fill_mask(shape, px)[window]
        region[..., m & ~shade, :] = rgb.astype(np.uint8)
        region[..., m & shade, :] = np.round(rgb * FILL_SHADE).astype(np.uint8)
    else:
        region[..., m, :] = colour


@dataclass(frozen=True)
class Backdrop:
    """A textured background with clutter, fully determined by `seed` (what scenes.json records).

    `render(size)` draws: a base grey (38-58) with a slight per-channel tint; one pattern of amplitude 6-14
    (stripes at a random angle and period, checks, or smooth blotches); fine grain (+-3); 0-5 clutter specks
    (a random shape 5-9 px wide in a `CLUTTER` colour) anywhere. Values are clipped to `BACKDROP_RANGE`.
    """

    seed: int

    def render(self, size: int) -> np.ndarray:
        """(size, size, 3) uint8 RGB."""
        rng = np.random.default_rng([self.seed, size])
        y, x = np.mgrid[0:size, 0:size].astype(np.float32)
        base = rng.uniform(38, 58) + rng.uniform(-4, 4, size=3)
        amp = rng.uniform(6, 14)
        kind = int(rng.integers(3))
        if kind == 0:  # stripes
            angle, period = rng.uniform(0, np.pi), rng.uniform(8, 28)
            pattern = np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period)
        elif kind == 1:  # checks
            period = rng.uniform(6, 20)
            pattern = np.sign(np.sin(np.pi * (x + 0.5) / period) * np.sin(np.pi * (y + 0.5) / period))
        else:  # blotches: coarse noise, bilinearly upsampled
            from PIL import Image

            coarse = rng.uniform(-1, 1, size=(int(rng.integers(3, 8)),) * 2).astype(np.float32)
            pattern = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR))
        grain = rng.uniform(-3, 3, size=(size, size, 1))
        img = base + amp * pattern[..., None] + grain
        out = np.clip(np.round(img), *BACKDROP_RANGE).astype(np.uint8)
        for _ in range(int(rng.integers(0, 6))):
            px = int(rng.integers(5, 10))
            sy, sx = (int(v) for v in rng.integers(0, size - px, size=2))
            paint(out, CLUTTER[int(rng.integers(len(CLUTTER)))], SHAPES[int(rng.integers(len(SHAPES)))], sy, sx, px)
        return out


def dress(things, geometry: Geometry, jitter: bool, textured: bool, rng: np.random.Generator):
    """The look of a drawn scene, drawn after the scene and its question so that it never changes which scene or
    question an item gets: each object or sprite (anything with `dy`/`dx`) at a random pixel offset inside its
    cell when `jitter`, then the backdrop when `textured`. Returns (tuple of things, Backdrop or None)."""
    j = geometry.max_jitter if jitter else 0
    if j:
        things = [replace(t, dy=int(rng.integers(-j, j + 1)), dx=int(rng.integers(-j, j + 1))) for t in things]
    return tuple(things), (Backdrop(int(rng.integers(2**31))) if textured else None)


def backdrop_image(backdrop: Backdrop | None, size: int, frames: int | None = None) -> np.ndarray:
    """The backdrop (or the plain `BACKGROUND` for None) as (size, size, 3), or (frames, size, size, 3) when
    `frames` is given (the same picture in every frame)."""
    if backdrop is None:
        return blank(size, frames)
    img = backdrop.render(size)
    return img.copy() if frames is None else np.repeat(img[None], frames, axis=0)


def render_objects(objects: tuple[Obj, ...] | list[Obj], geometry: Geometry,
                   backdrop: Backdrop | None = None, patterned: bool = True) -> np.ndarray:
    """Render a still scene over `backdrop` (plain background for None), shapes filled with their patterns
    unless `patterned` is False: (size, size, 3) uint8 RGB."""
    image = backdrop_image(backdrop, geometry.size)
    px = geometry.object_px
    for obj in objects:
        y, x = geometry.top_left(obj.row, obj.col, obj.dy, obj.dx)
        paint(image, obj.colour, obj.shape, y, x, px, patterned)
    return image


def all_names() -> list[str]:
    """Every "colour shape" name, colours outer, in a fixed order."""
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def caption(objects: tuple[Obj, ...] | list[Obj], grid: int) -> str:
    """Every object in reading order (row by row, left to right), e.g.
    "red circle at the top left, blue square at the centre." (a perception training target)."""
    parts = [f"{o.name} {position_phrase(o.row, o.col, grid)}" for o in sorted(objects)]
    return ", ".join(parts) + "."
