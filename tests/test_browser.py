"""A real headless Chromium clicks through all six panels and watches a live run."""

import os
import time
from pathlib import Path

import pytest
from app_server import running_app

pytestmark = [pytest.mark.browser, pytest.mark.real_model]
CHROMIUM = "/usr/bin/chromium"
TABS = ["1 · Model & data", "2 · Ranks", "3 · Distill (live)", "4 · Chat", "5 · Evaluate & export", "6 · Explore"]
PLOT_POINTS = """() => Array.from(document.querySelectorAll('#loss-chart .js-plotly-plot'))
    .map(gd => (gd.data || []).reduce((n, t) => n + (t.x ? t.x.length : 0), 0))"""


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is missing: `make test` installs it (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = Path(os.environ.get("LILLAMA_SCREENSHOT_DIR") or tmp_path_factory.mktemp("shots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def open_page(browser, url):
    page = browser.new_page(viewport={"width": 1440, "height": 1000})
    page.goto(url)
    page.get_by_role("tab", name=TABS[0]).wait_for(timeout=60_000)
    return page


def loss_points(page) -> int:
    counts = page.evaluate(PLOT_POINTS)
    return counts[0] if counts else 0


@pytest.fixture(scope="module")
def studio_url(tmp_path_factory, smollm):
    """The app on the built-in model, its calibration set and a small bottom-first plan, ready to distil."""
    from gradio_client import Client

    with running_app(tmp_path_factory.mktemp("browser"), "--no-preload") as url:
        client = Client(url, verbose=False)
        client.predict("smollm2-135m-instruct", "", False, False, api_name="/load_model")
        client.predict("Built-in", "", "", "", "train", 4096, 128, 4, 0.0, api_name="/calibration")
        client.predict("bottom", 3, 30, 0, ["attention", "mlp"], api_name="/apply_preset")
        yield url, client


def test_a_live_run_draws_its_losses_and_a_new_tab_reattaches(browser, shots, studio_url):
    url, client = studio_url
    page = open_page(browser, url)
    page.screenshot(path=shots / "1-model.png", full_page=True)
    page.get_by_role("tab", name=TABS[1]).click()
    page.get_by_text("modules compressed").wait_for(timeout=120_000)
    page.screenshot(path=shots / "2-ranks.png", full_page=True)

    page.get_by_role("tab", name=TABS[2]).click()
    page.get_by_role("button", name="▶ Start").click()
    page.wait_for_function(f"({PLOT_POINTS})()[0] > 0", timeout=120_000)
    first = loss_points(page)
    page.wait_for_function(f"({PLOT_POINTS})()[0] > {first}", timeout=120_000)
    assert loss_points(page) > first  # the live loss chart keeps gaining points
    page.screenshot(path=shots / "3-distill.png", full_page=True)

    # Closing the tab does not stop the run; a new tab re-attaches on the live panel.
    page.close()
    page = open_page(browser, url)
    page.locator("button[role=tab][aria-selected=true]", has_text="Distill").wait_for(timeout=30_000)
    assert client.predict(api_name="/status")["status"] == "running"
    page.wait_for_function(f"({PLOT_POINTS})()[0] > 0", timeout=60_000)
    deadline = time.time() + 300
    while client.predict(api_name="/status")["status"] == "running" and time.time() < deadline:
        time.sleep(1)
    assert client.predict(api_name="/status")["status"] == "completed"
    page.get_by_text("completed").first.wait_for(timeout=30_000)
    page.screenshot(path=shots / "3-distill-done.png", full_page=True)
    page.close()


def test_chat_evaluate_and_explore_panels_show_the_student(browser, shots, studio_url):
    url, client = studio_url
    if client.predict(api_name="/status")["status"] != "completed":
        pytest.skip("needs the student of the live-run test")
    page = open_page(browser, url)
    page.get_by_role("tab", name=TABS[3]).click()
    page.get_by_placeholder("Ask both models something…").fill("Name three fruits.")
    page.get_by_role("button", name="Send").click()
    page.get_by_text("tokens/s").nth(1).wait_for(timeout=120_000)
    page.wait_for_function("() => !document.body.innerText.includes('generating…')", timeout=120_000)
    assert page.get_by_text("tokens/s").count() >= 2  # one under each model's answer
    page.screenshot(path=shots / "4-chat.png", full_page=True)

    page.get_by_role("tab", name=TABS[4]).click()
    page.get_by_role("button", name="Evaluate teacher and student").wait_for()
    page.screenshot(path=shots / "5-evaluate.png", full_page=True)

    page.get_by_role("tab", name=TABS[5]).click()
    page.get_by_text("student saved").wait_for(timeout=30_000)
    page.screenshot(path=shots / "6-explore.png", full_page=True)
    page.close()
    assert sorted(p.name for p in shots.glob("*.png"))[:2] == ["1-model.png", "2-ranks.png"]
