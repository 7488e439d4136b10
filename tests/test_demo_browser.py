"""The demo in a real browser: Playwright drives Debian's chromium (never a downloaded one) against
the launched app, uploads an image, asks, and checks every variant column. The screenshot is kept
in build/test-artifacts/demo.png."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from test_app import VARIANTS, fast_home  # noqa: F401  (the same cached fast-mode variants)

from app.demo import launch
from lgemma.data.shapes import sample

ARTIFACTS = Path(__file__).resolve().parents[1] / "build" / "test-artifacts"


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium, installed with apt-get when absent and we are root (as in CI)."""
    if not shutil.which("chromium") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run("apt-get update -qq && apt-get install -y -qq chromium", shell=True, env=env, check=True,
                       stdout=subprocess.DEVNULL)
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("chromium is not installed and we are not root: `sudo apt-get install chromium`")
    return path


@pytest.fixture(scope="module")
def page(chromium):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium)
        yield browser.new_page(viewport={"width": 1400, "height": 1000})
        browser.close()


def test_upload_ask_and_every_column_answers(fast_home, page, tmp_path):  # noqa: F811
    from playwright.sync_api import expect
    demo = launch(fast_home, VARIANTS, port=None, block=False)
    try:
        image = tmp_path / "scene.png"
        sample(3)[0].save(image)
        page.goto(demo.local_url)
        page.locator("input[type=file]").first.set_input_files(image)
        expect(page.locator("#image img")).to_be_visible()  # uploaded and shown
        page.get_by_label("question").fill("What color is the circle?")
        page.get_by_role("button", name="Ask", exact=True).click()
        columns = page.locator(".variant:visible")
        expect(columns).to_have_count(len(VARIANTS))
        for i, name in enumerate(VARIANTS):
            col = columns.nth(i)
            expect(col.get_by_text(name, exact=True)).to_be_visible()
            expect(col.get_by_label("answer")).not_to_have_value("", timeout=60_000)
            col.locator("img").scroll_into_view_if_needed()  # loading="lazy": fetched once on screen
            expect(col.locator("img")).to_be_visible()
            assert col.locator("img").evaluate("img => img.decode().then(() => img.naturalWidth)") == 256
            expect(col.get_by_text("answered in")).to_be_visible()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=ARTIFACTS / "demo.png", full_page=True)
    finally:
        demo.close()
