"""The photo page in a real headless Chromium (Debian's package, driven by Selenium): pick a photo,
ask, the streamed answer appears, a follow-up keeps the conversation; Stop keeps the partial answer;
transparent photos show on white; grounded answers read as text with box chips (the tiny trained
model writes real ``<ref>``/``<box>`` answers); screenshots are kept in ``test-artifacts/`` for a
person to look at.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.server_harness import module_server, require_tool

pytestmark = pytest.mark.long  # its own step of .ci/run (python -m pytest -m long)

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
SHOT = ARTIFACTS / "server-page.png"
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                "--window-size=1280,860"]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium = require_tool("chromium", "Chromium")
    driver_path = require_tool("chromedriver", "Chromium's WebDriver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    # the driver's path is given, so Selenium's manager never tries to download one
    service = Service(executable_path=driver_path, env={**os.environ, "HOME": str(tmp_path_factory.mktemp("home"))})
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(f32_bundle, tmp_path_factory):
    yield from module_server(f32_bundle, tmp_path_factory, "server")


def test_page_asks_about_a_photo_and_streams_the_answer(browser, server, golden) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 120, poll_frequency=0.05)
    case = golden.cases["one_image"]
    browser.get(f"{server.url}/?temperature=0&max_tokens={golden.max_new_tokens}")  # greedy: the golden answer
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "ready"))
    assert browser.find_element(By.ID, "model").text == "qwen-vl-chat"

    browser.find_element(By.ID, "photo-input").send_keys(str(golden.images["sign"]))
    wait.until(lambda d: d.execute_script("const i = document.getElementById('photo');"
                                          "return !document.getElementById('figure').hidden && i.naturalWidth > 0"))

    def ask(question: str, n_answers: int) -> str:
        browser.find_element(By.ID, "question").send_keys(question)
        browser.find_element(By.ID, "send").click()

        def answered(d):
            done = d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done")
            errors = d.find_elements(By.CSS_SELECTOR, ".msg.error")
            assert not errors, errors[0].text
            return len(done) >= n_answers and done[-1]
        answer = wait.until(answered)
        assert "tokens in" in answer.find_element(By.CLASS_NAME, "meta").text  # the usage chunk arrived
        assert int(answer.get_attribute("data-updates")) > 1  # the text grew piece by piece as it streamed
        text = answer.find_element(By.CLASS_NAME, "text").get_attribute("textContent")
        assert text.strip()
        return text

    assert ask(case["text"], 1) == case["generated_text"]
    ask("And what colour is it?", 2)
    messages = browser.find_elements(By.CSS_SELECTOR, "#transcript .msg")
    assert [m.get_attribute("class").split()[1] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[0].text == case["text"]

    # the random model writes no boxes: draw known ones through the page's own code path
    browser.execute_script("const i = document.getElementById('photo'), n = [120, 200, 880, 700];"
                           "drawBoxes([{label: 'the sign', norm: n, pixels: n.map((v, k) => "
                           "v / 1000 * (k % 2 ? i.naturalHeight : i.naturalWidth))}])")
    assert browser.find_element(By.CSS_SELECTOR, "#box-list li").text.startswith("the sign")
    painted = browser.execute_script(
        "const c = document.getElementById('boxes'); const g = c.getContext('2d');"
        "return Array.from(g.getImageData(Math.round(c.width * 0.12), Math.round(c.height * 0.45), 1, 1).data)")
    assert painted[3] > 0, painted  # the box's left edge is drawn over the photo

    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(SHOT))
    assert SHOT.stat().st_size > 10_000


@pytest.fixture(autouse=True)
def screenshot(browser):
    """A failed test leaves its screenshot too: what the page showed when it failed."""
    SHOT.unlink(missing_ok=True)
    yield
    if not SHOT.exists():
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(SHOT))


# --- helpers for the page's friction fixes (issue 25) ----------------------------------------------

# Every request body the page sends, kept in the page for the test to read.
RECORD_REQUESTS = """
window.sentBodies = [];
const realFetch = window.fetch;
window.fetch = (url, options) => {
  if (options && options.body) window.sentBodies.push(JSON.parse(options.body));
  return realFetch(url, options);
};"""

# Clicks a button the moment the streaming answer has grown `n` times (a person's Stop, without the
# race of a test polling for it).
CLICK_WHEN_GROWN = """
const [button, n] = arguments;
const observer = new MutationObserver(() => {
  const a = document.querySelector('.msg.assistant.streaming');
  if (a && Number(a.dataset.updates || 0) >= n) { observer.disconnect(); document.getElementById(button).click(); }
});
observer.observe(document.getElementById('transcript'),
                 {subtree: true, childList: true, attributes: true, attributeFilter: ['data-updates']});"""

# The page's photo as the browser decodes it: [r, g, b, a] at each (fx, fy) fraction of its size.
PIXELS_OF_SENT_PHOTO = """
const [points, done] = [arguments[0], arguments[arguments.length - 1]];
loadImage(state.photo).then((img) => {
  const c = document.createElement('canvas');
  c.width = img.naturalWidth; c.height = img.naturalHeight;
  const g = c.getContext('2d');
  g.drawImage(img, 0, 0);
  done(points.map(([fx, fy]) => Array.from(g.getImageData(Math.round(fx * c.width), Math.round(fy * c.height),
                                                         1, 1).data)));
});"""


def _wait(browser, timeout_s: float = 120):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout_s, poll_frequency=0.05)


def open_page(browser, server, query: str = "temperature=0&max_tokens=24") -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{server.url}/?{query}")
    _wait(browser).until(lambda d: "ready" in d.find_element(By.ID, "status").text)
    browser.execute_script(RECORD_REQUESTS)


def pick_photo(browser, path: Path) -> None:
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, "photo-input").send_keys(str(path))
    _wait(browser).until(lambda d: d.execute_script(
        "const i = document.getElementById('photo');"
        "return !document.getElementById('figure').hidden && i.naturalWidth > 0 && state.photo !== null"))


def type_question(browser, text: str) -> None:
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, "question").send_keys(text)


def wait_idle(browser, n_answers: int):
    """The page's answers once the newest is finished (done, stopped or failed)."""
    from selenium.webdriver.common.by import By

    def idle(d):
        errors = d.find_elements(By.CSS_SELECTOR, ".msg.error")
        assert not errors, errors[0].text
        busy = d.execute_script("return state.controller !== null")
        answers = d.find_elements(By.CSS_SELECTOR, ".msg.assistant")
        return not busy and len(answers) >= n_answers and answers
    return _wait(browser).until(idle)


def raw_text(answer) -> str:
    from selenium.webdriver.common.by import By

    return answer.find_element(By.CLASS_NAME, "raw").get_attribute("textContent")


def shown_text(answer) -> str:
    from selenium.webdriver.common.by import By

    return answer.find_element(By.CLASS_NAME, "text").get_attribute("textContent")


def meta_text(answer) -> str:
    from selenium.webdriver.common.by import By

    return answer.find_element(By.CLASS_NAME, "meta").get_attribute("textContent")


def png_pixel(png: bytes, fx: float, fy: float) -> tuple[int, ...]:
    image = Image.open(io.BytesIO(png)).convert("RGB")
    return image.getpixel((round(fx * (image.width - 1)), round(fy * (image.height - 1))))


def half_transparent_png(path: Path, side: int, noise: bool = False) -> Path:
    """Left half fully transparent (its colour red, or noise: what a flattening must not show), right
    half opaque blue (or noise)."""
    rng = np.random.default_rng(0)
    rgba = np.zeros((side, side, 4), np.uint8)
    if noise:
        rgba[..., :3] = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    else:
        rgba[:, : side // 2] = (255, 0, 0, 0)
        rgba[:, side // 2:, 2] = 255
    rgba[:, side // 2:, 3] = 255
    Image.fromarray(rgba, "RGBA").save(path, compress_level=1)
    return path


def is_white(rgb, tolerance: int = 12) -> bool:
    return all(c >= 255 - tolerance for c in rgb[:3])


# --- Stop keeps the partial answer in the conversation --------------------------------------------

def test_stop_keeps_the_partial_answer_and_sends_it_with_the_next_question(browser, server, golden) -> None:
    from selenium.webdriver.common.by import By

    open_page(browser, server, "temperature=0&max_tokens=200")
    pick_photo(browser, golden.images["sign"])
    browser.execute_script(CLICK_WHEN_GROWN, "stop", 3)
    type_question(browser, "What is on the sign?")
    browser.find_element(By.ID, "send").click()
    first = wait_idle(browser, 1)[0]
    assert "stopped" in first.get_attribute("class").split()
    assert first.is_displayed()
    partial = raw_text(first)
    assert partial and shown_text(first) == partial  # the partial answer is still there, readable
    assert meta_text(first).startswith("stopped after ")

    browser.execute_script(CLICK_WHEN_GROWN, "stop", 2)  # a second stop, in the second turn
    type_question(browser, "Go on.")
    browser.find_element(By.ID, "send").click()
    second = wait_idle(browser, 2)[1]
    assert "stopped" in second.get_attribute("class").split()
    partial2 = raw_text(second)

    type_question(browser, "And then?")
    browser.find_element(By.ID, "send").click()
    wait_idle(browser, 3)
    sent = browser.execute_script("return window.sentBodies")
    assert [m["role"] for m in sent[1]["messages"]] == ["user", "assistant", "user"]
    assert sent[1]["messages"][1] == {"role": "assistant", "content": partial}
    assert sent[1]["messages"][0]["content"][0]["type"] == "image_url"  # the photo stays in the first turn
    assert sent[2]["messages"][1:4] == [{"role": "assistant", "content": partial},
                                        {"role": "user", "content": "Go on."},
                                        {"role": "assistant", "content": partial2}]
    roles = [m.get_attribute("class").split()[1] for m in browser.find_elements(By.CSS_SELECTOR, "#transcript .msg")]
    assert roles == ["user", "assistant"] * 3
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "server-page-stopped.png"))


def test_stop_before_the_first_word_keeps_the_question_in_the_conversation(browser, server, golden) -> None:
    from selenium.webdriver.common.by import By

    open_page(browser, server, "temperature=0&max_tokens=8")
    pick_photo(browser, golden.images["sign"])
    type_question(browser, "What is on the sign?")
    browser.execute_script("document.getElementById('send').click(); document.getElementById('stop').click();")
    answer = wait_idle(browser, 1)[0]
    assert "stopped" in answer.get_attribute("class").split()
    assert meta_text(answer) == "stopped before the answer began"
    type_question(browser, "Hello?")
    browser.find_element(By.ID, "send").click()
    wait_idle(browser, 2)
    sent = browser.execute_script("return window.sentBodies")
    assert [m["role"] for m in sent[-1]["messages"]] == ["user", "assistant", "user"]
    assert sent[-1]["messages"][1] == {"role": "assistant", "content": ""}


def test_new_chat_while_streaming_leaves_nothing_of_the_old_chat(browser, server, golden) -> None:
    from selenium.webdriver.common.by import By

    open_page(browser, server, "temperature=0&max_tokens=200")
    pick_photo(browser, golden.images["sign"])
    browser.execute_script(CLICK_WHEN_GROWN, "new-chat", 2)
    type_question(browser, "What is on the sign?")
    browser.find_element(By.ID, "send").click()
    _wait(browser).until(lambda d: d.execute_script("return state.controller === null"))
    assert browser.find_elements(By.CSS_SELECTOR, "#transcript .msg") == []
    browser.execute_script(CLICK_WHEN_GROWN, "stop", 2)
    type_question(browser, "Fresh question")
    browser.find_element(By.ID, "send").click()
    wait_idle(browser, 1)
    sent = browser.execute_script("return window.sentBodies")
    assert len(sent[-1]["messages"]) == 1 and sent[-1]["messages"][0]["role"] == "user"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#transcript .msg")) == 2


# --- transparent photos show on white, as the model sees them --------------------------------------

def test_transparent_png_shows_on_white_in_the_thumbnail_and_the_photo(browser, server, tmp_path) -> None:
    from selenium.webdriver.common.by import By

    open_page(browser, server, "temperature=0&max_tokens=2")
    pick_photo(browser, half_transparent_png(tmp_path / "half.png", 64))
    type_question(browser, "What is this?")
    browser.find_element(By.ID, "send").click()
    wait_idle(browser, 1)
    thumb = browser.find_element(By.CSS_SELECTOR, "#transcript .msg.user .thumb")  # the photo with the question
    png = thumb.screenshot_as_png
    assert is_white(png_pixel(png, 0.25, 0.5)), png_pixel(png, 0.25, 0.5)  # not the bubble's blue, not red
    assert png_pixel(png, 0.75, 0.5)[2] > 200 and png_pixel(png, 0.75, 0.5)[0] < 60
    photo = browser.find_element(By.ID, "photo")
    assert photo.value_of_css_property("background-color") in ("rgb(255, 255, 255)", "rgba(255, 255, 255, 1)")
    browser.execute_script("document.getElementById('drop').classList.add('over')")  # a new photo dragged over
    png = photo.screenshot_as_png
    assert is_white(png_pixel(png, 0.25, 0.5)), png_pixel(png, 0.25, 0.5)


def test_big_transparent_png_is_sent_flattened_on_white(browser, server, tmp_path) -> None:
    big = half_transparent_png(tmp_path / "big.png", 1800, noise=True)
    assert big.stat().st_size > 8 * 1024 * 1024  # over the page's send limit: it re-encodes as JPEG
    open_page(browser, server)
    pick_photo(browser, big)
    assert browser.execute_script("return state.photo.slice(0, 16)") == "data:image/jpeg;"
    left = browser.execute_async_script(PIXELS_OF_SENT_PHOTO, [[0.1, 0.2], [0.25, 0.5], [0.4, 0.9]])
    assert all(is_white(p, 20) for p in left), left  # transparent -> white, as the model sees it (not black)


# --- words, the empty page, the icon ---------------------------------------------------------------

def test_token_counts_are_pluralized(browser, server, golden) -> None:
    from selenium.webdriver.common.by import By

    open_page(browser, server, "temperature=0&max_tokens=1")
    pick_photo(browser, golden.images["sign"])
    type_question(browser, "One word?")
    browser.find_element(By.ID, "send").click()
    answer = wait_idle(browser, 1)[0]
    assert re.match(r"1 token in \d", meta_text(answer)), meta_text(answer)
    assert browser.execute_script("return [0, 1, 2, 24].map((n) => plural(n, 'token'))") == [
        "0 tokens", "1 token", "2 tokens", "24 tokens"]


def test_empty_page_shows_no_broken_image(browser, server, golden) -> None:
    from selenium.webdriver.common.by import By

    open_page(browser, server)
    for hidden in ("figure", "photo", "boxes", "stop"):
        assert not browser.find_element(By.ID, hidden).is_displayed(), hidden
    assert browser.execute_script("return document.getElementById('figure').getBoundingClientRect().width") == 0
    assert browser.find_element(By.ID, "drop-hint").is_displayed()
    pick_photo(browser, golden.images["sign"])
    assert browser.find_element(By.ID, "photo").is_displayed()
    assert not browser.find_element(By.ID, "drop-hint").is_displayed()


def test_favicon_is_served(browser, server) -> None:
    r = httpx.get(server.url + "/favicon.ico", timeout=10)
    assert r.status_code == 200, r.status_code
    assert r.headers["content-type"] == "image/x-icon"
    assert Image.open(io.BytesIO(r.content)).size == (32, 32)
    open_page(browser, server)
    statuses = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "Promise.all(['/favicon.ico', document.querySelector('link[rel=icon]').href].map((u) => fetch(u)"
        ".then((r) => r.status + ' ' + r.headers.get('content-type')))).then(done)")
    assert statuses == ["200 image/x-icon", "200 image/svg+xml"], statuses


# --- grounded answers read as text with box chips --------------------------------------------------

GROUNDED = re.compile(r"<ref>(.+?)</ref><box>\((\d+),(\d+)\),\((\d+),(\d+)\)</box>")
GROUNDING_SHOT = ARTIFACTS / "server-page-grounding.png"


@pytest.fixture(scope="module")
def trained_server(trained_f32_bundle, tmp_path_factory):
    """The tiny trained model: it answers "Where is the red circle?" with a real <ref>/<box> answer."""
    yield from module_server(trained_f32_bundle, tmp_path_factory, "trained-server")


def ask_and_wait(browser, question: str, n_answers: int):
    from selenium.webdriver.common.by import By

    type_question(browser, question)
    browser.find_element(By.ID, "send").click()
    return wait_idle(browser, n_answers)[n_answers - 1]


def canvas_alpha(browser, fx: float, fy: float) -> int:
    return browser.execute_script(
        "const c = document.getElementById('boxes'), [fx, fy] = arguments;"
        "return c.getContext('2d').getImageData(Math.round(fx * c.width), Math.round(fy * c.height), 1, 1).data[3]",
        fx, fy)


def test_grounded_answer_reads_as_text_with_box_chips(browser, trained_server, tmp_path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    from qwenvl_edge.evaluation import task_images

    sample = task_images.make_set("grounding", 1, 7)[0]
    sample.image.save(tmp_path / "shapes.png")
    open_page(browser, trained_server, "temperature=0&max_tokens=48")
    pick_photo(browser, tmp_path / "shapes.png")
    answer = ask_and_wait(browser, sample.question, 1)
    raw = raw_text(answer)
    m = GROUNDED.search(raw)
    assert m, raw  # the trained model writes Qwen-VL's grounding tags
    phrase, norm = m.group(1), [int(v) for v in m.groups()[1:]]

    shown = shown_text(answer)
    assert "<ref>" not in shown and "<box>" not in shown and phrase in shown, shown
    assert answer.find_element(By.CLASS_NAME, "ref").text == phrase
    chips = answer.find_elements(By.CLASS_NAME, "chip")
    assert [c.get_attribute("textContent") for c in chips][:1] == ["1"]
    assert len(chips) == len(GROUNDED.findall(raw)) == len(browser.find_elements(By.CSS_SELECTOR, "#box-list li"))
    assert chips[0].value_of_css_property("background-color") == "rgba(230, 25, 75, 1)"  # the first box's colour
    assert browser.find_element(By.CSS_SELECTOR, "#box-list li").text.startswith(phrase)
    x1, y1, x2, y2 = (v / 1000 for v in norm)
    assert canvas_alpha(browser, x1, (y1 + y2) / 2) > 0  # its box is drawn on the photo

    # hover shows the chip's box highlighted; leaving shows the plain view again
    ActionChains(browser).move_to_element(chips[0]).perform()
    assert browser.find_elements(By.CSS_SELECTOR, "#box-list li.on")
    ActionChains(browser).move_to_element(browser.find_element(By.ID, "question")).perform()
    assert not browser.find_elements(By.CSS_SELECTOR, "#box-list li.on")
    # a click pins it: chip and list entry marked, the box drawn thicker; a second click unpins
    thin = sum(canvas_alpha(browser, x1 + dx / 1000, (y1 + y2) / 2) > 0 for dx in range(-8, 9))
    chips[0].click()
    assert "on" in chips[0].get_attribute("class").split()
    assert "on" in browser.find_element(By.CSS_SELECTOR, "#box-list li").get_attribute("class").split()
    thick = sum(canvas_alpha(browser, x1 + dx / 1000, (y1 + y2) / 2) > 0 for dx in range(-8, 9))
    assert thick > thin, (thin, thick)
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(GROUNDING_SHOT))
    chips[0].click()
    assert "on" not in chips[0].get_attribute("class").split()

    # the raw text is one click away, and back
    toggle = answer.find_element(By.CLASS_NAME, "raw-toggle")
    toggle.click()
    assert answer.find_element(By.CLASS_NAME, "raw").is_displayed()
    assert answer.find_element(By.CLASS_NAME, "raw").text == raw.strip()
    assert not answer.find_element(By.CLASS_NAME, "text").is_displayed()
    toggle.click()
    assert answer.find_element(By.CLASS_NAME, "text").is_displayed()
    assert not answer.find_element(By.CLASS_NAME, "raw").is_displayed()

    # a newer grounded answer (the tiny model grounds only first questions: added through the page's own
    # rendering): the photo shows its boxes; the older answer's chip still previews its own
    browser.execute_script("const a = addMessage('assistant', '');"
                           "renderAnswer(a, 'It is <ref>the other</ref><box>(600,500),(800,800)</box>.');"
                           "showAnswerBoxes(a);")
    listed = lambda: [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#box-list li")]  # noqa: E731
    assert [t.split(":")[0] for t in listed()] == ["the other"]
    ActionChains(browser).move_to_element(chips[0]).perform()
    assert listed()[0].startswith(phrase)
    ActionChains(browser).move_to_element(browser.find_element(By.ID, "question")).perform()
    assert [t.split(":")[0] for t in listed()] == ["the other"]


# renderAnswer on a detached message: (text, streaming) -> what a person reads, refs, chips' labels
RENDER = """
const [text, streaming] = arguments;
const li = document.createElement('li');
li.innerHTML = '<span class="text"></span><code class="raw" hidden></code>';
const boxes = renderAnswer(li, text, streaming);
return {shown: li.querySelector('.text').textContent, raw: li.querySelector('.raw').textContent,
        refs: Array.from(li.querySelectorAll('.ref')).map((r) => r.textContent),
        chips: Array.from(li.querySelectorAll('.chip')).map((c) => c.textContent),
        labels: boxes.map((b) => b.label), norms: boxes.map((b) => b.norm)};"""


@pytest.mark.parametrize(("text", "streaming", "shown", "refs", "labels", "norms"), [
    ("<ref>the cat</ref><box>(10,20),(300,400)</box> and <ref>the dog</ref><box>(500,500),(900,990)</box>"
     "<box>(1,2),(3,4)</box>", False, "the cat1 and the dog23", ["the cat", "the dog"],
     ["the cat", "the dog", "the dog"],
     [[10, 20, 300, 400], [500, 500, 900, 990], [1, 2, 3, 4]]),
    ("<ref>x</ref><box>(-5,20),(1200,900)</box>", False, "x1", ["x"], ["x"], [[0, 20, 1000, 900]]),  # clamped
    ("I see <ref>the d", True, "I see the d", ["the d"], [], []),  # a ref still being written
    ("I see <ref>the dog</ref><box>(12,3", True, "I see the dog", ["the dog"], [], []),  # half a box: held back
    ("It is <bo", True, "It is ", [], [], []),
    ("a < b, <box> not closed", False, "a < b, <box> not closed", [], [], []),  # finished: shown as written
])
def test_answer_rendering_of_grounding_tags(browser, server, text, streaming, shown, refs, labels, norms) -> None:
    if not browser.current_url.startswith(server.url):
        open_page(browser, server)
    got = browser.execute_script(RENDER, text, streaming)
    assert got["shown"] == shown
    assert got["raw"] == text
    assert got["refs"] == refs
    assert got["labels"] == labels and got["norms"] == norms
    assert got["chips"] == [str(i + 1) for i in range(len(norms))]
