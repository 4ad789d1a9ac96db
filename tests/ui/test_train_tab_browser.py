"""The Train tab in headless Chromium against the real stack: it follows every training job.

The UI here talks to a second `csra api` process (same database, Redis and workers) whose
confirmation threshold is 0 s, so that a run started in the tab needs the second click. A job
started with `csra train` meanwhile shows up in the tab's list without a reload (the selection
stays), the Jobs tab's link follows it in the Train tab, and its loss plot fills in.
"""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager

import httpx
import pytest

from tests.integration.test_memory import import_intents_dataset
from tests.stack import Stack, wait_until
from tests.ui import test_ui_browser as browser
from tests.ui.test_ui_browser import serve_ui, sync_api

page = browser.page  # the browser fixture, here on this module's `ui_url`

pytestmark = pytest.mark.integration


def serve_api(stack: Stack, **settings: str) -> AbstractContextManager[str]:
    """Another `csra api` over the stack's database and Redis, with other ``CSRA_`` settings."""
    return stack.serve("api-train-tab", "api", "CSRA_API_PORT", "/health", (200, 503), 60, **settings)


@pytest.fixture(scope="module")
def ui_url(stack: Stack) -> Iterator[str]:
    """The UI on an API that asks to confirm every run (and waits little for a time estimate)."""
    settings = {"CSRA_CONFIRM_TRAIN_ABOVE_SECONDS": "0", "CSRA_ESTIMATE_WAIT_SECONDS": "5"}
    with serve_api(stack, **settings) as api, serve_ui(stack, api, "ui-train") as url:
        yield url


def _pick(page: sync_api.Page, elem_id: str, option: str | re.Pattern[str]) -> None:
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option").filter(has_text=option).first.click()


def _number(page: sync_api.Page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input")
    box.fill(value)
    box.press("Tab")


def _train_jobs(api: httpx.Client) -> list[dict]:
    return api.get("/jobs", params={"kind": "train", "limit": 100}).json()["data"]


def _train_tab_on_a_dataset(page: sync_api.Page, ui_url: str, stack: Stack) -> tuple[httpx.Client, int]:
    """The Train tab open with a dataset picked: a client of the stack's API and the dataset's id."""
    api = httpx.Client(base_url=stack.url, timeout=30)
    dataset_id = import_intents_dataset(api)
    page.goto(ui_url)
    sync_api.expect(page.locator("#api-status")).to_contain_text("ok", timeout=30_000)
    page.get_by_role("tab", name="Train").click()
    _pick(page, "train-dataset", f"#{dataset_id} ")
    return api, dataset_id


def test_the_train_tab_follows_every_training_job(page, ui_url, stack):
    expect = sync_api.expect
    # a long run started here: the estimate shows as the form changes, Start asks, "Start anyway" starts
    api, dataset_id = _train_tab_on_a_dataset(page, ui_url, stack)
    _number(page, "train-epochs", "200")
    _number(page, "train-batch", "4")
    estimate = page.locator("#train-estimate")
    # the estimate of the last change (54 rows, 14 steps an epoch): an earlier one still in flight could
    # otherwise land after the click below and take its confirmation back
    expect(estimate).to_contain_text("2,800 steps", timeout=60_000)
    expect(estimate).to_contain_text("Start will ask for a confirmation")
    before = len(_train_jobs(api))
    page.locator("#train-start").click()
    confirm = page.locator("#train-confirm")
    expect(confirm).to_contain_text("Start anyway")
    expect(estimate).to_contain_text("needs a confirmation")
    assert len(_train_jobs(api)) == before  # the first click started nothing
    _number(page, "train-epochs", "150")  # a change takes the confirmation back: Start asks again
    expect(confirm).to_be_hidden()
    expect(estimate).to_contain_text("2,100 steps", timeout=60_000)
    page.locator("#train-start").click()
    expect(confirm).to_be_visible()
    confirm.click()
    followed = page.locator("#train-job input")
    expect(followed).to_have_value(re.compile(r"^#\d+ .*(queued|running)"))
    mine = int(re.match(r"#(\d+)", followed.input_value()).group(1))  # type: ignore[union-attr]
    expect(confirm).to_be_hidden()
    expect(estimate).not_to_contain_text("needs a confirmation")

    # a job started with the CLI meanwhile: listed without a reload, the selection stays
    name = f"cli-{uuid.uuid4().hex[:6]}"
    cli = subprocess.Popen(
        [sys.executable, "-m", "csra.cli", "train", "--dataset", str(dataset_id), "--epochs", "3",
         "--batch-size", "4", "--max-train-samples", "24", "--output-name", name, "--lr", "1e-3",
         "--set", "logging_steps=1", "--set", "max_eval_samples=8", "--yes"],
        env=stack.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        cli_job = wait_until(lambda: next((j["id"] for j in _train_jobs(api) if j["params"].get("output_name")
                                            == name), None), 60, 0.5, what="the CLI's job")
        def listed() -> bool:  # the list refreshes every 2 s, an open dropdown's too
            # (5 s a try: on a loaded machine the dropdown can take seconds to open). A try ends by leaving
            # the box, not with Escape: Gradio 6.31's Dropdown closes on Escape but keeps the focus, so the
            # next click fires no focus event and opens nothing (every later try saw an empty list)
            page.locator("#train-job input").click()
            try:
                page.get_by_role("option").filter(has_text=f"#{cli_job} {name}").first.wait_for(timeout=5_000)
                return True
            except sync_api.TimeoutError:
                seen.append(page.get_by_role("option").all_inner_texts())
                return False
            finally:
                page.locator("#train-job input").blur()

        seen: list[list[str]] = []
        try:
            wait_until(listed, 120, 1.0, what="the CLI's job in the Train tab's list")
        except TimeoutError:
            raise AssertionError(f"job {cli_job} {name} not listed; the list showed {seen[-3:]}") from None
        expect(followed).to_have_value(re.compile(rf"^#{mine} "))
        # Escape closes the list and the next click opens it again (the UI's `HEAD` script: Gradio
        # alone kept the focus on Escape, and the click opened nothing)
        options = page.get_by_role("option")
        followed.click()
        expect(options.filter(has_text=f"#{cli_job} {name}")).to_be_visible()
        page.keyboard.press("Escape")
        expect(options).to_have_count(0)
        followed.click()
        expect(options.filter(has_text=f"#{cli_job} {name}")).to_be_visible()
        followed.blur()

        # Cancel works on the followed job (and frees the train worker for the CLI's)
        page.locator("#train-cancel").click()
        expect(page.locator("#train-status")).to_contain_text("cancel", timeout=30_000)

        # the Jobs tab links to it: the Train tab opens with the CLI's job, whose loss plot fills in
        page.get_by_role("tab", name="Jobs").click()
        cell = page.locator("#jobs-table [data-testid^='cell-'][data-col='0']")
        cell.filter(has_text=re.compile(rf"^\s*{cli_job}\s*$")).first.click()
        page.locator("#jobs-to-train").click()
        expect(page.get_by_role("tab", name="Train")).to_have_attribute("aria-selected", "true")
        expect(followed).to_have_value(re.compile(rf"^#{cli_job} {name}"))
        expect(page.locator("#loss-plot .mark-line path").first).to_be_visible(timeout=90_000)
        expect(page.locator("#train-status")).to_contain_text(f"train job #{cli_job}")
    finally:
        cli.terminate()
        cli.wait(10)
        api.post(f"/jobs/{mine}/cancel")
        api.close()


def test_a_grounded_runs_reply_settings_go_with_it(page, ui_url, stack):
    """The grounded model's own reply settings, set in the tab: a value the spec refuses is the API's
    detail in the estimate line; the run started carries the ones given."""
    expect = sync_api.expect
    api, _ = _train_tab_on_a_dataset(page, ui_url, stack)
    page.locator("#train-grounded input").check()
    page.locator("#train-reply-settings").get_by_text("how its replies follow").click()
    estimate = page.locator("#train-estimate")
    _number(page, "train-no-repeat-ngram-size", "1")
    expect(estimate).to_contain_text("no_repeat_ngram_size 1 would ban", timeout=60_000)
    _number(page, "train-no-repeat-ngram-size", "6")
    _number(page, "train-copy-bias", "2.5")
    _number(page, "train-epochs", "1")
    expect(estimate).to_contain_text("Start will ask for a confirmation", timeout=60_000)
    before = {j["id"] for j in _train_jobs(api)}
    page.locator("#train-start").click()
    page.locator("#train-confirm").click()
    started = wait_until(lambda: next((j for j in _train_jobs(api) if j["id"] not in before), None), 30, 0.5,
                         what="the job started in the tab")
    try:
        grounding = started["params"]["grounding"]
        assert (grounding["copy_bias"], grounding["no_repeat_ngram_size"]) == (2.5, 6)
        assert grounding["min_similarity"] == 0.5  # left alone: the spec's default
    finally:
        api.post(f"/jobs/{started['id']}/cancel")
        api.close()
