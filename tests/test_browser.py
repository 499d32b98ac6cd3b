"""End to end in a real browser: headless Chromium (Debian's) driven by Playwright."""

from __future__ import annotations

import shutil
import time

import pytest
from PIL import Image

from tests.conftest import build_tiny_bundle
from tests.serve_helpers import RunningServer, free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# As the machine notes say: no background networking (this machine has no network to reach).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    playwright_api = pytest.importorskip("playwright.sync_api")
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (Debian package 'chromium'; scripts/setup.sh installs it)")
    with playwright_api.sync_playwright() as p:
        try:
            instance = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        except Exception as err:  # a machine where Chromium cannot start
            pytest.skip(f"Chromium could not start here: {err}")
        yield instance
        instance.close()


def test_upload_ask_and_see_a_streamed_answer(browser, tiny_parts, tmp_path):
    from serve.app import ServeConfig, create_app
    from serve.engine import Engine

    model, processor = build_tiny_bundle(tiny_parts, tmp_path / "bundle")
    engine = Engine(model, processor, "tiny")
    server = RunningServer(create_app(engine, ServeConfig(model=None, default_max_tokens=24)), free_port())
    # Slow decoding down so the page can be seen mid-answer.
    hook = model.language_model.register_forward_hook(lambda *args: time.sleep(0.03))
    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (220, 30, 30)).save(image)
    page = browser.new_page()
    try:
        page.goto(server.url + "/", wait_until="load")
        page.get_by_placeholder("Ask about your images…").wait_for(timeout=30_000)
        page.locator("input[type=file]").first.set_input_files(str(image))
        page.wait_for_timeout(500)
        # The placeholder goes once a conversation starts; the message box is the page's textarea.
        box = page.locator("textarea").first
        box.fill("what colour is this ?")
        box.press("Enter")
        bot = page.locator(".message.bot, [data-testid='bot']").last
        bot.wait_for(timeout=30_000)
        lengths = set()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            lengths.add(len(bot.inner_text().strip()))
            if engine.last_stats is not None and not engine._slot.locked():
                break
            page.wait_for_timeout(50)
        page.wait_for_timeout(300)
        final = bot.inner_text().strip()
        assert final, "no answer shown"
        assert len({n for n in lengths if 0 < n < len(final)}) >= 1, "the answer did not stream in"
        first_prompt = engine.last_stats.prompt_tokens
        assert first_prompt > processor.num_image_tokens  # the image went in
        # A follow-up keeps the conversation (and its image) in the prompt.
        box.fill("and the colour again ?")
        box.press("Enter")
        page.wait_for_function("n => document.querySelectorAll('.message.bot, [data-testid=\"bot\"]').length >= n", arg=2, timeout=30_000)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (engine._slot.locked() or engine.last_stats.prompt_tokens == first_prompt):
            page.wait_for_timeout(100)
        assert engine.last_stats.prompt_tokens > first_prompt + 5
        page.screenshot(path=str(tmp_path / "chat.png"))
    finally:
        hook.remove()
        page.close()
        server.stop()
