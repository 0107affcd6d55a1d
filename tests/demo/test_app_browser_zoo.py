"""The app on the offline zoo in a real browser: Compare answers the shipped examples and users' own pictures
of other sizes (640×480, 1000×300) correctly in every default column (GRACE BF16, W8, W4), and says how each
model sees the upload.

The pictures are drawn here with plain PIL (not the training renderer), in sizes the models never trained on;
the app resizes them into the zoo's pixel budget."""

from __future__ import annotations

import re

import pytest
from PIL import Image, ImageDraw

from app_server import REPO, app_env, running_app
from test_app_browser import browser, open_app, playwright_api  # noqa: F401 (the browser fixture; skips without it)

from grace.zoo import DEFAULT_OUT

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not (DEFAULT_OUT / "zoo.json").is_file(), reason="needs the shipped zoo (assets/zoo)")]

EXAMPLES = REPO / "assets" / "examples"
COLORS = {"red": (215, 40, 40), "green": (30, 160, 70), "blue": (40, 90, 230), "yellow": (235, 185, 15)}


def picture(size: tuple[int, int], shapes: list[tuple[str, str, float, float, float]], background=(248, 248, 244)):
    """shapes: (kind, colour, centre x, centre y, half size), positions and sizes as shares of the height."""
    width, height = size
    image = Image.new("RGB", size, background)
    pen = ImageDraw.Draw(image)
    for kind, color, x, y, r in shapes:
        x, y, r = x * width, y * height, r * height
        if kind == "circle":
            pen.ellipse((x - r, y - r, x + r, y + r), fill=COLORS[color])
        elif kind == "square":
            pen.rectangle((x - r, y - r, x + r, y + r), fill=COLORS[color])
        else:
            pen.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=COLORS[color])
    return image


# (picture, question, the answer's word); shapes of 24-30 % of the shorter side, inside the task's 15-40 %
CASES = [
    ("640x480", ((640, 480), [("circle", "green", 0.3, 0.45, 0.12), ("triangle", "yellow", 0.68, 0.55, 0.12)]),
     [("How many shapes are there?", "two"), ("What color is the circle?", "green"),
      ("What shape is on the left?", "circle")]),
    ("1000x300", ((1000, 300), [("square", "blue", 0.15, 0.5, 0.15), ("circle", "red", 0.5, 0.45, 0.15),
                                ("triangle", "green", 0.85, 0.55, 0.15)]),
     [("How many shapes are there?", "three"), ("What color is the square?", "blue"),
      ("Is there a red circle?", "yes")]),
]
# the shipped examples with the questions the Compare tab pairs them with (demo/compare_tab.py)
ANSWERS = {"red-circle-blue-square.png": "red", "green-triangle.png": "triangle", "three-shapes.png": "three"}


@pytest.fixture(scope="module")
def zoo_url(fixtures_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("browser-zoo")
    env = app_env(fixtures_dir, work)
    env["GRACE_ZOO"] = str(DEFAULT_OUT)
    with running_app(env) as url:
        yield url


@pytest.fixture(scope="module")
def zoo_page(browser, zoo_url):
    page = open_app(browser, zoo_url)
    page.zoo_url = zoo_url
    yield page
    page.close()


def ask(page, image_path, question: str) -> list[str]:
    """One question on a freshly loaded page (so no earlier answer can be read for this one's)."""
    expect = playwright_api.expect
    page.goto(page.zoo_url)
    page.wait_for_selector("#compare-ask")
    page.locator("#compare-image input[type=file]").set_input_files(str(image_path))
    expect(page.locator("#compare-image img")).to_be_visible()
    page.locator("#compare-question textarea").fill(question)
    page.locator("#compare-ask").click()
    answers = []
    for i in range(3):
        expect(page.locator(f"#metrics-{i}")).to_contain_text(re.compile("done|Error"), timeout=120_000)
        expect(page.locator(f"#metrics-{i}")).to_contain_text("done")
        answers.append(page.locator(f"#answer-{i}").inner_text().strip().lower())
    return answers


@pytest.mark.parametrize("name,scene,questions", CASES, ids=[c[0] for c in CASES])
def test_users_own_pictures_are_answered_in_every_column(zoo_page, tmp_path, name, scene, questions):
    path = tmp_path / f"{name}.png"
    picture(*scene).save(path)
    for question, word in questions:
        answers = ask(zoo_page, path, question)
        assert all(re.search(rf"\b{word}\b", a) for a in answers), (question, answers)
    seen = [zoo_page.locator(f"#metrics-{i}").inner_text() for i in range(3)]
    # a 640x480 or 1000x300 upload is resized into the zoo's budget of 4-64 visual tokens
    for line in seen:
        tokens = int(re.search(r"seen as \d+×\d+, (\d+) visual tokens", line).group(1))
        assert 4 <= tokens <= 64, line


@pytest.mark.parametrize("example", sorted(ANSWERS))
def test_the_shipped_examples_are_answered(zoo_page, example):
    from demo.compare_tab import EXAMPLE_QUESTIONS

    question, word = EXAMPLE_QUESTIONS[example], ANSWERS[example]
    answers = ask(zoo_page, EXAMPLES / example, question)
    assert all(re.search(rf"\b{word}\b", a) for a in answers), (question, answers)
