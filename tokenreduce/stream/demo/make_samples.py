"""Write the demo's bundled sample videos: three test-split videos of the generated benchmark (never trained on),
at 224 px for display (the model resizes frames to its own 168 px), with their multiple-choice questions.

    python -m tokenreduce.stream.demo.make_samples [OUT_DIR]

Deterministic: the same files every run (libx264 with mbtree off, see `tokenreduce.eval.synthetic.mp4`). The
three items were picked because the default model answers them correctly when they are streamed at 1 fps.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

#: (name, test-split index): a brief needle, a moving object, the final state of a corner
SAMPLES = (("needle", 5), ("direction", 8), ("corner", 9))
SIZE = 224


def write_samples(out: str | Path) -> Path:
    """Write `<name>.mp4` for every sample and `samples.json` (title, question, options, answer) into `out`."""
    from tokenreduce.eval.synthetic.mp4 import write_mp4
    from tokenreduce.eval.synthetic.videos import VideoConfig, make_video

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = []
    for name, index in SAMPLES:
        v = make_video(index, seed=0, split="test", config=VideoConfig(size=SIZE))
        write_mp4(out / f"{name}.mp4", v.frames, fps=v.fps)
        q = v.question
        meta.append(dict(name=name, file=f"{name}.mp4", task=v.task, seconds=v.seconds, fps=v.fps,
                         question=q.question, options=list(q.options), answer=q.letter, uid=v.uid))
    (out / "samples.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


if __name__ == "__main__":
    print(write_samples(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "samples"))
