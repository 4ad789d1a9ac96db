"""The csra web UI (Gradio). It talks to the csra API over HTTP only (``ui.api_client``).

Tabs: Chat, Compare, Train, Evaluate, Jobs, Profile. Nothing contacts the API at import time:
choices are filled by ``demo.load`` and replies/progress are polled with ``gr.Timer``.
"""

from __future__ import annotations

import functools
import html
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import gradio as gr
import pandas as pd

from ui.api_client import TERMINAL, ApiError, client

TITLE = "csra — Customer Support Response Assistant"
TONES = [("Neutral", "neutral"), ("Friendly", "friendly"), ("Strict professional", "strict_professional")]
EXPORT_FORMATS = ("jsonl", "csv", "txt", "md")
JOB_KINDS = ["all", "import", "train", "evaluate", "generate", "sweep"]
JOB_STATUSES = ["all", "queued", "running", "succeeded", "failed", "cancelled"]
EVAL_PLOTS = ("metrics.png", "per_intent.png", "lengths.png", "loss_curves.png")
LEADERBOARD_METRICS = {  # overall metric -> column title
    "rouge_l": "ROUGE-L",
    "bleu": "BLEU",
    "chrf": "chrF",
    "semantic_similarity": "semantic sim.",
    "heuristic_quality": "quality",
    "too_verbose": "too verbose",
    "asks_needless_details": "needless asks",
    "repetitive": "repetitive",
    "off_tone": "off tone",
    "unfinished": "unfinished",
}
LOSS_COLORS = {"train loss": "#2563eb", "validation loss": "#f97316"}
FILES_DIR = Path(tempfile.gettempdir()) / "csra-ui"
FILES_MAX_AGE_S = 3600

CSS = """
.csra-bar {height: 8px; background: var(--neutral-200); border-radius: 4px; margin-top: 6px; overflow: hidden}
.csra-bar > div {height: 100%; background: var(--color-accent); transition: width .4s}
.csra-job {padding: 6px 2px}
.csra-err {color: var(--error-text-color, #b91c1c); margin-top: 4px; white-space: pre-wrap}
.csra-status {font-size: var(--text-sm)}
"""

F = TypeVar("F", bound=Callable[..., Any])


# ---------------------------------------------------------------------------- helpers
def api_errors(fn: F) -> F:
    """An API failure becomes a ``gr.Error`` showing the API's ``detail``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ApiError as e:
            title = f"API error {e.status}" if e.status else "API unreachable"
            raise gr.Error(e.detail, title=title, print_exception=False) from None

    return wrapper  # type: ignore[return-value]


def _keep(value: Any, choices: list[tuple[str, Any]], default: Any = None) -> Any:
    values = [v for _, v in choices]
    if isinstance(value, list):
        kept = [v for v in value if v in values]
        return kept or ([default] if default in values else [])
    if value in values:
        return value
    return default if default in values else (values[0] if values else None)


def _dropdown(choices: list[tuple[str, Any]], selected: Any) -> gr.Dropdown:
    """A dropdown of ``choices`` that keeps ``selected`` when it is still one of them (else none)."""
    return gr.Dropdown(choices=choices, value=selected if selected in [v for _, v in choices] else None)


def _num(value: float | None, label: str) -> float:
    """A required number field (a cleared Number input arrives as None)."""
    if value is None:
        raise gr.Error(f"{label}: enter a number.")
    return float(value)


def _secs(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def _write_file(name: str, content: bytes) -> str:
    """A file for the browser to download, in the system temp dir (Gradio serves from there)."""
    FILES_DIR.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for old in FILES_DIR.iterdir():
        try:
            if now - old.stat().st_mtime > FILES_MAX_AGE_S:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
    folder = FILES_DIR / uuid.uuid4().hex
    folder.mkdir()
    path = folder / Path(name).name
    path.write_bytes(content)
    return str(path)


def job_html(job: dict[str, Any] | None, note: str = "") -> str:
    """A job's status line with a progress bar."""
    if not job:
        return f"<div class='csra-job'>{html.escape(note) or 'No job yet.'}</div>"
    pct = max(0, min(100, int(round(100 * float(job.get("progress") or 0)))))
    if job["status"] == "succeeded":
        pct = 100
    parts = [f"<b>{html.escape(job['kind'])} job #{job['id']}</b>", html.escape(job["status"]), f"{pct}%"]
    if job.get("stage"):
        parts.append(html.escape(str(job["stage"])))
    if job["status"] == "running" and job.get("eta_seconds") is not None:
        parts.append(f"ETA {_secs(job['eta_seconds'])}")
    if job.get("attempts", 0) > 1:
        parts.append(f"attempt {job['attempts']}")
    err = f"<div class='csra-err'>{html.escape(job['error'])}</div>" if job.get("error") else ""
    return (
        f"<div class='csra-job'>{' · '.join(parts)}<div class='csra-bar'><div style='width:{pct}%'></div>"
        f"</div>{err}</div>"
    )


def _model_choices() -> list[tuple[str, str]]:
    return [(f"{m['name']} ({m['kind']})", m["name"]) for m in client().models()]


def _dataset_choices() -> list[tuple[str, int]]:
    out = []
    for d in client().datasets():
        status = "" if d["status"] == "ready" else f" · {d['status']}"
        out.append((f"#{d['id']} {d['name']} ({d['row_count']} rows{status})", d["id"]))
    return out


def _default_model(choices: list[tuple[str, str]]) -> str | None:
    names = [v for _, v in choices]
    return "baseline" if "baseline" in names else (names[0] if names else None)


def _gen_settings(
    model: str | None, tone: str, temperature: float, top_p: float, max_new_tokens: float, ask_details: bool
) -> dict[str, Any]:
    if not model:
        raise gr.Error("Pick a model first (the list comes from GET /models; is the store empty?).")
    return {
        "model_id": model,
        "tone": tone,
        "temperature": float(temperature),
        "top_p": float(top_p),
        "max_new_tokens": int(max_new_tokens),
        "ask_details_only_if_relevant": bool(ask_details),
    }


# ---------------------------------------------------------------------------- header / load
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
    try:
        choices = _model_choices()
    except ApiError as e:
        gr.Warning(f"Could not list models: {e.detail}")
        return (gr.skip(),) * 5
    default = _default_model(choices)
    finetuned = [v for label, v in choices if not label.endswith("(base)")]
    b_default = finetuned[-1] if finetuned else default
    return (
        gr.Dropdown(choices=choices, value=_keep(chat_model, choices, default)),
        gr.Dropdown(choices=choices, value=_keep(a, choices, default)),
        gr.Dropdown(choices=choices, value=_keep(b, choices, b_default)),
        gr.Dropdown(choices=choices, value=_keep(base, choices, default)),
        gr.Dropdown(choices=choices, value=_keep(eval_models, choices, default)),
    )


def refresh_datasets(train_ds: Any, eval_ds: Any) -> tuple[Any, ...]:
    try:
        choices = _dataset_choices()
    except ApiError as e:
        gr.Warning(f"Could not list datasets: {e.detail}")
        return gr.skip(), gr.skip()
    return (
        gr.Dropdown(choices=choices, value=_keep(train_ds, choices)),
        gr.Dropdown(choices=choices, value=_keep(eval_ds, choices)),
    )


# ---------------------------------------------------------------------------- chat
def _reply_text(m: dict[str, Any], jobs: dict[int, dict[str, Any]]) -> str:
    if m["status"] == "failed":
        return f"⚠️ **Generation failed:** {m.get('error') or 'unknown error'}"
    if m["status"] == "cancelled":
        return "⏹️ _Generation cancelled._"
    if m["status"] == "pending":
        job = jobs.get(m.get("job_id") or -1) or {}
        partial = (job.get("result") or {}).get("partial_text") or ""
        if partial:
            return partial + " ▌"
        return f"⏳ _{job.get('stage') or 'queued'}…_"
    text = m["content"] if m["content"].strip() else "_(empty reply)_"
    if m.get("corrected_reply"):
        text += f"\n\n✏️ _Corrected reply:_ {m['corrected_reply']}"
    return text


def render_chat(
    chat: dict[str, Any] | None, jobs: dict[int, dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """The chat's stored turns as Chatbot messages; pending replies show the job's partial text."""
    if not chat:
        return []
    out = []
    for m in chat["messages"]:
        if m["role"] == "user":
            out.append({"role": "user", "content": m["content"]})
        else:
            out.append({"role": "assistant", "content": _reply_text(m, jobs or {})})
    return out


def _last_reply(chat: dict[str, Any] | None) -> dict[str, Any] | None:
    replies = [m for m in (chat or {}).get("messages", []) if m["role"] == "assistant"]
    return replies[-1] if replies else None


def chat_meta(chat: dict[str, Any] | None) -> str:
    m = _last_reply(chat)
    if chat is None:
        return "New chat: the first message creates it."
    if m is None:
        return f"Chat #{chat['id']} · no replies yet."
    bits = [f"Chat #{chat['id']}", f"last reply: `{m.get('model_name') or '?'}`"]
    st = m.get("settings") or {}
    if st.get("tone"):
        bits.append(f"tone {st['tone']}")
    if m["status"] == "pending":
        bits.append(f"generating (job #{m.get('job_id')})")
    elif m["status"] in ("failed", "cancelled"):
        bits.append(m["status"])
    else:
        if m.get("latency_ms") is not None:
            bits.append(f"{m['latency_ms'] / 1000:.2f} s")
        if m.get("completion_tokens") is not None:
            bits.append(f"{m.get('prompt_tokens')} prompt / {m['completion_tokens']} reply tokens")
        if m.get("feedback"):
            bits.append("feedback " + ("👍" if m["feedback"] == "up" else "👎"))
        if m.get("corrected_reply"):
            bits.append("corrected")
    return " · ".join(bits)


def _pending(chat: dict[str, Any] | None) -> list[dict[str, Any]]:
    return [
        m for m in (chat or {}).get("messages", []) if m["role"] == "assistant" and m["status"] == "pending"
    ]


def _chat_list(selected: int | None) -> gr.Dropdown:
    chats = client().chats()
    choices = [(f"#{c['id']} {c['title']}", c["id"]) for c in chats]
    return _dropdown(choices, selected)


def _chat_outputs(
    chat: dict[str, Any] | None, jobs: dict[int, dict[str, Any]] | None = None
) -> tuple[Any, ...]:
    """chat state, chatbot, meta line, timer."""
    return chat, render_chat(chat, jobs), chat_meta(chat), gr.Timer(active=bool(_pending(chat)))


def load_chat_list() -> Any:
    try:
        return _chat_list(None)
    except ApiError:
        return gr.skip()


@api_errors
def refresh_chat_list(chat: dict[str, Any] | None) -> Any:
    return _chat_list((chat or {}).get("id"))


@api_errors
def open_chat(chat_id: int | None) -> tuple[Any, ...]:
    if chat_id is None:
        return (None, [], chat_meta(None), gr.Timer(active=False)) + (gr.skip(),) * 6
    chat = client().chat(int(chat_id))
    st = {**(chat.get("settings") or {}), **((_last_reply(chat) or {}).get("settings") or {})}

    def s(key: str) -> Any:
        return st[key] if st.get(key) is not None else gr.skip()

    return (
        *_chat_outputs(chat),
        s("model_id"),
        s("tone"),
        s("temperature"),
        s("top_p"),
        s("max_new_tokens"),
        s("ask_details_only_if_relevant"),
    )


def new_chat() -> tuple[Any, ...]:
    return None, [], chat_meta(None), gr.Timer(active=False), gr.Dropdown(value=None), ""


@api_errors
def delete_chat(chat: dict[str, Any] | None) -> tuple[Any, ...]:
    if not chat:
        raise gr.Error("No chat is open; nothing to delete.")
    client().delete_chat(chat["id"])
    gr.Info(f"Chat #{chat['id']} deleted.")
    return None, [], chat_meta(None), gr.Timer(active=False), _chat_list(None), ""


@api_errors
def send_message(
    chat: dict[str, Any] | None,
    message: str,
    model: str | None,
    tone: str,
    temperature: float,
    top_p: float,
    max_new_tokens: float,
    ask_details: bool,
) -> tuple[Any, ...]:
    if not (message or "").strip():
        raise gr.Error("Type a message first.")
    settings = _gen_settings(model, tone, temperature, top_p, max_new_tokens, ask_details)
    c = client()
    chat_id = chat["id"] if chat else c.create_chat("New chat", settings)["id"]
    c.post_message(chat_id, {"content": message, **settings})
    chat = c.chat(chat_id)
    return (*_chat_outputs(chat), "", _chat_list(chat_id))


def poll_chat(chat: dict[str, Any] | None) -> tuple[Any, ...]:
    """Timer tick: show the pending replies' partial text; re-read the chat once a job has ended."""
    pending = _pending(chat)
    if not chat or not pending:
        return _chat_outputs(chat)
    c = client()
    try:
        jobs = {m["job_id"]: c.job(m["job_id"]) for m in pending if m.get("job_id") is not None}
        if len(jobs) < len(pending) or any(j["status"] in TERMINAL for j in jobs.values()):
            chat = c.chat(chat["id"])
            jobs = {m["job_id"]: jobs[m["job_id"]] for m in _pending(chat) if m.get("job_id") in jobs}
    except ApiError as e:
        gr.Warning(f"Stopped following the reply: {e.detail}")
        return chat, gr.skip(), f"⚠️ {e.detail}", gr.Timer(active=False)
    return _chat_outputs(chat, jobs)


@api_errors
def stop_reply(chat: dict[str, Any] | None) -> tuple[Any, ...]:
    pending = _pending(chat)
    if not pending:
        raise gr.Error("No reply is being generated.")
    c = client()
    for m in pending:
        if m.get("job_id") is not None:
            try:
                c.cancel_job(m["job_id"])
            except ApiError as e:
                if e.status != 409:  # already finished: nothing to stop
                    raise
    return _chat_outputs(c.chat(chat["id"]))  # type: ignore[index]


@api_errors
def rate_reply(chat: dict[str, Any] | None, corrected: str, rating: str) -> tuple[Any, ...]:
    m = _last_reply(chat)
    if m is None or m["status"] != "done":
        raise gr.Error("There is no finished reply to rate yet.")
    c = client()
    c.feedback(chat["id"], m["id"], rating, (corrected or "").strip() or None)  # type: ignore[index]
    gr.Info("Thanks! Feedback saved." if rating == "up" else "Feedback saved.")
    return (*_chat_outputs(c.chat(chat["id"])), "")  # type: ignore[index]


@api_errors
def export_chat(chat: dict[str, Any] | None, fmt: str) -> str:
    if not chat:
        raise gr.Error("Open or start a chat first; there is nothing to export.")
    name, content = client().export_chat(chat["id"], fmt)
    return _write_file(name, content)


@api_errors
def export_all(fmt: str, model: str | None) -> str:
    name, content = client().export_chats(fmt, model=model or None)
    return _write_file(name, content)


# ---------------------------------------------------------------------------- compare
def _cmp_text(job: dict[str, Any] | None) -> tuple[str, str]:
    if not job:
        return "", ""
    res = job.get("result") or {}
    if job["status"] == "succeeded":
        meta = (
            f"`{res.get('model')}` · {float(res.get('latency_ms') or 0) / 1000:.2f} s · "
            f"{res.get('completion_tokens')} tokens · finish: {res.get('finish_reason')}"
        )
        return res.get("text", ""), meta
    if job["status"] in TERMINAL:
        return res.get("partial_text", ""), f"⚠️ **{job['status']}:** {job.get('error') or ''}"
    return res.get("partial_text", ""), f"⏳ job #{job['id']} · {job['status']} · {job.get('stage') or ''}"


@api_errors
def compare_start(
    message: str,
    model_a: str | None,
    model_b: str | None,
    tone: str,
    temperature: float,
    top_p: float,
    max_new_tokens: float,
    ask_details: bool,
    seed: float | None,
) -> tuple[Any, ...]:
    if not (message or "").strip():
        raise gr.Error("Type a customer message to compare the replies.")
    if not model_a or not model_b:
        raise gr.Error("Pick a model on each side.")
    c = client()
    ids = []
    for model in (model_a, model_b):
        body = {
            **_gen_settings(model, tone, temperature, top_p, max_new_tokens, ask_details),
            "message": message,
        }
        if seed is not None and int(seed) >= 0:
            body["seed"] = int(seed)
        ids.append(c.generate(body)["id"])
    return ids, "", "⏳ queued", "", "⏳ queued", gr.Timer(active=True)


def compare_poll(job_ids: list[int] | None) -> tuple[Any, ...]:
    if not job_ids:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.Timer(active=False)
    c = client()
    try:
        jobs = [c.job(j) for j in job_ids]
    except ApiError as e:
        gr.Warning(f"Stopped following the replies: {e.detail}")
        return gr.skip(), f"⚠️ {e.detail}", gr.skip(), f"⚠️ {e.detail}", gr.Timer(active=False)
    (ta, ma), (tb, mb) = _cmp_text(jobs[0]), _cmp_text(jobs[1])
    return ta, ma, tb, mb, gr.Timer(active=not all(j["status"] in TERMINAL for j in jobs))


@api_errors
def compare_stop(job_ids: list[int] | None) -> None:
    for j in job_ids or []:
        try:
            client().cancel_job(j)
        except ApiError as e:
            if e.status != 409:
                raise


# ---------------------------------------------------------------------------- train
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
    choices = [(f"#{j['id']} {j['params'].get('output_name') or ''} ({j['status']})", j["id"]) for j in jobs]
    return _dropdown(choices, selected)


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
        "epochs": _num(epochs, "Epochs"),
        "learning_rate": _num(lr, "Learning rate"),
        "batch_size": int(_num(batch_size, "Batch size")),
        "max_input_length": int(_num(max_input, "Max input tokens")),
        "max_target_length": int(_num(max_target, "Max target tokens")),
        "warmup_ratio": float(warmup or 0),
        "seed": int(seed or 0),
        "keep_best_on_cancel": bool(keep_best),
        "logging_steps": max(1, int(log_every or 10)),
    }
    if method == "lora":
        body.update(lora_r=int(_num(lora_r, "LoRA r")), lora_alpha=int(_num(lora_alpha, "LoRA alpha")))
    if max_train:
        body["max_train_samples"] = int(max_train)
    if (output_name or "").strip():
        body["output_name"] = output_name.strip()
    job = client().train(body)
    gr.Info(f"Training job #{job['id']} queued.")
    return job["id"], _train_jobs_dropdown(job["id"]), job_html(job), None, None, gr.Timer(active=True)


@api_errors
def train_follow(job_id: int | None) -> tuple[Any, ...]:
    if job_id is None:
        return None, job_html(None), None, None, gr.Timer(active=False)
    return job_id, *_train_view(int(job_id))[1]


def _train_view(job_id: int) -> tuple[bool, tuple[Any, ...]]:
    """(ended?, (status line, loss plot, result, timer))."""
    c = client()
    job = c.job(job_id)
    events = c.job_events(job_id, kind="metric")
    done = job["status"] in TERMINAL
    return done, (
        job_html(job),
        loss_frame(events),
        job.get("result") if done else None,
        gr.Timer(active=not done),
    )


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
def cancel_job(job_id: int | None) -> str:
    if job_id is None:
        raise gr.Error("No job selected.")
    job = client().cancel_job(int(job_id))
    gr.Info(f"Cancel requested for job #{job['id']}.")
    return job_html(job)


@api_errors
def import_dataset(path: str | None, name: str) -> tuple[Any, ...]:
    if not path:
        raise gr.Error("Choose a CSV, JSONL or Parquet file to upload.")
    out = client().import_dataset(path, (name or "").strip() or Path(path).stem)
    ds, job = out["dataset"], out["job"]
    gr.Info(f"Importing dataset #{ds['id']} (job #{job['id']}); it appears as ready when the job ends.")
    return job_html(job), None


# ---------------------------------------------------------------------------- evaluate
def leaderboard_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    out = []
    for i, r in enumerate(rows, start=1):
        m = r.get("metrics") or {}
        tc = r.get("training_config") or {}
        cfg = ", ".join(
            f"{k}={tc[k]}"
            for k in ("method", "epochs", "learning_rate", "batch_size", "max_train_samples")
            if tc.get(k) is not None
        )
        row = {"rank": i, "model": r["model"], "kind": r.get("kind") or ""}
        for k, title in LEADERBOARD_METRICS.items():
            v = m.get(k)
            row[title] = round(float(v), 4) if isinstance(v, (int, float)) else None
        row["evaluation"] = r.get("evaluation_id")
        row["training config"] = cfg
        out.append(row)
    cols = ["rank", "model", "kind", *LEADERBOARD_METRICS.values(), "evaluation", "training config"]
    return pd.DataFrame(out, columns=cols)


def _evaluation_choices(dataset_id: int | None) -> list[tuple[str, int]]:
    evs = client().evaluations(dataset_id=dataset_id)
    return [
        (f"#{e['id']} {', '.join(e['params'].get('model_ids', []))} ({e['status']})", e["id"]) for e in evs
    ]


@api_errors
def eval_start(
    models: list[str] | None,
    dataset_id: int | None,
    max_samples: float | None,
    max_new_tokens: float,
    num_beams: float,
    seed: float,
) -> tuple[Any, ...]:
    if not models:
        raise gr.Error("Pick at least one model to evaluate.")
    if dataset_id is None:
        raise gr.Error("Pick a dataset (its test split is used).")
    body: dict[str, Any] = {
        "model_ids": list(models),
        "dataset_id": int(dataset_id),
        "split": "test",
        "max_new_tokens": int(_num(max_new_tokens, "Max new tokens")),
        "num_beams": int(num_beams or 1),
        "seed": int(seed or 0),
    }
    body["max_samples"] = int(max_samples) if max_samples else None
    job = client().evaluate(body)
    gr.Info(f"Evaluation job #{job['id']} queued.")
    return job["id"], job_html(job), gr.Timer(active=True)


def _evaluation_view(evaluation_id: int) -> tuple[Any, ...]:
    """The dataset's leaderboard, this evaluation's plots and report, the evaluation list."""
    c = client()
    ev = c.evaluation(evaluation_id)
    dataset_id = ev.get("dataset_id")
    board = leaderboard_frame(c.leaderboard(dataset_id)) if dataset_id is not None else gr.skip()
    plots: list[str | None] = []
    for name in EVAL_PLOTS:
        try:
            plots.append(_write_file(f"eval{evaluation_id}-{name}", c.evaluation_file(evaluation_id, name)))
        except ApiError:
            plots.append(None)  # not every evaluation has every plot (loss curves need fine-tuned models)
    try:
        report = _write_file(
            f"evaluation-{evaluation_id}-report.html",
            c.download(f"/evaluations/{evaluation_id}/report.html")[1],
        )
    except ApiError:
        report = None
    choices = _evaluation_choices(dataset_id)
    return board, *plots, report, gr.Dropdown(choices=choices, value=_keep(evaluation_id, choices))


EVAL_VIEW_SKIP = (gr.skip(),) * (len(EVAL_PLOTS) + 3)


def eval_poll(job_id: int | None) -> tuple[Any, ...]:
    """job line, the evaluation view (once it has succeeded), timer."""
    if job_id is None:
        return gr.skip(), *EVAL_VIEW_SKIP, gr.Timer(active=False)
    try:
        job = client().job(int(job_id))
        if job["status"] not in TERMINAL:
            return job_html(job), *EVAL_VIEW_SKIP, gr.skip()
        ev_id = (job.get("result") or {}).get("evaluation_id")
        if job["status"] != "succeeded" or ev_id is None:
            return job_html(job), *EVAL_VIEW_SKIP, gr.Timer(active=False)
        return job_html(job), *_evaluation_view(int(ev_id)), gr.Timer(active=False)
    except ApiError as e:
        gr.Warning(f"Stopped following the evaluation: {e.detail}")
        return job_html(None, f"⚠️ {e.detail}"), *EVAL_VIEW_SKIP, gr.Timer(active=False)


@api_errors
def eval_show(dataset_id: int | None, evaluation_id: int | None) -> tuple[Any, ...]:
    """Leaderboard of the dataset; plots and report of the chosen (or latest) evaluation."""
    if dataset_id is None:
        raise gr.Error("Pick a dataset to see its leaderboard.")
    choices = _evaluation_choices(int(dataset_id))
    evaluation_id = _keep(evaluation_id, choices)  # else the latest, or None
    if evaluation_id is None:
        board = leaderboard_frame(client().leaderboard(int(dataset_id)))
        return board, *([None] * len(EVAL_PLOTS)), None, gr.Dropdown(choices=choices, value=None)
    return _evaluation_view(int(evaluation_id))


# ---------------------------------------------------------------------------- jobs
def jobs_frame(jobs: list[dict[str, Any]]) -> pd.DataFrame:
    rows = [
        {
            "id": j["id"],
            "kind": j["kind"],
            "status": j["status"],
            "progress": f"{100 * float(j['progress']):.0f}%",
            "stage": j.get("stage") or "",
            "eta": _secs(j["eta_seconds"]) if j.get("eta_seconds") is not None else "",
            "attempts": j.get("attempts", 0),
            "created": (j.get("created_at") or "")[:19].replace("T", " "),
            "error": (j.get("error") or "")[:200],
        }
        for j in jobs
    ]
    return pd.DataFrame(
        rows, columns=["id", "kind", "status", "progress", "stage", "eta", "attempts", "created", "error"]
    )


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
    gr.Info(
        f"Job #{job['id']} is {job['status']}{' (cancel requested)' if job['status'] == 'running' else ''}."
    )
    return (*refresh_jobs(kind, status), job)


@api_errors
def jobs_show(job_id: float | None) -> dict[str, Any]:
    if not job_id:
        raise gr.Error("Enter a job id.")
    return client().job(int(job_id))


def pick_job(evt: gr.SelectData, table: pd.DataFrame) -> Any:
    try:
        return int(table.iloc[evt.index[0]]["id"])
    except (IndexError, KeyError, TypeError, ValueError):
        return gr.skip()


# ---------------------------------------------------------------------------- profile
def _slots_text(slots: dict[str, str]) -> str:
    return "\n".join(f"{k} = {v}" for k, v in slots.items())


def _parse_slots(text: str) -> dict[str, str]:
    slots = {}
    for n, line in enumerate((text or "").splitlines(), start=1):
        if not line.strip():
            continue
        if "=" not in line:
            raise gr.Error(f"Custom slots, line {n}: write 'Slot name = value'.")
        k, v = line.split("=", 1)
        if not k.strip():
            raise gr.Error(f"Custom slots, line {n}: the slot name is empty.")
        slots[k.strip()] = v.strip()
    return slots


PROFILE_FIELDS = ("company_name", "website_url", "support_phone", "support_email", "support_hours")


def load_profile() -> tuple[Any, ...]:
    try:
        p = client().profile()
    except ApiError:
        return (gr.skip(),) * (len(PROFILE_FIELDS) + 1)
    return (*(p.get(f, "") for f in PROFILE_FIELDS), _slots_text(p.get("custom_slots") or {}))


@api_errors
def save_profile(
    company: str, website: str, phone: str, email: str, hours: str, slots: str
) -> tuple[Any, ...]:
    body = dict(zip(PROFILE_FIELDS, (company, website, phone, email, hours), strict=True))
    body = {k: (v or "").strip() for k, v in body.items()}
    body["custom_slots"] = _parse_slots(slots)
    p = client().save_profile(body)
    gr.Info("Profile saved: new replies fill {{Slot}} placeholders with it.")
    return (*(p.get(f, "") for f in PROFILE_FIELDS), _slots_text(p.get("custom_slots") or {}))


# ---------------------------------------------------------------------------- layout
CLICK_DOWNLOAD = "() => { const b = document.querySelector('#{id} button, button#{id}'); if (b) b.click(); }"


def _download_js(elem_id: str) -> str:
    return CLICK_DOWNLOAD.replace("{id}", elem_id)


def _bind(fn: Callable[..., Any], last: Any) -> Callable[..., Any]:
    """``fn`` with its last argument fixed (one handler per button)."""

    def handler(*args: Any) -> Any:
        return fn(*args, last)

    handler.__name__ = f"{fn.__name__}_{last}"
    return handler


def _generation_controls(prefix: str, render: bool = True) -> tuple[Any, ...]:
    tone = gr.Dropdown(TONES, value="neutral", label="Tone", elem_id=f"{prefix}-tone", render=render)
    temperature = gr.Slider(
        0,
        2,
        value=0.0,
        step=0.05,
        label="Temperature",
        info="0 = greedy",
        elem_id=f"{prefix}-temperature",
        render=render,
    )
    top_p = gr.Slider(0.05, 1, value=1.0, step=0.05, label="Top-p", elem_id=f"{prefix}-top-p", render=render)
    max_tokens = gr.Slider(
        8, 1024, value=256, step=8, label="Max new tokens", elem_id=f"{prefix}-max-tokens", render=render
    )
    ask = gr.Checkbox(
        value=True,
        label="Ask for details only if relevant",
        info="on: ask for order/account/email only when the request needs it; off: never",
        elem_id=f"{prefix}-ask-details",
        render=render,
    )
    return tone, temperature, top_p, max_tokens, ask


def build() -> gr.Blocks:
    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        gr.Markdown(f"# {TITLE}", elem_id="title")
        header = gr.HTML("", elem_id="api-status")

        # ------------------------------------------------------------------ Chat
        with gr.Tab("Chat", id="chat") as chat_tab:
            chat_state = gr.State(None)
            chat_timer = gr.Timer(0.5, active=False)
            with gr.Row():
                with gr.Column(scale=1, min_width=260):
                    chat_list = gr.Dropdown(
                        [], value=None, label="Chats", info="reopen a saved chat", elem_id="chat-list"
                    )
                    with gr.Row():
                        new_btn = gr.Button("New chat", size="sm", elem_id="chat-new")
                        del_btn = gr.Button("Delete chat", size="sm", variant="stop", elem_id="chat-delete")
                        list_btn = gr.Button("↻", size="sm", min_width=40, elem_id="chat-list-refresh")
                    chat_model = gr.Dropdown([], value=None, label="Model", elem_id="chat-model")
                    tone, temperature, top_p, max_tokens, ask = _generation_controls("chat")
                with gr.Column(scale=3):
                    chatbot = gr.Chatbot(
                        [],
                        label="Conversation",
                        height=460,
                        elem_id="chatbot",
                        feedback_options=None,
                        buttons=["copy", "copy_all"],
                        placeholder="Type a customer message below (the trash icon starts a "
                        "new chat; saved chats stay in the list).",
                    )
                    with gr.Row():
                        msg = gr.Textbox(
                            placeholder="Customer message…",
                            show_label=False,
                            lines=2,
                            scale=5,
                            elem_id="chat-input",
                        )
                        with gr.Column(scale=1, min_width=110):
                            send_btn = gr.Button("Send", variant="primary", elem_id="chat-send")
                            stop_btn = gr.Button("Stop", size="sm", elem_id="chat-stop")
                    meta = gr.Markdown(chat_meta(None), elem_id="chat-meta")
                    with gr.Row():
                        up_btn = gr.Button("👍 Good reply", size="sm", elem_id="chat-up")
                        down_btn = gr.Button("👎 Bad reply", size="sm", elem_id="chat-down")
                        corrected = gr.Textbox(
                            placeholder="Optional: the reply it should have given (saved with your rating)",
                            show_label=False,
                            lines=1,
                            scale=3,
                            elem_id="chat-corrected",
                        )
                    with gr.Row():
                        gr.Markdown("**Export this chat:**")
                        export_btns = {
                            f: gr.Button(f"⬇ {f.upper()}", size="sm", elem_id=f"export-{f}")
                            for f in EXPORT_FORMATS
                        }
                    with gr.Accordion("Export all chats", open=False):
                        with gr.Row():
                            all_fmt = gr.Radio(list(EXPORT_FORMATS), value="jsonl", label="Format")
                            all_model = gr.Textbox(label="Only chats with replies from model (optional)")
                            all_btn = gr.Button("⬇ Export all chats", elem_id="export-all")
                    chat_file = gr.DownloadButton("download", visible="hidden", elem_id="chat-download")

        # ------------------------------------------------------------------ Compare
        with gr.Tab("Compare", id="compare") as compare_tab:
            cmp_jobs = gr.State(None)
            cmp_timer = gr.Timer(0.5, active=False)
            cmp_msg = gr.Textbox(label="Customer message", lines=3, elem_id="cmp-input")
            with gr.Row():
                with gr.Column():
                    cmp_a = gr.Dropdown(
                        [], value=None, label="Model A (e.g. the baseline)", elem_id="cmp-model-a"
                    )
                    cmp_text_a = gr.Textbox(
                        label="Reply A", lines=10, interactive=False, elem_id="cmp-reply-a"
                    )
                    cmp_meta_a = gr.Markdown("", elem_id="cmp-meta-a")
                with gr.Column():
                    cmp_b = gr.Dropdown(
                        [], value=None, label="Model B (e.g. a fine-tuned model)", elem_id="cmp-model-b"
                    )
                    cmp_text_b = gr.Textbox(
                        label="Reply B", lines=10, interactive=False, elem_id="cmp-reply-b"
                    )
                    cmp_meta_b = gr.Markdown("", elem_id="cmp-meta-b")
            with gr.Accordion("Generation settings (both sides)", open=True):
                with gr.Row():
                    c_tone, c_temp, c_top_p, c_max, c_ask = _generation_controls("cmp", render=False)
                    c_tone.render()
                    c_temp.render()
                    c_top_p.render()
                with gr.Row():
                    c_max.render()
                    c_seed = gr.Number(
                        -1,
                        label="Seed",
                        info="-1: random; the same seed on both sides compares like with like",
                        precision=0,
                    )
                    c_ask.render()
            with gr.Row():
                cmp_btn = gr.Button("Compare", variant="primary", elem_id="cmp-run")
                cmp_stop = gr.Button("Stop", elem_id="cmp-stop")

        # ------------------------------------------------------------------ Train
        with gr.Tab("Train", id="train") as train_tab:
            train_job = gr.State(None)
            train_timer = gr.Timer(1.0, active=False)
            with gr.Accordion("Import a dataset", open=False):
                with gr.Row():
                    imp_file = gr.File(
                        label="CSV, JSONL or Parquet", file_types=[".csv", ".jsonl", ".parquet"], height=120
                    )
                    with gr.Column():
                        imp_name = gr.Textbox(label="Dataset name")
                        imp_btn = gr.Button("Import")
                        imp_status = gr.HTML("")
            with gr.Row():
                with gr.Column(scale=2):
                    with gr.Row():
                        train_ds = gr.Dropdown(
                            [], value=None, label="Dataset", elem_id="train-dataset", scale=3
                        )
                        ds_refresh = gr.Button("↻", size="sm", min_width=40, scale=0)
                    train_base = gr.Dropdown([], value=None, label="Base model", elem_id="train-base")
                    method = gr.Radio(["full", "lora"], value="full", label="Method")
                    with gr.Row():
                        epochs = gr.Number(2, label="Epochs", minimum=1, elem_id="train-epochs")
                        lr = gr.Number(5e-5, label="Learning rate", minimum=0)
                        batch = gr.Number(8, label="Batch size", precision=0, minimum=1)
                    with gr.Row():
                        max_train = gr.Number(
                            0, label="Max train samples (0: all)", precision=0, minimum=0, elem_id="train-max"
                        )
                        out_name = gr.Textbox(
                            label="Output model name (empty: ft-<job id>)", elem_id="train-out"
                        )
                    with gr.Accordion("Advanced", open=False):
                        with gr.Row():
                            lora_r = gr.Number(8, label="LoRA r", precision=0, minimum=1)
                            lora_alpha = gr.Number(16, label="LoRA alpha", precision=0, minimum=1)
                            warmup = gr.Number(0.0, label="Warmup ratio", minimum=0)
                        with gr.Row():
                            max_in = gr.Number(192, label="Max input tokens", precision=0, minimum=8)
                            max_out = gr.Number(192, label="Max target tokens", precision=0, minimum=8)
                            t_seed = gr.Number(42, label="Seed", precision=0)
                            log_every = gr.Number(
                                10, label="Log the loss every N steps", precision=0, minimum=1
                            )
                        keep_best = gr.Checkbox(False, label="On cancel, keep the best checkpoint so far")
                    with gr.Row():
                        train_btn = gr.Button("Start training", variant="primary", elem_id="train-start")
                        train_cancel = gr.Button("Cancel", variant="stop", elem_id="train-cancel")
                with gr.Column(scale=3):
                    train_follow_dd = gr.Dropdown(
                        [], value=None, label="Training job", info="follow a run", elem_id="train-job"
                    )
                    train_status = gr.HTML(job_html(None), elem_id="train-status")
                    loss_plot = gr.LinePlot(
                        None,
                        color_map=LOSS_COLORS,
                        x="step",
                        y="loss",
                        color="series",
                        title="Loss",
                        height=320,
                        elem_id="loss-plot",
                    )
                    train_result = gr.JSON(None, label="Result")

        # ------------------------------------------------------------------ Evaluate
        with gr.Tab("Evaluate", id="evaluate") as eval_tab:
            eval_job = gr.State(None)
            eval_timer = gr.Timer(1.0, active=False)
            with gr.Row():
                eval_models = gr.Dropdown(
                    [], value=[], multiselect=True, label="Models", scale=3, elem_id="eval-models"
                )
                eval_ds = gr.Dropdown(
                    [], value=None, label="Dataset (its test split)", scale=2, elem_id="eval-dataset"
                )
            with gr.Row():
                eval_max = gr.Number(
                    300,
                    label="Max samples (0: the whole test split)",
                    precision=0,
                    minimum=0,
                    elem_id="eval-max",
                )
                eval_tokens = gr.Number(
                    256, label="Max new tokens", precision=0, minimum=1, elem_id="eval-tokens"
                )
                eval_beams = gr.Number(1, label="Beams", precision=0, minimum=1, maximum=8)
                eval_seed = gr.Number(42, label="Seed", precision=0)
            with gr.Row():
                eval_btn = gr.Button("Run evaluation", variant="primary", elem_id="eval-run")
                eval_cancel = gr.Button("Cancel", variant="stop")
                eval_pick = gr.Dropdown([], value=None, label="Evaluation", scale=2, elem_id="eval-pick")
                eval_show_btn = gr.Button("Show leaderboard", elem_id="eval-show")
            eval_status = gr.HTML(job_html(None), elem_id="eval-status")
            board = gr.Dataframe(
                leaderboard_frame([]),
                label="Leaderboard",
                interactive=False,
                wrap=False,
                elem_id="leaderboard",
            )
            plot_imgs = []
            for row in (EVAL_PLOTS[:2], EVAL_PLOTS[2:]):
                with gr.Row():
                    for name in row:
                        plot_imgs.append(
                            gr.Image(
                                None,
                                label=name,
                                type="filepath",
                                interactive=False,
                                elem_id=f"plot-{name.split('.')[0]}",
                            )
                        )
            report = gr.File(None, label="Report (HTML)", interactive=False, height=90)

        # ------------------------------------------------------------------ Jobs
        with gr.Tab("Jobs", id="jobs") as jobs_tab:
            jobs_timer = gr.Timer(3.0, active=False)  # on while the tab is open
            with gr.Row():
                j_kind = gr.Dropdown(JOB_KINDS, value="all", label="Kind")
                j_status = gr.Dropdown(JOB_STATUSES, value="all", label="Status")
                j_auto = gr.Checkbox(True, label="Auto-refresh (3 s)")
                j_refresh = gr.Button("Refresh")
            jobs_note = gr.Markdown("")
            jobs_table = gr.Dataframe(
                jobs_frame([]), interactive=False, wrap=True, elem_id="jobs-table", max_height=480
            )
            with gr.Row():
                j_id = gr.Number(None, label="Job id (click a row)", precision=0, minimum=0)
                j_show = gr.Button("Show details")
                j_cancel = gr.Button("Cancel job", variant="stop", elem_id="jobs-cancel")
            j_detail = gr.JSON(None, label="Job")

        # ------------------------------------------------------------------ Profile
        with gr.Tab("Profile", id="profile") as profile_tab:
            gr.Markdown(
                "The company profile fills `{{Company Name}}`-style placeholders in replies shown here."
            )
            with gr.Row():
                p_company = gr.Textbox(label="Company name", elem_id="profile-company")
                p_web = gr.Textbox(label="Website URL")
            with gr.Row():
                p_phone = gr.Textbox(label="Support phone")
                p_email = gr.Textbox(label="Support email")
                p_hours = gr.Textbox(label="Support hours")
            p_slots = gr.Textbox(
                elem_id="profile-slots",
                label="Custom slots",
                lines=5,
                placeholder="Order Number = see your confirmation email\nRefund Policy URL = …",
                info="one per line: Slot name = value",
            )
            p_save = gr.Button("Save profile", variant="primary", elem_id="profile-save")

        # ------------------------------------------------------------------ events
        model_dds = [chat_model, cmp_a, cmp_b, train_base, eval_models]
        profile_fields = [p_company, p_web, p_phone, p_email, p_hours, p_slots]
        chat_view = [chat_state, chatbot, meta, chat_timer]
        eval_view = [board, *plot_imgs, report, eval_pick]
        quiet: dict[str, Any] = {"show_progress": "hidden"}

        def on(target: Any) -> dict[str, Any]:
            """Progress (and a failed call's error badge) on one component, not on every output."""
            return {"show_progress": "minimal", "show_progress_on": target}

        app.load(load_header, None, header, **quiet)
        app.load(refresh_models, model_dds, model_dds, **quiet)
        app.load(refresh_datasets, [train_ds, eval_ds], [train_ds, eval_ds], **quiet)
        app.load(load_chat_list, None, chat_list, **quiet)
        app.load(load_train_jobs, None, train_follow_dd, **quiet)
        app.load(load_profile, None, profile_fields, **quiet)
        app.load(refresh_jobs, [j_kind, j_status], [jobs_table, jobs_note], **quiet)

        # chat
        send_inputs = [chat_state, msg, chat_model, tone, temperature, top_p, max_tokens, ask]
        for trigger in (send_btn.click, msg.submit):
            trigger(send_message, send_inputs, [*chat_view, msg, chat_list], **on(chatbot))
        chat_timer.tick(poll_chat, chat_state, chat_view, **quiet)
        chat_list.input(
            open_chat,
            chat_list,
            [*chat_view, chat_model, tone, temperature, top_p, max_tokens, ask],
            **on(chatbot),
        )
        for clear in (new_btn.click, chatbot.clear):
            clear(new_chat, None, [*chat_view, chat_list, msg], **quiet)
        del_btn.click(delete_chat, chat_state, [*chat_view, chat_list, msg], **on(chatbot))
        list_btn.click(refresh_chat_list, chat_state, chat_list, **on(chat_list))
        stop_btn.click(stop_reply, chat_state, chat_view, **on(chatbot))
        for rating, btn in (("up", up_btn), ("down", down_btn)):
            btn.click(_bind(rate_reply, rating), [chat_state, corrected], [*chat_view, corrected], **on(meta))
        for fmt, btn in export_btns.items():
            btn.click(_bind(export_chat, fmt), chat_state, chat_file, **quiet).success(
                None, None, None, js=_download_js("chat-download")
            )
        all_btn.click(export_all, [all_fmt, all_model], chat_file, **quiet).success(
            None, None, None, js=_download_js("chat-download")
        )

        # compare
        cmp_out = [cmp_text_a, cmp_meta_a, cmp_text_b, cmp_meta_b]
        cmp_in = [cmp_msg, cmp_a, cmp_b, c_tone, c_temp, c_top_p, c_max, c_ask, c_seed]
        cmp_btn.click(compare_start, cmp_in, [cmp_jobs, *cmp_out, cmp_timer], **on([cmp_text_a, cmp_text_b]))
        cmp_timer.tick(compare_poll, cmp_jobs, [*cmp_out, cmp_timer], **quiet)
        cmp_stop.click(compare_stop, cmp_jobs, None)

        # train
        imp_btn.click(import_dataset, [imp_file, imp_name], [imp_status, imp_file], **on(imp_status))
        ds_refresh.click(refresh_datasets, [train_ds, eval_ds], [train_ds, eval_ds], **on(train_ds))
        train_in = [
            train_ds,
            train_base,
            method,
            epochs,
            lr,
            batch,
            max_train,
            out_name,
            lora_r,
            lora_alpha,
            max_in,
            max_out,
            warmup,
            t_seed,
            keep_best,
            log_every,
        ]
        train_out = [train_status, loss_plot, train_result, train_timer]
        train_btn.click(train_start, train_in, [train_job, train_follow_dd, *train_out], **on(train_status))
        train_follow_dd.input(train_follow, train_follow_dd, [train_job, *train_out], **on(train_status))
        train_timer.tick(train_poll, train_job, [*train_out, train_follow_dd], **quiet)
        train_cancel.click(cancel_job, train_job, train_status, **on(train_status))

        # evaluate
        eval_in = [eval_models, eval_ds, eval_max, eval_tokens, eval_beams, eval_seed]
        eval_btn.click(eval_start, eval_in, [eval_job, eval_status, eval_timer], **on(eval_status))
        eval_timer.tick(eval_poll, eval_job, [eval_status, *eval_view, eval_timer], **quiet)
        eval_cancel.click(cancel_job, eval_job, eval_status, **on(eval_status))
        eval_show_btn.click(eval_show, [eval_ds, eval_pick], eval_view, **on(board))
        eval_pick.input(eval_show, [eval_ds, eval_pick], eval_view, **on(board))

        # model and dataset lists follow the store (a model trained meanwhile shows up); the jobs list
        # refreshes itself only while its tab is open
        for tab in (chat_tab, compare_tab, train_tab, eval_tab):
            tab.select(refresh_models, model_dds, model_dds, **quiet)
            tab.select(lambda: gr.Timer(active=False), None, jobs_timer, **quiet)
        for tab in (train_tab, eval_tab):
            tab.select(refresh_datasets, [train_ds, eval_ds], [train_ds, eval_ds], **quiet)
        profile_tab.select(lambda: gr.Timer(active=False), None, jobs_timer, **quiet)
        jobs_tab.select(lambda active: gr.Timer(active=bool(active)), j_auto, jobs_timer, **quiet)
        jobs_tab.select(refresh_jobs, [j_kind, j_status], [jobs_table, jobs_note], **quiet)

        # jobs
        for trigger in (j_refresh.click, j_kind.change, j_status.change, jobs_timer.tick):
            trigger(refresh_jobs, [j_kind, j_status], [jobs_table, jobs_note], **quiet)
        j_auto.change(lambda active: gr.Timer(active=bool(active)), j_auto, jobs_timer, **quiet)
        jobs_table.select(pick_job, jobs_table, j_id, **quiet)
        j_show.click(jobs_show, j_id, j_detail, **on(j_detail))
        j_cancel.click(
            jobs_cancel, [j_id, j_kind, j_status], [jobs_table, jobs_note, j_detail], **on(j_detail)
        )

        # profile
        p_save.click(save_profile, profile_fields, profile_fields, **on(p_slots))
    return app


demo = build()


def launch(host: str, port: int) -> None:
    """Serve the UI (``csra ui``); it reaches the API at ``CSRA_API_URL``."""
    demo.queue(default_concurrency_limit=16).launch(
        server_name=host,
        server_port=port,
        show_error=True,
        css=CSS,
        footer_links=["api"],
    )
