"""The chat page in a real browser: headless Debian Chromium driven by Playwright (no browser
download), against a live server on loopback that requires an API key."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from medassist import DISCLAIMER

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (make browser)"
)
sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright Python package")


class _SlowStep:
    """Each generated token waits a little, so the answer visibly arrives in pieces."""

    def __call__(self, input_ids, scores, **kwargs):
        time.sleep(0.04)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


class _SlowModel:
    def __init__(self, model) -> None:
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)

    def generate(self, **kwargs):
        kwargs["stopping_criteria"].append(_SlowStep())
        return self._model.generate(**kwargs)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models are overhead-bound; one thread avoids oversubscribing a busy CPU (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def server_url(live_server):
    from medassist.config import ServeConfig
    from medassist.models import LoadedModel, load_for_inference
    from medassist.serving import create_app

    qwen = load_for_inference("tiny-qwen3")
    loaded = LoadedModel(_SlowModel(qwen.model), qwen.tokenizer, qwen.family, None, "tiny-qwen3")
    settings = ServeConfig(model_name="tiny-qwen3", api_key="ui-key", temperature=1.0, default_max_tokens=24)
    with live_server(create_app(loaded, settings)) as url:
        yield url


def test_chat_page_streams_an_answer_and_always_shows_the_disclaimer(server_url, tmp_path):
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 720})
            problems: list[str] = []
            foreign: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" and "401" not in m.text else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("request", lambda r: foreign.append(r.url) if not r.url.startswith((server_url, "data:")) else None)
            page.goto(server_url + "/")

            disclaimer = page.locator("#disclaimer")
            sync_api.expect(disclaimer).to_be_visible()
            sync_api.expect(disclaimer).to_have_text(DISCLAIMER)  # the one wording, from the server

            # the server needs a key: the page says so and keeps the one typed in
            sync_api.expect(page.locator("#settings")).to_be_visible()
            sync_api.expect(page.locator("#settings-note")).to_contain_text("API key")
            page.screenshot(path=str(tmp_path / "asks-for-key.png"))
            page.fill("#api-key", "ui-key")
            page.click("#save-settings")
            sync_api.expect(page.locator("#model")).to_have_text("tiny-qwen3")
            assert page.evaluate("localStorage.getItem('medassist.apiKey')") == "ui-key"

            # count how often the answer's text changes while it arrives
            page.evaluate("""() => {
                window.__updates = 0;
                new MutationObserver((records) => {
                    for (const r of records) {
                        const el = r.target.nodeType === 1 ? r.target : r.target.parentElement;
                        if (el && el.closest('.msg.assistant .body')) window.__updates += 1;
                    }
                }).observe(document.getElementById('log'), {childList: true, characterData: true, subtree: true});
            }""")
            page.fill("#input", "What are the symptoms of asthma?")
            page.keyboard.press("Enter")
            sync_api.expect(page.locator(".msg.user .body")).to_have_text("What are the symptoms of asthma?")
            answer = page.locator(".msg.assistant .body")
            sync_api.expect(answer).to_have_class("body streaming")  # arriving
            sync_api.expect(page.locator(".msg.assistant .meta")).to_contain_text("answer tokens", timeout=30_000)
            sync_api.expect(answer).to_have_class("body")  # finished
            assert answer.inner_text().strip()
            assert page.evaluate("window.__updates") >= 2, "the answer did not stream"
            sync_api.expect(disclaimer).to_be_visible()  # still there with an answer on screen

            shot = tmp_path / "chat.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 5_000
            assert not problems, problems
            assert not foreign, f"the page fetched from elsewhere: {foreign}"
        finally:
            browser.close()
