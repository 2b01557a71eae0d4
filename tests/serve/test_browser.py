"""The web page in headless Chromium (Debian `chromium` + `chromium-driver`, driven by selenium):
type a prompt, click Generate, see the spinner and the clock, get the image; caption an upload.

Skips (with the reason) where chromium, chromedriver or selenium are missing; .ci/run installs them.
"""

from __future__ import annotations

import base64
import io
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from mars.serve.app import create_app

from .conftest import RecordingPipeline, live_server

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1200,900"]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e '.[dev]')")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    # an explicit chromedriver: selenium then never tries to download one
    browser = webdriver.Chrome(service=Service(driver), options=options)
    browser.set_page_load_timeout(30)
    yield browser
    browser.quit()


def wait_for(condition, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def fill(browser, element_id: str, text: str) -> None:
    element = browser.find_element("id", element_id)
    element.clear()
    element.send_keys(text)


def test_generate_in_the_browser(browser, tiny_pipeline, tmp_path):
    recording = RecordingPipeline(tiny_pipeline)
    with live_server(create_app(recording, model_name="tiny")) as url:
        browser.get(url + "/")
        wait_for(lambda: browser.find_element("id", "model-name").text, what="the model card")
        defaults = tiny_pipeline.sampling_settings()  # the form starts from the model's own settings
        for field in ("cfg_scale", "top_k", "top_p", "temperature"):
            assert float(browser.find_element("id", field).get_attribute("value")) == defaults[field], field
        fill(browser, "prompt", "一个红色的圆 a red circle")
        fill(browser, "seed", "5")
        fill(browser, "n", "2")
        recording.hold()  # keep the request in flight to see the progress indication
        browser.find_element("id", "generate").click()
        assert recording.inside.wait(20)
        progress = browser.find_element("id", "progress")
        assert progress.is_displayed() and not browser.find_element("id", "generate").is_enabled()
        first = browser.find_element("id", "elapsed").text
        wait_for(lambda: browser.find_element("id", "elapsed").text != first, what="the clock to tick")
        recording.gate.set()
        wait_for(lambda: browser.find_element("id", "status").get_attribute("data-state") == "done", what="images")
        assert not progress.is_displayed()
        browser.save_screenshot(str(tmp_path / "page.png"))

        images = browser.find_elements("css selector", "#gallery figure.result img")
        assert [img.get_attribute("data-seed") for img in images] == ["5", "6"]
        expected = tiny_pipeline.generate(["一个红色的圆 a red circle"] * 2, seed=5)
        size = tiny_pipeline.model.config.image_size
        for img, want in zip(images, expected):
            src = img.get_attribute("src")
            assert src.startswith("data:image/png;base64,")
            data = base64.b64decode(src.split(",", 1)[1])
            assert data[:8] == b"\x89PNG\r\n\x1a\n"
            png = Image.open(io.BytesIO(data))
            assert png.format == "PNG" and png.size == (size, size)
            assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) == size
            diff = np.abs(np.asarray(png.convert("RGB"), dtype=np.int16) - np.asarray(want, dtype=np.int16))
            assert diff.max() <= 1
        assert "seed 5" in browser.find_element("css selector", "#gallery figcaption").text

        # an API error shows its message instead of a result
        fill(browser, "prompt", "x" * 300)
        browser.find_element("id", "generate").click()
        wait_for(lambda: browser.find_element("id", "status").get_attribute("data-state") == "error", what="the error")
        assert "300 tokens" in browser.find_element("id", "status").text
        assert len(browser.find_elements("css selector", "#gallery img")) == 2
    assert recording.generate_calls == [["一个红色的圆 a red circle"] * 2]


def test_caption_an_upload_in_the_browser(browser, tiny_pipeline, tmp_path):
    picture = Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    path = tmp_path / "upload.png"
    picture.save(path)
    with live_server(create_app(tiny_pipeline, model_name="tiny")) as url:
        browser.get(url + "/")
        assert not browser.find_element("id", "caption-preview").is_displayed()  # nothing chosen yet
        browser.find_element("id", "caption-file").send_keys(str(path))
        assert browser.find_element("id", "caption-preview").is_displayed()
        browser.find_element("css selector", "#caption-lang option[value='zh']").click()
        browser.find_element("id", "caption").click()
        text = browser.find_element("id", "caption-text")
        wait_for(lambda: text.get_attribute("data-state") == "done", what="the caption")
        browser.save_screenshot(str(tmp_path / "caption.png"))
        assert text.get_property("textContent") == tiny_pipeline.caption([picture], lang="zh")[0]


def test_caption_settings_in_the_browser(browser, tiny_pipeline, tmp_path, edit_recorder):
    path = tmp_path / "upload.png"
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    with live_server(create_app(tiny_pipeline, model_name="tiny")) as url:
        browser.get(url + "/")
        wait_for(lambda: browser.find_element("id", "model-name").text, what="the model card")
        refine = browser.find_element("id", "caption-refine")
        assert refine.get_attribute("value") == str(tiny_pipeline.caption_config.refine)  # the model's own
        assert refine.get_attribute("max") == "4"  # the server's limits
        assert browser.find_element("id", "caption-rerank").get_attribute("max") == "8"
        browser.find_element("id", "caption-file").send_keys(str(path))
        fill(browser, "caption-rerank", "2")
        fill(browser, "caption-refine", "3")
        browser.find_element("id", "caption").click()
        text = browser.find_element("id", "caption-text")
        wait_for(lambda: text.get_attribute("data-state") == "done", what="the caption")
        assert text.get_property("textContent") == "edited 3"  # the stand-in's answer for 3 rounds
        assert browser.find_element("id", "caption-status").text.startswith("best of 2 · 3 rounds of edits")
    assert [rounds for *_, rounds in edit_recorder] == [3]


def test_negative_prompt_in_the_browser(browser, tiny_pipeline):
    with live_server(create_app(RecordingPipeline(tiny_pipeline), model_name="tiny")) as url:
        browser.get(url + "/")
        wait_for(lambda: browser.find_element("id", "model-name").text, what="the model card")
        fill(browser, "prompt", "a red circle")
        fill(browser, "negative_prompt", "a green star")
        fill(browser, "seed", "3")
        browser.find_element("id", "generate").click()
        wait_for(lambda: browser.find_element("id", "status").get_attribute("data-state") == "done", what="images")
        src = browser.find_element("css selector", "#gallery figure.result img").get_attribute("src")
        png = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB")
    (want,) = tiny_pipeline.generate("a red circle", seed=3, cfg_scale=4, negative_prompt="a green star")
    assert np.abs(np.asarray(png, dtype=np.int16) - np.asarray(want, dtype=np.int16)).max() <= 1
