"""tokenreduce.video: sampling rules, decoding the right frames (PyAV and decord alike), bounded memory, errors.

Clips are generated here with `write_video`. Frame i carries its number in binary: 16x16 blocks, white for a
1 bit and black for a 0 bit, so a decoded frame says which frame it is despite lossy encoding.
"""

from __future__ import annotations

import ctypes
import gc
import re
import sys
import warnings
from pathlib import Path

import av
import numpy as np
import pytest

from tokenreduce import video
from tokenreduce.errors import InputError
from tokenreduce.video import (
    DynamicSampling,
    dynamic_frame_count,
    fps_indices,
    load_video,
    probe,
    read_frames,
    uniform_indices,
    write_video,
)

BLOCK = 16
BITS = 10  # frame numbers up to 1023


def pattern(i: int, height: int = 64, width: int = 96) -> np.ndarray:
    """(height, width, 3) uint8 frame whose top-left blocks spell ``i`` in binary (bit b: block b of a row)."""
    frame = np.full((height, width, 3), 96, np.uint8)
    per_row = width // BLOCK
    for b in range(BITS):
        r, c = divmod(b, per_row)
        frame[r * BLOCK:(r + 1) * BLOCK, c * BLOCK:(c + 1) * BLOCK] = 255 if (i >> b) & 1 else 0
    frame[-BLOCK:, :, 0] = (i * 37) % 256  # a changing colour stripe, so frames differ beyond the bits
    return frame


def frame_number(frame: np.ndarray, block: int = BLOCK) -> int:
    """Reads back `pattern`'s number from a decoded (H, W, 3) frame (``block``: block side after resizing)."""
    per_row = frame.shape[1] // block
    value = 0
    for b in range(BITS):
        r, c = divmod(b, per_row)
        q = block // 4
        cell = frame[r * block + q:(r + 1) * block - q, c * block + q:(c + 1) * block - q]
        value |= int(cell.mean() > 128) << b
    return value


def numbers(frames: np.ndarray, block: int = BLOCK) -> list[int]:
    return [frame_number(f, block) for f in frames]


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    """50-frame 96x64 clips at 30 fps: h264 (with B-frames) in .mp4 and .mkv (no frame count), mpeg4 in .mp4."""
    folder = tmp_path_factory.mktemp("clips")
    frames = np.stack([pattern(i) for i in range(50)])
    out = {"h264": folder / "h264.mp4", "mkv": folder / "h264.mkv", "mpeg4": folder / "mpeg4.mp4",
           "faststart": folder / "faststart.mp4"}
    write_video(out["h264"], frames, 30)
    write_video(out["mkv"], frames, 30)
    write_video(out["mpeg4"], frames, 30, codec="mpeg4")
    # index first, no B-frames: cutting it after packet k leaves exactly frames 0..k-1
    write_video(out["faststart"], frames, 30, codec="mpeg4", container_options={"movflags": "faststart"})
    return out


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory) -> Path:
    """600 frames of 320x240 (138 MB as RGB), written from a generator so the test never holds them all."""
    path = tmp_path_factory.mktemp("long") / "long.mp4"
    assert write_video(path, (pattern(i, 240, 320) for i in range(600)), 30) == 600
    return path


# ---------------------------------------------------------------------------------------------------------------
# Sampling rules
# ---------------------------------------------------------------------------------------------------------------


def test_uniform_indices_is_lmms_evals_linspace_with_truncation():
    idx = uniform_indices(8, 300)
    assert idx.dtype == np.int64 and len(idx) == 8
    assert idx[0] == 0 and idx[-1] == 299
    assert idx.tolist() == np.linspace(0, 299, 8, dtype=int).tolist() == [0, 42, 85, 128, 170, 213, 256, 299]
    assert uniform_indices(4, 11).tolist() == [0, 3, 6, 10]  # 6.67 truncates to 6 (rounding would give 7)
    assert uniform_indices(1, 300).tolist() == [0]
    assert uniform_indices(32, 5).tolist() == [0, 1, 2, 3, 4]  # never more frames than the video has
    assert uniform_indices(8, 5, allow_repeats=True).tolist() == [0, 0, 1, 1, 2, 2, 3, 4]


def test_fps_indices_take_one_frame_every_period():
    assert fps_indices(300, 30.0, 1.0).tolist() == list(range(0, 300, 30))  # t = 0..9 s of a 10 s video
    assert fps_indices(300, 30.0, 0.5).tolist() == [0, 60, 120, 180, 240]  # STC's 0.5 fps protocol
    assert fps_indices(50, 30.0, 10.0).tolist() == list(range(0, 50, 3))  # 1.67 s -> t = 0, 0.1, ..., 1.6
    assert fps_indices(10, 5.0, 10.0).tolist() == list(range(10))  # faster than the video: no repeats
    ntsc = fps_indices(300, 30000 / 1001, 1.0)  # 10.01 s -> 11 times, the last frame shows at t = 10 s
    assert len(ntsc) == 11 and ntsc[1] == 29 and ntsc[-1] == 299
    capped = fps_indices(300, 30.0, 1.0, max_frames=4)  # 10 times on the grid, 4 kept, spread
    assert capped.tolist() == [0, 90, 180, 270]
    assert fps_indices(3, 30.0, 0.5).tolist() == [0]  # a clip shorter than one period still gives a frame


def test_dynamic_frame_count_is_quotas_rule():
    assert dynamic_frame_count(600) == 106  # 10 min
    assert dynamic_frame_count(3600) == 160  # 1 h
    assert dynamic_frame_count(0) == 96
    assert dynamic_frame_count(59) == 97  # 59 / 3600 * 64 = 1.05
    assert dynamic_frame_count(7200, base=32, alpha=16) == 64


# ---------------------------------------------------------------------------------------------------------------
# Decoding the right frames
# ---------------------------------------------------------------------------------------------------------------


def test_probe(clips):
    for key in ("h264", "mkv", "mpeg4"):
        info = probe(clips[key])
        assert (info.num_frames, info.fps, info.width, info.height) == (50, 30.0, 96, 64), key
        assert info.duration == pytest.approx(50 / 30)
        assert info.path == str(clips[key])
    assert probe(clips["mkv"]).codec == "h264" and probe(clips["mpeg4"]).codec == "mpeg4"
    with av.open(str(clips["mkv"])) as container:  # the mkv count really comes from counting packets
        assert container.streams.video[0].frames == 0


@pytest.mark.parametrize("key", ["h264", "mkv", "mpeg4"])
@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_frames_are_the_requested_ones(clips, key, backend):
    got = load_video(clips[key], 8, backend=backend)
    expected = np.linspace(0, 49, 8, dtype=int)
    assert got.frames.shape == (8, 64, 96, 3) and got.frames.dtype == np.uint8
    assert got.indices.tolist() == expected.tolist()
    assert numbers(got.frames) == expected.tolist()
    assert np.allclose(got.timestamps, expected / 30)
    # any order, repeats allowed
    assert numbers(read_frames(clips[key], [49, 3, 3, 0, 17], backend=backend)) == [49, 3, 3, 0, 17]


def test_lossy_encoding_stays_close(clips):
    decoded = read_frames(clips["h264"], [0, 25, 49])
    original = np.stack([pattern(i) for i in (0, 25, 49)]).astype(int)
    assert np.abs(decoded.astype(int) - original).mean() < 3


@pytest.mark.parametrize("key", ["h264", "mkv", "mpeg4"])
def test_pyav_and_decord_give_identical_frames(clips, key):
    idx = np.arange(50)
    a = read_frames(clips[key], idx, backend="pyav")
    b = read_frames(clips[key], idx, backend="decord")
    assert a.shape == b.shape == (50, 64, 96, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a[10], b[11])  # neighbours differ, so an off-by-one would show


def test_auto_backend_uses_decord_when_installed(clips, monkeypatch):
    assert video._check_backend("auto") == "decord"
    monkeypatch.setitem(sys.modules, "decord", None)  # import decord now raises ImportError
    assert video._check_backend("auto") == "pyav"
    assert numbers(load_video(clips["h264"], 3, backend="auto").frames) == [0, 24, 49]


def test_fps_and_dynamic_sampling_on_a_file(clips):
    got = load_video(clips["mkv"], fps=10)
    assert got.indices.tolist() == list(range(0, 50, 3)) and numbers(got.frames) == got.indices.tolist()
    assert got.time_prompt().startswith("0.00s,0.10s,0.20s,") and got.time_prompt().endswith(",1.60s")
    assert load_video(clips["h264"], fps=10, max_frames=5).indices.tolist() == [0, 12, 24, 36, 48]
    assert len(load_video(clips["h264"], dynamic=True)) == 50  # 96 frames wanted, capped at the 50 there are
    few = load_video(clips["h264"], dynamic=DynamicSampling(base=4, alpha=64))  # 1.7 s adds nothing
    assert numbers(few.frames) == [0, 16, 32, 49]


@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_resize(clips, backend):
    small = read_frames(clips["h264"], [5, 40], backend=backend, size=(32, 48))
    assert small.shape == (2, 32, 48, 3)
    assert numbers(small, block=BLOCK // 2) == [5, 40]
    assert read_frames(clips["h264"], [5], backend=backend, size=32).shape == (1, 32, 48, 3)  # shorter side
    assert np.array_equal(small, read_frames(clips["h264"], [5, 40], backend="pyav", size=(32, 48)))


def test_fewer_frames_than_reported_are_clamped(clips, tmp_path):
    """A faststart mp4 cut at a packet boundary: the header says 50 frames, 30 decode."""
    data = clips["faststart"].read_bytes()
    with av.open(str(clips["faststart"])) as container:
        offsets = [p.pos for p in container.demux(video=0) if p.size]
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[:offsets[30]])
    assert probe(cut).num_frames == 50
    for backend in ("pyav", "decord"):
        with pytest.warns(RuntimeWarning, match="decodes only 30 frames"):
            got = load_video(cut, 5, backend=backend)
        assert got.indices.tolist() == [0, 12, 24, 29, 29]
        assert numbers(got.frames) == [0, 12, 24, 29, 29]
        with pytest.raises(InputError, match=r"frame index 40 is out of range for '.*cut\.mp4'"):
            read_frames(cut, [3, 40], backend=backend)


# ---------------------------------------------------------------------------------------------------------------
# Memory: a few frames of a long clip
# ---------------------------------------------------------------------------------------------------------------


def test_decoding_stops_after_the_last_wanted_frame(long_clip, monkeypatch):
    pulled = []
    original = video._decoded_frames

    def counting(container, stream):
        for frame in original(container, stream):
            pulled.append(1)
            yield frame

    monkeypatch.setattr(video, "_decoded_frames", counting)
    assert numbers(read_frames(long_clip, [0, 1, 2, 3])) == [0, 1, 2, 3]
    assert len(pulled) == 4
    pulled.clear()
    assert numbers(read_frames(long_clip, [100, 10])) == [100, 10]
    assert len(pulled) == 101


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(field)


def test_peak_memory_holds_the_wanted_frames_only(long_clip):
    """The kernel's peak RSS (VmHWM, reset via clear_refs) while reading 4 frames spread over 600.

    Freed heap memory is handed back first (glibc ``malloc_trim``), else pages kept from earlier reads would
    absorb a second pass over all frames and hide it.
    """
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pytest.skip("this kernel does not allow resetting the peak RSS")
    if trim is None:
        pytest.skip("no glibc malloc_trim to release freed heap memory")
    read_frames(long_clip, [0, 200, 400, 599])  # warm up: libraries loaded
    gc.collect()
    trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss("VmRSS")
    frames = read_frames(long_clip, [0, 200, 400, 599])
    peak = _rss("VmHWM") - before
    assert numbers(frames, BLOCK) == [0, 200, 400, 599]
    all_frames = 600 * 240 * 320 * 3  # 138 MB as RGB; 69 MB even as undecoded yuv420p frames
    assert peak < all_frames / 4, f"peak {peak / 2**20:.0f} MiB while reading 4 frames"


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, clips) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad")
    whole = clips["h264"].read_bytes()  # index (moov) at the end: cutting it loses the index
    files = {
        "missing": folder / "missing.mp4",
        "empty": folder / "empty.mp4",
        "text": folder / "notes.mp4",
        "png": folder / "picture.png",
        "truncated": folder / "truncated.mp4",
        "corrupt": folder / "corrupt.mp4",
        "cut_in_a_packet": folder / "cut_in_a_packet.mp4",
        "no_stream": folder / "no_stream.mp4",
        "zero_frames": folder / "zero_frames.mp4",
    }
    files["empty"].write_bytes(b"")
    files["text"].write_text("not a video\n" * 100)
    from PIL import Image

    Image.fromarray(pattern(3)).save(files["png"])
    files["truncated"].write_bytes(whole[: len(whole) // 2])
    garbage = np.random.default_rng(0).integers(0, 256, len(whole), dtype=np.uint8).tobytes()
    a, b = int(len(whole) * 0.3), int(len(whole) * 0.6)  # frame data; the index at the end stays intact
    files["corrupt"].write_bytes(whole[:a] + garbage[a:b] + whole[b:])
    h264_faststart = folder / "h264_faststart.mp4"  # index first, then the frames
    write_video(h264_faststart, np.stack([pattern(i) for i in range(50)]), 30,
                container_options={"movflags": "faststart"})
    faststart = h264_faststart.read_bytes()
    with av.open(str(h264_faststart)) as container:
        packets = [(p.pos, p.size) for p in container.demux(video=0) if p.size]
    files["cut_in_a_packet"].write_bytes(faststart[: packets[20][0] + packets[20][1] // 2])
    files["zero_frames"].write_bytes(faststart[: packets[0][0]])  # header says 50 frames, no frame data
    with av.open(str(files["no_stream"]), "w") as container:  # a container whose muxer wrote no frames
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height = 64, 48
        container.start_encoding()
    return files


@pytest.mark.parametrize("backend", ["pyav", "decord"])
@pytest.mark.parametrize(
    "key, problem",
    [
        ("missing", "does not exist"),
        ("empty", "is empty"),
        ("text", "cannot be read"),
        ("png", "is an image"),
        ("truncated", "cannot be read"),
        ("corrupt", "cannot be decoded"),
        ("cut_in_a_packet", "cannot be decoded"),
        ("no_stream", "no video stream"),
        ("zero_frames", "no frames|cannot be decoded"),  # PyAV decodes none; decord fails to set up
    ],
)
def test_bad_files_raise_input_error_naming_the_file(bad_files, key, problem, backend):
    path = bad_files[key]
    with pytest.raises(InputError, match=re.escape(path.name)) as error:
        load_video(path, 4, backend=backend)
    assert re.search(problem, str(error.value))
    with pytest.raises(InputError, match=re.escape(path.name)):
        read_frames(path, [49], backend=backend)  # the last frame: decoding must cross the damage
    if backend == "pyav" and key not in ("corrupt", "cut_in_a_packet", "zero_frames"):  # these have good headers
        with pytest.raises(InputError, match=re.escape(path.name)):
            probe(path)


@pytest.mark.parametrize(
    "kwargs, parameter",
    [
        ({"num_frames": 0}, "num_frames"),
        ({"num_frames": -3}, "num_frames"),
        ({"num_frames": 2.5}, "num_frames"),
        ({"num_frames": True}, "num_frames"),
        ({"fps": 0}, "fps"),
        ({"fps": -1.0}, "fps"),
        ({"fps": float("nan")}, "fps"),
        ({"num_frames": 8, "fps": 1.0}, "exactly one of num_frames, fps or dynamic"),
        ({}, "exactly one of num_frames, fps or dynamic"),
        ({"num_frames": 8, "max_frames": 4}, "max_frames"),
        ({"fps": 1.0, "max_frames": 0}, "max_frames"),
        ({"dynamic": "yes"}, "dynamic"),
        ({"dynamic": DynamicSampling(base=0)}, "base"),
        ({"num_frames": 8, "backend": "opencv"}, "backend"),
        ({"num_frames": 8, "size": (0, 10)}, "size"),
        ({"num_frames": 8, "size": -5}, "size"),
    ],
)
def test_bad_arguments_raise_input_error_naming_the_parameter(clips, kwargs, parameter):
    with pytest.raises(InputError, match=re.escape(parameter)):
        load_video(clips["h264"], **kwargs)


def test_bad_indices(clips):
    for indices in ([], [-1, 3], [[1, 2]], [1.5], "abc"):
        with pytest.raises(InputError, match="indices for .*h264.mp4"):
            read_frames(clips["h264"], indices)
    with pytest.raises(InputError, match="frame index 50 is out of range"):
        read_frames(clips["h264"], [0, 50])


def test_decord_requested_but_not_installed(clips, monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", None)
    with pytest.raises(InputError, match="backend='decord' needs decord"):
        load_video(clips["h264"], 4, backend="decord")
    with pytest.raises(InputError, match="backend='decord' needs decord"):
        read_frames(clips["h264"], [0], backend="decord")


def test_write_video_checks_its_frames(tmp_path):
    path = tmp_path / "w.mp4"
    with pytest.raises(InputError, match="even height and width"):
        write_video(path, np.zeros((2, 63, 96, 3), np.uint8))
    with pytest.raises(InputError, match=r"\(H, W, 3\) uint8"):
        write_video(path, np.zeros((2, 64, 96, 3), np.float32))
    with pytest.raises(InputError, match="no frames to write"):
        write_video(path, np.zeros((0, 64, 96, 3), np.uint8))
    with pytest.raises(InputError, match="must all have shape"):
        write_video(path, [np.zeros((64, 96, 3), np.uint8), np.zeros((32, 96, 3), np.uint8)])
    with pytest.raises(InputError, match="fps"):
        write_video(path, np.zeros((2, 64, 96, 3), np.uint8), fps=0)
    with pytest.raises(InputError, match="codec 'no-such-codec'"):
        write_video(path, np.zeros((2, 64, 96, 3), np.uint8), codec="no-such-codec")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert write_video(path, np.zeros((3, 64, 96, 3), np.uint8), fps=29.97) == 3
    assert probe(path).fps == pytest.approx(29.97)
