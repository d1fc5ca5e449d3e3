"""The app in Gradio's dark and light themes, in a real headless Chromium, without a model (fast): cards take
the theme's colours and empty tables show their column names."""

import pytest
from app_server import running_app
from test_browser import TABS, browser, open_page, shots  # noqa: F401 - fixtures shared with the live-run test

pytestmark = pytest.mark.browser

CARD_COLOURS = """() => { const s = getComputedStyle(document.querySelector('.progress-wrap'));
    return [s.color, s.backgroundColor]; }"""


def _rgb(css: str) -> tuple[float, ...]:
    """'rgb(1, 2, 3)' or 'rgba(1, 2, 3, 0.5)' as numbers."""
    return tuple(float(v) for v in css[css.index("(") + 1:-1].split(","))


def _luminance(rgb: tuple[float, ...]) -> float:
    """WCAG relative luminance of an sRGB colour."""
    def linear(c):
        c /= 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(c) for c in rgb[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def _contrast(a: float, b: float) -> float:
    return (max(a, b) + 0.05) / (min(a, b) + 0.05)


@pytest.fixture(scope="module")
def bare_app(tmp_path_factory):
    with running_app(tmp_path_factory.mktemp("theme"), "--no-preload") as url:
        yield url


@pytest.mark.parametrize("theme", ["dark", "light"])
def test_cards_and_empty_tables_follow_the_theme(browser, shots, bare_app, theme):  # noqa: F811
    page = open_page(browser, f"{bare_app}?__theme={theme}")
    page.get_by_role("tab", name=TABS[2]).click()
    page.locator(".progress-wrap").wait_for(timeout=30_000)
    text, background = (_rgb(c) for c in page.evaluate(CARD_COLOURS))
    assert len(background) == 3 or background[3] > 0.5  # the card paints its own background
    text_lum, back_lum = _luminance(text), _luminance(background)
    assert _contrast(text_lum, back_lum) >= 4.5, (theme, text, background)  # WCAG AA for body text
    assert (back_lum < 0.2) if theme == "dark" else (back_lum > 0.6)  # the card follows the theme
    headers = page.get_by_role("columnheader")
    assert "loss T-in" in " ".join(headers.all_inner_texts())  # an empty table names its columns, not "1 2 3"
    page.screenshot(path=shots / f"theme-{theme}-distill.png", full_page=True)

    page.get_by_role("tab", name=TABS[4]).click()
    page.get_by_role("columnheader", name="perplexity").first.wait_for(timeout=30_000)
    page.screenshot(path=shots / f"theme-{theme}-evaluate.png", full_page=True)
    page.close()
