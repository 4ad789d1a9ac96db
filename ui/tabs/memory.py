"""The Memory tab: the team's approved answers (the answer memory) through the API.

How many there are and where they come from; a search that finds what the Chat tab's memory panel
would show for a customer message; every entry, page by page; removing a wrong one; and a rebuild of a
dataset's answers from its train split (a job, followed until it ends).
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Any

import gradio as gr
import pandas as pd

from csra.client import ApiError, memory_entry_source
from ui.common import QUIET, api_errors, client, job_html, on

PAGE = 20
SOURCES = [("all", "all"), ("from datasets", "dataset"), ("approved in chats", "chat")]
HIT_COLUMNS = ["id", "similarity", "intent", "source", "customer message", "approved answer"]
HIT_WIDTHS: list[str | int] = ["6%", "8%", "12%", "10%", "24%", "40%"]  # the answers are what is read: the most room
ENTRY_COLUMNS = ["id", "source", "intent", "customer message", "approved answer", "added"]
ENTRY_WIDTHS: list[str | int] = ["6%", "10%", "12%", "24%", "38%", "10%"]


def stats_text(stats: dict[str, Any]) -> str:
    """One line: how many answers, from which datasets and from chats."""
    if not stats["entries"]:
        return ("**The answer memory is empty.** Rebuild it below from a dataset's train split, or approve "
                "replies in the Chat tab (👍).")
    by = stats.get("by_source") or {}
    datasets = ", ".join(f"#{d}" for d in stats.get("datasets") or []) or "none"
    line = (f"**{stats['entries']:,} approved answers**: {by.get('dataset', 0):,} from datasets ({datasets}), "
            f"{by.get('chat', 0):,} approved in chats.")
    if not stats.get("embedder_ready"):
        line += " The embedding model is not ready yet: a rebuild prepares it."
    return line


def hits_frame(hits: list[dict[str, Any]]) -> pd.DataFrame:
    rows = [{"id": h["id"], "similarity": round(float(h["similarity"]), 3), "intent": h.get("intent") or "",
             "source": memory_entry_source(h), "customer message": h["message"], "approved answer": h["reply"]}
            for h in hits]
    return pd.DataFrame(rows, columns=HIT_COLUMNS)


def entries_frame(entries: list[dict[str, Any]]) -> pd.DataFrame:
    rows = [{"id": e["id"], "source": memory_entry_source(e), "intent": e.get("intent") or "",
             "customer message": e["message"], "approved answer": e["reply"],
             "added": (e.get("created_at") or "")[:16].replace("T", " ")}
            for e in entries]
    return pd.DataFrame(rows, columns=ENTRY_COLUMNS)


@api_errors
def load_stats() -> str:
    return stats_text(client().memory())


@api_errors
def search(query: str, k: float) -> tuple[pd.DataFrame, str]:
    """The approved answers to the customer messages most like ``query``, and the intent they predict."""
    if not (query or "").strip():
        raise gr.Error("Type a customer message to search the approved answers for.")
    found = client().memory_search(query.strip(), int(k))
    intent = found.get("intent")
    line = (f"**Intent:** {intent} (confidence {found['intent_confidence']:.2f})" if intent
            else "**Intent:** unknown")
    return hits_frame(found["data"]), f"{line} · {len(found['data'])} answer(s), most similar first"


@api_errors
def browse(source: str, page: float | None) -> tuple[pd.DataFrame, str, int]:
    """One page of the live entries (the page is kept within the pages there are)."""
    wanted = max(1, int(page or 1))
    chosen = None if source == "all" else source
    try:
        listed = client().memory_entries(chosen, PAGE, (wanted - 1) * PAGE)
    except ApiError as e:
        if e.status != 403:
            raise
        # an agent's key (keys on): not an error to show every time the tab opens
        return entries_frame([]), "Listing, removing and rebuilding the answers take an admin's key; search works.", 1
    pages = max(1, math.ceil(listed["count"] / PAGE))
    if wanted > pages:  # past the end (entries were removed meanwhile): the last page
        wanted = pages
        listed = client().memory_entries(chosen, PAGE, (wanted - 1) * PAGE)
    first = (wanted - 1) * PAGE + 1
    info = (f"entries {first:,}-{first + len(listed['data']) - 1:,} of {listed['count']:,} · page {wanted} of {pages}"
            if listed["data"] else "no entries")
    return entries_frame(listed["data"]), info, wanted


def pick_entry(evt: gr.SelectData, table: pd.DataFrame) -> Any:
    """The clicked row's entry id."""
    try:
        return str(int(table.iloc[evt.index[0]]["id"]))
    except (IndexError, KeyError, TypeError, ValueError):
        return gr.skip()


@api_errors
def remove(entry_id: str | None, source: str, page: float | None, hits: pd.DataFrame | None = None
           ) -> tuple[Any, ...]:
    """Remove an entry (a wrong approval, an outdated answer); the count, the page and the search's
    answers follow."""
    text = str(entry_id or "").strip().lstrip("#")
    if not text:
        raise gr.Error("Click the entry to remove in a table, or type its id.")
    if not text.isdigit():
        raise gr.Error(f"Entry id: {entry_id!r} is not a number.")
    client().remove_memory_entry(int(text))
    gr.Info(f"Entry #{text} removed: no chat or model finds it any more. An answer from a dataset comes "
            "back if that dataset's memory is rebuilt.")
    left = hits[hits["id"].astype(str) != text] if hits is not None and "id" in hits else hits
    return (load_stats(), *browse(source, page), "", left)


REBUILD_NOTE = ("Until it finishes the memory answers from its current entries; then the dataset's answers are "
                "replaced in one step, and answers approved in chats stay.")


@api_errors
def rebuild(dataset_id: int | None) -> tuple[int, str, gr.Timer]:
    """Start the rebuild job; the tab follows it (its id, its status line, the timer on)."""
    if dataset_id is None:
        raise gr.Error("Pick the dataset whose train split the memory's answers come from.")
    job = client().rebuild_memory(int(dataset_id))
    return job["id"], _rebuild_line(job), gr.Timer(active=True)


def _rebuild_line(job: dict[str, Any]) -> str:
    note = "" if job["finished"] else f"<div class='csra-estimate'>{html.escape(REBUILD_NOTE)}</div>"
    return job_html(job) + note


def follow_rebuild(job_id: int | None) -> tuple[Any, Any, gr.Timer]:
    """The rebuild job's status line; once it has ended, the new summary too and the timer off."""
    if job_id is None:
        return gr.skip(), gr.skip(), gr.Timer(active=False)
    try:
        job = client().job(int(job_id))
        if not job["finished"]:
            return _rebuild_line(job), gr.skip(), gr.Timer(active=True)
        return _rebuild_line(job), stats_text(client().memory()), gr.Timer(active=False)
    except ApiError as e:  # a blip of the API: the next tick tries again
        return f"⚠️ {e.detail}", gr.skip(), gr.Timer(active=True)


@dataclass
class MemoryTab:
    tab: gr.Tab
    dataset: gr.Dropdown


def _search_box() -> gr.Dataframe:
    with gr.Row():
        query = gr.Textbox(label="Customer message", placeholder="e.g. I want to cancel my order", scale=4,
                           elem_id="mem-query")
        k = gr.Slider(1, 20, value=5, step=1, label="Answers", scale=1, elem_id="mem-k")
        go = gr.Button("Search", variant="primary", scale=1, elem_id="mem-search")
    found = gr.Markdown("", elem_id="mem-found")
    hits = gr.Dataframe(pd.DataFrame(columns=HIT_COLUMNS), interactive=False, wrap=True, column_widths=HIT_WIDTHS,
                        elem_id="mem-hits")
    for trigger in (go.click, query.submit):
        trigger(search, [query, k], [hits, found], **on(hits))
    return hits


def build(demo: gr.Blocks) -> MemoryTab:
    """The tab inside the current ``gr.Blocks``, with its events."""
    with gr.Tab("Memory", id="memory") as tab:
        stats = gr.Markdown("", elem_id="mem-stats")
        gr.Markdown("### Search\nThe approved answers to the customer messages most like this one: what a "
                    "grounded model is shown, and what the Chat tab lists beside a suggestion.")
        hits = _search_box()
        gr.Markdown("### Every answer")
        with gr.Row():
            source = gr.Dropdown(SOURCES, value="all", label="Source", elem_id="mem-source")
            page = gr.Number(1, label="Page", precision=0, minimum=1, elem_id="mem-page")
            show = gr.Button("Show", elem_id="mem-show")
        info = gr.Markdown("", elem_id="mem-info")
        table = gr.Dataframe(pd.DataFrame(columns=ENTRY_COLUMNS), interactive=False, wrap=True,
                             column_widths=ENTRY_WIDTHS, elem_id="mem-entries")
        with gr.Row():
            entry = gr.Textbox("", label="Entry id (click a row)", elem_id="mem-entry")
            drop = gr.Button("Remove this answer", variant="stop", elem_id="mem-remove")
        gr.Markdown("### Rebuild from a dataset")
        with gr.Row():
            dataset = gr.Dropdown([], value=None, label="Dataset (its train split)", elem_id="mem-dataset")
            again = gr.Button("Rebuild", elem_id="mem-rebuild")
        rebuilt = gr.HTML("", elem_id="mem-rebuilt")
        rebuilding, timer = gr.State(None), gr.Timer(1.0, active=False)

    listing = [table, info, page]
    tab.select(load_stats, None, stats, **QUIET).then(browse, [source, page], listing, **QUIET)
    show.click(browse, [source, page], listing, **on(table))
    source.input(browse, [source, gr.State(1)], listing, **on(table))
    for shown in (table, hits):  # a wrong answer found by a search can be removed too
        shown.select(pick_entry, shown, entry, **QUIET)
    drop.click(remove, [entry, source, page, hits], [stats, *listing, entry, hits], **on(table))
    again.click(rebuild, dataset, [rebuilding, rebuilt, timer], **on(rebuilt))
    timer.tick(follow_rebuild, rebuilding, [rebuilt, stats, timer], **QUIET)
    return MemoryTab(tab, dataset)
