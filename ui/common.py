"""What the tabs share: the API client, error display, choice lists, small formatting helpers."""

from __future__ import annotations

import asyncio
import functools
import html
import inspect
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast, get_args

import gradio as gr
from gradio.context import LocalContext
from gradio.processing_utils import save_bytes_to_cache
from gradio.utils import get_upload_folder

from csra.client import ApiError, Client
from csra.settings import get_settings
from csra.specs import ANSWER_ROOM, REPLY_TOKENS, Backend, Grounding

TONES = [("Neutral", "neutral"), ("Friendly", "friendly"), ("Strict professional", "strict_professional")]
QUIET: dict[str, Any] = {"show_progress": "hidden"}

F = TypeVar("F", bound=Callable[..., Any])


@functools.cache
def _shared_client() -> Client:
    """The UI's own API client (its CSRA_API_KEY), made on first use (never at import time)."""
    return Client()


# With CSRA_UI_LOGIN each person signs in with their key's name and the key; the key stays in this
# process's memory only (Gradio's sessions are in memory too: a restarted UI asks everyone again)
_signed_in: dict[str, Client] = {}
_signed_in_lock = threading.Lock()
SIGN_IN_TIMEOUT_S = 5.0


def _check_key(name: str, key: str) -> Client | None:
    candidate = Client(api_key=key, timeout=SIGN_IN_TIMEOUT_S)
    try:
        ok = candidate.me().get("name") == name
    except ApiError:
        ok = False
    candidate.close()
    return Client(api_key=key) if ok else None


async def sign_in(name: str, key: str) -> bool:
    """Gradio's ``auth`` check: the key must be live and carry this name (``GET /me``), so nobody can
    sign in under another person's name with a key of their own. Async, with the call in a thread and a
    short timeout: Gradio awaits it on the event loop every page shares."""
    client_ = await asyncio.to_thread(_check_key, name, key)
    if client_ is None:
        return False
    with _signed_in_lock:  # an earlier client of this name may still stream in another tab: left open
        _signed_in[name] = client_
    return True


def client() -> Client:
    """The API client for the person this event is for: their own key when the UI asks people to sign in
    (never the UI's own key then), else the UI's."""
    if not get_settings().ui_login:
        return _shared_client()
    request = LocalContext.request.get(None)  # the event's gr.Request, as Gradio's own helpers read it
    name = getattr(request, "username", None)
    found = _signed_in.get(name) if name else None
    if found is None:
        raise gr.Error("Your sign-in has expired (the UI restarted): reload the page and sign in again.")
    return found


def on(target: Any) -> dict[str, Any]:
    """Event options: progress (and a failed call's error badge) on one component, not on every output."""
    return {"show_progress": "minimal", "show_progress_on": target}


# ---------------------------------------------------------------------------- handlers
def _shown(e: ApiError) -> gr.Error:
    title = f"API error {e.status}" if e.status else "API unreachable"
    return gr.Error(e.detail, title=title, print_exception=False)


def api_errors(fn: F) -> F:
    """An API failure becomes a ``gr.Error`` showing the API's ``detail`` (generators too)."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def stream(*args: Any, **kwargs: Any) -> Iterator[Any]:
            try:
                yield from fn(*args, **kwargs)
            except ApiError as e:
                raise _shown(e) from None

        return cast(F, stream)

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ApiError as e:
            raise _shown(e) from None

    return cast(F, call)


def bind(fn: Callable[..., Any], last: Any) -> Callable[..., Any]:
    """``fn`` with its last argument fixed (one handler per button); a generator stays one."""
    if inspect.isgeneratorfunction(fn):

        def stream(*args: Any) -> Iterator[Any]:
            yield from fn(*args, last)

        handler: Callable[..., Any] = stream
    else:

        def call(*args: Any) -> Any:
            return fn(*args, last)

        handler = call
    handler.__name__ = f"{fn.__name__}_{last}"
    return handler


def download_js(elem_id: str) -> str:
    """Browser code that clicks the (hidden) download button ``elem_id``."""
    return f"() => {{ const b = document.querySelector('#{elem_id} button, button#{elem_id}'); if (b) b.click(); }}"


def save_download(name: str, content: bytes) -> str:
    """A file for the browser, in Gradio's cache: ``gr.Blocks(delete_cache=...)`` removes it later."""
    return save_bytes_to_cache(content, name, get_upload_folder())


# ---------------------------------------------------------------------------- values
def keep(value: Any, choices: list[tuple[str, Any]], default: Any = None) -> Any:
    """``value`` (or the part of a list value) still among ``choices``; else ``default``, else the first."""
    values = [v for _, v in choices]
    if isinstance(value, list):
        kept = [v for v in value if v in values]
        return kept or ([default] if default in values else [])
    if value in values:
        return value
    return default if default in values else (values[0] if values else None)


def dropdown(choices: list[tuple[str, Any]], selected: Any) -> gr.Dropdown:
    """A dropdown of ``choices`` that keeps ``selected`` when it is still one of them (else none)."""
    return gr.Dropdown(choices=choices, value=selected if selected in [v for _, v in choices] else None)


def num(value: float | None, label: str) -> float:
    """A required number field (a cleared Number input arrives as None)."""
    if value is None:
        raise gr.Error(f"{label}: enter a number.")
    return float(value)


def secs(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


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
        parts.append(f"ETA {secs(job['eta_seconds'])}")
    if job.get("attempts", 0) > 1:
        parts.append(f"attempt {job['attempts']}")
    err = f"<div class='csra-err'>{html.escape(job['error'])}</div>" if job.get("error") else ""
    return (
        f"<div class='csra-job'>{' · '.join(parts)}<div class='csra-bar'><div style='width:{pct}%'></div>"
        f"</div>{err}</div>"
    )


@api_errors
def cancel_job(job_id: int | None) -> str:
    """Cancel the job a tab follows; its status line."""
    if job_id is None:
        raise gr.Error("No job selected.")
    job = client().cancel_job(int(job_id))
    gr.Info(f"Cancel requested for job #{job['id']}.")
    return job_html(job)


# ---------------------------------------------------------------------------- choices
def model_choices() -> list[tuple[str, str]]:
    return [(f"{m['name']} ({m['kind']})", m["name"]) for m in client().models()]


def default_model(choices: list[tuple[str, str]]) -> str | None:
    names = [v for _, v in choices]
    return "baseline" if "baseline" in names else (names[0] if names else None)


def dataset_choices() -> list[tuple[str, int]]:
    out = []
    for d in client().datasets():
        status = "" if d["status"] == "ready" else f" · {d['status']}"
        out.append((f"#{d['id']} {d['name']} ({d['row_count']} rows{status})", d["id"]))
    return out


# ---------------------------------------------------------------------------- generation settings
BACKENDS = list(get_args(Backend))
GENERATION_KEYS = ("tone", "temperature", "top_p", "max_new_tokens", "ask_details_only_if_relevant", "backend",
                   "copy_bias")  # generation_controls' order, after the model
# A Dropdown, not a Number: an emptied Number box sends 0, which would switch the copy bias off unasked.
MODEL_SETTING = "model"
COPY_BIASES = [(f"the model's setting (default {Grounding().copy_bias:g})", MODEL_SETTING),
               ("0: its own words", "0"), ("2.5: loosely", "2.5"), ("10: closely", "10"),
               ("20: word for word", "20")]


def gen_settings(
    model: str | None, tone: str, temperature: float, top_p: float, max_new_tokens: float, ask_details: bool,
    backend: str | None = None, copy_bias: str | float | None = None,
) -> dict[str, Any]:
    """The generation fields of a chat message or a generate job (an empty copy bias: the model's own)."""
    if not model:
        raise gr.Error("Pick a model first (the list comes from GET /models; is the store empty?).")
    return {
        "model_id": model,
        "tone": tone,
        "temperature": float(temperature),
        "top_p": float(top_p),
        "max_new_tokens": int(max_new_tokens),
        "ask_details_only_if_relevant": bool(ask_details),
        "backend": backend or "auto",
        "copy_bias": copy_bias_value(copy_bias),
    }


def generation_controls(prefix: str, render: bool = True) -> tuple[Any, ...]:
    """Tone, temperature, top-p, max new tokens, the privacy toggle, the backend and the copy bias (element
    ids ``{prefix}-...``), in ``GENERATION_KEYS``' order."""
    tone = gr.Dropdown(TONES, value="neutral", label="Tone", elem_id=f"{prefix}-tone", render=render)
    temperature = gr.Slider(
        0, 2, value=0.0, step=0.05, label="Temperature", info="0 = greedy",
        elem_id=f"{prefix}-temperature", render=render,
    )
    top_p = gr.Slider(0.05, 1, value=1.0, step=0.05, label="Top-p", elem_id=f"{prefix}-top-p", render=render)
    max_tokens = gr.Slider(
        8, 1024, value=REPLY_TOKENS, step=8, label="Max new tokens", elem_id=f"{prefix}-max-tokens", render=render,
        info=f"a grounded model following an approved answer may go past it, to that answer's end (+{ANSWER_ROOM})",
    )
    ask = gr.Checkbox(
        value=True,
        label="Ask for details only if relevant",
        info="on: ask for order/account/email only when the request needs it; off: never",
        elem_id=f"{prefix}-ask-details",
        render=render,
    )
    backend = gr.Dropdown(
        BACKENDS, value="auto", label="Backend", elem_id=f"{prefix}-backend", render=render,
        info="auto: llama.cpp where the model has a GGUF export, else torch (exact); llamacpp:<format>: that export",
    )
    return tone, temperature, top_p, max_tokens, ask, backend, copy_bias_dropdown(f"{prefix}-copy-bias", render)


def copy_bias_dropdown(elem_id: str, render: bool = True) -> gr.Dropdown:
    """How closely a grounded model follows approved answers: the model's own setting, a preset or a typed number."""
    return gr.Dropdown(
        COPY_BIASES, value=MODEL_SETTING, allow_custom_value=True, label="Follow approved answers (copy bias)",
        info="grounded models only; or type a number from 0 to 20", elem_id=elem_id, render=render,
    )


def copy_bias_value(choice: str | float | None) -> float | None:
    """The copy bias a request carries for the dropdown's choice (None: the model's own)."""
    if choice is None or str(choice).strip() in ("", MODEL_SETTING):
        return None
    try:
        return float(choice)
    except ValueError:
        raise gr.Error(f"Follow approved answers: {choice!r} is not a number; pick a choice or type one "
                       "from 0 to 20.") from None


def copy_bias_choice(value: float | None) -> str:
    """The dropdown's choice for a stored copy bias."""
    return MODEL_SETTING if value is None else f"{value:g}"
