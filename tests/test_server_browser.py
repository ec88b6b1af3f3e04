"""The photo page in a real headless Chromium (Debian's package, driven by Selenium): pick a photo,
ask, the streamed answer appears, a follow-up keeps the conversation; a screenshot is kept in
``test-artifacts/`` for a person to look at.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.server_harness import ServerProcess, require_tool

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
    s = ServerProcess(f32_bundle, tmp_path_factory.mktemp("server"))
    yield s
    assert s.stop() == 0
    assert "Traceback" not in s.log(), s.log()


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
