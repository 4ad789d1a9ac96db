"""The Train tab: import a dataset, start a fine-tuning job, follow its progress and loss curve.

Progress is polled with a ``gr.Timer`` while a job is followed (the job row is the source of truth).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from csra.client import ApiError
from ui.common import QUIET, api_errors, cancel_job, client, dropdown, job_html, num, on

LOSS_COLORS = {"train loss": "#2563eb", "validation loss": "#f97316"}


def loss_frame(events: list[dict[str, Any]]) -> pd.DataFrame | None:
    """Metric events as long-form rows (step, loss, series) for the loss plot; None before the first.

    (None rather than an empty frame: Gradio 6.31's LinePlot draws no lines once it started empty.)
    """
    rows = []
    for ev in events:
        d = ev.get("data") or {}
        if d.get("step") is None:
            continue
        if d.get("loss") is not None:
            rows.append({"step": int(d["step"]), "loss": float(d["loss"]), "series": "train loss"})
        if d.get("eval_loss") is not None:
            rows.append({"step": int(d["step"]), "loss": float(d["eval_loss"]), "series": "validation loss"})
    return pd.DataFrame(rows, columns=["step", "loss", "series"]) if rows else None


def _train_jobs_dropdown(selected: int | None) -> gr.Dropdown:
    jobs = client().jobs(kind="train", limit=30)
    return dropdown([(f"#{j['id']} {j['params'].get('output_name') or ''} ({j['status']})", j["id"]) for j in jobs],
                    selected)


def load_train_jobs() -> Any:
    try:
        return _train_jobs_dropdown(None)
    except ApiError:
        return gr.skip()


@api_errors
def train_start(
    dataset_id: int | None,
    base_model: str | None,
    method: str,
    epochs: float,
    lr: float,
    batch_size: float,
    max_train: float | None,
    output_name: str,
    lora_r: float,
    lora_alpha: float,
    max_input: float,
    max_target: float,
    warmup: float,
    seed: float,
    keep_best: bool,
    log_every: float,
) -> tuple[Any, ...]:
    if dataset_id is None:
        raise gr.Error("Pick a dataset (import one in 'Import a dataset' above if the list is empty).")
    body: dict[str, Any] = {
        "dataset_id": int(dataset_id),
        "base_model": base_model or "baseline",
        "method": method,
        "epochs": num(epochs, "Epochs"),
        "learning_rate": num(lr, "Learning rate"),
        "batch_size": int(num(batch_size, "Batch size")),
        "max_input_length": int(num(max_input, "Max input tokens")),
        "max_target_length": int(num(max_target, "Max target tokens")),
        "warmup_ratio": float(warmup or 0),
        "seed": int(seed or 0),
        "keep_best_on_cancel": bool(keep_best),
        "logging_steps": max(1, int(log_every or 10)),
    }
    if method == "lora":
        body.update(lora_r=int(num(lora_r, "LoRA r")), lora_alpha=int(num(lora_alpha, "LoRA alpha")))
    if max_train:
        body["max_train_samples"] = int(max_train)
    if (output_name or "").strip():
        body["output_name"] = output_name.strip()
    job = client().train(body)
    gr.Info(f"Training job #{job['id']} queued.")
    return job["id"], _train_jobs_dropdown(job["id"]), job_html(job), None, None, gr.Timer(active=True)


def _train_view(job_id: int) -> tuple[bool, tuple[Any, ...]]:
    """(finished?, (status line, loss plot, result, timer))."""
    c = client()
    job = c.job(job_id)
    events = c.job_events(job_id, kind="metric")
    done = bool(job["finished"])
    return done, (job_html(job), loss_frame(events), job.get("result") if done else None, gr.Timer(active=not done))


@api_errors
def train_follow(job_id: int | None) -> tuple[Any, ...]:
    if job_id is None:
        return None, job_html(None), None, None, gr.Timer(active=False)
    return job_id, *_train_view(int(job_id))[1]


def train_poll(job_id: int | None) -> tuple[Any, ...]:
    """status, loss plot, result, timer, job list (refreshed once the job ends)."""
    if job_id is None:
        return gr.skip(), gr.skip(), gr.skip(), gr.Timer(active=False), gr.skip()
    try:
        done, view = _train_view(int(job_id))
        return *view, _train_jobs_dropdown(int(job_id)) if done else gr.skip()
    except ApiError as e:
        gr.Warning(f"Stopped following the training job: {e.detail}")
        return job_html(None, f"⚠️ {e.detail}"), gr.skip(), gr.skip(), gr.Timer(active=False), gr.skip()


@api_errors
def import_dataset(path: str | None, name: str) -> tuple[Any, ...]:
    if not path:
        raise gr.Error("Choose a CSV, JSONL or Parquet file to upload.")
    out = client().import_file(path, (name or "").strip() or Path(path).stem)
    ds, job = out["dataset"], out["job"]
    gr.Info(f"Importing dataset #{ds['id']} (job #{job['id']}); it appears as ready when the job ends.")
    return job_html(job), None


@dataclass
class TrainTab:
    tab: gr.Tab
    dataset: gr.Dropdown
    datasets_refresh: gr.Button
    base: gr.Dropdown


def _import_box() -> None:
    with gr.Accordion("Import a dataset", open=False):
        with gr.Row():
            file = gr.File(label="CSV, JSONL or Parquet", file_types=[".csv", ".jsonl", ".parquet"], height=120)
            with gr.Column():
                name = gr.Textbox(label="Dataset name")
                btn = gr.Button("Import")
                status = gr.HTML("")
    btn.click(import_dataset, [file, name], [status, file], **on(status))


def _form() -> tuple[list[Any], gr.Button, gr.Button, gr.Button]:
    """The job's parameters (in train_start's order), the dataset refresh, start and cancel buttons."""
    with gr.Row():
        dataset = gr.Dropdown([], value=None, label="Dataset", elem_id="train-dataset", scale=3)
        refresh = gr.Button("↻", size="sm", min_width=40, scale=0)
    base = gr.Dropdown([], value=None, label="Base model", elem_id="train-base")
    method = gr.Radio(["full", "lora"], value="full", label="Method")
    with gr.Row():
        epochs = gr.Number(2, label="Epochs", minimum=1, elem_id="train-epochs")
        lr = gr.Number(5e-5, label="Learning rate", minimum=0)
        batch = gr.Number(8, label="Batch size", precision=0, minimum=1)
    with gr.Row():
        max_train = gr.Number(0, label="Max train samples (0: all)", precision=0, minimum=0, elem_id="train-max")
        out_name = gr.Textbox(label="Output model name (empty: ft-<job id>)", elem_id="train-out")
    with gr.Accordion("Advanced", open=False):
        with gr.Row():
            lora_r = gr.Number(8, label="LoRA r", precision=0, minimum=1)
            lora_alpha = gr.Number(16, label="LoRA alpha", precision=0, minimum=1)
            warmup = gr.Number(0.0, label="Warmup ratio", minimum=0)
        with gr.Row():
            max_in = gr.Number(192, label="Max input tokens", precision=0, minimum=8)
            max_out = gr.Number(192, label="Max target tokens", precision=0, minimum=8)
            seed = gr.Number(42, label="Seed", precision=0)
            log_every = gr.Number(10, label="Log the loss every N steps", precision=0, minimum=1)
        keep_best = gr.Checkbox(False, label="On cancel, keep the best checkpoint so far")
    with gr.Row():
        start = gr.Button("Start training", variant="primary", elem_id="train-start")
        cancel = gr.Button("Cancel", variant="stop", elem_id="train-cancel")
    params = [dataset, base, method, epochs, lr, batch, max_train, out_name, lora_r, lora_alpha, max_in, max_out,
              warmup, seed, keep_best, log_every]
    return params, refresh, start, cancel


def _progress() -> tuple[gr.Dropdown, gr.HTML, gr.LinePlot, gr.JSON]:
    follow = gr.Dropdown([], value=None, label="Training job", info="follow a run", elem_id="train-job")
    status = gr.HTML(job_html(None), elem_id="train-status")
    plot = gr.LinePlot(
        None, color_map=LOSS_COLORS, x="step", y="loss", color="series", title="Loss", height=320,
        elem_id="loss-plot",
    )
    return follow, status, plot, gr.JSON(None, label="Result")


def build(demo: gr.Blocks) -> TrainTab:
    """The tab inside the current ``gr.Blocks``, with its events."""
    with gr.Tab("Train", id="train") as tab:
        job = gr.State(None)
        timer = gr.Timer(1.0, active=False)
        _import_box()
        with gr.Row():
            with gr.Column(scale=2):
                params, refresh, start, cancel = _form()
            with gr.Column(scale=3):
                follow, status, plot, result = _progress()

    demo.load(load_train_jobs, None, follow, **QUIET)
    view = [status, plot, result, timer]
    start.click(train_start, params, [job, follow, *view], **on(status))
    follow.input(train_follow, follow, [job, *view], **on(status))
    timer.tick(train_poll, job, [*view, follow], **QUIET)
    cancel.click(cancel_job, job, status, **on(status))
    return TrainTab(tab, dataset=params[0], datasets_refresh=refresh, base=params[1])
