"""The Train tab: import a dataset, estimate and start a fine-tuning job, follow every training job.

The job list holds every training job, whoever started it (this tab, the API, ``csra train``, the
OpenAI fine-tuning surface, a sweep), newest first. A ``gr.Timer`` refreshes it, and the followed
job's progress and loss curve, while the tab is open (the job rows are the source of truth); while
nothing is selected the newest running job is followed. As the form changes the API's dry run
(``POST /jobs/train`` with ``dry_run``) gives the estimate shown under Start; a run the API says
needs confirmation starts only after a second, explicit click.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from csra.client import ApiError
from csra.specs import Grounding, TrainSpec
from ui.common import QUIET, api_errors, cancel_job, client, job_html, num, on, secs

LOSS_COLORS = {"train loss": "#2563eb", "validation loss": "#f97316"}
LIST_LIMIT = 50  # the newest training jobs listed (a followed older one is kept in the list)
POLL_SECONDS = 2.0
WAITING = ("queued", "waiting")
ESTIMATE_FIELDS = ("summary", "confirm", "estimated_seconds", "note")


def _default(field: str, spec: type[TrainSpec] | type[Grounding] = TrainSpec) -> Any:
    """The form's default for a ``TrainSpec`` (or ``Grounding``) field: the spec is the one source of the defaults."""
    return spec.model_fields[field].default


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


# ---------------------------------------------------------------------------- the job list
def job_label(job: dict[str, Any]) -> str:
    """``#12 tiny-ft (baseline, full) · sweep #9 · ● running 45%``: a finished job ends in its status."""
    p = job.get("params") or {}
    name = (job.get("result") or {}).get("model_name") or p.get("output_name") or ""
    label = f"#{job['id']} {name}".rstrip()
    how = ", ".join(str(v) for v in (p.get("base_model"), p.get("method")) if v)
    if how:
        label += f" ({how})"
    if job.get("parent_id"):
        label += f" · sweep #{job['parent_id']}"
    status = job["status"]
    if status == "running":
        mark = f"● running {int(100 * float(job.get('progress') or 0))}%"
        mark += " · cancelling" if job.get("cancel_requested") else ""
    elif status in WAITING:
        mark = f"○ {status}"
    else:
        mark = status
    return f"{label} · {mark}"


def train_job_choices(jobs: list[dict[str, Any]], followed: dict[str, Any] | None = None) -> list[tuple[str, int]]:
    """Every training job as (label, id), newest first; ``followed`` stays in even when past the listing."""
    rows = {j["id"]: j for j in jobs}
    if followed is not None:
        rows[followed["id"]] = followed
    return [(job_label(j), j["id"]) for j in sorted(rows.values(), key=lambda j: j["id"], reverse=True)]


def newest_active(jobs: list[dict[str, Any]]) -> int | None:
    """The job to follow when none is selected: the newest running one, else the newest waiting one."""
    for statuses in (("running",), WAITING):
        ids = [j["id"] for j in jobs if j["status"] in statuses]
        if ids:
            return max(ids)
    return None


def _view(job: dict[str, Any] | None, shown: dict[str, Any] | None) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """(status line, loss plot, result) of ``job``, ``gr.skip()`` for what ``shown`` already shows; the new ``shown``.

    A finished job already shown costs no further request.
    """
    if job is None:
        fresh: dict[str, Any] = {"id": None}
        return ((gr.skip(),) * 3 if shown == fresh else (job_html(None), None, None)), fresh
    old = shown if shown and shown.get("id") == job["id"] else {}
    status, done = job_html(job), bool(job["finished"])
    if old.get("done") and old.get("status") == status:
        return (gr.skip(),) * 3, old
    frame = loss_frame(client().job_events(job["id"], kind="metric"))
    new = {"id": job["id"], "status": status, "points": 0 if frame is None else len(frame), "done": done}
    return (
        status if old.get("status") != status else gr.skip(),
        frame if old.get("points") != new["points"] else gr.skip(),
        (job.get("result") if done else None) if old.get("done") != done else gr.skip(),
    ), new


def train_refresh(job_id: int | None, shown: dict[str, Any] | None, listed: list[Any] | None) -> tuple[Any, ...]:
    """Timer tick, tab open, page load: job, list, status, plot, result, shown, listed.

    The list's value is only set when nothing was selected (then the newest running job is followed),
    so a tick never undoes what the person picks meanwhile. Failures are shown in the status line.
    """
    try:
        jobs = client().jobs(kind="train", limit=LIST_LIMIT)
        auto = newest_active(jobs) if job_id is None else None
        target = auto if job_id is None else int(job_id)
        job = None
        if target is not None:
            job = next((j for j in jobs if j["id"] == target), None) or client().job(target)
        view, shown = _view(job, shown)
    except ApiError as e:
        note = job_html(None, f"⚠️ {e.detail}")
        if (shown or {}).get("error") == note:
            return (gr.skip(),) * 7
        return gr.skip(), gr.skip(), note, gr.skip(), gr.skip(), {"error": note}, gr.skip()
    choices = train_job_choices(jobs, job)
    if auto is not None:
        follow: Any = gr.Dropdown(choices=choices, value=auto)
    else:
        follow = gr.Dropdown(choices=choices) if choices != listed else gr.skip()
    return auto if auto is not None else gr.skip(), follow, *view, shown, choices


def _follow(job: dict[str, Any]) -> tuple[Any, ...]:
    """Follow ``job`` from now on: the same outputs as a refresh, all of them sent."""
    view, shown = _view(job, None)
    choices = train_job_choices(client().jobs(kind="train", limit=LIST_LIMIT), job)
    return job["id"], gr.Dropdown(choices=choices, value=job["id"]), *view, shown, choices


def train_cancel(job_id: int | None) -> tuple[str, None]:
    """Cancel: the followed job's status line as the API answered, and ``shown`` forgotten, so the next tick
    sends the status again. The answer's job is the one before the worker stopped it ("running"); a tick
    that already saw it cancelled may land before this answer, and without the reset every later tick
    would skip a status it believes shown (the likely cause of a CI failure where "running 13%" stayed on
    screen after the cancel)."""
    return cancel_job(job_id), None


@api_errors
def show_job(job_id: int | None) -> tuple[Any, ...]:
    """Follow ``job_id``, picked in the list or opened from the Jobs tab."""
    if job_id is None:
        view, shown = _view(None, None)
        return None, gr.skip(), *view, shown, gr.skip()
    job = client().job(int(job_id))
    if job["kind"] != "train":
        raise gr.Error(f"Job #{job['id']} is a {job['kind']} job; the Train tab follows training jobs.")
    return _follow(job)


def timer_on() -> gr.Timer:
    return gr.Timer(active=True)


# ---------------------------------------------------------------------------- estimate and start
def train_body(
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
    grounded: bool = False,
    k: float = _default("k", Grounding),
    exemplar_tokens: float = _default("max_exemplar_tokens", Grounding),
    *reply: float | None,
) -> dict[str, Any]:
    """The ``POST /jobs/train`` body of the form (``gr.Error`` for a missing field). A grounded run leaves
    max input tokens at its default out, so the API makes room for the exemplars (``TrainSpec``);
    ``reply``: its reply settings in ``REPLY_SETTINGS``' order (those not given keep the spec's defaults)."""
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
    if grounded:
        body["grounding"] = grounding_body(k, exemplar_tokens, reply)
        if body["max_input_length"] == _default("max_input_length"):
            del body["max_input_length"]
    if (output_name or "").strip():
        body["output_name"] = output_name.strip()
    return body


# A grounded model's own reply settings (``Grounding``), set once at training and used by every chat and
# evaluation that does not override them: (field, the form's label, its hint). Their defaults and ranges
# are the spec's; the API's 422 names a value out of range.
REPLY_SETTINGS = (
    ("copy_bias", "Copy bias", "how hard a reply keeps to the approved answer (0: off; up to 20)"),
    ("copy_exemplars", "Copy along the first N answers", "0: along all of them"),
    ("length_floor", "Length floor", "the reply may not end before this share of the first answer's length"),
    ("consensus_pool", "Consensus pool", "of the N nearest answers, those agreeing most come first (0: the k nearest)"),
    ("no_repeat_ngram_size", "Loop guard", "no run of this many tokens twice in a reply (0: off)"),
    ("min_similarity", "Min similarity", "below this, the message is unlike any approved one: the model writes freely"),
)


def _whole(field: str) -> bool:
    """Whether a ``Grounding`` field takes a whole number."""
    return Grounding.model_fields[field].annotation is int


def grounding_body(k: float | None, exemplar_tokens: float | None, reply: tuple[float | None, ...]) -> dict[str, Any]:
    """The ``grounding`` of a grounded run: its exemplars, and the reply settings the form gives."""
    body: dict[str, Any] = {"k": int(num(k, "Exemplars per prompt")),
                            "max_exemplar_tokens": int(num(exemplar_tokens, "Tokens per exemplar"))}
    for (field, label, _), value in zip(REPLY_SETTINGS, reply, strict=False):
        number = num(value, label)
        body[field] = int(number) if _whole(field) else number
    return body


def dry_run(body: dict[str, Any]) -> dict[str, Any]:
    """The API's estimate for ``body`` (summary, confirm, estimated_seconds, note); nothing is started."""
    answer = client().train({**body, "dry_run": True})
    if not answer.get("dry_run"):  # an API from before dry runs would have queued a real job
        raise ApiError(0, f"the API does not support dry runs (it answered job #{answer.get('id')})")
    return {k: answer.get(k) for k in ESTIMATE_FIELDS}


def needs_confirmation(estimate: dict[str, Any] | None) -> bool:
    """The API asks for confirmation (above the deployment's threshold, or no time estimate)."""
    return bool(estimate and estimate.get("confirm"))


def confirm_label(estimate: dict[str, Any]) -> str:
    seconds = estimate.get("estimated_seconds")
    return f"Start anyway (about {secs(seconds)})" if seconds is not None else "Start anyway (time unknown)"


def estimate_html(estimate: dict[str, Any] | None, *, asking: bool = False, error: str = "") -> str:
    """The estimate under Start; ``asking``: Start was clicked and waits for the confirmation."""
    if error:
        return f"<div class='csra-estimate csra-err'>{html.escape(error)}</div>"
    if not estimate:
        return ""
    parts = [f"<b>Estimate:</b> {html.escape(str(estimate.get('summary') or 'none'))}"]
    if estimate.get("note"):
        parts.append(f"<i>{html.escape(str(estimate['note']))}</i>")
    if asking:
        parts.append("<b>This run needs a confirmation: click “Start anyway” to start it.</b>")
    elif needs_confirmation(estimate):
        parts.append("Start will ask for a confirmation.")
    return f"<div class='csra-estimate'>{'<br>'.join(parts)}</div>"


def train_estimate(*params: Any) -> tuple[Any, ...]:
    """A form change: est, estimate line, pending, confirm button. Errors stay inline (no popup while typing)."""
    hidden = gr.Button(visible=False)
    if params[0] is None:  # no dataset picked (yet): nothing to estimate, nothing wrong either
        return None, "", None, hidden
    try:
        body = train_body(*params)
        estimate = dry_run(body)
    except gr.Error as e:
        return None, estimate_html(None, error=str(e.message)), None, hidden
    except ApiError as e:
        return None, estimate_html(None, error=f"No estimate: {e.detail}"), None, hidden
    return {"body": body, "estimate": estimate}, estimate_html(estimate), None, hidden


def reset_confirmation() -> tuple[Any, ...]:
    """A change that needs no new estimate still takes a given confirmation back: pending, confirm button."""
    return None, gr.Button(visible=False)


def _start(body: dict[str, Any]) -> tuple[Any, ...]:
    """Start the job and follow it: the refresh outputs, then pending and the confirm button."""
    job = client().train(body)
    gr.Info(f"Training job #{job['id']} queued.")
    return *_follow(job), None, gr.Button(visible=False)


@api_errors
def train_start(est: dict[str, Any] | None, *params: Any) -> tuple[Any, ...]:
    """Start: the run starts unless its estimate asks for a confirmation; then the confirm button shows."""
    body = train_body(*params)
    estimate = est["estimate"] if est and est.get("body") == body else dry_run(body)
    if needs_confirmation(estimate):
        asking = gr.Button(value=confirm_label(estimate), visible=True)
        return (*(gr.skip(),) * 7, {"body": body, "estimate": estimate}, asking, estimate_html(estimate, asking=True))
    return *_start(body), estimate_html(estimate)


@api_errors
def train_confirm(pending: dict[str, Any] | None, *params: Any) -> tuple[Any, ...]:
    """Start anyway: only the very run that was estimated; a form changed since needs a new Start."""
    body = train_body(*params)
    if pending is None or body != pending["body"]:
        gr.Warning("The form changed after the estimate: click Start training again to see the new one.")
        return (*(gr.skip(),) * 7, None, gr.Button(visible=False), gr.skip())
    return *_start(body), estimate_html(pending["estimate"])


# ---------------------------------------------------------------------------- import
@api_errors
def import_dataset(path: str | None, name: str) -> tuple[Any, ...]:
    if not path:
        raise gr.Error("Choose a CSV, JSONL or Parquet file to upload.")
    out = client().import_file(path, (name or "").strip() or Path(path).stem)
    ds, job = out["dataset"], out["job"]
    gr.Info(f"Importing dataset #{ds['id']} (job #{job['id']}); it appears as ready when the job ends.")
    return job_html(job), None


# ---------------------------------------------------------------------------- layout
@dataclass
class TrainTab:
    tab: gr.Tab
    dataset: gr.Dropdown
    datasets_refresh: gr.Button
    base: gr.Dropdown
    timer: gr.Timer  # on only while the tab is open: other tabs switch it off when selected
    view: list[Any]  # show_job's outputs: job, list, status, plot, result, shown, listed


def _import_box() -> None:
    with gr.Accordion("Import a dataset", open=False):
        with gr.Row():
            file = gr.File(label="CSV, JSONL or Parquet", file_types=[".csv", ".jsonl", ".parquet"], height=120)
            with gr.Column():
                name = gr.Textbox(label="Dataset name")
                btn = gr.Button("Import")
                status = gr.HTML("")
    btn.click(import_dataset, [file, name], [status, file], **on(status))


def _form() -> tuple[list[Any], gr.Button, gr.Button, gr.Button, gr.HTML]:
    """The job's parameters (in train_body's order), the dataset refresh, start and confirm buttons,
    the estimate line."""
    with gr.Row():
        dataset = gr.Dropdown([], value=None, label="Dataset", elem_id="train-dataset", scale=3)
        refresh = gr.Button("↻", size="sm", min_width=40, scale=0)
    base = gr.Dropdown([], value=None, label="Base model", elem_id="train-base")
    method = gr.Radio(["full", "lora"], value="full", label="Method")
    grounded = gr.Checkbox(_default("grounding") is not None, elem_id="train-grounded",
                           label="Grounded: the model is shown the team's approved answers to the most similar "
                                 "messages, in training and in every reply (on Bitext a grounded fine-tune beats "
                                 "the nearest approved answer; an ungrounded one does not)")
    with gr.Row():
        epochs = gr.Number(_default("epochs"), label="Epochs", minimum=1, elem_id="train-epochs")
        lr = gr.Number(_default("learning_rate"), label="Learning rate", minimum=0)
        batch = gr.Number(_default("batch_size"), label="Batch size", precision=0, minimum=1, elem_id="train-batch")
    with gr.Row():
        max_train = gr.Number(0, label="Max train samples (0: all)", precision=0, minimum=0, elem_id="train-max")
        out_name = gr.Textbox(label="Output model name (empty: ft-<job id>)", elem_id="train-out")
    with gr.Accordion("Advanced", open=False):
        with gr.Row():
            lora_r = gr.Number(_default("lora_r"), label="LoRA r", precision=0, minimum=1)
            lora_alpha = gr.Number(_default("lora_alpha"), label="LoRA alpha", precision=0, minimum=1)
            warmup = gr.Number(_default("warmup_ratio"), label="Warmup ratio", minimum=0)
        with gr.Row():
            max_in = gr.Number(_default("max_input_length"), label="Max input tokens", precision=0, minimum=8)
            max_out = gr.Number(_default("max_target_length"), label="Max target tokens", precision=0, minimum=8)
            seed = gr.Number(_default("seed"), label="Seed", precision=0)
            log_every = gr.Number(_default("logging_steps"), label="Log the loss every N steps", precision=0, minimum=1,
                                  elem_id="train-log-every")
        with gr.Row():
            k = gr.Number(_default("k", Grounding), label="Grounded: exemplars per prompt", precision=0, minimum=1,
                          maximum=8, elem_id="train-k")
            exemplar_tokens = gr.Number(_default("max_exemplar_tokens", Grounding), precision=0, minimum=16,
                                        maximum=512, label="Grounded: tokens per exemplar")
        keep_best = gr.Checkbox(_default("keep_best_on_cancel"), label="On cancel, keep the best checkpoint so far")
    with gr.Accordion("Grounded: how its replies follow the approved answers", open=False,
                      elem_id="train-reply-settings"):
        gr.Markdown("The model keeps these for every reply; a reply or an evaluation can override some of them "
                    "(the copy bias, the loop guard).")
        reply = [gr.Number(_default(field, Grounding), label=label, info=hint, minimum=0,
                           precision=0 if _whole(field) else None,
                           elem_id=f"train-{field.replace('_', '-')}")
                 for field, label, hint in REPLY_SETTINGS]
    with gr.Row():
        start = gr.Button("Start training", variant="primary", elem_id="train-start")
        confirm = gr.Button("Start anyway", variant="stop", visible=False, elem_id="train-confirm")
    estimate = gr.HTML("", elem_id="train-estimate")
    params = [dataset, base, method, epochs, lr, batch, max_train, out_name, lora_r, lora_alpha, max_in, max_out,
              warmup, seed, keep_best, log_every, grounded, k, exemplar_tokens, *reply]
    return params, refresh, start, confirm, estimate


def _progress() -> tuple[gr.Dropdown, gr.Button, gr.HTML, gr.LinePlot, gr.JSON]:
    with gr.Row(equal_height=True):
        follow = gr.Dropdown(
            [], value=None, label="Training job", elem_id="train-job", scale=4,
            info="every training job, newest first (● running, ○ queued); the newest running one is followed",
        )
        cancel = gr.Button("Cancel", variant="stop", elem_id="train-cancel", scale=1, min_width=90)
    status = gr.HTML(job_html(None), elem_id="train-status")
    plot = gr.LinePlot(
        None, color_map=LOSS_COLORS, x="step", y="loss", color="series", title="Loss", height=320,
        elem_id="loss-plot",
    )
    return follow, cancel, status, plot, gr.JSON(None, label="Result")


def _wire_estimate(params: list[Any], est: gr.State, estimate: gr.HTML, pending: gr.State, confirm: gr.Button) -> None:
    """Every form change asks for a new estimate; typing a name only takes a given confirmation back,
    the estimate follows when the field is left.

    One listener for all the fields, so ``always_last`` holds across them: two fields changed in a row
    give one estimate of the form as it ends up, never an older one that happened to finish last."""
    triggers: list[Any] = []
    for field in params:
        if isinstance(field, gr.Textbox):
            field.input(reset_confirmation, None, [pending, confirm], **QUIET)
            triggers += [field.blur, field.submit]
        else:
            triggers.append(field.change)
    gr.on(triggers, train_estimate, params, [est, estimate, pending, confirm], trigger_mode="always_last", **QUIET)


def build(demo: gr.Blocks) -> TrainTab:
    """The tab inside the current ``gr.Blocks``, with its events."""
    with gr.Tab("Train", id="train") as tab:
        job = gr.State(None)  # the followed job's id
        shown = gr.State(None)  # what the status, plot and result show (to skip unchanged updates)
        listed = gr.State(None)  # the list's choices as last sent
        est = gr.State(None)  # {"body", "estimate"}: the last dry run and the form it was made for
        pending = gr.State(None)  # {"body", "estimate"}: the run Start asked to confirm
        timer = gr.Timer(POLL_SECONDS, active=False)
        _import_box()
        with gr.Row():
            with gr.Column(scale=2):
                params, refresh, start, confirm, estimate = _form()
            with gr.Column(scale=3):
                follow, cancel, status, plot, result = _progress()

    view = [job, follow, status, plot, result, shown, listed]
    polled = ([job, shown, listed], view)
    demo.load(train_refresh, *polled, **QUIET)
    tab.select(timer_on, None, timer, **QUIET)
    tab.select(train_refresh, *polled, **QUIET)
    timer.tick(train_refresh, *polled, **QUIET)
    follow.input(show_job, follow, view, **on(status))
    cancel.click(train_cancel, job, [status, shown], **on(status))
    _wire_estimate(params, est, estimate, pending, confirm)
    started = [*view, pending, confirm, estimate]
    start.click(train_start, [est, *params], started, **on(estimate))
    confirm.click(train_confirm, [pending, *params], started, **on(estimate))
    return TrainTab(tab, dataset=params[0], datasets_refresh=refresh, base=params[1], timer=timer, view=view)
