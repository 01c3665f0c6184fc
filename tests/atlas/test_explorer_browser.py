"""The atlas explorer in a real browser: Debian's Chromium driven by Playwright, against
`python -m train.feature_atlas serve` on a tiny trained run. The overview lists the features;
dragging a slider regenerates the image continuously (its pixels change, the activation
follows the last position); the random walk plays and pauses; a saved movie downloads and
decodes to its frames. A screenshot of the feature view and the measured slider-to-image
latencies are written next to the test's runs (`explorer_feature_view.png`,
`explorer_latency.json`). Chromium missing is a failure, not a skip."""

import io
import json
import statistics
import subprocess
import sys
import time

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from jaxmed.atlas.inference import read_atlas
from tests.atlas.conftest import run_copy
from tests.programs import ROOT, free_port, program_env

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def server(tmp, trainings):
    workdir = run_copy(tmp, trainings, "explorer_browser")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "train.feature_atlas", "serve", "--workdir", str(workdir),
         "--port", str(port)], cwd=ROOT, env=program_env(tmp / "jax_cache"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    if f":{port}/" not in line:
        process.kill()
        pytest.fail(f"the server did not start: {line}{process.stderr.read()[-3000:]}")
    yield f"http://127.0.0.1:{port}/", workdir
    process.terminate()
    process.wait(timeout=60)


@pytest.fixture(scope="module")
def page(server):
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(server[0])
        page.wait_for_function("window.atlasExplorer && window.atlasExplorer.ready")
        yield page
        assert not errors, errors
        browser.close()


def _explorer(page) -> dict:
    return page.evaluate("() => ({renders: window.atlasExplorer.renders, "
                         "latencies: window.atlasExplorer.latencies, "
                         "last: window.atlasExplorer.last})")


def _pixels(page, selector: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(page.locator(selector).screenshot())).convert("RGB"))


def _settled(page) -> dict:
    """The explorer's state once no request is in flight and nothing is pending."""
    previous = -1
    for _ in range(100):
        state = _explorer(page)
        if state["renders"] == previous:
            return state
        previous = state["renders"]
        time.sleep(0.3)
    raise AssertionError("the page kept rendering")


def test_the_explorer_in_chromium(page, server, tmp):
    nodes = read_atlas(server[1] / "atlas")["chosen"]
    # The overview: one card per feature, with library crops.
    cards = page.locator(".card")
    expect(cards).to_have_count(len(nodes))
    assert [cards.nth(i).get_attribute("data-node") for i in range(len(nodes))] == nodes
    assert page.locator(".card img.crop").count() >= len(nodes)

    # The feature view of the first feature: the centre image and its activation.
    cards.first.click()
    expect(page.locator("#feature")).to_be_visible()
    page.wait_for_function("window.atlasExplorer.renders >= 1")
    before = _settled(page)
    pixels_before = _pixels(page, "#generated")
    value_before = page.locator("#activation-value").inner_text()

    # Drag the first slider from the centre to its right end: the image follows while dragging.
    slider = page.locator("#z0").bounding_box()
    y = slider["y"] + slider["height"] / 2
    page.mouse.move(slider["x"] + slider["width"] / 2, y)
    page.mouse.down()
    for k in range(1, 31):
        page.mouse.move(slider["x"] + slider["width"] / 2 + k * slider["width"] / 60, y)
        time.sleep(0.03)
    page.mouse.up()
    after = _settled(page)
    assert after["renders"] >= before["renders"] + 3, "the image did not follow the drag"
    final = float(page.locator("#z0").input_value())
    assert final > 2.5
    assert after["last"]["z"][0] == pytest.approx(final, abs=1e-3)  # the last position shown
    assert not np.array_equal(_pixels(page, "#generated"), pixels_before)
    value = page.locator("#activation-value").inner_text()
    assert value == f"{after['last']['activation']['value']:.3f}"
    assert value != value_before or after["last"]["activation"] != before["last"]["activation"]
    latencies = after["latencies"][len(before["latencies"]):]
    page.screenshot(path=str(tmp / "explorer_feature_view.png"), full_page=True)
    (tmp / "explorer_latency.json").write_text(json.dumps({
        "updates": len(latencies), "median_ms": statistics.median(latencies),
        "p90_ms": float(np.percentile(latencies, 90)), "max_ms": max(latencies),
        "all_ms": latencies}, indent=2))

    # The random walk plays (the sliders and the image move) and pauses.
    page.locator("#speed").select_option("4")
    page.locator("#play").click()
    page.wait_for_function(f"window.atlasExplorer.renders >= {after['renders'] + 5}")
    assert float(page.locator("#z0").input_value()) != final
    page.locator("#pause").click()
    paused = _settled(page)
    time.sleep(1.0)
    assert _explorer(page)["renders"] == paused["renders"], "the walk did not pause"

    # Save a movie: the link appears, the download decodes to the frames asked for.
    page.locator("#movie-format").select_option("mp4")
    page.locator("#movie-frames").fill("12")
    page.locator("#save-movie").click()
    link = page.locator("#movie-link")
    expect(link).to_be_visible(timeout=60_000)
    with page.expect_download() as download:
        link.click()
    path = tmp / "explorer_download.mp4"
    download.value.save_as(path)
    assert iio.imread(path, index=None).shape[0] == 12

    # The library browser: every crop, and its source image on click.
    library = page.locator("#library figure")
    count = read_atlas(server[1] / "atlas")["library_sizes"][nodes[0]]
    expect(library).to_have_count(count)
    library.first.click()
    expect(page.locator("#source-view")).to_be_visible()
    page.wait_for_function("document.getElementById('source-image').naturalWidth === 32")
