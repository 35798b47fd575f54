"""The search page in a real browser (headless Chromium through Selenium) against
`python -m albef_ds.serve`: load, search, see the images, open the per-word heat maps, ask a VQA
checkpoint about an uploaded image; then bad input (an empty query, an index made by another
model, a non-image and an oversized upload, a question to a server without VQA) shown on the
page and answered 4xx with a message over HTTP, the server answering afterwards. A screenshot of
each state lands in the test's temporary folder."""
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from search_helpers import heldout_corpus, index_args, other_albef, run_command, vqa_checkpoint

from albef_ds.index import main as index_main

PRETRAINED = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "tiny_pretrained.safetensors")
ANSWERS = ["red", "yes", "no", "two red", "left", "2", "circle", "purple", "square", "top"]
UPLOAD_LIMIT_MB = 0.02              # 20,971 bytes: a 64 px shapes PNG passes, a noise PNG does not
QUERY = "two large red circles on the left"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(url: str, process=None, timeout: float = 180) -> None:
    import httpx

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the server stopped: {process.stdout.read()}")
        try:
            if httpx.get(f"{url}/api/info", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {timeout} s")


def in_thread_server(argv: list, port: int):
    """`python -m albef_ds.serve argv` served by uvicorn in a thread of this process."""
    import uvicorn

    from albef_ds.serve import build_app, parse_args

    app, _ = build_app(parse_args(argv + ["--port", str(port)]))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    return server, thread


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1400",
                 "--disable-gpu"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    folder = tmp_path_factory.mktemp("site")
    shards = heldout_corpus(str(folder / "corpus"))
    for name, checkpoint in (("shapes", PRETRAINED), ("other", other_albef(str(folder / "other.pt")))):
        code, _, err = run_command(index_main, index_args(checkpoint, shards, str(folder / name)))
        assert code == 0, err
    (folder / "answers.json").write_text(json.dumps(ANSWERS))
    vqa = vqa_checkpoint(str(folder / "vqa.pt"))
    with_vqa, without_vqa = free_port(), free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "albef_ds.serve", "--index", f"shapes={folder / 'shapes'}", "--index",
         f"other={folder / 'other'}", "--vqa", vqa, "--answer_list", str(folder / "answers.json"), "--port",
         str(with_vqa), "--rerank", "16", "--workers", "0", "--max_upload_mb", str(UPLOAD_LIMIT_MB)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    server = driver = None
    try:
        url = f"http://127.0.0.1:{with_vqa}"
        server, _ = in_thread_server(["--index", str(folder / "shapes"), "--rerank", "16", "--workers", "0"],
                                     without_vqa)
        wait_until_serving(url, process)
        wait_until_serving(f"http://127.0.0.1:{without_vqa}")
        driver = browser()
        yield {"url": url, "plain_url": f"http://127.0.0.1:{without_vqa}", "driver": driver, "folder": folder}
    finally:
        if driver is not None:
            driver.quit()
        if server is not None:
            server.should_exit = True
        process.terminate()
        process.wait(30)


def shapes_png(folder) -> str:
    """A held-out image of the corpus as a PNG file to upload."""
    import random

    from albef_ds.synthetic.shapes import ALL_ATTRIBUTES, render

    path = str(folder / "upload.png")
    render(ALL_ATTRIBUTES[0], 64, random.Random(0)).save(path)
    return path


def wait_for(driver, condition, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


def shown_error(driver) -> str:
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, "error")
    return box.text if box.is_displayed() else ""


def search_on_page(driver, text: str, index: str = "shapes") -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, "index-select")).select_by_value(index)
    query = driver.find_element(By.ID, "query")
    query.clear()
    query.send_keys(text)
    driver.find_element(By.ID, "search-button").click()


def ask_on_page(driver, path: str, question: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "vqa-image").send_keys(path)
    box = driver.find_element(By.ID, "vqa-question")
    box.clear()
    box.send_keys(question)
    driver.find_element(By.ID, "vqa-button").click()


def test_search_heat_map_and_answer_in_the_browser(site, tmp_path):
    from selenium.webdriver.common.by import By

    driver = site["driver"]
    driver.get(site["url"])
    wait_for(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#index-select option")) == 2)
    assert driver.title == "ALBEF-DS search" and shown_error(driver) == ""
    driver.save_screenshot(str(tmp_path / "1_page.png"))

    search_on_page(driver, QUERY)
    figures = wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#results figure.result"))
    assert len(figures) == 12
    wait_for(driver, lambda d: d.execute_script(
        "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth === 64)"))
    labels = [f.find_element(By.TAG_NAME, "figcaption").text for f in figures]
    assert labels[0].startswith("#1 ITM") and "heldout-" in labels[0]
    status = driver.find_element(By.ID, "status").text
    assert "16 re-ranked by ITM" in status
    driver.save_screenshot(str(tmp_path / "2_results.png"))

    figures[0].click()
    wait_for(driver, lambda d: d.find_element(By.ID, "heatmap").is_displayed())
    panels = driver.find_elements(By.CSS_SELECTOR, "#heatmap-panels figure")
    words = [p.find_element(By.TAG_NAME, "figcaption").text for p in panels]
    assert words == ["whole sentence"] + QUERY.split()
    assert all(p.find_element(By.TAG_NAME, "img").get_attribute("src").startswith("data:image/png;base64,")
               for p in panels)
    assert "Grad-CAM" in driver.find_element(By.ID, "heatmap-title").text
    driver.save_screenshot(str(tmp_path / "3_heat_map.png"))

    ask_on_page(driver, shapes_png(tmp_path), "what colour is the shape")
    answers = wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#answers li"))
    assert len(answers) == 5 and shown_error(driver) == ""
    shares = []
    for item in answers:
        answer, share = item.text.rsplit(" (", 1)
        assert answer in ANSWERS
        shares.append(float(share.rstrip("%)")))
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 100.05
    driver.find_element(By.ID, "vqa").location_once_scrolled_into_view
    driver.save_screenshot(str(tmp_path / "4_answer.png"))


def test_bad_input_shown_on_the_page_and_answered_4xx(site, tmp_path):
    import httpx
    from PIL import Image
    from selenium.webdriver.common.by import By

    driver, url = site["driver"], site["url"]
    driver.get(url)
    wait_for(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#index-select option")) == 2)
    search_on_page(driver, "   ")
    assert "400" in wait_for(driver, shown_error) and "empty" in shown_error(driver)
    driver.save_screenshot(str(tmp_path / "5_empty_query.png"))
    search_on_page(driver, QUERY, index="other")
    assert "409" in wait_for(driver, lambda d: "409" in shown_error(d) and shown_error(d))
    assert "made by another model" in shown_error(driver)
    driver.save_screenshot(str(tmp_path / "6_other_model.png"))

    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    ask_on_page(driver, str(text_file), "what colour is the shape")
    assert "415" in wait_for(driver, lambda d: "415" in shown_error(d) and shown_error(d))
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (160, 160, 3), dtype=np.uint8)).save(noise)
    assert noise.stat().st_size > UPLOAD_LIMIT_MB * (1 << 20)
    ask_on_page(driver, str(noise), "what colour is the shape")
    assert "413" in wait_for(driver, lambda d: "413" in shown_error(d) and shown_error(d))
    driver.save_screenshot(str(tmp_path / "7_oversized_upload.png"))

    driver.get(site["plain_url"])                  # a server without a VQA model
    wait_for(driver, lambda d: "No VQA model" in d.find_element(By.ID, "vqa-note").text)
    ask_on_page(driver, shapes_png(tmp_path), "what colour is the shape")
    assert "409" in wait_for(driver, lambda d: "409" in shown_error(d) and shown_error(d))
    assert "--vqa" in shown_error(driver)
    driver.save_screenshot(str(tmp_path / "8_no_vqa_model.png"))

    png = open(shapes_png(tmp_path), "rb").read()
    question = {"question": "what colour is the shape"}
    bad = [
        (httpx.post(f"{url}/api/search", json={"text": ""}), 400, "empty"),
        (httpx.post(f"{url}/api/search", json={"text": QUERY, "index": "other"}), 409, "another model"),
        (httpx.post(f"{url}/api/search", json={"text": QUERY, "index": "nope"}), 404, "no index named"),
        (httpx.post(f"{url}/api/search", json={"text": QUERY, "k": 1000}), 422, "k:"),
        (httpx.get(f"{url}/api/images/shapes/100000"), 404, "rows 0..95"),
        (httpx.post(f"{url}/api/answer", files={"image": ("a.txt", b"text", "text/plain")}, data=question), 415,
         "not an image"),
        (httpx.post(f"{url}/api/answer", files={"image": ("n.png", noise.read_bytes(), "image/png")},
                    data=question), 413, "larger than"),
        (httpx.post(f"{url}/api/answer", files={"image": ("big.png", b"0" * (200 << 10), "image/png")},
                    data=question), 413, "the request is larger"),          # refused before it is read
        (httpx.post(f"{site['plain_url']}/api/answer", files={"image": ("u.png", png, "image/png")},
                    data=question), 409, "no VQA model"),
    ]
    for response, status, message in bad:
        assert response.status_code == status and message in response.json()["detail"], response.text
    good = httpx.post(f"{url}/api/search", json={"text": QUERY, "k": 3}, timeout=60)
    assert good.status_code == 200 and len(good.json()["hits"]) == 3
    answered = httpx.post(f"{url}/api/answer", files={"image": ("u.png", png, "image/png")}, data=question,
                          timeout=60)
    assert answered.status_code == 200 and answered.json()["answers"][0]["answer"] in ANSWERS
    image = httpx.get(f"{url}/api/images/shapes/{good.json()['hits'][0]['row']}")
    assert image.headers["content-type"] == "image/png" and Image.open(io.BytesIO(image.content)).size == (64, 64)
    search_on_page(driver, QUERY)                  # the page goes on working after its errors
    wait_for(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results figure.result")) == 12)
    assert shown_error(driver) == ""
