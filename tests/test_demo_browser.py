"""The demo page in a real browser (issue 19): Debian's headless Chromium driven by Playwright loads the page served
by `tokenreduce demo`'s app on the default video model, starts a sample video, asks a question while it streams and
sees the answer stream in and the live charts update, and uploads a corrupt file to see the error message.

Marked `browser` (deselected by default; `.ci/run` installs chromium and runs `pytest -m browser`). Set
TOKENREDUCE_SCREENSHOT=path to also save the page's screenshot there (the README's is docs/demo.png)."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.demo]

CHROMIUM = os.environ.get("TOKENREDUCE_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The demo app on 127.0.0.1 at a free port, in a thread; shut down after the tests."""
    import uvicorn

    from tokenreduce.stream.demo.app import create_app

    app = create_app(upload_dir=str(tmp_path_factory.mktemp("uploads")))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not srv.started:
        assert thread.is_alive() and time.time() < deadline, "the demo server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=30)
    sock.close()
    assert not thread.is_alive(), "the demo server did not shut down"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert shutil.which(CHROMIUM) or os.path.exists(CHROMIUM), (
        f"{CHROMIUM} not found: apt-get install chromium (or set TOKENREDUCE_CHROMIUM)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


def test_stream_a_sample_ask_while_it_plays_and_upload_a_corrupt_file(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 1150})
    requests: list[str] = []
    errors: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server + "/")
    page.wait_for_selector("body[data-ready='1']", timeout=60_000)
    assert "multiple-choice" in page.inner_text("#qa .note")

    # a sample video, the STC plan, streamed in real time at 1 fps
    page.select_option("#video", "sample:needle")
    assert page.input_value("#question").startswith("A diamond appeared only briefly")
    page.select_option("#plan", "stc-cache+stc-prune")
    page.fill("#max-tokens", "48")
    page.click("#start")
    page.wait_for_function("Number(document.body.dataset.frames || 0) >= 2", timeout=120_000)
    first = page.evaluate("[document.getElementById('chart-tokens').dataset.points, "
                          "document.getElementById('chart-kv').toDataURL()]")
    page.wait_for_function("Number(document.body.dataset.frames || 0) >= 5", timeout=120_000)
    later = page.evaluate("[document.getElementById('chart-tokens').dataset.points, "
                          "document.getElementById('chart-kv').toDataURL()]")
    assert int(later[0]) > int(first[0]) >= 2 and later[1] != first[1]  # the live charts update
    assert "kept" in page.inner_text("#frame-info") and "frames" in page.inner_text("#stats")

    # ask while it plays: the answer streams in, token by token, with its latency
    page.click("#ask")
    page.wait_for_function("document.body.dataset.answered === '1'", timeout=120_000)
    assert int(page.evaluate("document.body.dataset.tokens")) >= 1
    assert page.inner_text("#answer").strip()
    meta = page.inner_text("#answer-meta")
    assert "choice (" in meta and " ms" in meta
    assert int(page.evaluate("document.getElementById('chart-latency').dataset.points")) == 1

    # a corrupt upload: a message on the page, and the page keeps working
    page.set_input_files("#upload", files=[{"name": "broken.mp4", "mimeType": "video/mp4",
                                            "buffer": b"\x00\x00\x00\x18ftypmp42 but not really" * 40}])
    page.wait_for_selector("#upload-msg.error", timeout=60_000)
    assert "broken.mp4: not a readable video" in page.inner_text("#upload-msg")
    page.wait_for_function("document.body.dataset.done === '1'", timeout=120_000)
    stats = page.inner_text("#stats")
    assert "48" in stats  # the KV budget is shown and kept
    shot = tmp_path / "demo.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("TOKENREDUCE_SCREENSHOT"):
        shutil.copy(shot, os.environ["TOKENREDUCE_SCREENSHOT"])

    # a plan the stream cannot serve is explained on the page
    page.fill("#plan-custom", "quota(keep=0.5)")
    page.click("#start")
    page.wait_for_selector("#start-msg.error", timeout=60_000)
    assert "needs the question" in page.inner_text("#start-msg")

    assert not errors, errors
    assert all(u.startswith(server) or u.startswith("data:") for u in requests), \
        [u for u in requests if not u.startswith(server)]
    page.close()
