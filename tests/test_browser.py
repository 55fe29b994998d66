"""The search page in a real browser: headless Chromium (Debian's chromium and chromium-driver, driven by
selenium) against `multimodal serve` in its own process, over real Flickr8k photos embedded by the tiny trained
model. Types a query, waits for the grid, checks the results and captions in score order, the address, alt text
and keys, uploads a photo, clicks a result, and saves a screenshot.

`make test` installs the browser where it can (`make browser`: apt-get as root); elsewhere these tests skip,
saying why. MULTIMODAL_SCREENSHOT=PATH also writes the screenshot there (docs/serve.png was made so).
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import limit_memory
from tests.layouts import flickr_photos

CHROMIUM = next((found for name in ("chromium", "chromium-browser", "google-chrome") if (found := shutil.which(name))),
                None)
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="no headless Chromium here: `make browser` "
                                "installs Debian's chromium and chromium-driver (as root)")
TOKEN = "page-token"
PHOTOS = 40
WAIT = 60  # seconds: the longest a page waits for an answer before the test fails


@pytest.fixture(scope="module")
def server(trained, flickr, tmp_path_factory):
    """`multimodal serve --token` over 40 Flickr8k photos (shards of the full-size JPEGs and their captions)."""
    from multimodal.cli import main
    from multimodal.data.shards import write_csv

    root = tmp_path_factory.mktemp("browser")
    photos = flickr_photos(flickr, PHOTOS)
    lines = (flickr / "captions.txt").read_text(encoding="utf-8").splitlines()
    names = {name for name, _, _ in photos}
    (root / "used.csv").write_text("\n".join([lines[0], *(r for r in lines[1:] if r.split(",")[0] in names)]))
    write_csv(root / "used.csv", flickr / "images", root / "shards", shard_size=20, workers=1)
    saved = os.getcwd()
    os.chdir(root)
    try:
        assert main(["embed", "--checkpoint", str(trained[0]), "--shards", str(root / "shards"), "--out",
                     str(root / "emb"), "--num_workers", "0"]) == 0
    finally:
        os.chdir(saved)
    proc = subprocess.Popen([sys.executable, "-m", "multimodal", "serve", "--index", str(root / "emb"), "--port", "0",
                             "--token", TOKEN], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"}, preexec_fn=limit_memory)
    line = proc.stdout.readline()
    found = re.search(r"(http://127\.0\.0\.1:\d+/)#token=", line)
    if found is None:
        proc.kill()
        pytest.fail(f"serve did not start: {line}{proc.stderr.read()[-2000:]}")
    yield found.group(1), photos, flickr
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in err, err[-2000:]


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: pip install -e '.[test]'")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,900", "--no-first-run", "--disable-extensions"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(driver, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT, poll_frequency=0.1).until(lambda d: condition(d), message=what)


def grid(driver) -> list[dict]:
    """The results as shown: row, score, caption, alt text, and whether the thumbnail has loaded."""
    return driver.execute_script("""
        return [...document.querySelectorAll('#grid a.hit')].map((a) => {
            const img = a.querySelector('img');
            return {row: +a.dataset.row, score: +a.dataset.score, caption: a.querySelector('.caption').textContent,
                    alt: img ? img.alt : null, loaded: !!img && img.complete && img.naturalWidth > 0};
        });""")


def shown(driver, count: int, first_row: int | None = None, first_score: float | None = None):
    """Waits for a grid of `count` results whose thumbnails have loaded (and whose first is `first_row`, or scores
    above `first_score`: the new search's grid, not the one it replaces, which a slow answer leaves a while)."""
    def ready(d):
        hits = grid(d)
        return hits if len(hits) == count and all(h["loaded"] for h in hits) and \
            (first_row is None or hits[0]["row"] == first_row) and \
            (first_score is None or hits[0]["score"] > first_score) else False
    return wait_for(driver, ready, f"a grid of {count} loaded results")


def test_search_upload_and_click_in_a_real_browser(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, photos, flickr = server
    captions = {caption for _, _, found in photos for caption in found}
    browser.get(url + "#token=" + TOKEN)
    wait_for(browser, lambda d: "of emb with tiny" in d.find_element(By.ID, "status").text, "the page to load")
    assert "token" not in browser.current_url  # taken out of the address, kept for the tab

    box = browser.find_element(By.ID, "q")
    box.send_keys("a dog runs through the grass", Keys.ENTER)
    hits = shown(browser, 8)
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert all(h["caption"] in captions and h["alt"] == h["caption"] for h in hits)  # real captions, as alt text
    assert re.search(r"\?q=a\+dog\+runs\+through\+the\+grass&k=8&target=images$", browser.current_url)
    texts = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#grid .score")]
    assert texts[0].startswith("#1") and f"{scores[0]:.4f}" in texts[0]

    body = browser.find_element(By.TAG_NAME, "body")
    browser.find_elements(By.CSS_SELECTOR, "#grid a.hit")[0].send_keys(Keys.ARROW_RIGHT)
    assert browser.switch_to.active_element.get_attribute("data-row") == str(hits[1]["row"])
    body.send_keys("/")
    assert browser.switch_to.active_element.get_attribute("id") == "q"

    name, _, its_captions = photos[7]
    browser.find_element(By.ID, "file").send_keys(str(flickr / "images" / name))
    wait_for(browser, lambda d: name in d.find_element(By.ID, "query").text, "the uploaded image's query")
    hits = shown(browser, 8, first_score=0.999)  # the photo finds itself first
    assert hits[0]["caption"] in its_captions

    chosen = hits[2]["row"]
    browser.find_elements(By.CSS_SELECTOR, "#grid a.hit")[2].click()
    wait_for(browser, lambda d: d.current_url.endswith(f"?row={chosen}&k=8&target=images"), "the row's address")
    hits = shown(browser, 8, first_row=chosen)
    assert hits[0]["score"] > 0.999
    assert f"Like row {chosen}" in browser.find_element(By.ID, "query").text

    browser.get(url + "?q=two+people&k=16")  # a shared address: the same search, the token kept for the tab
    assert len(shown(browser, 16)) == 16 and browser.find_element(By.ID, "q").get_attribute("value") == "two people"
    time.sleep(0.3)  # the thumbnails' last paint
    screenshot = tmp_path / "serve.png"
    assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 20_000
    if os.environ.get("MULTIMODAL_SCREENSHOT"):
        shutil.copy(screenshot, Path(os.environ["MULTIMODAL_SCREENSHOT"]))
