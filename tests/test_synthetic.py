"""The generated benchmark (tokenreduce.eval.synthetic): determinism, balance, layouts, resumable writing, and
every answer re-derived from pixels (rendered images, decoded mp4 frames), never from the answer fields."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from tokenreduce.eval import synthetic as syn
from tokenreduce.eval.synthetic import layouts
from tokenreduce.eval.synthetic.images import scene_key
from tokenreduce.eval.synthetic.videos import video_key

av = pytest.importorskip("av", reason="mp4 writing needs PyAV (the `video` extra)")

# --- reading pictures back, independently of the generator ----------------------------------------------------------

PALETTE = {name: np.array(rgb) for name, rgb in syn.COLOURS.items()}
#: the dark part of each colour's fill pattern (images draw shapes patterned: `scene.fill_mask`)
SHADED = {name: np.round(rgb * syn.scene.FILL_SHADE) for name, rgb in PALETTE.items()}
BG = np.array(syn.BACKGROUND)
CELL_WORDS = {"top left": (0, 0), "top middle": (0, 1), "top right": (0, 2), "middle left": (1, 0), "centre": (1, 1),
              "middle right": (1, 2), "bottom left": (2, 0), "bottom middle": (2, 1), "bottom right": (2, 2)}


def cell_crop(img: np.ndarray, row: int, col: int, grid: int) -> np.ndarray:
    """The pixels of one cell: the picture is cut into grid x grid equal cells, centred."""
    size = img.shape[0]
    cell = size // grid
    o = (size - cell * grid) // 2
    return img[o + row * cell: o + (row + 1) * cell, o + col * cell: o + (col + 1) * cell]


def nearest_colour(rgb: np.ndarray) -> str:
    """The palette colour of a pixel, in its full or its shaded (pattern) tone."""
    dist = {name: min(float(np.linalg.norm(rgb - PALETTE[name])), float(np.linalg.norm(rgb - SHADED[name])))
            for name in PALETTE}
    name = min(dist, key=dist.get)
    assert dist[name] < 60, f"pixel {rgb} is no palette colour (nearest {name} at {dist[name]:.0f})"
    return name


def classify_shape(mask: np.ndarray) -> str:
    """A shape from its foreground mask, by fill ratio and the widths of its top and bottom rows."""
    ys, xs = np.nonzero(mask)
    box = mask[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    h, w = box.shape
    fill = box.mean()
    top, bottom = box[0].sum() / w, box[-1].sum() / w
    if fill > 0.9:
        return "square"
    if fill > 0.68:
        return "circle"
    if bottom > 0.8 and top < 0.3:
        return "triangle"
    if top > 0.22 and bottom > 0.22:
        return "cross"
    return "diamond"


def palette_mask(img: np.ndarray) -> np.ndarray:
    """Pixels within 60 (RGB) of a palette colour or 40 of its shaded tone: objects, never the textured backdrop
    or its clutter (every backdrop pixel is at least 47 from every shaded tone)."""
    pix = img.astype(np.int32)[..., None, :]
    full = (np.linalg.norm(pix - np.stack(list(PALETTE.values())), axis=-1) < 60).any(-1)
    return full | (np.linalg.norm(pix - np.stack(list(SHADED.values())), axis=-1) < 40).any(-1)


def read_cell(img: np.ndarray, row: int, col: int, grid: int) -> str | None:
    """ "colour shape" of the object in a cell, or None for an empty cell. The object may sit anywhere inside
    its cell (jitter); its colour is read at the centre of its own bounding box."""
    crop = cell_crop(img, row, col, grid).astype(np.int32)
    fg = palette_mask(crop)
    if fg.sum() < 6:
        return None
    ys, xs = np.nonzero(fg)
    cy, cx = (ys.min() + ys.max()) // 2, (xs.min() + xs.max()) // 2
    centre = crop[cy - 1: cy + 2, cx - 1: cx + 2].reshape(-1, 3)
    colour = Counter(nearest_colour(p) for p in centre).most_common(1)[0][0]  # full and shaded pixels alike
    return f"{colour} {classify_shape(fg)}"


def read_scene(img: np.ndarray, grid: int) -> dict[tuple[int, int], str]:
    """(row, col) -> "colour shape" for every occupied cell."""
    out = {}
    for r in range(grid):
        for c in range(grid):
            name = read_cell(img, r, c, grid)
            if name:
                out[(r, c)] = name
    return out


def parse_cell(text: str, grid: int) -> tuple[int, int]:
    m = re.search(r"in row (\d+) column (\d+)", text)
    if m:
        return int(m.group(1)) - 1, int(m.group(2)) - 1
    assert grid == 3
    m = re.search(r"at the (top left|top middle|top right|middle left|centre|middle right|bottom left|"
                  r"bottom middle|bottom right)\b", text)
    return CELL_WORDS[m.group(1)]


def true_options_for_image(question: syn.Question, img: np.ndarray, grid: int) -> list[int]:
    """Indices of the options that are true of the picture, re-derived from its pixels."""
    seen = read_scene(img, grid)
    q = question.question
    if question.task == "colour_at":
        name = seen[parse_cell(q, grid)]
        return [i for i, o in enumerate(question.options) if name.split()[0] == o]
    if question.task == "shape_at":
        name = seen[parse_cell(q, grid)]
        return [i for i, o in enumerate(question.options) if name.split()[1] == o]
    if question.task == "colour_of":
        shape = re.fullmatch(r"What colour is the (\w+)\?", q).group(1)
        (name,) = [n for n in seen.values() if n.split()[1] == shape]  # the scene has that shape once
        return [i for i, o in enumerate(question.options) if name.split()[0] == o]
    if question.task == "shape_of":
        colour = re.fullmatch(r"What shape is the (\w+) object\?", q).group(1)
        (name,) = [n for n in seen.values() if n.split()[0] == colour]  # the scene has that colour once
        return [i for i, o in enumerate(question.options) if name.split()[1] == o]
    if question.task == "present":
        assert q == "Which of these objects is in the picture?"
        return [i for i, o in enumerate(question.options) if o in seen.values()]
    if question.task == "count_colour":
        colour = re.fullmatch(r"How many (\w+) objects are there\?", q).group(1)
        n = sum(name.split()[0] == colour for name in seen.values())
        return [i for i, o in enumerate(question.options) if o == str(n)]
    m = re.fullmatch(r"Which object is (left of|right of|above|below) the (\w+ \w+)\?", q)
    rel, ref = m.groups()
    where = {name: cell for cell, name in seen.items()}
    (rr, rc) = where[ref]
    test = {"left of": lambda r, c: c < rc, "right of": lambda r, c: c > rc,
            "above": lambda r, c: r < rr, "below": lambda r, c: r > rr}[rel]
    return [i for i, o in enumerate(question.options) if o in where and o != ref and test(*where[o])]


def decoded_frames(path: Path) -> tuple[np.ndarray, float]:
    with av.open(str(path)) as c:
        rate = float(c.streams.video[0].average_rate)
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    return frames, rate


def runs(frames: np.ndarray, grid: int) -> list[tuple[str, int, int, tuple[int, int]]]:
    """(name, start, stop, cell) for every maximal stretch of frames showing the same object in one cell."""
    out = []
    for r in range(grid):
        for c in range(grid):
            current, start = None, 0
            for t in range(len(frames) + 1):
                name = read_cell(frames[t], r, c, grid) if t < len(frames) else None
                if name != current:
                    if current is not None:
                        out.append((current, start, t, (r, c)))
                    current, start = name, t
    return out


def true_options_for_video(task: str, q: str, options: list[str], frames: np.ndarray, grid: int) -> list[int]:
    """Indices of the options that are true of the decoded video; `task` is MLVU's question_type."""
    n = len(frames)
    if task == "direction":  # follow the mover's colour
        colour, _ = re.fullmatch(r"In which direction did the (\w+) (\w+) move\?", q).groups()
        centroids = []
        for f in (frames[0], frames[-1]):
            ys, xs = np.nonzero(np.linalg.norm(f.astype(np.int32) - PALETTE[colour], axis=-1) < 60)
            # one object of that colour: its pixels fit in one object's box
            assert max(np.ptp(ys), np.ptp(xs)) < 0.8 * f.shape[0] / grid, "the mover's colour is not unique"
            centroids.append((ys.mean(), xs.mean()))
        dy, dx = centroids[1][0] - centroids[0][0], centroids[1][1] - centroids[0][1]
        truth = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
        return [i for i, o in enumerate(options) if o == truth]
    all_runs = runs(frames, grid)
    transient = [r for r in all_runs if not (r[1] == 0 and r[2] == n)]
    if task == "final_corner":
        last = read_cell(frames[-1], 0, 0, grid)
        return [i for i, o in enumerate(options) if o == last]
    if task == "findNeedle":
        shape = re.fullmatch(r"A (\w+) appeared only briefly\. What colour was it\?", q).group(1)
        brief = [r for r in transient if r[0].split()[1] == shape]
        assert len(brief) == 1, f"expected one brief {shape}, saw {brief}"
        assert brief[0][2] - brief[0][1] <= max(n // 4, syn.event_length(n, 8)) + 1
        static_colours = {r[0].split()[0] for r in all_runs if r[1] == 0 and r[2] == n}
        assert brief[0][0].split()[0] not in static_colours, "the needle's colour is visible all along"
        return [i for i, o in enumerate(options) if o == brief[0][0].split()[0]]
    if task == "count":
        name = re.fullmatch(r"How many times did the (\w+ \w+) appear\?", q).group(1)
        count = sum(r[0] == name for r in all_runs)
        return [i for i, o in enumerate(options) if o == str(count)]
    assert task == "order"
    static = {r[0] for r in all_runs if r[1] == 0 and r[2] == n}
    assert not static & set(options), "a static object is offered as an answer to 'which appeared first'"
    first = min(transient, key=lambda r: r[1])
    assert sum(r[1] == first[1] for r in transient) == 1
    return [i for i, o in enumerate(options) if o == first[0]]


# --- shared data --------------------------------------------------------------------------------------------------

N_IMAGES, N_VIDEOS = 12, 15  # 15 videos = every task at every duration


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    syn.write_benchmark(out, "test", N_IMAGES, N_VIDEOS, seed=5, progress_every=0)
    return out / "test"


def load(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


# --- in memory ----------------------------------------------------------------------------------------------------


def test_generation_is_deterministic_and_seeded():
    a = syn.generate_images(40, seed=3, split="validation")
    b = syn.generate_images(40, seed=3, split="validation")
    c = syn.generate_images(40, seed=4, split="validation")
    assert all(np.array_equal(x.image, y.image) and x.question == y.question and x.caption == y.caption
               for x, y in zip(a, b))
    assert sum(np.array_equal(x.image, y.image) for x, y in zip(a, c)) < 4
    # item i is the same whether made alone or in a batch
    assert syn.make_image(17, 3, "validation").question == a[17].question
    v1 = syn.generate_videos(5, seed=3, split="test", start=10)
    v2 = [syn.make_video(i, 3, "test") for i in range(10, 15)]
    assert all(np.array_equal(x.frames, y.frames) and x.question == y.question for x, y in zip(v1, v2))


DIGEST = """
import hashlib, sys
from tokenreduce.eval import synthetic as syn
h = hashlib.sha256()
for s in syn.generate_images(100, seed=9, split="test"):
    h.update(repr((s.question, s.caption)).encode() + s.image.tobytes())
for v in syn.generate_videos(20, seed=9, split="test", render=False):
    h.update(repr((v.question, v.sprites, v.n_frames, v.backdrop)).encode() + v.render()[::7].tobytes())
print(h.hexdigest())
"""


def test_generation_does_not_depend_on_the_process():
    """Same digest in another interpreter with another string-hash seed (no set/dict-order leaks)."""
    digests = {
        subprocess.run([sys.executable, "-c", DIGEST], capture_output=True, text=True, check=True, timeout=300,
                       env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip()
        for seed in ("1", "2")
    }
    assert len(digests) == 1 and len(digests.pop()) == 64


def test_backdrop_is_textured_cluttered_and_never_a_palette_colour():
    """The default look is like real content: the background varies from patch to patch and carries small clutter
    specks, yet no backdrop pixel can be taken for an object; `textured=False` gives the plain background."""
    samples = syn.generate_images(24, seed=0, split="test")
    patch_means = []
    for s in samples:
        bg = s.backdrop.render(s.image.shape[0])
        assert not palette_mask(bg).any(), s.uid
        drawn = palette_mask(s.image)
        assert np.array_equal(s.image[~drawn], bg[~drawn])  # objects are painted over the backdrop, nothing else
        patches = bg.reshape(12, 14, 12, 14, 3).mean(axis=(1, 3, 4))
        patch_means.append(patches.std())
    assert min(patch_means) > 1.0, "a backdrop is flat: neighbouring background tokens would be identical"
    assert len({s.backdrop for s in samples}) == len(samples)
    clutter = [np.isin(s.backdrop.render(168).reshape(-1, 3), np.array(syn.CLUTTER)).all(-1).any() for s in samples]
    assert 0.5 < np.mean(clutter) < 1.0  # most backdrops have specks (0-5 each)
    plain = syn.generate_images(4, seed=0, split="test", config=syn.ImageConfig(textured=False, jitter=False))
    assert all(s.backdrop is None and (s.image[~palette_mask(s.image)] == BG).all() for s in plain)
    v = syn.make_video(3, 0, "test", config=syn.VideoConfig.with_look("rich"))
    still = v.frames[:, ~palette_mask(v.frames).any(0)]
    assert (still == still[:1]).all() and still.std() > 1.0  # one textured backdrop, static through the video


def test_objects_span_several_patches_at_random_offsets():
    """At the default 168 px an object covers 3 to 4 patches of a patch-14 tower each way, and sits at its own
    offset inside its cell (so a token's place in the grid does not give an object's cell by itself)."""
    cfg = syn.ImageConfig()
    assert cfg.size // 14 == 12 and cfg.geometry.object_px >= 3 * 14
    objects = [o for s in syn.generate_images(40, seed=0, split="test") for o in s.objects]
    offsets = {(o.dy, o.dx) for o in objects}
    j = cfg.geometry.max_jitter
    assert j >= 5 and len(offsets) > 20 and all(abs(dy) <= j and abs(dx) <= j for dy, dx in offsets)
    rich = syn.VideoConfig.with_look("rich")
    sprites = [sp for v in syn.generate_videos(20, seed=0, split="test", render=False, config=rich) for sp in v.sprites]
    assert len({(sp.dy, sp.dx) for sp in sprites}) > 10


def test_answer_letters_balanced_and_options_distinct():
    images = syn.generate_images(400, seed=1, split="train")
    assert Counter(s.question.letter for s in images) == {L: 100 for L in "ABCD"}
    for task in syn.IMAGE_TASKS:
        letters = Counter(s.question.letter for s in images if s.task == task)
        assert sum(letters.values()) == 100 and min(letters.values()) >= 12, (task, letters)
    videos = syn.generate_videos(80, seed=1, split="train", render=False)
    assert Counter(s.question.letter for s in videos) == {L: 20 for L in "ABCD"}
    assert Counter(s.task for s in videos) == {t: 16 for t in syn.VIDEO_TASKS}
    for s in [*images, *videos]:
        assert len(s.question.options) == 4 and len(set(s.question.options)) == 4, s.question
        assert all(o.strip() for o in s.question.options)


@pytest.mark.parametrize("size,grid", [(112, 3), (224, 3), (112, 4)])
def test_image_answers_are_true_of_the_pixels(size, grid):
    config = syn.ImageConfig(size=size, grid=grid)
    samples = syn.generate_images(140, seed=2, split="test", config=config, tasks=syn.ALL_IMAGE_TASKS)
    assert {s.task for s in samples} == set(syn.ALL_IMAGE_TASKS)
    for s in samples:
        assert s.image.shape == (size, size, 3) and s.image.dtype == np.uint8
        true = true_options_for_image(s.question, s.image, grid)
        assert true == [s.question.answer], (s.uid, s.question, read_scene(s.image, grid))
        # the caption names every object in the picture, in reading order, at its position
        seen = read_scene(s.image, grid)
        parts = s.caption.rstrip(".").split(", ")
        assert len(parts) == len(seen)
        for part, (cell, name) in zip(parts, sorted(seen.items())):
            assert part.startswith(name + " ") and parse_cell(part, grid) == cell, (part, cell, name)


@pytest.mark.parametrize("size,grid", [(112, 3), (128, 4)])
def test_video_answers_are_true_of_the_rendered_frames(size, grid):
    config = syn.VideoConfig(size=size, grid=grid, durations=(("short", 8, 24),))
    for v in syn.generate_videos(50, seed=4, split="train", config=config):
        assert v.frames.shape == (v.n_frames, size, size, 3) and 8 <= v.n_frames <= 24
        q = v.question
        task = layouts.MLVU_TASKS[v.task][1]
        assert true_options_for_video(task, q.question, list(q.options), v.frames, grid) == [q.answer], (v.uid, q)


def test_video_events_are_seen_by_sparse_uniform_sampling():
    """Every appearance (and every gap of a blinking object) contains a frame of any uniform k-frame sample,
    k >= min_sampled_frames, for lmms-eval's floored linspace, rounded linspace and MLVU's segment midpoints."""
    videos = syn.generate_videos(60, seed=0, split="validation", render=False)
    for v in videos:
        n = v.n_frames
        for k in (8, 16, 32):
            schemes = {
                "floor": np.linspace(0, n - 1, k, dtype=int),
                "round": np.round(np.linspace(0, n - 1, k)).astype(int),
                "mid": np.array([int((n / k) / 2 + np.round(n / k * i)) for i in range(k)]).clip(0, n - 1),
            }
            for scheme, idx in schemes.items():
                hit = np.zeros(n, dtype=bool)
                hit[idx] = True
                for sp in v.sprites:
                    apps = sp.appearances
                    for a in apps:
                        assert hit[a.start: a.stop].any(), (v.uid, scheme, k, sp.name, a)
                    if v.task == "count":
                        for a, b in zip(apps, apps[1:]):
                            assert hit[a.stop: b.start].any(), (v.uid, scheme, k, "gap", sp.name)


def test_splits_are_disjoint():
    seeds = {split: syn.split_seed(0, split) for split in syn.SPLITS}
    assert len(set(seeds.values())) == 3
    keys = {
        split: {scene_key(s.objects, 3) for s in syn.generate_images(n, seed=0, split=split)}
        for split, n in (("train", 4000), ("validation", 600), ("test", 600))
    }
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["validation"]
    assert not keys["validation"] & keys["test"]
    assert all(syn.scene_split(k) == split for split, ks in keys.items() for k in ks)
    vkeys = {split: {video_key(v.task, v.n_frames, v.sprites, 3)
                     for v in syn.generate_videos(100, seed=0, split=split, render=False)} for split in syn.SPLITS}
    assert not vkeys["train"] & vkeys["test"] and all(len(k) == 100 for k in vkeys.values())


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="size"):
        syn.ImageConfig(size=10)
    with pytest.raises(ValueError, match="even"):
        syn.VideoConfig(size=111)
    with pytest.raises(ValueError, match="max_objects"):
        syn.ImageConfig(max_objects=12)
    with pytest.raises(ValueError, match="split"):
        syn.generate_images(1, split="dev")
    with pytest.raises(ValueError, match="tasks"):
        syn.generate_videos(1, tasks=["nope"])


def test_mp4_bytes_are_deterministic(tmp_path):
    """This clip encoded to different bytes (and pixels up to 5 apart) from run to run while libx264's
    macroblock tree read uninitialised memory; write_mp4 turns mbtree off."""
    a, s = syn.Appearance, syn.Sprite
    sprites = (s("white", "cross", (a(0, 22, 1, 1, 1, 1),)), s("purple", "triangle", (a(0, 22, 0, 0, 0, 0),)),
               s("yellow", "cross", (a(0, 22, 1, 2, 1, 2),)), s("red", "diamond", (a(0, 22, 2, 0, 2, 2),)))
    frames = syn.render_video(sprites, 22, syn.Geometry(112, 3))
    path = tmp_path / "clip.mp4"
    digests = set()
    for _ in range(4):
        syn.write_mp4(path, frames, fps=8)
        digests.add(path.read_bytes())
    # and with the heap filled with other bytes (glibc's MALLOC_PERTURB_), which used to change the output
    np.save(tmp_path / "frames.npy", frames)
    code = (
        "import importlib.util, sys, numpy as np\n"
        f"spec = importlib.util.spec_from_file_location('mp4', {str(Path(syn.__file__).with_name('mp4.py'))!r})\n"
        "mp4 = importlib.util.module_from_spec(spec); spec.loader.exec_module(mp4)\n"
        "mp4.write_mp4(sys.argv[2], np.load(sys.argv[1]), fps=8)\n"
    )
    for fill in ("85", "170"):
        other = tmp_path / f"clip{fill}.mp4"
        subprocess.run([sys.executable, "-c", code, str(tmp_path / "frames.npy"), str(other)], check=True,
                       env={**os.environ, "MALLOC_PERTURB_": fill}, timeout=120)
        digests.add(other.read_bytes())
    assert len(digests) == 1
    decoded = syn.read_mp4(path)
    assert decoded.shape == frames.shape
    assert np.median(np.abs(decoded.astype(int) - frames)) <= 2
    assert [read_cell(decoded[t], 1, 1, 3) for t in (0, 21)] == ["white cross"] * 2
    assert not list(tmp_path.glob("*.partial"))


# --- on disk ------------------------------------------------------------------------------------------------------

VIDEOMME_DOMAINS = {"Knowledge", "Film & Television", "Sports Competition", "Artistic Performance", "Life Record",
                    "Multilingual"}
VIDEOMME_TASK_TYPES = {"Temporal Perception", "Spatial Perception", "Attribute Perception", "Action Recognition",
                       "Object Recognition", "OCR Problems", "Counting Problem", "Temporal Reasoning",
                       "Spatial Reasoning", "Action Reasoning", "Object Reasoning", "Information Synopsis"}


def test_layouts_have_the_official_fields(bench):
    vm = load(bench / "videomme" / "videomme.json")
    assert len(vm) == N_VIDEOS
    for rec in vm:
        assert list(rec) == ["video_id", "duration", "domain", "sub_category", "url", "videoID", "question_id",
                             "task_type", "question", "options", "answer"]
        assert rec["duration"] in ("short", "medium", "long") and rec["answer"] in "ABCD"
        assert [o[:3] for o in rec["options"]] == ["A. ", "B. ", "C. ", "D. "]
        assert rec["domain"] in VIDEOMME_DOMAINS and rec["task_type"] in VIDEOMME_TASK_TYPES
        assert rec["question_id"].startswith(rec["video_id"] + "-")
        assert (bench / "videomme" / "data" / f"{rec['videoID']}.mp4").is_file()
    assert Counter(r["duration"] for r in vm) == {"short": 5, "medium": 5, "long": 5}
    files = sorted(p.name for p in (bench / "mlvu" / "json").iterdir())
    assert files == ["10_direction.json", "11_final_corner.json", "2_needle.json", "4_count.json", "5_order.json"]
    total = 0
    for f in files:
        for rec in load(bench / "mlvu" / "json" / f):
            total += 1
            assert list(rec) == ["video", "duration", "question", "candidates", "answer", "question_type"]
            assert rec["answer"] in rec["candidates"] and len(rec["candidates"]) == 4
            assert (bench / "mlvu" / "video" / f.removesuffix(".json") / rec["video"]).is_file()
    assert total == N_VIDEOS
    for rec in load(bench / "mlvu" / "mlvu_lmms_eval.json"):
        assert list(rec) == ["video_name", "duration", "question", "candidates", "answer", "task_type"]
        assert (bench / "mlvu" / rec["video_name"]).is_file() and rec["answer"] in "ABCD"
        assert rec["question"].splitlines()[1:] == [f"({L}) {c}" for L, c in zip("ABCD", rec["candidates"])]
    n = 0
    for f in sorted((bench / "images" / "json").iterdir()):
        for rec in load(f):
            n += 1
            assert list(rec) == ["image", "question", "candidates", "answer", "question_type", "caption"]
            assert (bench / "images" / "image" / f.stem / rec["image"]).is_file()
    assert n == N_IMAGES
    manifest = load(bench / "manifest.json")
    assert manifest["complete"] and manifest["parameters"]["seed"] == 5 and manifest["parameters"]["split"] == "test"
    assert manifest["counts"]["videos"] == N_VIDEOS and manifest["counts"]["images"] == N_IMAGES


def test_written_answers_are_true_of_the_decoded_files(bench):
    fps = load(bench / "manifest.json")["parameters"]["video"]["fps"]
    mlvu = {}
    for f in (bench / "mlvu" / "json").iterdir():
        mlvu.update({rec["video"]: rec for rec in load(f)})
    lmms = {Path(rec["video_name"]).name: rec for rec in load(bench / "mlvu" / "mlvu_lmms_eval.json")}
    for rec in load(bench / "videomme" / "videomme.json"):
        frames, rate = decoded_frames(bench / "videomme" / "data" / f"{rec['videoID']}.mp4")
        stated = mlvu[rec["videoID"] + ".mp4"]["duration"] * fps
        assert len(frames) == round(stated) and rate == fps, (rec["videoID"], len(frames), stated, rate)
        lo, hi = dict((d[0], d[1:]) for d in syn.DURATIONS)[rec["duration"]]
        assert lo <= len(frames) <= hi
        m = mlvu[rec["videoID"] + ".mp4"]
        options = [o.split(". ", 1)[1] for o in rec["options"]]
        true = true_options_for_video(m["question_type"], rec["question"], options, frames, 3)
        assert true == ["ABCD".index(rec["answer"])], (rec, true)
        # MLVU's record of the same video: same question, its answer text is the true candidate
        assert m["question"] == rec["question"] and m["candidates"] == options
        assert true == [m["candidates"].index(m["answer"])], m
        assert lmms[f"{m['video']}"]["answer"] == rec["answer"]
    from PIL import Image

    for f in (bench / "images" / "json").iterdir():
        for rec in load(f):
            img = np.asarray(Image.open(bench / "images" / "image" / f.stem / rec["image"]).convert("RGB"))
            q = syn.Question(rec["question_type"], rec["question"], tuple(rec["candidates"]),
                             rec["candidates"].index(rec["answer"]))
            assert true_options_for_image(q, img, 3) == [q.answer], rec


def test_writing_is_deterministic(bench, tmp_path):
    syn.write_benchmark(tmp_path, "test", N_IMAGES, N_VIDEOS, seed=5, progress_every=0)
    again = tmp_path / "test"
    names = sorted(p.relative_to(bench) for p in bench.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for name in names:
        if name.suffix in (".json", ".png"):
            assert (bench / name).read_bytes() == (again / name).read_bytes(), name
        elif name.parts[:2] == ("videomme", "data"):
            assert np.array_equal(decoded_frames(bench / name)[0], decoded_frames(again / name)[0]), name
            assert (bench / name).read_bytes() == (again / name).read_bytes(), name


def test_killed_run_resumes_without_redoing_finished_items(tmp_path, monkeypatch):
    written = []
    real_write = layouts.write_mp4

    def dying_write(path, frames, fps, crf):
        if len(written) == 3:
            raise KeyboardInterrupt  # the run is killed while encoding the 4th video
        written.append(Path(path).name)
        return real_write(path, frames, fps, crf)

    monkeypatch.setattr(layouts, "write_mp4", dying_write)
    with pytest.raises(KeyboardInterrupt):
        syn.write_benchmark(tmp_path, "validation", 6, 8, seed=1, progress_every=0)
    root = tmp_path / "validation"
    assert not load(root / "manifest.json")["complete"]
    finished = sorted(p.name for p in (root / "videomme" / "data").glob("*.mp4"))
    assert finished == sorted(written) and len(finished) == 3
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*.png")} | {
        p: p.stat().st_mtime_ns for p in (root / "videomme" / "data").glob("*.mp4")}
    assert len(stamps) == 6 + 3

    written.clear()
    monkeypatch.setattr(layouts, "write_mp4", lambda *a: (written.append(Path(a[0]).name), real_write(*a))[1])
    manifest = syn.write_benchmark(tmp_path, "validation", 6, 8, seed=1, progress_every=0)
    assert manifest["complete"] and len(written) == 5 and not set(written) & set(finished)
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items()), "a finished file was rewritten"
    assert len(load(root / "videomme" / "videomme.json")) == 8
    # the resumed folder equals a clean run
    clean = tmp_path / "clean"
    syn.write_benchmark(clean, "validation", 6, 8, seed=1, progress_every=0)
    for name in ("videomme/videomme.json", "mlvu/json/2_needle.json", "scenes.json", "manifest.json"):
        assert (root / name).read_bytes() == (clean / "validation" / name).read_bytes(), name
    with pytest.raises(ValueError, match="other parameters"):
        syn.write_benchmark(tmp_path, "validation", 6, 8, seed=2, progress_every=0)


def test_cli(tmp_path, capsys):
    assert syn.main([str(tmp_path), "--splits", "train,test", "--images", "4", "--videos", "0",
                     "--progress-every", "0"]) == 0
    assert (tmp_path / "train" / "manifest.json").is_file() and (tmp_path / "test" / "manifest.json").is_file()
    assert syn.main([str(tmp_path / "x"), "--grid", "1"]) == 2
    assert "grid" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        syn.main([str(tmp_path), "--splits", "dev"])
    with pytest.raises(SystemExit):
        syn.main([str(tmp_path), "--image-look", "glossy"])


def test_cli_looks_default_to_the_shipped_models_and_can_be_chosen(tmp_path):
    """Written data look like what each shipped model was trained on unless a look is asked for."""
    def scenes(out):
        return json.loads((out / "test" / "manifest.json").read_text())["parameters"]

    assert syn.main([str(tmp_path / "d"), "--images", "1", "--videos", "1", "--progress-every", "0"]) == 0
    assert scenes(tmp_path / "d")["image"] == syn.ImageConfig().to_dict()
    assert scenes(tmp_path / "d")["video"]["size"] == syn.VideoConfig().size
    assert syn.main([str(tmp_path / "p"), "--images", "1", "--videos", "0", "--progress-every", "0",
                     "--image-look", "plain", "--image-size", "126"]) == 0
    plain = scenes(tmp_path / "p")["image"]
    assert plain == syn.ImageConfig.with_look("plain", size=126).to_dict() and not plain["patterned"]
    with pytest.raises(ValueError, match="unknown look 'glossy'"):
        syn.ImageConfig.with_look("glossy")


def test_every_patch_inside_an_object_shows_its_shape():
    """Each shape has its own fill pattern, so any 14-px patch inside an object tells the shapes apart (the
    outline alone needs several patches together); video frames too, and the plain look keeps flat shapes."""
    px = syn.ImageConfig().geometry.object_px
    for y in range(0, px - 14, 5):
        for x in range(0, px - 14, 5):
            windows = {s: syn.scene.fill_mask(s, px)[y:y + 14, x:x + 14].tobytes() for s in syn.SHAPES}
            assert len(set(windows.values())) == len(syn.SHAPES), (y, x)
    img = syn.make_image(0, 0, "test").image
    assert palette_mask(img).sum() > (np.isin(img.reshape(-1, 3), np.stack(list(PALETTE.values()))).all(-1)).sum()
    def shaded(frames: np.ndarray) -> int:
        return int((np.linalg.norm(frames.astype(int)[..., None, :] - np.stack(list(SHADED.values())),
                                   axis=-1) < 3).any(-1).sum())

    assert shaded(syn.make_video(0, 0, "test").frames) > 0
    assert shaded(syn.make_video(0, 0, "test", config=syn.VideoConfig.with_look("plain")).frames) == 0
    with pytest.raises(ValueError, match="unknown shape"):
        syn.scene.fill_mask("star", px)
