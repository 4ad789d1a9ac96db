"""With CSRA_UI_LOGIN each agent signs in to the UI with their own key: what they do there is theirs.

Headless Chromium against the real stack, a second API with keys on, and `csra ui` pointed at it
with no key of its own. Skipped when Playwright or Chromium is missing.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from tests.stack import Stack
from tests.ui.test_ui_browser import open_page, serve_ui, sync_api

pytestmark = pytest.mark.integration
BOOTSTRAP = "ui-login-bootstrap-key"


@pytest.fixture(scope="module")
def login_ui(stack: Stack) -> Iterator[tuple[str, str, str]]:
    """(UI URL, keyed API URL, dana's key) over the session stack (its generate worker, the tiny baseline)."""
    made = subprocess.run([sys.executable, "-m", "csra.cli", "keys", "create", "--name", "dana", "--role", "agent"],
                          env={**stack.env, "CSRA_API_KEY": BOOTSTRAP}, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    with stack.serve("api-login", "api", "CSRA_API_PORT", "/health", (200, 503), 60, CSRA_API_KEY=BOOTSTRAP) as api:
        with serve_ui(stack, api, name="ui-login", CSRA_UI_LOGIN="true") as ui:
            yield ui, api, made.stdout.strip()


def _sign_in(page: sync_api.Page, name: str, key: str) -> None:
    page.get_by_label(re.compile("username", re.I)).fill(name)
    page.get_by_label(re.compile("password", re.I)).fill(key)
    page.get_by_role("button", name=re.compile("login", re.I)).click()


def test_an_agent_signs_in_and_their_chat_is_theirs(login_ui):
    ui, api, key = login_ui
    expect = sync_api.expect
    with open_page() as page:
        page.goto(ui)
        _sign_in(page, "someone-else", key)  # a live key under another name is refused
        expect(page.get_by_text(re.compile("incorrect", re.I))).to_be_visible()
        page.goto(ui)
        _sign_in(page, "dana", key)
        expect(page.locator("#api-status")).to_contain_text("ok", timeout=30_000)
        page.locator("#chat-model input").click()
        page.get_by_role("option").filter(has_text="baseline (base)").click()
        page.locator("#chat-input textarea").fill("Can I change my delivery address?")
        page.locator("#chat-send").click()
        expect(page.locator("#chat-meta")).to_contain_text("reply tokens", timeout=120_000)
        chat_id = int(re.search(r"Chat #(\d+)", page.locator("#chat-meta").inner_text()).group(1))  # type: ignore[union-attr]
    with httpx.Client(base_url=api, timeout=10, headers={"Authorization": f"Bearer {BOOTSTRAP}"}) as admin:
        chat = admin.get(f"/chats/{chat_id}").json()
    assert chat["owner"] == "dana" and chat["messages"][0]["content"] == "Can I change my delivery address?"
