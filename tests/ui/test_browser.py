"""End-to-end: ``minicpmv ui`` with the tiny 2.6 checkpoint, driven by headless Chromium.

The server is the real command line (a subprocess on a free local port); the browser is
Debian's Chromium driven by Playwright (no browser download). A missing Chromium fails these
tests with instructions, it does not skip them. Screenshots go to the test's tmp directory;
set MINICPMV_UI_SCREENSHOT=path.png to also keep the one of the answered question.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import wave
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Locator, Page, Playwright, expect, sync_playwright

from minicpmv.ui.logic import video_supported

from .conftest import CONF, HOUSE, ROOT, make_clip, write_wav

CHROMIUM = os.environ.get("MINICPMV_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
WAIT_MS = 90_000  # generous bound for any single page state on a busy 2-core machine
STARTUP_S = 180
LOGS: dict[str, Path] = {}  # server URL -> its log (stdout and stderr of `minicpmv ui`)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_until_serving(url: str, proc: subprocess.Popen, log: Path) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never a proxy
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"`minicpmv ui` exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with opener.open(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.25)  # polling interval while the server starts (not an assertion)
    pytest.fail(f"`minicpmv ui` did not serve {url} within {STARTUP_S} s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def serve(version: str, tmp: Path, model: Path | None = None, extra: tuple[str, ...] = ()) -> Iterator[str]:
    """Run `minicpmv ui` on a tiny checkpoint (``model``, else the version's) at a free local
    port; yields its URL."""
    port = _free_port()
    log = tmp / "server.log"
    env = {**os.environ, "GRADIO_TEMP_DIR": str(tmp / "uploads"), "GRADIO_ANALYTICS_ENABLED": "False"}
    if model is None:
        model = (CONF / version / "_checkpoint").relative_to(ROOT)  # as a user types it in the checkout
    cmd = [sys.executable, "-m", "minicpmv.cli", "ui", "--model", str(model),
           "--dtype", "float32", "--port", str(port), "--max-new-tokens", "48", *extra]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}/"
    LOGS[url] = log
    try:
        _wait_until_serving(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serve("2.6", tmp_path_factory.mktemp("ui-server-26")) as url:
        yield url


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    """The module's one Playwright driver (a second sync_playwright() inside it is refused)."""
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(
            f"headless Chromium not found at {CHROMIUM}: the browser tests need Debian's chromium "
            "(apt-get install -y chromium) or MINICPMV_CHROMIUM=/path/to/chromium. "
            "Never run `playwright install`."
        )
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    b = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    try:
        yield b
    finally:
        b.close()


@pytest.fixture()
def requested() -> list[str]:
    """Every URL the page's browser context requested."""
    return []


@pytest.fixture()
def page(browser: Browser, server: str, requested: list[str]) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 960})
    context.on("request", lambda r: requested.append(r.url))
    pg = context.new_page()
    pg.set_default_timeout(WAIT_MS)
    pg.goto(server)
    expect(pg.locator("#input textarea")).to_be_visible()
    try:
        yield pg
    finally:
        context.close()


# ---------------------------------------------------------------------- page helpers
def attach(page: Page, *files: Path) -> None:
    page.locator("#input input[type=file]").set_input_files([str(f) for f in files])
    expect(page.locator('#input [aria-label="File thumbnail"]')).to_have_count(len(files), timeout=WAIT_MS)


def send(page: Page, text: str) -> None:
    box = page.locator("#input textarea")
    box.fill(text)
    box.press("Enter")


def user_messages(page: Page, text: str | None = None):
    loc = page.locator('#chatbot [data-testid="user"]')
    return loc.filter(has_text=text) if text is not None else loc


def bot_messages(page: Page):
    return page.locator('#chatbot [data-testid="bot"]')


def uploaded(page: Page, component: str) -> Locator:
    """The download link an audio component shows once its file is on the server."""
    return page.locator(f'{component} a[data-testid="download-link"][href*="/gradio_api/file="]')


def ask_and_wait(page: Page, text: str) -> str:
    """Send ``text`` and wait for its answer to finish streaming; returns the answer's text."""
    send(page, text)
    expect(user_messages(page, text)).to_have_count(1, timeout=WAIT_MS)  # shown with "Generating…"
    expect(page.locator("#status")).to_contain_text("Answered in", timeout=WAIT_MS)
    return bot_messages(page).last.inner_text()


WATCH_ANSWERS = """() => {
  window.__answers = [];
  const chat = document.querySelector('#chatbot');
  new MutationObserver(() => {
    const bots = chat.querySelectorAll('[data-testid="bot"]');
    if (!bots.length) return;
    const t = bots[bots.length - 1].innerText.trim();
    const seen = window.__answers;
    if (t && t !== '…' && seen[seen.length - 1] !== t) seen.push(t);
  }).observe(chat, {subtree: true, childList: true, characterData: true});
}"""


# ---------------------------------------------------------------------- tests
def test_the_command_prints_its_address_and_no_share_hint(server: str) -> None:
    """The CLI offers no share links, so the log must not suggest `share=True`; it prints where
    the page is instead."""
    want = f"open {server.rstrip('/')}"
    deadline = time.monotonic() + 60  # the line is printed right after the page starts serving
    while want not in (text := LOGS[server].read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert want in text, text
    assert "share=True" not in text and "public link" not in text, text


def test_upload_image_ask_and_stream_answer(page: Page, tmp_path: Path, server: str, requested: list[str]) -> None:
    page.evaluate(WATCH_ANSWERS)
    attach(page, HOUSE)
    question = "What is in this image?"
    answer = ask_and_wait(page, question)
    assert answer.strip()
    expect(page.locator("#chatbot img")).to_have_count(1)  # the uploaded image is in the chat
    expect(page.locator('#input [aria-label="File thumbnail"]')).to_have_count(0)  # input was cleared
    partials = page.evaluate("window.__answers")
    assert len(partials) >= 2, f"the answer did not stream (states seen: {partials})"
    assert partials[-1] == answer.strip()
    shot = tmp_path / "answer.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    outside = sorted({u for u in requested if not u.startswith((server, "data:", "blob:"))})
    assert not outside, f"the page fetched resources from outside the local server: {outside}"
    assert len(requested) > 5  # the listener did see the page's own requests
    if os.environ.get("MINICPMV_UI_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["MINICPMV_UI_SCREENSHOT"])


def test_corrupt_file_shows_an_error(page: Page, tmp_path: Path, corrupt_png: Path) -> None:
    attach(page, corrupt_png)
    send(page, "What is this?")
    status = page.locator("#status")
    expect(status).to_contain_text("broken_photo.png", timeout=WAIT_MS)
    expect(status).to_contain_text("not a recognised image format")
    page.screenshot(path=str(tmp_path / "error.png"), full_page=True)
    assert "Traceback" not in page.locator("body").inner_text()
    expect(user_messages(page)).to_have_count(0)  # nothing was sent to the model
    expect(page.locator("#input textarea")).to_have_value("What is this?")  # the input is kept to fix


def test_browser_tabs_keep_their_own_history(browser: Browser, server: str, small_png: Path) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 960})
    try:
        tabs = [context.new_page(), context.new_page()]
        for t in tabs:
            t.set_default_timeout(WAIT_MS)
            t.goto(server)
            expect(t.locator("#input textarea")).to_be_visible()
        attach(tabs[0], HOUSE)
        attach(tabs[1], small_png)
        send(tabs[0], "alpha question")
        send(tabs[1], "beta question")  # sent while the first tab is (or is queued to be) answering
        for t in tabs:
            expect(t.locator("#status")).to_contain_text("Answered in", timeout=WAIT_MS)
        ask_and_wait(tabs[0], "alpha follow-up")
        expect(user_messages(tabs[0])).to_have_count(3)  # image + alpha, alpha follow-up
        expect(user_messages(tabs[0], "beta")).to_have_count(0)
        expect(user_messages(tabs[1])).to_have_count(2)  # image + beta
        expect(user_messages(tabs[1], "alpha")).to_have_count(0)
        expect(bot_messages(tabs[1])).to_have_count(1)
    finally:
        context.close()


def test_beam_search_regenerate_and_clear(page: Page) -> None:
    page.locator("#decoding").get_by_text("Beam search").click()
    expect(page.locator("#temperature input[type=range]")).to_be_disabled()  # not used by beam search
    attach(page, HOUSE)
    first = ask_and_wait(page, "Describe the house.")
    page.locator("#regenerate").click()
    expect(page.locator("#status")).to_contain_text("Regenerated the last answer in", timeout=WAIT_MS)
    expect(user_messages(page, "Describe the house.")).to_have_count(1)
    expect(bot_messages(page)).to_have_count(1)
    assert bot_messages(page).last.inner_text() == first  # beam search is deterministic
    page.locator("#clear").click()
    expect(user_messages(page)).to_have_count(0)
    expect(bot_messages(page)).to_have_count(0)
    answer = ask_and_wait(page, "A fresh start?")  # the cleared tab still works, without the old turns
    assert answer.strip()
    expect(user_messages(page)).to_have_count(1)


def test_video_upload_and_answer(page: Page, tmp_path: Path) -> None:
    assert video_supported(), "this installation has no minicpmv.processing.video"
    clip = make_clip(tmp_path / "bars.mp4")
    attach(page, clip)
    answer = ask_and_wait(page, "What happens in the video?")
    assert answer.strip()
    expect(page.locator("#chatbot video")).to_have_count(1)  # the clip is shown in the chat
    page.screenshot(path=str(tmp_path / "video.png"), full_page=True)


def test_corrupt_video_shows_an_error(page: Page, tmp_path: Path) -> None:
    bad = tmp_path / "holiday.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42 but then nothing useful")
    attach(page, bad)
    send(page, "What happens in the video?")
    expect(page.locator("#status")).to_contain_text("holiday.mp4", timeout=WAIT_MS)
    expect(page.locator("#status")).to_contain_text("cannot be read as a video")
    expect(user_messages(page)).to_have_count(0)


def test_few_shot_tab(page: Page, small_png: Path) -> None:
    page.get_by_role("tab", name="Few-shot").click()
    page.locator("#fs-ex-image input[type=file]").set_input_files(str(small_png))
    expect(page.locator("#fs-ex-image img")).to_have_count(1, timeout=WAIT_MS)
    page.locator("#fs-ex-question textarea").fill("What colour is it?")
    page.locator("#fs-ex-answer textarea").fill("Blue.")
    page.locator("#fs-add").click()
    expect(page.locator("#fs-status")).to_contain_text("1 example(s).", timeout=WAIT_MS)
    expect(page.locator("#fs-gallery img")).to_have_count(1)
    page.locator("#fs-image input[type=file]").set_input_files(str(HOUSE))
    expect(page.locator("#fs-image img")).to_have_count(1, timeout=WAIT_MS)
    page.locator("#fs-question textarea").fill("What colour is it?")
    page.locator("#fs-ask").click()
    expect(page.locator("#fs-status")).to_contain_text("Done.", timeout=WAIT_MS)
    assert page.locator('#fs-answer [data-testid="bot"]').last.inner_text().strip()


def test_thinking_mode_reasoning_is_collapsed(browser: Browser, tmp_path: Path) -> None:
    with serve("4.5", tmp_path) as url:
        pg = browser.new_page(viewport={"width": 1280, "height": 960})
        try:
            pg.set_default_timeout(WAIT_MS)
            pg.goto(url)
            pg.locator("#thinking input").check()  # 4.5 has a thinking mode: the box is enabled
            attach(pg, HOUSE)
            ask_and_wait(pg, "Think about it: what is shown?")
            block = pg.locator("#chatbot .thought-group")
            expect(block).to_have_count(1)
            expect(block).to_have_text(re.compile(r"^\s*Reasoning\s*$"))  # collapsed: only its title
            pg.screenshot(path=str(tmp_path / "thinking.png"), full_page=True)
            block.get_by_text("Reasoning").click()  # expand it: the reasoning text appears
            expect(block).to_have_text(re.compile(r"^\s*Reasoning\s*\S"))
        finally:
            pg.close()


def test_thinking_box_is_disabled_for_2_6(page: Page) -> None:
    expect(page.locator("#thinking input")).to_be_disabled()
    expect(page.locator("#thinking")).to_contain_text("has no thinking mode")


def test_spoken_answer_with_a_cloned_voice_plays_in_the_page(
    tmp_path: Path, tts_checkpoint: Path, playwright: Playwright
) -> None:
    """MiniCPM-o: a question recorded with the microphone (Chromium's fake capture device), a
    reference clip uploaded for voice cloning; the answer is spoken in the page as a 24 kHz WAV."""
    ref = write_wav(tmp_path / "voice.wav", 1.5, 22050, 2)
    mic = [*CHROMIUM_ARGS, "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]
    with serve("o2.6", tmp_path, tts_checkpoint, ("--max-audio-seconds", "1")) as url:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=mic)
        try:
            pg = browser.new_context(permissions=["microphone"], viewport={"width": 1280, "height": 1400}).new_page()
            pg.set_default_timeout(WAIT_MS)
            pg.goto(url)
            import time as _t
            def _slow(route):
                if route.request.method == "POST" and "/upload" in route.request.url:
                    _t.sleep(2.0)
                route.continue_()
            pg.route("**/*", _slow)
            pg.locator("#speak input").check()
            pg.locator("#voice").get_by_text("Clone the reference clip").click()
            pg.locator("#voice-ref input[type=file]").set_input_files(str(ref))
            expect(pg.locator("#voice-ref audio")).not_to_have_count(0)  # the uploaded clip, ready to play
            expect(uploaded(pg, "#voice-ref")).to_have_count(1)
            pg.locator("#audio-in button.record-button").click()  # the microphone: a fake beep
            pg.wait_for_timeout(1500)  # record 1.5 s of it
            pg.locator("#audio-in button.stop-button").first.click()
            expect(pg.locator("#audio-in audio")).not_to_have_count(0)
            # The player shows the local recording at once; the message takes it only once it is
            # on the server (a busy machine took longer than the Enter key: CI sent no audio).
            expect(uploaded(pg, "#audio-in")).to_have_count(1)
            ask_and_wait(pg, "Please answer.")
            expect(pg.locator('#chatbot a[href$=".wav"]')).to_have_count(1)  # the recording is in the chat
            link = pg.locator('#answer-audio a[data-testid="download-link"]')
            expect(link).to_have_count(1)
            expect(pg.locator("#answer-audio audio")).not_to_have_count(0)  # a player in the page
            data = pg.evaluate("""async (src) => {
                const buf = new Uint8Array(await (await fetch(src)).arrayBuffer());
                let s = ''; for (const b of buf) s += String.fromCharCode(b); return btoa(s); }""",
                               link.get_attribute("href"))
            with wave.open(io.BytesIO(base64.b64decode(data))) as w:
                assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)
                assert 0 < w.getnframes() <= 24000  # --max-audio-seconds 1
            pg.screenshot(path=str(tmp_path / "spoken.png"), full_page=True)
            assert "Traceback" not in pg.locator("body").inner_text()
            expect(pg.locator("#status")).not_to_contain_text("Error")
        finally:
            browser.close()
