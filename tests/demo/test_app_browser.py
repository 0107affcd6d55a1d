"""The app in a real browser (Playwright driving Debian's chromium): Compare fills every column, Train draws
its panels and stops. Saves docs/screenshots/compare.png and train.png.

Needs `pip install playwright` and `apt-get install chromium`; never a browser downloaded by playwright.
GRACE_APP_TEST_ZOO=1 serves assets/zoo instead of the fixtures (for screenshots of real answers).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from app_server import REPO, app_env, running_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = REPO / "docs" / "screenshots"
EXAMPLE = REPO / "assets" / "examples" / "red-circle-blue-square.png"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                                     "(apt-get install -y chromium)"),
]
playwright_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright pip package")


@pytest.fixture(scope="module")
def app_url(fixtures_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("browser")
    env = app_env(fixtures_dir, work)
    if os.environ.get("GRACE_APP_TEST_ZOO") == "1":
        env.pop("GRACE_ZOO")
    with running_app(env) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_app(browser, app_url):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    page.goto(app_url)
    page.wait_for_selector("#compare-ask")
    return page


@pytest.fixture(scope="module")
def page(browser, app_url):
    """One user's page, kept across the tests that build on each other (compare, train, trained family)."""
    page = open_app(browser, app_url)
    yield page
    page.close()


def answer_texts(page) -> list[str]:
    return [page.locator(f"#answer-{i}").inner_text().strip() for i in range(3)]


def test_missing_inputs_are_pointed_out(page):
    expect = playwright_api.expect
    page.locator("#compare-ask").click()
    expect(page.get_by_text("Please type a question about the image.")).to_be_visible()
    expect(page.get_by_text("Please upload an image").first).to_be_visible()


def test_compare_fills_every_column(page):
    expect = playwright_api.expect
    page.locator("#compare-image input[type=file]").set_input_files(str(EXAMPLE))
    expect(page.locator("#compare-image img")).to_be_visible()
    page.locator("#compare-question textarea").fill("What color is the circle?")
    page.locator("#compare-ask").click()
    for i in range(3):
        expect(page.locator(f"#metrics-{i}")).to_contain_text("done", timeout=90_000)
        expect(page.locator(f"#metrics-{i}")).to_contain_text("tokens/s")
    assert all(answer_texts(page)), answer_texts(page)
    for i in (1, 2):   # quantized columns are compared with the BF16 one
        expect(page.locator(f"#metrics-{i}")).to_contain_text(re.compile(r"vs .*identical"))
    expect(page.locator("#compare-chart .main-svg").first).to_be_visible()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "compare.png"), full_page=True)


def test_train_draws_its_panels_and_stops(page):
    expect = playwright_api.expect
    page.get_by_role("tab", name="Train").click()
    page.locator("#train-steps input").fill("5000")
    page.locator("#train-start").click()
    expect(page.locator("#train-progress")).to_contain_text("running", timeout=90_000)
    for panel in ("#plot-cka", "#plot-ib"):   # traces with data, not the "no steps yet" placeholder
        expect(page.locator(f"{panel} .scatterlayer .trace").first).to_be_visible(timeout=60_000)
    expect(page.locator("#plot-ib")).to_contain_text("β")
    page.wait_for_function("() => parseInt((document.querySelector('#train-progress').innerText"
                           ".match(/step (\\d+)/) || [0, 0])[1]) >= 20")
    page.screenshot(path=str(SCREENSHOTS / "train.png"), full_page=True)
    page.locator("#train-stop").click()
    expect(page.locator("#train-message")).to_contain_text("Training stopped", timeout=45_000)
    expect(page.locator("#train-progress")).to_contain_text("stopped")


def test_a_finished_run_goes_to_compare(page):
    expect = playwright_api.expect
    page.locator("#train-steps input").fill("10")
    page.locator("#train-start").click()
    expect(page.locator("#train-message")).to_contain_text("Training finished", timeout=120_000)
    page.locator("#train-to-compare").click()
    expect(page.locator("#compare-family input")).to_have_value(re.compile("^trained: "))
    expect(page.locator("#answer-1")).to_contain_text("")     # the columns follow the new family
    page.locator("#compare-ask").click()
    for i in range(3):
        expect(page.locator(f"#metrics-{i}")).to_contain_text("done", timeout=90_000)
    labels = page.locator("#compare-variants").inner_text()
    assert "teacher: " in labels and "trained W4G128-AWQ" in labels


def test_a_bad_upload_gets_a_message(browser, app_url, tmp_path):
    expect = playwright_api.expect
    fake = tmp_path / "fake.png"
    fake.write_text("not an image at all")
    page = open_app(browser, app_url)      # a second user, while the first one's page is still open
    page.locator("#compare-question textarea").fill("What is this?")
    page.locator("#compare-image input[type=file]").set_input_files(str(fake))
    # Uploaded once the preview points at the server (a broken picture, since it is not an image).
    expect(page.locator("#compare-image img")).to_have_attribute("src", re.compile("gradio_api/file="))
    page.locator("#compare-ask").click()
    expect(page.get_by_text("not an image this app can read").first).to_be_visible(timeout=30_000)
    page.close()


def test_eval_tab_draws_a_table_and_chart(browser, app_url):
    expect = playwright_api.expect
    page = open_app(browser, app_url)
    page.get_by_role("tab", name="Eval").click()
    page.locator("#eval-run").click()
    expect(page.locator("#eval-table")).to_contain_text("accuracy", timeout=120_000)
    expect(page.locator("#eval-chart .main-svg").first).to_be_visible(timeout=60_000)
    page.screenshot(path=str(SCREENSHOTS / "eval.png"), full_page=True)
