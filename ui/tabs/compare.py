"""The Compare tab: one customer message, two models, the two replies streamed side by side.

Each side is its own generator handler reading its job's token stream, so the replies fill in at
their own pace.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr

from csra.client import ApiError
from ui.common import QUIET, api_errors, bind, client, gen_settings, generation_controls, on

SIDES = ("a", "b")


def done_meta(job: dict[str, Any]) -> str:
    """The line under a finished reply: model, latency, tokens, why it stopped (or what went wrong)."""
    res = job.get("result") or {}
    if job["status"] == "succeeded":
        line = (f"`{res.get('model')}` · {float(res.get('latency_ms') or 0) / 1000:.2f} s · "
                f"{res.get('completion_tokens')} tokens · finish: {res.get('finish_reason')}")
        if res.get("follows_approved") is False:
            line += " · ℹ️ no approved answer is close: the model's own words"
        return line
    return f"⚠️ **{job['status']}:** {job.get('error') or ''}"


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
    backend: str | None,
    copy_bias: str | None,
    seed: float | None,
) -> tuple[Any, ...]:
    """Submit one generation job per side: job ids, then (reply, meta) for each side."""
    if not (message or "").strip():
        raise gr.Error("Type a customer message to compare the replies.")
    if not model_a or not model_b:
        raise gr.Error("Pick a model on each side.")
    ids = []
    for model in (model_a, model_b):
        body = {**gen_settings(model, tone, temperature, top_p, max_new_tokens, ask_details, backend, copy_bias),
                "message": message}
        if seed is not None and int(seed) >= 0:
            body["seed"] = int(seed)
        ids.append(client().generate(body)["id"])
    return ids, "", "⏳ queued", "", "⏳ queued"


def stream_side(job_ids: list[int] | None, side: str) -> Iterator[tuple[str, str]]:
    """(reply, meta) of one side as its tokens arrive; the job's final text once it is done."""
    if not job_ids:
        yield gr.skip(), gr.skip()  # (a generator that yields nothing would blank its outputs)
        return
    job_id = job_ids[SIDES.index(side)]
    text = ""
    try:
        for event, data in client().stream_job(job_id):
            if event == "token":
                text += data.get("text", "")
            elif event == "reset":  # a retried attempt writes the reply again from its start
                text = ""
            elif event == "done":
                final = (data.get("result") or {}).get("text") if data.get("status") == "succeeded" else None
                yield (text if final is None else final), done_meta(data)
                return
            yield text, f"⏳ job #{job_id} · writing…"
    except ApiError as e:
        gr.Warning(f"Stopped following reply {side.upper()}: {e.detail}")
        yield text, f"⚠️ {e.detail}"


@api_errors
def compare_stop(job_ids: list[int] | None) -> None:
    for j in job_ids or []:
        try:
            client().cancel_job(j)
        except ApiError as e:
            if e.status != 409:  # already finished
                raise


@dataclass
class CompareTab:
    tab: gr.Tab
    model_a: gr.Dropdown
    model_b: gr.Dropdown


def _side(side: str, label: str) -> tuple[Any, ...]:
    model = gr.Dropdown([], value=None, label=label, elem_id=f"cmp-model-{side}")
    text = gr.Textbox(label=f"Reply {side.upper()}", lines=10, interactive=False, elem_id=f"cmp-reply-{side}")
    meta = gr.Markdown("", elem_id=f"cmp-meta-{side}")
    return model, text, meta


def _settings() -> list[Any]:
    """Tone, temperature, top-p, max new tokens, privacy toggle, backend, copy bias and seed, in three rows."""
    with gr.Accordion("Generation settings (both sides)", open=True):
        with gr.Row():
            tone, temp, top_p, max_tokens, ask, backend, copy_bias = generation_controls("cmp", render=False)
            tone.render()
            temp.render()
            top_p.render()
        with gr.Row():
            max_tokens.render()
            seed = gr.Number(
                -1, label="Seed", info="-1: random; the same seed on both sides compares like with like", precision=0
            )
            ask.render()
        with gr.Row():
            backend.render()
            copy_bias.render()
    return [tone, temp, top_p, max_tokens, ask, backend, copy_bias, seed]


def build(demo: gr.Blocks) -> CompareTab:
    """The tab inside the current ``gr.Blocks``, with its events."""
    with gr.Tab("Compare", id="compare") as tab:
        jobs = gr.State(None)
        msg = gr.Textbox(label="Customer message", lines=3, elem_id="cmp-input")
        with gr.Row():
            with gr.Column():
                model_a, text_a, meta_a = _side("a", "Model A (e.g. the baseline)")
            with gr.Column():
                model_b, text_b, meta_b = _side("b", "Model B (e.g. a fine-tuned model)")
        settings = _settings()
        with gr.Row():
            run = gr.Button("Compare", variant="primary", elem_id="cmp-run")
            stop = gr.Button("Stop", elem_id="cmp-stop")

    inputs = [msg, model_a, model_b, *settings]
    started = run.click(
        compare_start, inputs, [jobs, text_a, meta_a, text_b, meta_b], **on([text_a, text_b])
    )
    streams = [
        started.success(bind(stream_side, side), jobs, outputs, **QUIET)
        for side, outputs in (("a", [text_a, meta_a]), ("b", [text_b, meta_b]))
    ]
    run.click(None, None, None, cancels=streams)  # a new comparison replaces the replies still streaming
    stop.click(compare_stop, jobs, None)
    return CompareTab(tab, model_a, model_b)
