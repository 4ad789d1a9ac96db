"""The Jobs tab: every job with its status and progress, refreshed every 3 s while the tab is open;
details and cancel for one job."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import gradio as gr
import pandas as pd

from csra.client import ApiError
from ui.common import QUIET, api_errors, client, on, secs

JOB_KINDS = ["all", "import", "train", "evaluate", "generate", "sweep", "memory"]
JOB_STATUSES = ["all", "queued", "running", "succeeded", "failed", "cancelled"]
COLUMNS = ["id", "kind", "status", "progress", "stage", "eta", "attempts", "created", "error"]


def jobs_frame(jobs: list[dict[str, Any]]) -> pd.DataFrame:
    rows = [
        {
            "id": j["id"],
            "kind": j["kind"],
            "status": j["status"],
            "progress": f"{100 * float(j['progress']):.0f}%",
            "stage": j.get("stage") or "",
            "eta": secs(j["eta_seconds"]) if j.get("eta_seconds") is not None else "",
            "attempts": j.get("attempts", 0),
            "created": (j.get("created_at") or "")[:19].replace("T", " "),
            "error": (j.get("error") or "")[:200],
        }
        for j in jobs
    ]
    return pd.DataFrame(rows, columns=COLUMNS)


def refresh_jobs(kind: str, status: str) -> tuple[Any, str]:
    try:
        jobs = client().jobs(
            kind=None if kind == "all" else kind, status=None if status == "all" else status, limit=200
        )
    except ApiError as e:
        return gr.skip(), f"⚠️ {e.detail}"
    return jobs_frame(jobs), f"{len(jobs)} job(s) · refreshed {time.strftime('%H:%M:%S')}"


@api_errors
def jobs_cancel(job_id: float | None, kind: str, status: str) -> tuple[Any, ...]:
    if not job_id:
        raise gr.Error("Enter the id of the job to cancel.")
    job = client().cancel_job(int(job_id))
    gr.Info(f"Job #{job['id']} is {job['status']}{' (cancel requested)' if job['status'] == 'running' else ''}.")
    return (*refresh_jobs(kind, status), job)


@api_errors
def jobs_show(job_id: float | None) -> dict[str, Any]:
    if not job_id:
        raise gr.Error("Enter a job id.")
    return client().job(int(job_id))


def pick_job(evt: gr.SelectData, table: pd.DataFrame) -> tuple[Any, Any]:
    """The clicked row's job id, and the "Follow in the Train tab" button for a training job only."""
    try:
        row = table.iloc[evt.index[0]]
        return int(row["id"]), gr.Button(visible=row["kind"] == "train")
    except (IndexError, KeyError, TypeError, ValueError):
        return gr.skip(), gr.skip()


def timer_on(active: bool) -> gr.Timer:
    return gr.Timer(active=bool(active))


@dataclass
class JobsTab:
    tab: gr.Tab
    timer: gr.Timer  # on only while the tab is open: other tabs switch it off when selected
    job_id: gr.Number  # the job picked in the table (or typed)
    to_train: gr.Button  # follow the picked training job in the Train tab (wired by ui.app)


def build(demo: gr.Blocks) -> JobsTab:
    """The tab inside the current ``gr.Blocks``, with its events."""
    with gr.Tab("Jobs", id="jobs") as tab:
        timer = gr.Timer(3.0, active=False)
        with gr.Row():
            kind = gr.Dropdown(JOB_KINDS, value="all", label="Kind")
            status = gr.Dropdown(JOB_STATUSES, value="all", label="Status")
            auto = gr.Checkbox(True, label="Auto-refresh (3 s)")
            refresh = gr.Button("Refresh")
        note = gr.Markdown("")
        table = gr.Dataframe(jobs_frame([]), interactive=False, wrap=True, elem_id="jobs-table", max_height=480)
        with gr.Row():
            job_id = gr.Number(None, label="Job id (click a row)", precision=0, minimum=0)
            show = gr.Button("Show details")
            cancel = gr.Button("Cancel job", variant="stop", elem_id="jobs-cancel")
            to_train = gr.Button("Follow in the Train tab", visible=False, elem_id="jobs-to-train")
        detail = gr.JSON(None, label="Job")

    listing = ([kind, status], [table, note])
    demo.load(refresh_jobs, *listing, **QUIET)
    tab.select(timer_on, auto, timer, **QUIET)
    tab.select(refresh_jobs, *listing, **QUIET)
    for trigger in (refresh.click, kind.change, status.change, timer.tick):
        trigger(refresh_jobs, *listing, **QUIET)
    auto.change(timer_on, auto, timer, **QUIET)
    table.select(pick_job, table, [job_id, to_train], **QUIET)
    show.click(jobs_show, job_id, detail, **on(detail))
    cancel.click(jobs_cancel, [job_id, kind, status], [table, note, detail], **on(detail))
    return JobsTab(tab, timer, job_id, to_train)
