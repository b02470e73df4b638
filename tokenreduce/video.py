"""Video files: probing, frame sampling, decoding (PyAV by default, decord optional) and writing.

Sampling rules (pure functions on frame counts, so they are testable without a file):

- `uniform_indices`: lmms-eval's rule for MLVU / Video-MME (``read_video_pyav`` / ``load_video_decord`` in
  ``lmms_eval/models/model_utils/load_video.py``): ``np.linspace(0, total - 1, min(n, total), dtype=int)``;
  first and last frame always included, truncation towards zero, never more frames than the video has.
- `fps_indices`: one frame every ``1 / fps`` seconds from t = 0 (STC's 0.5 fps protocol), optionally capped.
- `dynamic_frame_count`: QuoTA's ``T = T_base + floor(duration_s / 3600 * alpha)`` (96 and 64 by default;
  10 min -> 106 frames, 1 h -> 160), then uniform.

Frame i is the i-th frame the decoder outputs, in presentation order (lmms-eval and decord count the same
way); sampling uses the container's frame count. Decoding with PyAV is sequential: only the wanted frames are
converted to RGB and kept, and decoding stops right after the last wanted one, so memory holds the selected
frames only. decord (``backend="decord"``) gives bit-identical frames (tested on h264 and mpeg4 clips).
Every problem with a file or an argument raises `tokenreduce.errors.InputError` naming the file or parameter;
no av/decord exception leaks.

Timestamps are ``index / fps`` seconds (fps: the stream's average frame rate), the convention LLaVA-Video and
QuoTA use for their "12.34s,..." time prompts.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

import numpy as np

from .errors import InputError

Backend = Literal["pyav", "decord", "auto"]
Size = int | tuple[int, int] | None


# ----------------------------------------------------------------------------------------------------------------
# Sampling rules
# ----------------------------------------------------------------------------------------------------------------


def uniform_indices(num_frames: int, total: int, *, allow_repeats: bool = False) -> np.ndarray:
    """``num_frames`` frame indices spread evenly over ``total`` frames, first and last included.

    lmms-eval's rule: ``np.linspace(0, total - 1, min(num_frames, total), dtype=int)`` (truncation, not
    rounding). With ``allow_repeats=True`` the count is not capped at ``total`` and short videos repeat frames,
    as LLaVA-NeXT's ``force_sample`` loader (used by QuoTA) does.

    Returns:
        (T,) int64, non-decreasing, T = num_frames (or min(num_frames, total) without repeats).
    """
    _check_positive_int("num_frames", num_frames)
    _check_positive_int("total", total)
    n = num_frames if allow_repeats else min(num_frames, total)
    return np.linspace(0, total - 1, n, dtype=np.int64)


def fps_indices(total: int, video_fps: float, fps: float, *, max_frames: int | None = None) -> np.ndarray:
    """Indices of the frames shown at t = 0, 1/fps, 2/fps, ... seconds while t < duration.

    The frame shown at time t is ``floor(t * video_fps)``; duration = total / video_fps. Sampling faster than
    the video's own rate would repeat frames, so repeats are dropped. If more than ``max_frames`` times
    remain, ``max_frames`` of them are kept, spread with `uniform_indices` over the time grid. Memory is
    O(total) for any fps: at or above the video's own rate every frame is shown, which is computed directly.

    Returns:
        (T,) int64, strictly increasing, T >= 1 (and <= max_frames if given).
    """
    _check_positive_int("total", total)
    _check_positive_number("video_fps", video_fps)
    _check_positive_number("fps", fps)
    if max_frames is not None:
        _check_positive_int("max_frames", max_frames)
    if fps >= video_fps:
        # sample times at least as close as the frames: every frame is shown at one of them. Said directly, so
        # memory stays (total,) however large fps is (a time grid at fps=1e5 would hold billions of entries)
        idx = np.arange(total, dtype=np.int64)
    else:
        steps = total * fps / video_fps  # duration * fps, the number of sample times before the end (< total)
        count = max(1, math.ceil(steps - 1e-9))
        times = np.arange(count, dtype=np.float64) / fps
        idx = np.unique(np.minimum(np.floor(times * video_fps + 1e-9).astype(np.int64), total - 1))
    if max_frames is not None and len(idx) > max_frames:
        idx = idx[uniform_indices(max_frames, len(idx))]
    return idx


def dynamic_frame_count(duration: float, base: int = 96, alpha: int = 64) -> int:
    """QuoTA's frame count: ``base + floor(duration / 3600 * alpha)``; 10 min -> 106, 1 h -> 160 by default."""
    if not isinstance(duration, int | float | np.integer | np.floating) or not math.isfinite(duration) or duration < 0:
        raise InputError(f"duration must be a finite number of seconds >= 0, got {duration!r}")
    _check_positive_int("base", base)
    if not isinstance(alpha, int) or isinstance(alpha, bool) or alpha < 0:
        raise InputError(f"alpha must be an int >= 0, got {alpha!r}")
    return base + math.floor(duration / 3600 * alpha)


@dataclass(frozen=True)
class DynamicSampling:
    """QuoTA's dynamic frame count (``T = base + floor(duration_s / 3600 * alpha)``), then uniform sampling.

    ``repeat=False`` (default) samples at most the clip's frames; ``repeat=True`` always samples T, repeating
    frames of a shorter clip, as QuoTA's release does (its loader forces ``linspace(0, n - 1, T)``).
    """

    base: int = 96
    alpha: int = 64
    repeat: bool = False


# ----------------------------------------------------------------------------------------------------------------
# Probing
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoInfo:
    """What a video file holds.

    Attributes:
        path: the file.
        num_frames: frames in the first video stream: the container's count, or packets counted by demuxing
            when the container has none (Matroska/WebM, MPEG-TS).
        fps: average frame rate (frames per second).
        duration: num_frames / fps seconds (the convention of LLaVA-Video and QuoTA).
        width, height: frame size in pixels.
        codec: the decoder's name, e.g. "h264".
    """

    path: str
    num_frames: int
    fps: float
    duration: float
    width: int
    height: int
    codec: str


def probe(path: str | os.PathLike[str]) -> VideoInfo:
    """Read a video's header (and, if the container has no frame count, its packet index) without decoding."""
    av = _import_av()
    name = _check_file(path)
    try:
        with av.open(name) as container:
            stream = _video_stream(container, name)
            num_frames = int(stream.frames)
            if num_frames <= 0:  # no count in the header: count the packets (cheap: no decoding)
                num_frames = sum(1 for packet in container.demux(stream) if packet.size)
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            width, height = stream.codec_context.width, stream.codec_context.height
            codec = stream.codec_context.name
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"video {name!r} cannot be read (corrupt, truncated or not a video): {e}") from e
    if num_frames <= 0:
        raise InputError(f"video {name!r} has no frames")
    if not rate or float(rate) <= 0:
        raise InputError(f"video {name!r} has no frame rate")
    fps = float(rate)
    return VideoInfo(name, num_frames, fps, num_frames / fps, int(width), int(height), str(codec))


# ----------------------------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------------------------


def read_frames(
    path: str | os.PathLike[str], indices: Sequence[int] | np.ndarray, *, backend: Backend = "pyav", size: Size = None
) -> np.ndarray:
    """Decode the frames at ``indices`` (any order, repeats allowed).

    Args:
        indices: (T,) frame numbers, 0-based, in decoding (presentation) order.
        backend: "pyav" (default), "decord", or "auto" (decord when installed, else PyAV).
        size: None (native), (height, width), or an int: the shorter side, aspect ratio kept. Resizing is done
            on the decoded RGB frames with PIL bicubic, identically for both backends.

    Returns:
        (T, H, W, 3) uint8 RGB.

    Raises:
        InputError: unreadable file, bad argument, or an index at or past the last frame that decodes.
    """
    frames, _ = _read(path, indices, backend, size, clamp=False)
    return frames


@dataclass
class Frames:
    """Frames sampled from a video.

    Attributes:
        frames: (T, H, W, 3) uint8 RGB.
        indices: (T,) int64 frame numbers actually returned.
        timestamps: (T,) float64 seconds, ``indices / info.fps``.
        info: the video's `VideoInfo`.
    """

    frames: np.ndarray
    indices: np.ndarray
    timestamps: np.ndarray
    info: VideoInfo

    def __len__(self) -> int:
        return len(self.indices)

    def time_prompt(self, decimals: int = 2) -> str:
        """The timestamps as LLaVA-Video/QuoTA write them in prompts: ``"0.00s,1.23s,..."``."""
        return ",".join(f"{t:.{decimals}f}s" for t in self.timestamps)


def load_video(
    path: str | os.PathLike[str],
    num_frames: int | None = None,
    *,
    fps: float | None = None,
    max_frames: int | None = None,
    dynamic: DynamicSampling | bool | None = None,
    backend: Backend = "pyav",
    size: Size = None,
) -> Frames:
    """Sample frames from a video with exactly one rule and decode them.

    Args:
        num_frames: uniform sampling (`uniform_indices`, lmms-eval's rule; at most the video's frame count).
        fps: one frame every 1/fps seconds (`fps_indices`), at most ``max_frames`` frames if given.
        dynamic: QuoTA's duration-dependent count then uniform; True means `DynamicSampling()` (96, 64).
        backend, size: as in `read_frames`.

    If fewer frames decode than the container reports, indices past the end are clamped to the last frame that
    decodes (with a RuntimeWarning); ``Frames.indices`` holds the clamped numbers.

    Returns:
        `Frames` with frames (T, H, W, 3) uint8, indices (T,), timestamps (T,) and the `VideoInfo`.
    """
    rules = [name for name, value in (("num_frames", num_frames), ("fps", fps), ("dynamic", dynamic))
             if value is not None and value is not False]
    if len(rules) != 1:
        raise InputError(f"give exactly one of num_frames, fps or dynamic, got {rules or 'none'}")
    if max_frames is not None and fps is None:
        raise InputError("max_frames only applies with fps; for uniform sampling set num_frames instead")
    _check_backend(backend)
    _target_size(size, 2, 2)  # validate before touching the file
    if num_frames is not None:
        _check_positive_int("num_frames", num_frames)
    if fps is not None:
        _check_positive_number("fps", fps)
    if max_frames is not None:
        _check_positive_int("max_frames", max_frames)

    info = probe(path)
    if num_frames is not None:
        indices = uniform_indices(num_frames, info.num_frames)
    elif fps is not None:
        indices = fps_indices(info.num_frames, info.fps, fps, max_frames=max_frames)
    else:
        rule = DynamicSampling() if dynamic is True else dynamic
        if not isinstance(rule, DynamicSampling):
            raise InputError(f"dynamic must be True or a DynamicSampling, got {dynamic!r}")
        indices = uniform_indices(dynamic_frame_count(info.duration, rule.base, rule.alpha), info.num_frames,
                                  allow_repeats=bool(rule.repeat))
    frames, indices = _read(info.path, indices, backend, size, clamp=True)
    return Frames(frames, indices, indices / info.fps, info)


def _read(
    path: str | os.PathLike[str], indices: Sequence[int] | np.ndarray, backend: Backend, size: Size, *, clamp: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``indices``; returns ((T, H, W, 3) uint8 frames, (T,) int64 indices actually read)."""
    backend = _check_backend(backend)
    _target_size(size, 2, 2)  # validate before touching the file
    name = _check_file(path)
    idx = np.asarray(indices)
    if idx.ndim != 1 or len(idx) == 0 or idx.dtype == bool or not np.issubdtype(idx.dtype, np.integer):
        raise InputError(f"indices for {name!r} must be a non-empty 1-D sequence of ints, got {indices!r}")
    if idx.min() < 0:
        raise InputError(f"indices for {name!r} must be ints >= 0, got {indices!r}")
    wanted, inverse = np.unique(idx.astype(np.int64), return_inverse=True)
    decode = _decode_decord if backend == "decord" else _decode_pyav
    frames, end = decode(name, wanted)
    if end is not None:  # the stream holds only `end` frames, too few for the last wanted index
        if end == 0:
            raise InputError(f"video {name!r} has no frames that decode")
        if not clamp:
            raise InputError(f"frame index {int(wanted[-1])} is out of range for {name!r}, which decodes {end} frames")
        warnings.warn(f"{name!r} decodes only {end} frames although its container reports more; clamping frame "
                      f"indices {wanted[wanted >= end].tolist()} to {end - 1}", RuntimeWarning, stacklevel=3)
        wanted = np.minimum(wanted, end - 1)
    out = np.stack(frames)
    if size is not None:
        out = _resize(out, _target_size(size, out.shape[1], out.shape[2]))
    return out[inverse.reshape(-1)], wanted[inverse.reshape(-1)]


def _decoded_frames(container: Any, stream: Any) -> Iterable[Any]:
    """Every frame of ``stream`` in presentation order (a seam the tests use to count decoded frames)."""
    return container.decode(stream)


def _decode_pyav(name: str, wanted: np.ndarray) -> tuple[list[np.ndarray], int | None]:
    """Decode sequentially, keep the RGB frames at ``wanted`` (sorted, unique), stop after the last one.

    Returns one (H, W, 3) frame per wanted index and None, or, if the stream ends first, the frames that exist
    with the last decoded frame standing in for the missing ones, and the number of frames that decoded.
    """
    av = _import_av()
    frames: list[np.ndarray] = []
    last = None
    count = 0
    try:
        with av.open(name) as container:
            stream = _video_stream(container, name)
            for count, frame in enumerate(_decoded_frames(container, stream), start=1):
                last = frame
                if count - 1 == wanted[len(frames)]:
                    frames.append(frame.to_ndarray(format="rgb24"))
                    if len(frames) == len(wanted):
                        return frames, None
            if last is not None:
                frames += [last.to_ndarray(format="rgb24")] * (len(wanted) - len(frames))
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"video {name!r} cannot be decoded (corrupt, truncated or not a video): {e}") from e
    return frames, count


def _decode_decord(name: str, wanted: np.ndarray) -> tuple[list[np.ndarray], int | None]:
    """`_decode_pyav` with decord's ``VideoReader.get_batch`` (seeks to key frames, decodes what it needs)."""
    decord = _import_decord()
    _check_not_image(name)
    try:
        reader = decord.VideoReader(name, ctx=decord.cpu(0))
        total = len(reader)
        batch = reader.get_batch(np.minimum(wanted, total - 1).tolist()).asnumpy() if total > 0 else []
    except Exception as e:
        raise InputError(f"video {name!r} cannot be decoded (corrupt, truncated or not a video): {e}") from e
    return list(batch), (total if wanted[-1] >= total else None)


def _resize(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, h, w, 3) uint8 with PIL bicubic (antialiased when shrinking)."""
    from PIL import Image

    height, width = size
    if frames.shape[1:3] == (height, width):
        return frames
    bicubic = Image.Resampling.BICUBIC
    return np.stack([np.asarray(Image.fromarray(f).resize((width, height), bicubic)) for f in frames])


def _target_size(size: Size, height: int, width: int) -> tuple[int, int]:
    """(height, width) after resizing a ``height`` x ``width`` frame to ``size``."""
    if size is None:
        return height, width
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        scale = size / min(height, width)
        return max(1, round(height * scale)), max(1, round(width * scale))
    if (isinstance(size, tuple) and len(size) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
        return size
    raise InputError(f"size must be None, an int > 0 (shorter side) or (height, width) ints > 0, got {size!r}")


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------

_DEFAULT_OPTIONS: dict[str, dict[str, str]] = {
    # mbtree=0: libx264's macroblock-tree rate control reads uninitialised memory, so the same frames can
    # encode to different bytes from run to run; without it the output is byte-identical
    "libx264": {"crf": "18", "preset": "veryfast", "x264-params": "mbtree=0"},
    "mpeg4": {"qmin": "2", "qmax": "4"},
}


def write_video(
    path: str | os.PathLike[str],
    frames: np.ndarray | Iterable[np.ndarray],
    fps: float = 30,
    *,
    codec: str = "libx264",
    options: Mapping[str, str] | None = None,
    container_options: Mapping[str, str] | None = None,
) -> int:
    """Encode RGB frames into a video file with PyAV (yuv420p); the container follows the file's suffix.

    Encoding is lossy: decoded pixels differ from the input by a few levels (more at sharp colour edges,
    since yuv420p halves the colour resolution). Patterns meant to be read back should use flat blocks of
    at least 16x16 pixels and well separated colours.

    Args:
        frames: (T, H, W, 3) uint8, or an iterable of (H, W, 3) uint8 frames (written one at a time, so a long
            clip never has to sit in memory). H and W must be even (yuv420p).
        fps: frame rate; floats become the nearest fraction (29.97 -> 2997/100).
        codec: an FFmpeg encoder, e.g. "libx264" (default) or "mpeg4".
        options: encoder options; defaults to near-transparent quality for libx264 and mpeg4.
        container_options: muxer options, e.g. ``{"movflags": "faststart"}`` (index first in .mp4).

    Returns:
        The number of frames written (at least 1).
    """
    av = _import_av()
    _check_positive_number("fps", fps)
    name = os.fspath(path)
    iterator = iter(frames)
    first = next(iterator, None)
    if first is None:
        raise InputError(f"no frames to write to {name!r}")
    shape = _check_frame(name, first, None)
    height, width = shape[:2]
    written = 0
    try:
        with av.open(name, "w", options=dict(container_options or {})) as container:
            stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = dict(options if options is not None else _DEFAULT_OPTIONS.get(codec, {}))
            for frame in _chain(first, iterator):
                _check_frame(name, frame, shape)
                container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
                written += 1
            container.mux(stream.encode(None))
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"cannot write video {name!r} with codec {codec!r}: {e}") from e
    return written


def _chain(first: np.ndarray, rest: Iterable[np.ndarray]) -> Iterable[np.ndarray]:
    """``first``, then the frames left in ``rest``."""
    yield first
    yield from rest


def _check_frame(name: str, frame: Any, shape: tuple[int, ...] | None) -> tuple[int, ...]:
    """The (H, W, 3) shape of an RGB uint8 frame with even sides, equal to ``shape`` if given."""
    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise InputError(f"frames for {name!r} must be (H, W, 3) uint8 RGB, got {frame.dtype} {frame.shape}")
    if shape is None and (frame.shape[0] % 2 or frame.shape[1] % 2):
        raise InputError(f"frames for {name!r} need even height and width for yuv420p, got {frame.shape[:2]}")
    if shape is not None and frame.shape != shape:
        raise InputError(f"frames for {name!r} must all have shape {shape}, got {frame.shape}")
    return frame.shape


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


def _import_av() -> Any:
    try:
        import av
    except ImportError as e:
        raise InputError("reading or writing videos needs PyAV: pip install 'tokenreduce[video]'") from e
    return av


def _import_decord() -> Any:
    try:
        import decord
    except ImportError as e:
        raise InputError("backend='decord' needs decord, which is not installed: "
                         "pip install 'tokenreduce[decord]'") from e
    return decord


def _check_backend(backend: Any) -> str:
    """The backend to use: "pyav" or "decord" ("auto" picks decord when it is installed)."""
    if backend == "auto":
        try:
            import decord  # noqa: F401
        except ImportError:
            return "pyav"
        return "decord"
    if backend not in ("pyav", "decord"):
        raise InputError(f"backend must be 'pyav', 'decord' or 'auto', got {backend!r}")
    return backend


def _check_file(path: Any) -> str:
    """The path as a str, after checking it names a non-empty regular file."""
    if not isinstance(path, str | os.PathLike):
        raise InputError(f"video path must be a str or os.PathLike, got {type(path).__name__}")
    name = os.fspath(path)
    if not os.path.exists(name):
        raise InputError(f"video file {name!r} does not exist")
    if not os.path.isfile(name):
        raise InputError(f"video path {name!r} is not a file")
    if os.path.getsize(name) == 0:
        raise InputError(f"video file {name!r} is empty")
    return name


def _video_stream(container: Any, name: str) -> Any:
    """The first video stream of an open container; still images (PNG, JPEG, ...) are refused."""
    if _is_image_format(container.format.name):
        raise InputError(f"{name!r} is an image ({container.format.name}), not a video")
    if not container.streams.video:
        raise InputError(f"{name!r} has no video stream")
    return container.streams.video[0]


def _check_not_image(name: str) -> None:
    """Refuse still images before decord sees them (decord calls them broken videos)."""
    av = _import_av()
    try:
        with av.open(name) as container:
            _video_stream(container, name)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"video {name!r} cannot be read (corrupt, truncated or not a video): {e}") from e


def _is_image_format(format_name: str) -> bool:
    """FFmpeg's demuxers for still pictures: "image2" (files, patterns) and "png_pipe", "jpeg_pipe", ..."""
    return format_name == "image2" or format_name.endswith("_pipe")


def _check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value <= 0:
        raise InputError(f"{name} must be an int > 0, got {value!r}")


def _check_positive_number(name: str, value: Any) -> None:
    if (not isinstance(value, int | float | Fraction | np.integer | np.floating) or isinstance(value, bool)
            or not math.isfinite(value) or value <= 0):
        raise InputError(f"{name} must be a finite number > 0, got {value!r}")
