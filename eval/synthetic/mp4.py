"""Minimal mp4 writing and reading with PyAV (the `video` extra): H.264 (libx264), yuv420p.

At crf 12 a colour inside an object comes back within about 3 of its value per channel; edges blur a little
(4:2:0 chroma).

Determinism: with its default macroblock-tree rate control, this libx264 (PyAV 18.1 wheels, libavcodec 62)
reads uninitialised memory on some clips: the same frames encode to different bytes from run to run, and decode
to pixels up to 5 levels apart (found with MALLOC_PERTURB_: the output then changed with the fill byte).
`mbtree=0` avoids that code path: output is byte-identical whatever the heap holds (checked on 51 clips at 112
and 224 px under three MALLOC_PERTURB_ values). For these flat synthetic pictures mbtree saves next to nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

DEFAULT_CRF = 12


def _av():
    try:
        import av
    except ImportError as e:  # pragma: no cover - av is in the `video` extra
        raise ImportError("writing and reading mp4 needs PyAV: pip install 'tokenreduce[video]'") from e
    return av


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int, crf: int = DEFAULT_CRF,
              preset: str = "veryfast") -> Path:
    """Write (T, H, W, 3) uint8 RGB `frames` (H and W even) to `path` as H.264 mp4, atomically: the file
    appears complete under its name or not at all (a killed run leaves only a `*.partial` file)."""
    av = _av()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    t, h, w, _ = frames.shape
    if t < 1 or h % 2 or w % 2:
        raise ValueError(f"need at least one frame and even height/width for yuv420p, got {frames.shape}")
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    with av.open(str(tmp), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(int(crf)), "preset": preset, "x264-params": "mbtree=0"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)
    return path


def read_mp4(path: str | os.PathLike) -> np.ndarray:
    """Every frame of a video: (T, H, W, 3) uint8 RGB."""
    av = _av()
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError(f"{path}: no video frames decoded")
    return np.stack(frames)
