"""The Chat tab: saved chats, generation settings, replies streamed as they are written, feedback
and exports.

A reply is shown by reading its job's token stream (``GET /jobs/{id}/stream``) in a generator
handler; once the stream says ``done`` the chat is read again, so what stays on screen is the
stored reply (placeholders filled from the company profile).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr

from csra.client import ApiError
from ui.common import (
    GENERATION_KEYS,
    QUIET,
    api_errors,
    bind,
    client,
    copy_bias_choice,
    download_js,
    dropdown,
    gen_settings,
    generation_controls,
    on,
    save_download,
)

EXPORT_FORMATS = ("jsonl", "csv", "txt", "md")
GROUNDED_MARK = "📌 in the prompt · "  # a similar answer the grounded suggestion stood on


# ---------------------------------------------------------------------------- rendering
def reply_text(m: dict[str, Any], partial: str | None = None) -> str:
    """An assistant turn as shown; ``partial`` is the streamed text of a pending one."""
    if m["status"] == "failed":
        return f"⚠️ **Generation failed:** {m.get('error') or 'unknown error'}"
    if m["status"] == "cancelled":
        return "⏹️ _Generation cancelled._"
    if m["status"] == "pending":
        return partial + " ▌" if partial else "⏳ _generating…_"
    text = m["content"] if m["content"].strip() else "_(empty reply)_"
    if m.get("corrected_reply"):
        text += f"\n\n✏️ _Corrected reply:_ {m['corrected_reply']}"
    return text


def render_chat(chat: dict[str, Any] | None, partial: dict[int, str] | None = None) -> list[dict[str, Any]]:
    """The chat's stored turns as Chatbot messages; ``partial`` maps a pending reply's id to its text so far."""
    if not chat:
        return []
    partial = partial or {}
    return [
        {"role": "user", "content": m["content"]}
        if m["role"] == "user"
        else {"role": "assistant", "content": reply_text(m, partial.get(m["id"]))}
        for m in chat["messages"]
    ]


def last_reply(chat: dict[str, Any] | None) -> dict[str, Any] | None:
    replies = [m for m in (chat or {}).get("messages", []) if m["role"] == "assistant"]
    return replies[-1] if replies else None


def pending_replies(chat: dict[str, Any] | None) -> list[dict[str, Any]]:
    return [m for m in (chat or {}).get("messages", []) if m["role"] == "assistant" and m["status"] == "pending"]


def chat_meta(chat: dict[str, Any] | None) -> str:
    """The line under the conversation: chat id, model, settings, latency and tokens of the last reply."""
    m = last_reply(chat)
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
        if m.get("memory_entry_id"):
            bits.append("in the answer memory")
    line = " · ".join(bits)
    if m.get("follows_approved") is False:
        line += f"\n\nℹ️ **No approved answer is close to this message**{_nearest(m)}: this suggestion is the " \
                "model's own words, not held to an approved answer. Check it before sending."
    if m.get("slot_warnings"):
        line += f"\n\n⚠️ **Placeholders outside the contract** (not in the profile nor in the approved answers it " \
                f"was shown): {', '.join('`' + s + '`' for s in m['slot_warnings'])}"
    return line


def _nearest(m: dict[str, Any]) -> str:
    similar = m.get("similar") or []
    return f" (the nearest: {similar[0]['similarity']:.2f})" if similar else ""


def memory_panel(chat: dict[str, Any] | None) -> tuple[Any, ...]:
    """The predicted intent and the approved answers to the most similar messages, for the last reply."""
    m = last_reply(chat)
    if m is None or m["status"] != "done":
        return "", gr.Radio(choices=[], value=None, visible=False)
    intent = (f"**Intent:** `{m['intent']}` ({(m.get('intent_confidence') or 0):.0%} of the similar answers agree)"
              if m.get("intent") else "**Intent:** unknown (the answer memory is not built)")
    choices = [(f"{s['similarity']:.2f} · {s.get('intent') or '?'} · {GROUNDED_MARK if s.get('grounded') else ''}"
                f"{s['reply'][:160]}", i) for i, s in enumerate(m.get("similar") or [])]
    return intent, gr.Radio(choices=choices, value=None, visible=bool(choices))


def suggested_text(chat: dict[str, Any] | None, filled_for: int | None) -> tuple[Any, int | None]:
    """The reply box starts from each new finished reply: the agent edits it, then approves.

    ``filled_for`` is the reply the box was last filled from: the chat is shown again for that same
    reply (a second follower finishing, a rating) without touching the box, or it would wipe the
    agent's edit as they type it.
    """
    m = last_reply(chat)
    if m is None or m["status"] != "done":
        return "", None
    if m["id"] == filled_for:
        return gr.skip(), filled_for
    return m.get("raw_content") or m["content"], m["id"]


def pick_similar(chat: dict[str, Any] | None, index: int | None) -> Any:
    """One click on a similar approved answer puts it in the reply box."""
    m = last_reply(chat)
    similar = (m or {}).get("similar") or []
    if index is None or not 0 <= int(index) < len(similar):
        return gr.skip()
    return similar[int(index)]["reply"]


def view(chat: dict[str, Any] | None, partial: dict[int, str] | None = None) -> tuple[Any, ...]:
    """chat state, chatbot, meta line."""
    return chat, render_chat(chat, partial), chat_meta(chat)


def _chat_list(selected: int | None) -> gr.Dropdown:
    return dropdown([(f"#{c['id']} {c['title']}", c["id"]) for c in client().chats()], selected)


# ---------------------------------------------------------------------------- handlers
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
    """The chat, and the settings of its last reply in the controls (its pending replies follow)."""
    if chat_id is None:
        return (*view(None), *(gr.skip(),) * (1 + len(GENERATION_KEYS)))
    chat = client().chat(int(chat_id))
    st = {**(chat.get("settings") or {}), **((last_reply(chat) or {}).get("settings") or {})}
    shown = [st[k] if st.get(k) is not None else gr.skip() for k in ("model_id", *GENERATION_KEYS)]
    if "copy_bias" in st:
        shown[-1] = copy_bias_choice(st["copy_bias"])
    return (*view(chat), *shown)


def new_chat() -> tuple[Any, ...]:
    return *view(None), gr.Dropdown(value=None), ""


@api_errors
def delete_chat(chat: dict[str, Any] | None) -> tuple[Any, ...]:
    if not chat:
        raise gr.Error("No chat is open; nothing to delete.")
    client().delete_chat(chat["id"])
    gr.Info(f"Chat #{chat['id']} deleted.")
    return *view(None), _chat_list(None), ""


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
    backend: str | None,
    copy_bias: str | None,
) -> tuple[Any, ...]:
    """Store the user turn (a first message creates the chat); the reply is followed next."""
    if not (message or "").strip():
        raise gr.Error("Type a message first.")
    settings = gen_settings(model, tone, temperature, top_p, max_new_tokens, ask_details, backend, copy_bias)
    c = client()
    chat_id = chat["id"] if chat else c.create_chat("New chat", settings)["id"]
    c.post_message(chat_id, {"content": message, **settings})
    chat = c.chat(chat_id)
    return *view(chat), "", _chat_list(chat_id)


def follow_replies(chat: dict[str, Any] | None) -> Iterator[tuple[Any, ...]]:
    """Stream the chat's pending replies, one after the other, then show the stored chat."""
    c = client()
    followed: set[int] = set()
    while chat is not None and (
        todo := [m for m in pending_replies(chat) if m.get("job_id") is not None and m["job_id"] not in followed]
    ):
        reply = todo[0]
        followed.add(reply["job_id"])
        try:
            yield from _stream_reply(chat, reply)
            chat = c.chat(chat["id"])
        except ApiError as e:
            gr.Warning(f"Stopped following the reply: {e.detail}")
            yield chat, gr.skip(), f"⚠️ {e.detail}"
            return
        yield view(chat)
    if not followed:  # a generator that yields nothing would blank its outputs
        yield gr.skip(), gr.skip(), gr.skip()


def _stream_reply(chat: dict[str, Any], reply: dict[str, Any]) -> Iterator[tuple[Any, ...]]:
    text = ""
    for event, data in client().stream_job(reply["job_id"]):
        if event == "token":
            text += data.get("text", "")
        elif event == "reset":  # a retried attempt writes the reply again from its start
            text = ""
        else:
            continue
        yield view(chat, {reply["id"]: text})


@api_errors
def stop_reply(chat: dict[str, Any] | None) -> None:
    """Cancel the pending replies; their streams then end and show "Generation cancelled."."""
    pending = pending_replies(chat)
    if not pending:
        raise gr.Error("No reply is being generated.")
    for m in pending:
        if m.get("job_id") is not None:
            try:
                client().cancel_job(m["job_id"])
            except ApiError as e:
                if e.status != 409:  # already finished: nothing to stop
                    raise


@api_errors
def rate_reply(chat: dict[str, Any] | None, edited: str, rating: str) -> tuple[Any, ...]:
    """👍 approves the reply as it stands in the reply box (edited or not): it goes into the answer memory;
    👎 with an edited text gives the right answer (also into the memory); 👎 alone takes an approval back."""
    m = last_reply(chat)
    if chat is None or m is None or m["status"] != "done":
        raise gr.Error("There is no finished reply to rate yet.")
    text = (edited or "").strip()
    own = (m.get("raw_content") or m["content"]).strip()
    corrected = text if text and text not in (own, m["content"].strip()) else None
    c = client()
    c.feedback(chat["id"], m["id"], rating, corrected)
    if rating == "up" or corrected:
        gr.Info("Approved: this answer is now in the answer memory." + (" (as you edited it)" if corrected else ""))
    else:
        gr.Info("Feedback saved.")
    return *view(c.chat(chat["id"])), ""


@api_errors
def export_chat(chat: dict[str, Any] | None, fmt: str) -> str:
    if not chat:
        raise gr.Error("Open or start a chat first; there is nothing to export.")
    return save_download(*client().export_chat(chat["id"], fmt))


@api_errors
def export_all(fmt: str, model: str | None) -> str:
    return save_download(*client().export_chats(fmt, model=model or None))


# ---------------------------------------------------------------------------- layout
@dataclass
class ChatTab:
    tab: gr.Tab
    state: gr.State
    chat_list: gr.Dropdown
    new: gr.Button
    delete: gr.Button
    list_refresh: gr.Button
    model: gr.Dropdown
    settings: list[Any]  # tone, temperature, top-p, max new tokens, privacy toggle
    chatbot: gr.Chatbot
    msg: gr.Textbox
    send: gr.Button
    stop: gr.Button
    meta: gr.Markdown
    ratings: dict[str, gr.Button]
    corrected: gr.Textbox
    filled_for: gr.State  # the reply the reply box was filled from (see suggested_text)
    intent: gr.Markdown
    similar: gr.Radio
    exports: dict[str, gr.Button]
    all_fmt: gr.Radio
    all_model: gr.Textbox
    all_btn: gr.Button
    file: gr.DownloadButton

    @property
    def view(self) -> list[Any]:
        return [self.state, self.chatbot, self.meta]


def _sidebar() -> tuple[Any, ...]:
    chat_list = gr.Dropdown([], value=None, label="Chats", info="reopen a saved chat", elem_id="chat-list")
    with gr.Row():
        new = gr.Button("New chat", size="sm", elem_id="chat-new")
        delete = gr.Button("Delete chat", size="sm", variant="stop", elem_id="chat-delete")
        refresh = gr.Button("↻", size="sm", min_width=40, elem_id="chat-list-refresh")
    model = gr.Dropdown([], value=None, label="Model", elem_id="chat-model")
    controls = generation_controls("chat", render=False)
    *basic, backend, copy_bias = controls
    for c in basic:
        c.render()
    with gr.Accordion("Backend and approved answers", open=False):
        backend.render()
        copy_bias.render()
    return chat_list, new, delete, refresh, model, list(controls)


def _conversation() -> tuple[Any, ...]:
    chatbot = gr.Chatbot(
        [],
        label="Conversation",
        height=460,
        elem_id="chatbot",
        feedback_options=None,
        buttons=["copy", "copy_all"],
        placeholder="Type a customer message below (the trash icon starts a new chat; saved chats stay in the list).",
    )
    with gr.Row():
        msg = gr.Textbox(placeholder="Customer message…", show_label=False, lines=2, scale=5, elem_id="chat-input")
        with gr.Column(scale=1, min_width=110):
            send = gr.Button("Send", variant="primary", elem_id="chat-send")
            stop = gr.Button("Stop", size="sm", elem_id="chat-stop")
    meta = gr.Markdown(chat_meta(None), elem_id="chat-meta")
    with gr.Row():
        ratings = {
            "up": gr.Button("👍 Good reply", size="sm", elem_id="chat-up"),
            "down": gr.Button("👎 Bad reply", size="sm", elem_id="chat-down"),
        }
    corrected = gr.Textbox(
        label="Reply box: edit the suggested reply, then 👍 approves it as written (into the answer memory)",
        lines=3, elem_id="chat-corrected",
    )
    with gr.Accordion("Answer memory: intent and similar approved answers", open=True):
        intent = gr.Markdown("", elem_id="chat-intent")
        similar = gr.Radio(choices=[], label="Similar approved answers (📌: the suggestion stood on it; "
                                             "click one to put it in the reply box)",
                           visible=False, elem_id="chat-similar")
    return chatbot, msg, send, stop, meta, ratings, corrected, intent, similar


def _export_row() -> tuple[Any, ...]:
    with gr.Row():
        gr.Markdown("**Export this chat:**")
        exports = {f: gr.Button(f"⬇ {f.upper()}", size="sm", elem_id=f"export-{f}") for f in EXPORT_FORMATS}
    with gr.Accordion("Export all chats", open=False):
        with gr.Row():
            all_fmt = gr.Radio(list(EXPORT_FORMATS), value="jsonl", label="Format")
            all_model = gr.Textbox(label="Only chats with replies from model (optional)")
            all_btn = gr.Button("⬇ Export all chats", elem_id="export-all")
    file = gr.DownloadButton("download", visible="hidden", elem_id="chat-download")
    return exports, all_fmt, all_model, all_btn, file


def build(demo: gr.Blocks) -> ChatTab:
    """The tab inside the current ``gr.Blocks``, with its events."""
    with gr.Tab("Chat", id="chat") as tab:
        state = gr.State(None)
        filled_for = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1, min_width=260):
                chat_list, new, delete, refresh, model, settings = _sidebar()
            with gr.Column(scale=3):
                chatbot, msg, send, stop, meta, ratings, corrected, intent, similar = _conversation()
                exports, all_fmt, all_model, all_btn, file = _export_row()
    t = ChatTab(
        tab=tab, state=state, chat_list=chat_list, new=new, delete=delete, list_refresh=refresh, model=model,
        settings=settings, chatbot=chatbot, msg=msg, send=send, stop=stop, meta=meta, ratings=ratings,
        corrected=corrected, filled_for=filled_for, intent=intent, similar=similar, exports=exports, all_fmt=all_fmt,
        all_model=all_model, all_btn=all_btn, file=file,
    )
    _wire_conversation(demo, t)
    _wire_feedback_and_exports(t)
    return t


def _wire_conversation(demo: gr.Blocks, t: ChatTab) -> None:
    demo.load(load_chat_list, None, t.chat_list, **QUIET)
    # a stored user turn or an opened chat is followed by the streaming handler; whatever shows another
    # chat cancels the streams that are running, so a stream never draws over the wrong chat
    follows = []
    for trigger in (t.send.click, t.msg.submit):
        sent = trigger(send_message, [t.state, t.msg, t.model, *t.settings], [*t.view, t.msg, t.chat_list],
                       **on(t.chatbot))
        follows.append(sent.success(follow_replies, t.state, t.view, **QUIET))
    opened = t.chat_list.input(open_chat, t.chat_list, [*t.view, t.model, *t.settings], **on(t.chatbot))
    follows.append(opened.success(follow_replies, t.state, t.view, **QUIET))
    for trigger in (t.chat_list.input, t.new.click, t.chatbot.clear, t.delete.click):
        trigger(None, None, None, cancels=follows)

    for clear in (t.new.click, t.chatbot.clear):
        clear(new_chat, None, [*t.view, t.chat_list, t.msg], **QUIET)
    t.delete.click(delete_chat, t.state, [*t.view, t.chat_list, t.msg], **on(t.chatbot))
    t.list_refresh.click(refresh_chat_list, t.state, t.chat_list, **on(t.chat_list))
    t.stop.click(stop_reply, t.state, None)


def _wire_feedback_and_exports(t: ChatTab) -> None:
    for rating, btn in t.ratings.items():
        btn.click(bind(rate_reply, rating), [t.state, t.corrected], [*t.view, t.corrected], **on(t.meta))
    # whenever the shown chat changes: the memory panel; the reply box is pre-filled once per new reply
    t.state.change(memory_panel, t.state, [t.intent, t.similar], **QUIET)
    t.state.change(suggested_text, [t.state, t.filled_for], [t.corrected, t.filled_for], **QUIET)
    t.similar.input(pick_similar, [t.state, t.similar], t.corrected, **QUIET)
    click_download = download_js("chat-download")
    for fmt, btn in t.exports.items():
        btn.click(bind(export_chat, fmt), t.state, t.file, **QUIET).success(None, None, None, js=click_download)
    t.all_btn.click(export_all, [t.all_fmt, t.all_model], t.file, **QUIET).success(
        None, None, None, js=click_download
    )
