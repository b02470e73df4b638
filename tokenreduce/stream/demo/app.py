"""The demo web app: stream a video through a `StreamingSession` and ask questions while it plays.

One FastAPI app (`create_app`), one model loaded once, one `StreamingSession` per started stream. The page
(`static/`) uses no external resources: plain JS, charts drawn on canvases, frames sent by the server.

    GET  /                    the page
    GET  /api/info            model, plans, protocols, limits, bundled samples
    POST /api/upload          multipart "file": size-limited, type-checked, probed; {"video": id} or {"error"}
    POST /api/start           {video, plan, max_tokens, fps, protocol, keep_positions, realtime} -> {"sid"}
    GET  /api/events/{sid}    server-sent events: one "frame" per pushed frame (image, kept cells, stats), "done"
    POST /api/ask             {sid, question, options} -> server-sent events: "token" pieces, then "answer"
    POST /api/stop            {sid}

Every bad input (unknown video, bad plan, bad budget, corrupt or oversized upload) is a 4xx with a one-line
{"error": ...} that the page shows; nothing crashes the server.
"""

import asyncio
import base64
import io
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

HERE = Path(__file__).parent
STATIC = HERE / "static"
SAMPLES = HERE / "samples"
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v")
#: plans offered on the page (any plan string may be typed too)
PLANS = (
    ("none", "none"),
    ("STC: cacher + pruner", "stc-cache+stc-prune"),
    ("STC pruner (33% per frame)", "stc-prune"),
    ("STC cacher (r=0.25, N=2)", "stc-cache"),
    ("STC cacher + pool to 4 tokens a frame", "stc-cache+pool(tokens=4)"),
    ("STC + random 50% first", "stc-cache+random(keep=0.5)+stc-prune(keep=0.5)"),
)
MAX_SECONDS = 600.0
MAX_SESSIONS = 4
DISPLAY = 256  # longest side of the frames sent to the page


class DemoError(Exception):
    """A bad request: answered with its status and a one-line message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Run:
    """One started stream: its session, the thread pushing frames, and the events the page reads."""

    sid: str
    session: Any
    path: Path
    fps: float
    realtime: bool
    protocol: str
    events: list[dict[str, Any]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    done: bool = False
    latencies: list[float] = field(default_factory=list)
    thread: threading.Thread | None = None

    def emit(self, kind: str, **data: Any) -> None:
        self.events.append({"event": kind, **data})


def decode_stream(path: Path, fps: float, max_frames: int) -> Iterator[tuple[float, np.ndarray]]:
    """(time in s, (H, W, 3) uint8 frame) for the frames shown at t = 0, 1/fps, ... (as `tokenreduce.video`
    samples them), decoded sequentially with PyAV so only the current frame is in memory."""
    import av

    from tokenreduce.video import fps_indices, probe

    info = probe(path)
    wanted = fps_indices(info.num_frames, info.fps, fps, max_frames=max_frames)
    want = {int(i): k for k, i in enumerate(wanted)}
    last = int(wanted[-1])
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in want:
                yield float(i / info.fps), frame.to_ndarray(format="rgb24")
            if i >= last:
                break


def jpeg_data_url(frame: np.ndarray, longest: int = DISPLAY) -> str:
    from PIL import Image

    img = Image.fromarray(frame)
    scale = longest / max(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def megabytes(n: int) -> str:
    """`n` bytes as the user reads an upload limit: "50 MB", "0.15 MB" (three significant digits)."""
    return f"{n / 2**20:.3g} MB"


def sse(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n"


class Demo:
    """The app's state: the model, the bundled samples, uploads and the running streams."""

    def __init__(self, model=None, processor=None, max_upload_mb: float = 50.0, upload_dir: str | None = None):
        import tokenreduce as tr

        if model is None:
            model, processor = tr.load_default("video")
        self.model, self.processor = model, processor
        self.max_upload = int(max_upload_mb * 1024 * 1024)
        self.samples = json.loads((SAMPLES / "samples.json").read_text())
        self._own_dir = upload_dir is None
        self.upload_dir = Path(upload_dir or tempfile.mkdtemp(prefix="tokenreduce-demo-"))
        self.uploads: dict[str, Path] = {}
        self.runs: dict[str, Run] = {}
        self.lock = threading.Lock()

    def close(self) -> None:
        for run in list(self.runs.values()):
            run.stop.set()
        if self._own_dir:
            shutil.rmtree(self.upload_dir, ignore_errors=True)

    # -- videos ---------------------------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        from tokenreduce.eval.protocols import PROTOCOLS

        path = str(getattr(self.model.config, "_name_or_path", "") or "")
        default = path.replace("\\", "/").endswith("assets/models/video")
        return dict(
            model=type(self.model).__name__,
            model_name="the shipped default video model" if default or not path else path,
            plans=[dict(label=a, plan=b) for a, b in PLANS], protocols=list(PROTOCOLS),
            max_upload_mb=float(f"{self.max_upload / 2**20:.3g}"), max_seconds=MAX_SECONDS,
            samples=[{k: s[k] for k in ("name", "question", "options", "answer", "seconds", "task")}
                     for s in self.samples],
        )

    def video_path(self, ref: str) -> Path:
        kind, _, name = str(ref).partition(":")
        if kind == "sample":
            for s in self.samples:
                if s["name"] == name:
                    return SAMPLES / s["file"]
        elif kind == "upload" and name in self.uploads:
            return self.uploads[name]
        raise DemoError(f"unknown video {ref!r}: pick a sample or upload a file")

    def save_upload(self, filename: str, chunks: Iterator[bytes]) -> dict[str, Any]:
        """Store an uploaded file after checking its name, size and that it decodes as a video."""
        from tokenreduce.errors import InputError
        from tokenreduce.video import probe

        name = os.path.basename(filename or "")
        ext = os.path.splitext(name)[1].lower()
        if ext not in VIDEO_EXTENSIONS:
            raise DemoError(f"{name or 'the file'}: not a video file ({', '.join(VIDEO_EXTENSIONS)} accepted)", 415)
        vid = uuid.uuid4().hex[:12]
        path = self.upload_dir / f"{vid}{ext}"
        size = 0
        with open(path, "wb") as f:
            for chunk in chunks:
                size += len(chunk)
                if size > self.max_upload:
                    f.close()
                    path.unlink(missing_ok=True)
                    raise DemoError(f"{name}: larger than the {megabytes(self.max_upload)} upload limit", 413)
                f.write(chunk)
        try:
            info = probe(path)
            next(decode_stream(path, 1.0, 1))  # the first frame really decodes
        except Exception as e:  # anything a corrupt file makes PyAV raise
            path.unlink(missing_ok=True)
            msg = str(e) if isinstance(e, InputError) else f"cannot decode it ({type(e).__name__})"
            raise DemoError(f"{name}: not a readable video: {msg.replace(str(path), name)}") from None
        if info.duration > MAX_SECONDS:
            path.unlink(missing_ok=True)
            raise DemoError(f"{name}: {info.duration:.0f} s long; the demo streams videos up to {MAX_SECONDS:.0f} s")
        self.uploads[vid] = path
        return dict(video=f"upload:{vid}", name=name, seconds=round(info.duration, 2), width=info.width,
                    height=info.height)

    # -- streams --------------------------------------------------------------------------------------------------
    def start(self, body: dict[str, Any]) -> dict[str, Any]:
        from tokenreduce.errors import TokenReduceError
        from tokenreduce.eval.protocols import PROTOCOLS
        from tokenreduce.stream import StreamingSession

        path = self.video_path(body.get("video", ""))
        plan = str(body.get("plan") or "none")
        protocol = str(body.get("protocol") or "mlvu")
        if protocol not in PROTOCOLS:
            raise DemoError(f"protocol must be one of {', '.join(PROTOCOLS)}")
        try:
            fps = float(body.get("fps", 1.0))
            max_tokens = body.get("max_tokens")
            max_tokens = None if max_tokens in (None, "", 0, "0") else int(max_tokens)
        except (TypeError, ValueError):
            raise DemoError("fps must be a number and max_tokens an integer (or empty for no cap)") from None
        if not 0.1 <= fps <= 8:
            raise DemoError(f"fps must be between 0.1 and 8, got {fps}")
        try:
            session = StreamingSession(self.model, self.processor, plan, max_tokens=max_tokens, fps=fps,
                                       prompt=protocol, keep_positions=bool(body.get("keep_positions", True)))
        except TokenReduceError as e:
            raise DemoError(str(e)) from None
        run = Run(sid=uuid.uuid4().hex[:12], session=session, path=path, fps=fps,
                  realtime=bool(body.get("realtime", True)), protocol=protocol)
        with self.lock:
            while len(self.runs) >= MAX_SESSIONS:
                old = self.runs.pop(next(iter(self.runs)))
                old.stop.set()
            self.runs[run.sid] = run
        run.thread = threading.Thread(target=self._play, args=(run,), name=f"demo-{run.sid}", daemon=True)
        run.thread.start()
        return dict(sid=run.sid, plan=str(session.plan), max_tokens=max_tokens, fps=fps,
                    tokens_per_frame=session.sm.tokens_per_frame, grid=list(session.sm.grid))

    def _play(self, run: Run) -> None:
        import torch

        session = run.session
        t0 = time.perf_counter()
        try:
            max_frames = int(MAX_SECONDS * run.fps)
            for i, (t, frame) in enumerate(decode_stream(run.path, run.fps, max_frames)):
                if run.stop.is_set():
                    break
                if run.realtime:
                    wait = t0 + i / run.fps - time.perf_counter()
                    if wait > 0 and run.stop.wait(wait):
                        break
                with torch.no_grad():
                    rec = session.push(frame)[0]
                st = session.stats
                kept = session.last_kept
                run.emit("frame", t=round(t, 3), image=jpeg_data_url(frame), rows=kept["rows"], cols=kept["cols"],
                         grid=list(kept["grid"]), lag=round(max(0.0, time.perf_counter() - t0 - i / run.fps), 3)
                         if run.realtime else None, **{k: rec[k] for k in (
                             "frame", "arrived", "kept", "vision_ms", "tower_ms", "saved_ms", "reference", "evicted",
                             "kv_tokens", "visual_tokens", "frame_ms")},
                         saved_total_ms=st["vision_ms_saved"], vision_total_ms=st["vision_ms"],
                         max_tokens=st["max_tokens"], kv_bytes=st["kv_bytes"], position=st["position"])
            run.emit("done", frames=session.stats["frames"])
        except Exception as e:  # the page shows it; the server keeps serving
            run.emit("error", error=f"{type(e).__name__}: {e}")
        finally:
            run.done = True

    def get_run(self, sid: str) -> Run:
        run = self.runs.get(str(sid))
        if run is None:
            raise DemoError("this stream is gone (stopped or replaced): start it again", 404)
        return run

    def ask(self, body: dict[str, Any]) -> Iterator[str]:
        from tokenreduce.errors import TokenReduceError
        from tokenreduce.eval.protocols import LETTERS, extract

        run = self.get_run(body.get("sid", ""))
        question = str(body.get("question") or "").strip()
        options = [str(o).strip() for o in (body.get("options") or []) if str(o).strip()]
        if not question:
            raise DemoError("type a question first")
        if options and not 2 <= len(options) <= 6:
            raise DemoError("give 2 to 6 options (or none for a free-form question)")
        try:
            pieces = run.session.ask_stream(question, options or None, max_new_tokens=int(body.get("max_new_tokens",
                                                                                                    8)))
        except TokenReduceError as e:
            raise DemoError(str(e)) from None

        def events() -> Iterator[str]:
            t0 = time.perf_counter()
            text = ""
            try:
                for piece in pieces:
                    text += piece
                    yield sse("token", {"text": piece})
            except Exception as e:
                yield sse("error", {"error": f"{type(e).__name__}: {e}"})
                return
            st = run.session.stats
            latency = (time.perf_counter() - t0) * 1e3
            run.latencies.append(latency)
            letter = extract(run.protocol, text) if options else None
            idx = LETTERS.find(letter) if letter else -1
            yield sse("answer", dict(text=text, letter=letter or None,
                                     option=options[idx] if 0 <= idx < len(options) else None,
                                     latency_ms=round(latency, 1), model_ms=st["last_answer_ms"],
                                     ttft_ms=st["last_ttft_ms"], frames=st["frames"], index=len(run.latencies)))

        return events()

    def stop(self, sid: str) -> None:
        run = self.runs.pop(str(sid), None)
        if run is not None:
            run.stop.set()


def create_app(model=None, processor=None, max_upload_mb: float = 50.0, upload_dir: str | None = None):
    """The FastAPI app over `model` (default: `tr.load_default("video")`)."""
    from contextlib import asynccontextmanager

    demo = Demo(model, processor, max_upload_mb, upload_dir)

    @asynccontextmanager
    async def lifespan(app):
        yield
        demo.close()

    app = FastAPI(title="tokenreduce streaming demo", lifespan=lifespan)
    app.state.demo = demo

    @app.exception_handler(DemoError)
    async def _demo_error(request: Request, exc: DemoError):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    async def _json(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except Exception:
            raise DemoError("the request body must be JSON") from None
        if not isinstance(body, dict):
            raise DemoError("the request body must be a JSON object")
        return body

    @app.get("/")
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/api/info")
    async def info():
        return demo.info()

    @app.post("/api/upload")
    async def upload(request: Request):
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > demo.max_upload + 64 * 1024:
            raise DemoError(f"the file is larger than the {megabytes(demo.max_upload)} upload limit", 413)
        try:
            form = await request.form()
        except Exception:
            raise DemoError("the upload must be a multipart form with a 'file' field") from None
        file = form.get("file")
        if not isinstance(file, UploadFile) and not hasattr(file, "read"):
            raise DemoError("no file in the upload (form field 'file')")

        def chunks() -> Iterator[bytes]:
            while True:
                b = file.file.read(1 << 20)
                if not b:
                    return
                yield b

        return await asyncio.to_thread(demo.save_upload, file.filename, chunks())

    @app.post("/api/start")
    async def start(request: Request):
        body = await _json(request)
        return await asyncio.to_thread(demo.start, body)

    @app.post("/api/stop")
    async def stop(request: Request):
        body = await _json(request)
        demo.stop(body.get("sid", ""))
        return {"stopped": True}

    @app.get("/api/events/{sid}")
    async def events(sid: str, request: Request):
        run = demo.get_run(sid)

        async def gen():
            i = 0
            while True:
                while i < len(run.events):
                    ev = dict(run.events[i])
                    i += 1
                    yield sse(ev.pop("event"), ev)
                if run.done and i >= len(run.events):
                    return
                if await request.is_disconnected():
                    return
                await asyncio.sleep(0.05)

        return StreamingResponse(gen(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/api/ask")
    async def ask(request: Request):
        body = await _json(request)
        stream = await asyncio.to_thread(demo.ask, body)
        return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
