"""The csra web UI (Gradio). It talks to the csra API over HTTP only (``csra.client``).

Tabs: Chat, Compare, Train, Evaluate, Memory, Jobs, Profile, one module each under ``ui/tabs``; this
module composes them and wires what they share (the header, the model and dataset lists, the
jobs list's timer). Nothing contacts the API at import time: choices are filled by
``demo.load``, replies are streamed and training/evaluation progress is polled with ``gr.Timer``.
"""

from __future__ import annotations

import html
from typing import Any

import gradio as gr

from csra.client import ApiError
from csra.settings import get_settings
from ui.common import QUIET, client, dataset_choices, default_model, keep, model_choices, on, sign_in
from ui.tabs import chat, compare, evaluate, jobs, memory, profile, train

TITLE = "csra — Customer Support Response Assistant"
DOWNLOADS_MAX_AGE_S = 3600  # exports, plots and reports written for the browser; Gradio deletes them

CSS = """
.csra-bar {height: 8px; background: var(--neutral-200); border-radius: 4px; margin-top: 6px; overflow: hidden}
.csra-bar > div {height: 100%; background: var(--color-accent); transition: width .4s}
.csra-job {padding: 6px 2px}
.csra-err {color: var(--error-text-color, #b91c1c); margin-top: 4px; white-space: pre-wrap}
.csra-status {font-size: var(--text-sm)}
.csra-estimate {font-size: var(--text-sm); margin-top: 4px}
"""

# Escape leaves a dropdown. Gradio 6.31's Dropdown closes its list on Escape but keeps the focus,
# and it opens the list only on a focus event: the next click opened nothing, and a focused box
# never showed its choices' new labels (the Train tab's "● running 45%"). Leaving the box closes the
# list and puts back the selected choice's label, which is what Escape means there anyway.
HEAD = """<script>
document.addEventListener("keydown", (e) => {
  const box = e.target;
  if (e.key === "Escape" && box instanceof HTMLInputElement && box.getAttribute("role") === "combobox") {
    setTimeout(() => box.blur(), 0);
  }
}, true);
</script>"""


def load_header() -> str:
    c = client()
    url = html.escape(c.base_url)
    try:
        h = c.health()
    except ApiError as e:
        return f"<span class='csra-err'>API {url} unreachable: {html.escape(e.detail)}</span>"
    workers = h.get("workers") or {}
    ws = " · ".join(f"{q} {'✓' if live else '✗'}" for q, live in workers.items())
    status = html.escape(h.get("status", "?")) + (f" · workers: {ws}" if ws else "")
    return f"<span class='csra-status'>API <code>{url}</code> · {status}</span>"


def refresh_models(chat_model: Any, a: Any, b: Any, base: Any, eval_models: Any) -> tuple[Any, ...]:
    """Every model dropdown from GET /models, keeping what is selected (Compare's B: the newest fine-tune)."""
    try:
        choices = model_choices()
    except ApiError as e:
        gr.Warning(f"Could not list models: {e.detail}")
        return (gr.skip(),) * 5
    default = default_model(choices)
    finetuned = [v for label, v in choices if not label.endswith("(base)")]
    b_default = finetuned[-1] if finetuned else default
    return (
        gr.Dropdown(choices=choices, value=keep(chat_model, choices, default)),
        gr.Dropdown(choices=choices, value=keep(a, choices, default)),
        gr.Dropdown(choices=choices, value=keep(b, choices, b_default)),
        gr.Dropdown(choices=choices, value=keep(base, choices, default)),
        gr.Dropdown(choices=choices, value=keep(eval_models, choices, default)),
    )


def refresh_datasets(*selected: Any) -> tuple[Any, ...]:
    """Every dataset dropdown (Train, Evaluate, Memory) from GET /datasets, keeping what each has selected."""
    try:
        choices = dataset_choices()
    except ApiError as e:
        if e.status != 403:  # an agent's key: datasets are for admins, and an agent's tabs need none
            gr.Warning(f"Could not list datasets: {e.detail}")
        return tuple(gr.skip() for _ in selected)
    return tuple(gr.Dropdown(choices=choices, value=keep(s, choices)) for s in selected)


def timer_off() -> gr.Timer:
    return gr.Timer(active=False)


def open_in_train(job_id: float | None) -> tuple[Any, ...]:
    """The Jobs tab's "Follow in the Train tab": that tab, its timer on, the Jobs tab's off, the job followed."""
    if not job_id:
        raise gr.Error("Pick a training job in the table first.")
    view = train.show_job(int(job_id))
    return gr.Tabs(selected="train"), gr.Timer(active=True), gr.Timer(active=False), *view


def build() -> gr.Blocks:
    with gr.Blocks(
        title=TITLE, analytics_enabled=False, delete_cache=(DOWNLOADS_MAX_AGE_S // 4, DOWNLOADS_MAX_AGE_S)
    ) as demo:
        gr.Markdown(f"# {TITLE}", elem_id="title")
        header = gr.HTML("", elem_id="api-status")
        with gr.Tabs(elem_id="tabs") as tabs:
            chat_tab = chat.build(demo)
            compare_tab = compare.build(demo)
            train_tab = train.build(demo)
            eval_tab = evaluate.build(demo)
            memory_tab = memory.build(demo)
            jobs_tab = jobs.build(demo)
            profile_tab = profile.build(demo)

        models = [chat_tab.model, compare_tab.model_a, compare_tab.model_b, train_tab.base, eval_tab.models]
        datasets = [train_tab.dataset, eval_tab.dataset, memory_tab.dataset]
        demo.load(load_header, None, header, **QUIET)
        demo.load(refresh_models, models, models, **QUIET)
        demo.load(refresh_datasets, datasets, datasets, **QUIET)
        train_tab.datasets_refresh.click(refresh_datasets, datasets, datasets, **on(train_tab.dataset))
        # the model and dataset lists follow the store (a model trained meanwhile shows up); the jobs
        # list and the Train tab's job list refresh themselves only while their tab is open
        for tab in (chat_tab.tab, compare_tab.tab, train_tab.tab, eval_tab.tab):
            tab.select(refresh_models, models, models, **QUIET)
        for tab in (train_tab.tab, eval_tab.tab, memory_tab.tab):
            tab.select(refresh_datasets, datasets, datasets, **QUIET)
        for tab in (chat_tab.tab, compare_tab.tab, train_tab.tab, eval_tab.tab, memory_tab.tab, profile_tab):
            tab.select(timer_off, None, jobs_tab.timer, **QUIET)
        for tab in (chat_tab.tab, compare_tab.tab, eval_tab.tab, memory_tab.tab, jobs_tab.tab, profile_tab):
            tab.select(timer_off, None, train_tab.timer, **QUIET)
        jobs_tab.to_train.click(
            open_in_train, jobs_tab.job_id, [tabs, train_tab.timer, jobs_tab.timer, *train_tab.view], **QUIET
        )
    return demo


demo = build()


def launch(host: str, port: int) -> None:
    """Serve the UI (``csra ui``); it reaches the API at ``CSRA_API_URL``."""
    login = get_settings().ui_login
    demo.queue(default_concurrency_limit=16).launch(
        server_name=host,
        server_port=port,
        show_error=True,
        css=CSS,
        head=HEAD,
        footer_links=["api"],
        auth=sign_in if login else None,
        auth_message="Sign in with your key's name and the key `csra keys create` printed for you." if login else None,
    )
