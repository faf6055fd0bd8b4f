"""The web page in a real headless Chromium (Debian's ``chromium`` + ``chromium-driver``, driven by Selenium):
type a prompt, Generate, wait for the image to render, check the settings shown, drop PNGs to restore the form.

Nothing downloads a browser: the test uses the system's chromium and chromedriver, and is skipped (saying why)
only when they are not installed. ``LDM_SERVE_SCREENSHOT=FILE`` saves a screenshot of the finished page.
"""

from __future__ import annotations

import base64
import io
import os
import shutil

import pytest
from PIL import Image, PngImagePlugin

webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (pip install -e '.[test]')")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                                reason="no chromium/chromedriver installed (apt-get install -y chromium chromium-driver)")
TIMEOUT_S = 60
# Selenium cannot drag a file from the desktop; this drops one through the page's own drop handler.
DROP = """
const [b64, name] = arguments;
const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
const transfer = new DataTransfer();
transfer.items.add(new File([bytes], name, { type: "image/png" }));
for (const type of ["dragenter", "dragover", "drop"]) {
  document.body.dispatchEvent(new DragEvent(type, { dataTransfer: transfer, bubbles: true, cancelable: true }));
}
"""


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,900",
                 "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    yield driver
    driver.quit()


def field(browser, name: str) -> str:
    return browser.find_element(By.ID, name).get_attribute("value")


def a1111_png() -> str:
    chunks = PngImagePlugin.PngInfo()
    chunks.add_text("parameters", "a lighthouse at dusk\nNegative prompt: blurry\nSteps: 9, Sampler: Euler a, "
                                  "CFG scale: 5.5, Seed: 123, Size: 48x56, Model hash: 0123456789")
    buffer = io.BytesIO()
    Image.new("RGB", (48, 56), "navy").save(buffer, format="PNG", pnginfo=chunks)
    return base64.b64encode(buffer.getvalue()).decode()


def test_generate_shows_the_image_and_its_settings_and_dropping_a_png_restores_the_form(server, browser):
    wait = WebDriverWait(browser, TIMEOUT_S)
    browser.get(server.url + "/")
    wait.until(lambda b: b.execute_script("return document.body.dataset.ready === '1'"))
    prompt = browser.find_element(By.ID, "prompt")
    prompt.send_keys("red apple")
    for name, value in (("steps", "4"), ("seed", "7"), ("num", "2")):
        element = browser.find_element(By.ID, name)
        element.clear()
        element.send_keys(value)
    Select(browser.find_element(By.ID, "sampler")).select_by_value("euler")
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "figure.result img")) == 2)
    images = browser.find_elements(By.CSS_SELECTOR, "figure.result img")
    wait.until(lambda b: all(b.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i) == 64
                             for i in images))
    captions = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "figure.result figcaption .settings")]
    assert sorted(captions) == ["seed 7 · 4 steps · Euler · CFG 3 · 64×64", "seed 8 · 4 steps · Euler · CFG 3 · 64×64"]
    assert "red apple" in browser.find_element(By.CSS_SELECTOR, "figure.result figcaption").text
    assert "done: 2 images" in browser.find_element(By.ID, "status").text
    link = browser.find_element(By.CSS_SELECTOR, "figure.result a").get_attribute("href")
    assert "/ldm/v1/images/" in link
    if os.environ.get("LDM_SERVE_SCREENSHOT"):
        browser.save_screenshot(os.environ["LDM_SERVE_SCREENSHOT"])

    browser.execute_script(DROP, a1111_png(), "lighthouse.png")  # an A1111 image restores the form
    wait.until(lambda b: field(b, "prompt") == "a lighthouse at dusk")
    assert (field(browser, "negative_prompt"), field(browser, "steps"), field(browser, "seed")) == ("blurry", "9", "123")
    assert (field(browser, "guidance"), field(browser, "width"), field(browser, "height")) == ("5.5", "48", "56")
    assert field(browser, "sampler") == "euler_a"
    assert "restored from lighthouse.png" in browser.find_element(By.ID, "status").text

    ldm_png = base64.b64encode(server.client.get(link.removeprefix(server.url)).content).decode()
    browser.execute_script(DROP, ldm_png, "apple.png")  # so does one of ldm's own
    wait.until(lambda b: field(b, "prompt") == "red apple")
    assert (field(browser, "steps"), field(browser, "sampler"), field(browser, "width")) == ("4", "euler", "64")
    assert field(browser, "seed") in ("7", "8")

    browser.find_element(By.ID, "prompt").clear()
    browser.find_elements(By.CSS_SELECTOR, "figure.result button.reuse")[0].click()  # "reuse" does the same
    assert field(browser, "prompt") == "red apple" and field(browser, "seed") in ("7", "8")
