"""The app in a real browser (Playwright driving Debian's chromium): Compare fills every column with its
confidence strip and download, Train draws, smooths, stops, lists and resumes runs, Eval draws.

Screenshots go to a temporary folder; `docs/screenshots/refresh.sh` runs these tests with
GRACE_SCREENSHOTS_DIR=docs/screenshots and GRACE_APP_TEST_ZOO=1 (the offline zoo, real answers) to
refresh the README's pictures.

Needs `pip install playwright` and `apt-get install chromium`; never a browser downloaded by playwright.
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
EXAMPLE = REPO / "assets" / "examples" / "red-circle-blue-square.png"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                                     "(apt-get install -y chromium)"),
]
playwright_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright pip package")


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("GRACE_SCREENSHOTS_DIR") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


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


def open_app(browser, app_url, remote: list | None = None):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    if remote is not None:   # every request that leaves the app's own server
        page.on("request", lambda r: None if r.url.startswith(app_url) or r.url.startswith("data:")
                or r.url.startswith("blob:") else remote.append(r.url))
    page.goto(app_url)
    page.wait_for_selector("#compare-ask")
    return page


@pytest.fixture(scope="module")
def remote_requests() -> list:
    return []


@pytest.fixture(scope="module")
def page(browser, app_url, remote_requests):
    """One user's page, kept across the tests that build on each other (compare, train, trained family)."""
    page = open_app(browser, app_url, remote_requests)
    yield page
    page.close()


def answer_texts(page) -> list[str]:
    return [page.locator(f"#answer-{i}").inner_text().strip() for i in range(3)]


def test_missing_inputs_are_pointed_out(page):
    expect = playwright_api.expect
    page.locator("#compare-ask").click()
    expect(page.get_by_text("Please type a question about the image.")).to_be_visible()
    expect(page.get_by_text("Please upload an image").first).to_be_visible()


def test_question_counter(page):
    expect = playwright_api.expect
    box = page.locator("#compare-question textarea")
    box.fill("x" * 1500)
    box.press("End")
    box.type("y")
    expect(page.locator("#compare-question-counter")).to_contain_text("1501 / 1000 characters: too long")
    assert len(box.input_value()) == 1501                       # not silently cut
    box.fill("")
    box.type("What color is the circle?")
    expect(page.locator("#compare-question-counter")).to_contain_text("25 / 1000 characters")


def test_a_bad_upload_is_flagged_at_once_and_the_note_clears(browser, app_url, tmp_path):
    expect = playwright_api.expect
    fake = tmp_path / "fake.png"
    fake.write_text("not an image at all")
    page = open_app(browser, app_url)      # a second user, while the first one's page is still open
    page.locator("#compare-image input[type=file]").set_input_files(str(fake))
    expect(page.locator("#compare-image-note")).to_contain_text("not an image this app can read")   # before Ask
    page.locator("#compare-question textarea").fill("What is this?")
    page.locator("#compare-ask").click()
    expect(page.get_by_text("not an image this app can read").nth(1)).to_be_visible(timeout=30_000)
    page.close()


def test_compare_fills_every_column(page, screenshots):
    expect = playwright_api.expect
    page.locator("#compare-image input[type=file]").set_input_files(str(EXAMPLE))
    expect(page.locator("#compare-image img")).to_be_visible()
    expect(page.locator("#compare-image-note")).not_to_contain_text("not an image")
    page.locator("#compare-question textarea").fill("What color is the circle?")
    page.locator("#compare-ask").click()
    for i in range(3):
        expect(page.locator(f"#metrics-{i}")).to_contain_text("done", timeout=90_000)
        expect(page.locator(f"#metrics-{i}")).to_contain_text("tokens/s")
        expect(page.locator(f"#metrics-{i}")).to_contain_text("KV cache")
        expect(page.locator(f"#confidence-{i} .grace-token").first).to_be_visible()   # the per-token view
        expect(page.locator(f"#confidence-{i}")).to_contain_text("least sure: token #")
    assert all(answer_texts(page)), answer_texts(page)
    for i in (1, 2):   # quantized columns are compared with the BF16 one
        expect(page.locator(f"#metrics-{i}")).to_contain_text(re.compile(r"vs .*identical"))
    expect(page.locator("#compare-legend")).to_contain_text("positions count from 1")
    expect(page.locator("#compare-chart .main-svg").first).to_be_visible()
    expect(page.locator("#compare-download")).to_contain_text(re.compile(r"comparison\s*\.json"))
    expect(page.locator("#compare-download")).to_contain_text(re.compile(r"comparison\s*\.md"))
    expect(page.locator("#cache-summary")).to_contain_text("whole process")
    page.screenshot(path=str(screenshots / "compare.png"), full_page=True)


def test_train_draws_smooths_stops_lists_and_resumes(page, screenshots):
    expect = playwright_api.expect
    page.get_by_role("tab", name="Train").click()
    page.locator("#train-steps input").fill("5000")
    page.locator("#train-start").click()
    expect(page.locator("#train-progress")).to_contain_text("running", timeout=90_000)
    for panel in ("#plot-cka", "#plot-ib", "#plot-losses"):   # traces with data, not the "no steps yet" placeholder
        expect(page.locator(f"{panel} .scatterlayer .trace").first).to_be_visible(timeout=60_000)
    expect(page.locator("#plot-ib")).to_contain_text("β")
    expect(page.locator("#caption-ib")).to_contain_text("target τ")
    page.wait_for_function("() => parseInt((document.querySelector('#train-progress').innerText"
                           ".match(/step (\\d+)/) || [0, 0])[1]) >= 20")
    page.screenshot(path=str(screenshots / "train.png"), full_page=True)
    page.locator("#train-log-scale input").check()
    expect(page.locator("#plot-losses")).to_contain_text("log scale")
    raw_lines = page.locator("#plot-losses .scatterlayer .trace").count()
    page.locator("#train-log-scale input").uncheck()
    slider = page.locator("#train-smoothing input[type=number]")
    slider.fill("0")
    slider.press("Enter")
    page.locator("#train-smoothing input[type=range]").dispatch_event("pointerup")
    page.wait_for_function(f"() => document.querySelectorAll('#plot-losses .scatterlayer .trace').length < {raw_lines}")
    page.locator("#train-stop").click()
    expect(page.locator("#train-message")).to_contain_text("Training stopped", timeout=45_000)
    expect(page.locator("#train-progress")).to_contain_text("stopped")
    took = page.locator("#train-progress").inner_text()
    page.wait_for_timeout(2500)
    assert page.locator("#train-progress").inner_text() == took          # "took" no longer counts
    runs = page.locator("#train-runs")
    expect(runs).to_contain_text("stopped", timeout=20_000)
    expect(runs).to_contain_text("resume")
    run = re.search(r"run (\S+)", took).group(1)
    expect(runs).to_contain_text(run)
    pick = page.locator("#train-run-pick input")                          # pick the run ...
    pick.fill(run)
    pick.press("Enter")
    page.locator("#train-run-resume").click()                            # ... and continue it
    expect(page.locator("#train-progress")).to_contain_text("running", timeout=90_000)
    page.locator("#train-stop").click()
    expect(page.locator("#train-message")).to_contain_text("Training stopped", timeout=60_000)


def test_a_finished_run_goes_to_compare_with_its_student_before_distillation(page):
    expect = playwright_api.expect
    page.get_by_role("tab", name="Train").click()
    page.locator("#train-steps input").fill("10")
    page.locator("#train-start").click()
    expect(page.locator("#train-message")).to_contain_text("Training finished", timeout=120_000)
    page.locator("#train-to-compare").click()
    expect(page.locator("#compare-family input")).to_have_value(re.compile("^trained: "))
    for label in ("teacher: ", "student before distillation", "trained W4G128-AWQ"):
        expect(page.locator("#compare-variants")).to_contain_text(label)
    page.locator("#compare-image input[type=file]").set_input_files(str(EXAMPLE))
    page.locator("#compare-question textarea").fill("What color is the circle?")
    page.locator("#compare-ask").click()
    for i in range(4):
        expect(page.locator(f"#metrics-{i}")).to_contain_text(re.compile("done|Error"), timeout=180_000)
        expect(page.locator(f"#metrics-{i}")).to_contain_text("done")


def test_an_example_answers(browser, app_url):
    """The examples come from the operator's folder, which the upload checks allow (nothing else is)."""
    expect = playwright_api.expect
    page = open_app(browser, app_url)
    page.get_by_text("How many shapes are there?").first.click()
    expect(page.locator("#compare-question textarea")).to_have_value("How many shapes are there?")
    page.locator("#compare-ask").click()
    expect(page.locator("#metrics-0")).to_contain_text(re.compile("done|Error"), timeout=90_000)
    expect(page.locator("#metrics-0")).to_contain_text("done")
    page.close()


def test_eval_tab_draws_a_table_and_chart(browser, app_url, screenshots):
    expect = playwright_api.expect
    page = open_app(browser, app_url)
    page.get_by_role("tab", name="Eval").click()
    page.locator("#eval-run").click()
    expect(page.locator("#eval-table")).to_contain_text("accuracy", timeout=400_000)   # 3 variants x 100 questions on 2 CPU cores
    expect(page.locator("#eval-chart .main-svg").first).to_be_visible(timeout=60_000)
    page.screenshot(path=str(screenshots / "eval.png"), full_page=True)
    page.close()


def test_nothing_is_fetched_from_outside_the_app(remote_requests):
    """Offline first: no web fonts, scripts or images from other hosts while the pages above were used."""
    assert remote_requests == []
