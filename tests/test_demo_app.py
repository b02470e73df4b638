"""The demo web app's API (issue 19), through FastAPI's TestClient on the default video model: bundled samples, a
stream's frame events, a streamed answer, and every bad input answered with a one-line error, never a crash."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from tokenreduce.stream.demo import app as demo_app

pytestmark = pytest.mark.demo


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    app = demo_app.create_app(max_upload_mb=0.15, upload_dir=str(tmp_path_factory.mktemp("uploads")))
    with TestClient(app) as c:
        yield c


def events(text: str) -> list[tuple[str, dict]]:
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_page_and_info(client):
    page = client.get("/")
    assert page.status_code == 200 and "tokenreduce" in page.text
    # no external resources: every src/href is local (or an inline data URL)
    for attr in ("src=", "href="):
        for part in page.text.split(attr)[1:]:
            url = part[1:].split(part[0])[0]
            assert url.startswith("/") or url.startswith("data:"), url
    assert "multiple-choice" in page.text  # the page says what the default model answers
    info = client.get("/api/info").json()
    assert info["model"] == "LlavaOnevisionForConditionalGeneration"
    assert {s["name"] for s in info["samples"]} == {"needle", "direction", "corner"}
    assert any(p["plan"] == "stc-cache+stc-prune" for p in info["plans"])
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200


def test_a_sample_streams_and_a_question_is_answered_as_it_streams(client):
    sample = next(s for s in client.get("/api/info").json()["samples"] if s["name"] == "needle")
    r = client.post("/api/start", json={"video": "sample:needle", "plan": "none", "fps": 1, "realtime": False,
                                        "max_tokens": 300})
    assert r.status_code == 200, r.text
    sid = r.json()["sid"]
    assert r.json()["tokens_per_frame"] == 36 and r.json()["max_tokens"] == 300  # 6x6 pooled, 8 frames
    evs = events(client.get(f"/api/events/{sid}").text)
    frames = [d for k, d in evs if k == "frame"]
    assert evs[-1] == ("done", {"frames": len(frames)}) and len(frames) == 11  # 10.1 s at 1 fps
    assert [f["frame"] for f in frames] == list(range(11))
    assert all(f["image"].startswith("data:image/jpeg;base64,") for f in frames)
    assert all(len(f["rows"]) == f["kept"] == 36 for f in frames)
    assert max(f["visual_tokens"] for f in frames) <= 300 and frames[-1]["kv_tokens"] > 0
    ans = events(client.post("/api/ask", json={"sid": sid, "question": sample["question"],
                                               "options": sample["options"]}).text)
    tokens = [d["text"] for k, d in ans if k == "token"]
    final = ans[-1][1]
    assert ans[-1][0] == "answer" and "".join(tokens) == final["text"] and len(tokens) >= 1
    assert final["letter"] == sample["answer"]  # the default model gets this sample right at 1 fps
    assert final["option"] == sample["options"]["ABCD".index(sample["answer"])]
    assert final["latency_ms"] > 0 and final["frames"] == 11


def test_stc_plan_reports_its_saving_and_pruning(client):
    r = client.post("/api/start", json={"video": "sample:corner", "plan": "stc-cache+stc-prune(keep=0.25)",
                                        "realtime": False, "fps": 2})
    frames = [d for k, d in events(client.get(f"/api/events/{r.json()['sid']}").text) if k == "frame"]
    assert [f["kept"] for f in frames] == [9] * len(frames)  # a quarter of 36
    assert [f["reference"] for f in frames[:4]] == [True, False, True, False]
    assert frames[-1]["saved_total_ms"] == pytest.approx(sum(f["saved_ms"] for f in frames))


@pytest.mark.parametrize("body, status, match", [
    ({"video": "sample:nope"}, 400, "unknown video"),
    ({"video": "sample:needle", "plan": "bogus"}, 400, "unknown reducer"),
    ({"video": "sample:needle", "plan": "quota(keep=0.5)"}, 400, "needs the question"),
    ({"video": "sample:needle", "max_tokens": "many"}, 400, "max_tokens"),
    ({"video": "sample:needle", "max_tokens": 3}, 200, None),  # accepted; the stream reports the error
    ({"video": "sample:needle", "fps": 100}, 400, "fps"),
    ({"video": "sample:needle", "protocol": "free"}, 400, "protocol"),
])
def test_bad_start_requests(client, body, status, match):
    r = client.post("/api/start", json={**body, "realtime": False})
    assert r.status_code == status, r.text
    if match:
        assert match in r.json()["error"]
    else:
        evs = events(client.get(f"/api/events/{r.json()['sid']}").text)
        assert evs[-1][0] == "error" and "smaller than one frame" in evs[-1][1]["error"]


def test_bad_uploads_get_a_message(client, tmp_path):
    r = client.post("/api/upload", files={"file": ("broken.mp4", b"not a video at all" * 50, "video/mp4")})
    assert r.status_code == 400 and "broken.mp4: not a readable video" in r.json()["error"]
    r = client.post("/api/upload", files={"file": ("notes.txt", b"hello", "text/plain")})
    assert r.status_code == 415 and "not a video file" in r.json()["error"]
    r = client.post("/api/upload", files={"file": ("big.mp4", b"0" * 200_000, "video/mp4")})
    assert r.status_code == 413 and "big.mp4: larger than the 0.15 MB upload limit" in r.json()["error"]
    r = client.post("/api/upload", data={"nothing": "here"})
    assert r.status_code == 400 and "no file" in r.json()["error"]
    assert client.get("/api/info").json()["max_upload_mb"] == 0.15  # still serving, the limit as configured


def test_a_good_upload_streams(client):
    data = (demo_app.SAMPLES / "direction.mp4").read_bytes()
    r = client.post("/api/upload", files={"file": ("mine.mp4", data, "video/mp4")})
    assert r.status_code == 200, r.text
    up = r.json()
    assert up["video"].startswith("upload:") and up["seconds"] == pytest.approx(11.5)
    r = client.post("/api/start", json={"video": up["video"], "plan": "stc-prune", "realtime": False})
    evs = events(client.get(f"/api/events/{r.json()['sid']}").text)
    assert evs[-1][0] == "done" and evs[-1][1]["frames"] == 12


def test_bad_questions(client):
    sid = client.post("/api/start", json={"video": "sample:needle", "realtime": False}).json()["sid"]
    client.get(f"/api/events/{sid}")
    for body, match in (({"sid": sid, "question": ""}, "question"),
                        ({"sid": sid, "question": "Which?", "options": ["only one"]}, "2 to 6"),
                        ({"sid": "gone", "question": "Which?"}, "start it again")):
        r = client.post("/api/ask", json=body)
        assert r.status_code in (400, 404) and match in r.json()["error"]
    r = client.post("/api/ask", content=b"not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]
    # a free-form question: the default model answers it with an empty string, and says so
    ans = events(client.post("/api/ask", json={"sid": sid, "question": "What happened?"}).text)
    assert ans[-1][0] == "answer" and ans[-1][1]["letter"] is None


def test_the_demo_command_serves_the_page_and_stops(tmp_path):
    """`tokenreduce demo --host 127.0.0.1 --port P` (the README's command) serves the page on a free port, and
    ends when it is told to."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "tokenreduce.cli", "demo", "--host", "127.0.0.1", "--port", str(port),
           "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        deadline, page = time.time() + 120, None
        while page is None:
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "tokenreduce demo did not serve its page within 120 s"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    page = r.read().decode()
            except OSError:
                time.sleep(0.5)
        assert "<canvas" in page and "tokenreduce" in page.lower()
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    assert f"http://127.0.0.1:{port}" in out


@pytest.mark.parametrize("argv, match", [
    (["--port", "0"], "--port must be in 1..65535"),
    (["--max-upload-mb", "-1"], "--max-upload-mb must be positive"),
])
def test_the_demo_command_refuses_bad_arguments(argv, match, capsys):
    from tokenreduce.cli import main

    assert main(["demo", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1
