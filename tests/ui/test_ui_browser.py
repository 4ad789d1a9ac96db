"""The Gradio UI end to end in headless Chromium, against the real stack (Redis, workers, API).

Pick the model, send a message, wait for the reply the generate worker streams (what the page shows
must be the stored reply), export the chat as JSONL through the UI and check the downloaded file.
Skipped when Playwright or Chromium is missing.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import httpx
import pytest

from tests.stack import Stack

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
MESSAGE = "Hello, I was charged twice for order 4521. Can you help?"

pytestmark = pytest.mark.integration

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
)
if not CHROMIUM.is_file():
    pytest.skip(f"Chromium is not at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def ui_url(stack: Stack) -> Iterator[str]:
    """The stack plus what the UI test needs (a generate worker, the tiny `baseline`), then `csra ui`."""
    env = dict(stack.env)
    if not (stack.health().get("workers") or {}).get("generate"):
        stack.csra("worker-generate-ui", "worker", "--queue", "generate")
        stack.wait_ready(("generate",))
    names = [m["name"] for m in httpx.get(f"{stack.url}/models", timeout=10).json()["data"]]
    if "baseline" not in names:
        init = subprocess.run(
            [sys.executable, "-m", "csra.cli", "models", "init", "--tiny"],
            env=env,
            capture_output=True,
            text=True,
        )
        if init.returncode != 0:
            pytest.skip(f"`csra models init --tiny` failed, no model to chat with: {init.stderr[-500:]}")

    with serve_ui(stack, stack.url) as url:
        yield url


def serve_ui(stack: Stack, api_url: str, name: str = "ui", **settings: str) -> AbstractContextManager[str]:
    """`csra ui` against the API at ``api_url``, until the block ends; its log is ``<name>.log``
    (``/config`` answers 401 before sign-in when the UI asks people to sign in)."""
    return stack.serve(name, "ui", "CSRA_UI_PORT", "/config", (200, 401), 90, CSRA_API_URL=api_url,
                       GRADIO_ANALYTICS_ENABLED="False", **settings)


@contextmanager
def open_page() -> Iterator[sync_api.Page]:
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        context = browser.new_context(accept_downloads=True, viewport={"width": 1400, "height": 1000})
        pg = context.new_page()
        pg.set_default_timeout(30_000)
        try:
            yield pg
        finally:
            context.close()
            browser.close()


@pytest.fixture()
def page(ui_url: str) -> Iterator[sync_api.Page]:
    with open_page() as pg:
        yield pg


def _set_slider(page: sync_api.Page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(value)
    box.press("Enter")
    sync_api.expect(box).to_have_value(value)


def _letters(text: str) -> str:
    return "".join(ch for ch in text if ch.isalnum())


def test_chat_reply_appears_and_exports_as_jsonl(page, ui_url, stack, tmp_path):
    expect = sync_api.expect
    page.goto(ui_url)
    expect(page).to_have_title("csra — Customer Support Response Assistant")
    expect(page.locator("#api-status")).to_contain_text("ok", timeout=30_000)

    # pick the model from the list the page loaded from GET /models
    page.locator("#chat-model input").click()
    page.get_by_role("option").filter(has_text="baseline (base)").click()
    expect(page.locator("#chat-model input")).to_have_value("baseline (base)")
    # sampling, so the tiny random model says something; few tokens, so it says it quickly
    _set_slider(page, "chat-temperature", "1")
    _set_slider(page, "chat-max-tokens", "16")
    # the backend the agent picks is the one asked for (the tiny model has no GGUF export: torch)
    page.get_by_text("Backend and approved answers").click()
    page.locator("#chat-backend input").click()
    page.get_by_role("option", name="torch", exact=True).click()
    expect(page.locator("#chat-backend input")).to_have_value("torch")

    page.locator("#chat-input textarea").fill(MESSAGE)
    page.locator("#chat-send").click()
    chatbot = page.locator("#chatbot")
    expect(chatbot.locator("[data-testid='user']")).to_contain_text(MESSAGE)
    expect(chatbot.locator("[data-testid='bot']")).to_have_count(1)
    # the reply is done when the meta line shows its token counts
    expect(page.locator("#chat-meta")).to_contain_text("reply tokens", timeout=120_000)
    meta = page.locator("#chat-meta").inner_text()
    chat_id = int(re.search(r"Chat #(\d+)", meta).group(1))  # type: ignore[union-attr]

    with httpx.Client(base_url=stack.url, timeout=10) as api:
        stored = api.get(f"/chats/{chat_id}").json()
    user, reply = stored["messages"]
    assert user["content"] == MESSAGE and reply["role"] == "assistant"
    assert reply["status"] == "done", reply
    assert reply["model_name"] == "baseline" and reply["completion_tokens"] >= 1
    assert reply["settings"]["temperature"] == 1 and reply["settings"]["max_new_tokens"] == 16
    assert reply["settings"]["backend"] == "torch" and reply["settings"]["copy_bias"] is None  # empty: the model's

    # the reply streamed into the chat is the stored one: the same letters and digits (Markdown
    # rendering may drop marks and spacing), nothing left of a status line or the typing cursor
    bot_text = chatbot.locator("[data-testid='bot']").inner_text()
    assert bot_text.strip(), "the reply shown is empty"
    if reply["content"].strip():
        assert _letters(bot_text) == _letters(reply["content"]), (bot_text, reply["content"])
    else:
        assert "empty reply" in bot_text
    assert "Generation failed" not in bot_text and "▌" not in bot_text and "⏳" not in bot_text

    # the chat is in the saved-chats list
    expect(page.locator("#chat-list input")).to_have_value(re.compile(rf"^#{chat_id} "))

    with page.expect_download(timeout=30_000) as info:
        page.locator("#export-jsonl").click()
    download = info.value
    assert download.suggested_filename == f"chat-{chat_id}.jsonl"
    target = tmp_path / download.suggested_filename
    download.save_as(target)
    lines = [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(lines) == 1
    record = lines[0]
    assert record["metadata"]["chat_id"] == chat_id
    roles = [m["role"] for m in record["messages"]]
    assert roles == ["system", "user", "assistant"]
    assert record["messages"][1]["content"] == MESSAGE
    assert record["messages"][2]["content"] == reply["content"]

    # thumbs up on the last reply is stored with it
    page.locator("#chat-up").click()
    expect(page.locator("#chat-meta")).to_contain_text("feedback", timeout=15_000)
    with httpx.Client(base_url=stack.url, timeout=10) as api:
        assert api.get(f"/chats/{chat_id}").json()["messages"][1]["feedback"] == "up"


def test_an_approved_edit_is_among_the_similar_answers_next_time(page, ui_url, stack):
    """The agent edits the suggested reply, approves it, asks the same again: the edit is a similar answer."""
    from tests.integration.test_memory import ensure_memory

    expect = sync_api.expect
    question = "the box came crushed, can I get a new one?"
    corrected = "So sorry it arrived crushed: we ship a replacement today, no need to return it."
    with httpx.Client(base_url=stack.url, timeout=30) as api:
        ensure_memory(api)
    page.goto(ui_url)
    expect(page.locator("#api-status")).to_contain_text("ok", timeout=30_000)
    page.locator("#chat-model input").click()
    page.get_by_role("option").filter(has_text="retrieval").first.click()
    expect(page.locator("#chat-model input")).to_have_value(re.compile("retrieval"))

    def ask() -> None:
        page.locator("#chat-input textarea").fill(question)
        page.locator("#chat-send").click()

    ask()
    expect(page.locator("#chat-intent")).to_contain_text("Intent:", timeout=120_000)
    expect(page.locator("#chat-similar")).to_be_visible()
    box = page.locator("#chat-corrected textarea")
    expect(box).not_to_have_value("")  # the suggested reply, ready to edit
    box.fill(corrected)
    page.locator("#chat-up").click()
    expect(page.locator("#chat-meta")).to_contain_text("in the answer memory", timeout=15_000)

    ask()
    expect(page.locator("#chatbot [data-testid='bot']")).to_have_count(2, timeout=120_000)
    expect(page.locator("#chat-similar")).to_contain_text(corrected[:40], timeout=120_000)
    # one click on it puts it in the reply box
    page.locator("#chat-similar label").filter(has_text=corrected[:40]).first.click()
    expect(box).to_have_value(corrected)


def test_the_memory_tab_finds_and_removes_a_wrong_approval(page, ui_url, stack):
    """A wrong answer was approved in a chat: the Memory tab finds it by its customer message, and one
    click on it and Remove take it out of the memory for every search."""
    from tests.integration.helpers import approve_in_chat
    from tests.integration.test_memory import ensure_memory

    expect = sync_api.expect
    question = "the courier left my parcel in the rain and everything inside is soaked"
    wrong = "Parcels are waterproof, so nothing inside can be wet: please look again."
    with httpx.Client(base_url=stack.url, timeout=30) as api:
        ensure_memory(api)
        entry_id = approve_in_chat(api, question, wrong)
        entries = api.get("/memory").json()["entries"]

    page.goto(ui_url)
    expect(page.locator("#api-status")).to_contain_text("ok", timeout=30_000)
    page.get_by_role("tab", name="Memory").click()
    expect(page.locator("#mem-stats")).to_contain_text(f"{entries:,} approved answers")
    page.locator("#mem-query textarea").fill(question)
    page.locator("#mem-search").click()
    expect(page.locator("#mem-found")).to_contain_text("Intent:")
    hits = page.locator("#mem-hits")
    expect(hits).to_contain_text(wrong[:40])
    hits.get_by_role("gridcell").filter(has_text=question[:40]).first.click()  # its row: the id is picked
    expect(page.locator("#mem-entry textarea")).to_have_value(str(entry_id))
    page.locator("#mem-remove").click()
    expect(page.locator("#mem-stats")).to_contain_text(f"{entries - 1:,} approved answers")
    expect(hits).not_to_contain_text(wrong[:40])  # the search's answers no longer show it

    with httpx.Client(base_url=stack.url, timeout=30) as api:
        found = api.get("/memory/search", params={"q": question, "k": 5}).json()["data"]
        assert entry_id not in [h["id"] for h in found]
        assert api.delete(f"/memory/entries/{entry_id}").status_code == 404  # it is gone, not hidden
        dataset_id = api.get("/memory").json()["datasets"][0]

    # a rebuild of a dataset's answers is followed to its end, and the summary follows
    page.locator("#mem-dataset input").click()
    page.get_by_role("option").filter(has_text=f"#{dataset_id} ").first.click()
    page.locator("#mem-rebuild").click()
    expect(page.locator("#mem-rebuilt")).to_contain_text("succeeded", timeout=120_000)
    expect(page.locator("#mem-stats")).to_contain_text(f"{entries - 1:,} approved answers")


def test_the_evaluate_tab_lists_what_a_model_answered(page, ui_url, stack):
    """An evaluation of the retrieval responder: its leaderboard, then its examples, worst first."""
    from tests.integration.helpers import wait_job
    from tests.integration.test_memory import ensure_memory

    expect = sync_api.expect
    with httpx.Client(base_url=stack.url, timeout=30) as api:
        ensure_memory(api)
        dataset_id = api.get("/memory").json()["datasets"][0]
        job = api.post("/jobs/evaluate", json={"model_ids": ["retrieval"], "dataset_id": dataset_id}).json()
        done = wait_job(api, job["id"], timeout=300)
        assert done["status"] == "succeeded", done["error"]
        ev_id = done["result"]["evaluation_id"]
        worst = api.get(f"/evaluations/{ev_id}/examples", params={"model": "retrieval", "limit": 1}).json()

    page.goto(ui_url)
    expect(page.locator("#api-status")).to_contain_text("ok", timeout=30_000)
    page.get_by_role("tab", name="Evaluate").click()
    page.locator("#eval-dataset input").click()
    page.get_by_role("option").filter(has_text=f"#{dataset_id} ").first.click()
    page.locator("#eval-show").click()
    expect(page.locator("#eval-pick input")).to_have_value(re.compile(rf"^#{ev_id} "))
    page.get_by_text("Examples: what each model answered").click()
    expect(page.locator("#ex-model input")).to_have_value("retrieval")  # the evaluation's models fill the list
    page.locator("#ex-show").click()
    expect(page.locator("#ex-line")).to_contain_text(f"retrieval: {worst['count']} example(s) (all)")
    expect(page.locator("#ex-table")).to_contain_text(worst["data"][0]["prompt"][:30])  # the worst one, first
