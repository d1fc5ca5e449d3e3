"""The Ranks step's diagnostics in a real headless Chromium, on the tiny model: the damage heat map and a
module's spectrum render once the sensitivity is measured, and moving a layer's slider changes the prediction."""

import re

import pytest
from app_server import running_app
from test_browser import TABS, browser, open_page, shots  # noqa: F401 - fixtures shared with the other browser tests
from tiny import tiny_llama

from lillama_core.config import ModelConfig, RunConfig
from lillama_core.planning.ranks import ModelShape
from lillama_core.runtime.atomic import write_json

pytestmark = pytest.mark.browser
PREDICTION = "#plan-prediction"


def _finished_runs(runs, model: str) -> None:
    """Three finished runs of the model in the history, at three kept shares, for the perplexity fit."""
    shape = ModelShape.of(tiny_llama(layers=3).model)
    for keep, ppl in ((0.7, 44.0), (0.4, 60.0), (0.2, 90.0)):
        folder = runs / f"run-{keep}"
        folder.mkdir(parents=True)
        write_json(folder / "config.json", RunConfig(model=ModelConfig(name=model)).to_dict())
        write_json(folder / "plan.json", {"ranks": {m.name: m.rank_for_keep(keep) for m in shape.modules}})
        write_json(folder / "metrics.json", {"teacher_ppl": 40.0, "student_ppl": ppl})
        write_json(folder / "status.json", {"status": "completed"})


@pytest.fixture(scope="module")
def tiny_app(tmp_path_factory, tiny_model_dir):
    from gradio_client import Client

    tmp = tmp_path_factory.mktemp("ranks")
    _finished_runs(tmp / "runs", str(tiny_model_dir))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LILLAMA_MEASUREMENTS", str(tmp / "measurements"))
        with running_app(tmp, "--no-preload") as url:
            client = Client(url, verbose=False)
            client.predict("other", str(tiny_model_dir), False, False, api_name="/load_model")
            client.predict("Built-in", "", "", "", "train", 2048, 64, 4, 0.0, api_name="/calibration")
            client.predict("sensitivity", 20, 30, 0, ["attention", "mlp"], api_name="/apply_preset")
            yield url


def test_the_spectrum_and_heat_map_render_and_a_slider_moves_the_prediction(browser, shots, tiny_app):  # noqa: F811
    page = open_page(browser, f"{tiny_app}?__theme=dark")
    page.get_by_role("tab", name=TABS[1]).click()
    page.locator("#damage-heatmap .js-plotly-plot").wait_for(timeout=60_000)
    page.locator("#spectrum-chart .js-plotly-plot").wait_for(timeout=60_000)
    assert page.evaluate("() => document.querySelector('#damage-heatmap .js-plotly-plot').data[0].type") == "heatmap"
    prediction = page.locator(PREDICTION)
    prediction.get_by_text("leave-one-out over 3 runs").wait_for(timeout=30_000)
    before = prediction.inner_text()
    page.screenshot(path=shots / "ranks-diagnostics-dark.png", full_page=True)

    number = page.locator(".layer-grid input[type=number]").first  # layer 0's first group
    number.fill("10")
    number.press("Tab")  # leaving the box releases the slider, as letting go of its handle does
    page.wait_for_function(f"t => document.querySelector('{PREDICTION}').innerText !== t", arg=before,
                           timeout=30_000)
    damage = [float(re.search(r"training-free damage\s+([0-9.e+-]+)", text).group(1))
              for text in (before, prediction.inner_text())]
    assert damage[1] > damage[0]
    page.close()
