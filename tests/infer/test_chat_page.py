"""The chat page (`nanoseek serve` at /) in a real headless Chromium against the real server: the API key asked for
and used, the answer streamed in several pieces and equal to the API's, the conversation sent back as history, a
stop that keeps the partial answer and cancels the server's request, R1 reasoning folded, a new conversation, and
not one request to anywhere but the server.

Marker `browser` (not in the default suite): `make test-browser` installs Debian's chromium (as root) and
playwright (requirements-browser.txt), which drives that system browser. The screenshot goes to the test's tmp
folder; NANOSEEK_CHAT_SCREENSHOT=docs/chat_page.png also writes it there (the README's picture)."""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest
from infer_helpers import running_server, tiny_model_and_tokenizer, wait_until

from nanoseek.infer.engine import Engine
from nanoseek.infer.server import build_app

pytestmark = pytest.mark.browser

KEY = "page-key"
MODEL = "nanoseek-tiny"
STEP_S = 0.03  # each engine step is slowed to this, so that a generation lasts long enough to watch and stop
SYSTEM = "You write short Python."


def chromium() -> str | None:
    found = os.environ.get("NANOSEEK_CHROMIUM")
    return found or next((p for name in ("chromium", "chromium-browser", "google-chrome")
                          if (p := shutil.which(name))), None)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: make test-browser "
                                                                 "installs it (requirements-browser.txt)")
    exe = chromium()
    if exe is None:
        pytest.skip("no Chromium found (chromium, chromium-browser, google-chrome or $NANOSEEK_CHROMIUM): "
                    "apt-get install chromium (make test-browser does, as root)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def srv():
    model, tok = tiny_model_and_tokenizer()
    engine = Engine(model, tok, max_batch=2, max_len=512)
    engine.eos_ids = set()  # a random model: let every answer run to max_tokens (or to a stop)
    step = engine.step

    @functools.wraps(step)
    def slow_step() -> None:
        t = time.monotonic()
        step()
        time.sleep(max(0.0, STEP_S - (time.monotonic() - t)))

    engine.step = slow_step  # type: ignore[method-assign]
    app = build_app(engine, tok, MODEL, api_key=KEY)
    with running_server(app) as (_, port):
        yield SimpleNamespace(engine=engine, app=app, base=f"http://127.0.0.1:{port}",
                              client=openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY,
                                                   max_retries=0, timeout=60))


def set_field(page, selector: str, value: str) -> None:
    page.fill(selector, value)
    page.dispatch_event(selector, "change")


def wait_js(page, expression: str, timeout: float = 60.0) -> None:
    """Poll a JavaScript expression until it is true (page.evaluate: playwright's wait_for_function evaluates its
    predicate with eval, which the page's Content-Security-Policy forbids)."""
    assert wait_until(lambda: page.evaluate(expression), timeout=timeout, every=0.05), expression


def last_assistant(page):
    return page.locator(".message.assistant").last


def test_chat_page(browser, srv, tmp_path):
    context = browser.new_context(viewport={"width": 1200, "height": 820})
    page = context.new_page()
    urls: list[str] = []
    bodies: list[dict] = []  # what the page posted to /v1/chat/completions
    problems: list[str] = []
    page.on("request", lambda r: urls.append(r.url))
    page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.url.endswith("/chat/completions")
            else None)
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))

    # ---- the key: asked for, then used
    page.goto(srv.base + "/")
    wait_js(page, "document.getElementById('status').textContent.includes('API key')")
    assert page.text_content("#model-name") == "?"
    set_field(page, "#api-key", KEY)
    wait_js(page, f"document.getElementById('model-name').textContent === {json.dumps(MODEL)}")
    problems.clear()  # the 401 of the first /v1/models is logged by the browser: expected
    set_field(page, "#system", SYSTEM)
    set_field(page, "#temperature", "0")
    set_field(page, "#max-tokens", "40")

    # ---- one answer, streamed: the text grows in several steps and equals the API's answer
    page.evaluate("""() => {
        window.lengths = [];
        new MutationObserver(() => {
            const c = document.querySelector('.message.assistant:last-child .content');
            if (c) window.lengths.push(c.textContent.length);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    }""")
    page.fill("#input", "Write a queue.")
    page.press("#input", "Enter")
    page.wait_for_selector(".message.assistant[data-state='done']", timeout=60_000)
    answer = last_assistant(page).locator(".content").text_content()
    lengths = page.evaluate("window.lengths")
    growth = sorted(set(lengths))
    assert len(growth) >= 4 and growth[-1] == len(answer) and lengths == sorted(lengths), lengths
    assert int(last_assistant(page).get_attribute("data-deltas")) >= 4
    assert page.locator(".message.user .content").text_content() == "Write a queue."
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Write a queue."}]
    assert bodies[0]["messages"] == first and bodies[0]["stream"] is True
    assert (bodies[0]["temperature"], bodies[0]["top_p"], bodies[0]["max_tokens"]) == (0, 0.95, 40)
    api = srv.client.chat.completions.create(model=MODEL, messages=first, max_tokens=40, temperature=0)
    assert answer == api.choices[0].message.content and answer
    assert "40 tokens" in last_assistant(page).locator(".meta").text_content()

    # ---- the conversation goes back as history
    page.fill("#input", "Now a heap.")
    page.press("#input", "Enter")
    page.wait_for_selector(".message.assistant:nth-of-type(4)[data-state='done']", timeout=60_000)
    assert bodies[1]["messages"] == first + [{"role": "assistant", "content": answer},
                                             {"role": "user", "content": "Now a heap."}]

    # ---- stop: the partial answer stays, the server's request is cancelled
    set_field(page, "#max-tokens", "300")
    page.fill("#input", "Write a long program.")
    page.click("#send")
    wait_js(page, "(document.querySelector('.message.assistant:last-child .content') || {}).textContent?.length > 10")
    assert page.is_visible("#stop") and not page.is_visible("#send")
    page.click("#stop")
    page.wait_for_selector(".message.assistant:last-child[data-state='stopped']")
    kept = last_assistant(page).locator(".content").text_content()
    assert page.is_visible("#send") and not page.is_visible("#stop")
    assert wait_until(lambda: not srv.engine.has_work(), timeout=10)
    assert srv.app.state.metrics.finished.values.get(("cancelled",)) == 1
    assert srv.app.state.metrics.generation_tokens.values[()] < 3 * 40 + 300  # the stopped one ended early
    time.sleep(0.3)
    assert last_assistant(page).locator(".content").text_content() == kept and len(kept) > 10

    # ---- R1 reasoning: folded, equal to the API's reasoning_content
    page.check("#think")
    set_field(page, "#max-tokens", "30")
    page.fill("#input", "Think about sorting.")
    page.press("#input", "Enter")
    page.wait_for_selector(".message.assistant:last-child[data-state='done']", timeout=60_000)
    sent = bodies[-1]
    assert sent["think"] is True and sent["messages"][-2] == {"role": "assistant", "content": kept}
    api = srv.client.chat.completions.create(model=MODEL, messages=sent["messages"], max_tokens=30, temperature=0,
                                             extra_body={"think": True}).choices[0].message
    details = last_assistant(page).locator("details.reasoning")
    assert details.locator(".thought").text_content() == api.model_extra["reasoning_content"]
    assert last_assistant(page).locator(".content").text_content() == (api.content or "")
    assert details.evaluate("d => d.open") is False and not details.locator(".thought").is_visible()
    assert details.locator("summary").text_content().startswith("Thought for")
    details.locator("summary").click()
    assert details.locator(".thought").is_visible()

    # a model that writes "<think>...</think>" into its answer (R1 without a reasoning parser) is folded alike
    cases = {"<think>a\nb</think>\n\nIt is 4.": ["a\nb", "It is 4."], "<think>still": ["still", ""],
             " <thi": ["", ""], "It is 4.": ["", "It is 4."], "<b>x</b>": ["", "<b>x</b>"]}
    for text, split in cases.items():
        assert page.evaluate("t => splitThink(t)", text) == split, text
    assert page.evaluate("t => splitThink(t, true)", " <thi") == ["", " <thi"]

    shot = tmp_path / "chat_page.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    if target := os.environ.get("NANOSEEK_CHAT_SCREENSHOT"):
        Path(target).write_bytes(shot.read_bytes())

    # ---- new conversation: the history is gone
    page.click("#new-chat")
    assert page.locator(".message").count() == 0
    page.uncheck("#think")
    set_field(page, "#max-tokens", "5")
    page.fill("#input", "Hello again.")
    page.press("#input", "Enter")
    page.wait_for_selector(".message.assistant:last-child[data-state='done']", timeout=60_000)
    assert bodies[-1]["messages"] == [{"role": "system", "content": SYSTEM},
                                      {"role": "user", "content": "Hello again."}]
    assert page.locator(".message").count() == 2

    # ---- only this server was asked for anything, and the page logged no error (a CSP violation would be one)
    assert urls and all(u.startswith(srv.base + "/") or u.startswith("data:") for u in urls), urls
    assert not problems, problems
    context.close()
