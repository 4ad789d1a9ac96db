"""The Chat tab's reply box: filled from each new finished reply, and never refilled under an agent's edit."""

from __future__ import annotations

import gradio as gr

from tests.ui.test_streaming import USER, message
from ui.tabs import chat, compare


def test_the_reply_box_is_filled_once_per_reply_and_keeps_an_edit() -> None:
    pending = {"id": 1, "messages": [USER, message("pending")]}
    done = {"id": 1, "messages": [USER, message("done", "Order {{Order Number}} ships today.")]}
    assert chat.suggested_text(pending, None) == ("", None)

    text, filled_for = chat.suggested_text(done, None)
    assert (text, filled_for) == ("Order {{Order Number}} ships today.", 2)
    # the same reply shown again (a second follower finishing, a rating) must not wipe what the agent typed
    assert chat.suggested_text(done, filled_for) == (gr.skip(), 2)

    nxt = {**message("done", "Refunds take 5 days."), "id": 4}
    asked_again = {"id": 1, "messages": [USER, done["messages"][1], {**USER, "id": 3}, nxt]}
    assert chat.suggested_text(asked_again, filled_for) == ("Refunds take 5 days.", 4)


def test_the_agent_is_told_when_a_suggestion_is_the_model_s_own_words() -> None:
    similar = [{"reply": "It ships today.", "intent": "track_order", "similarity": 0.31}]
    own = {**message("done", "Sunny, 20 degrees."), "follows_approved": False, "similar": similar}
    line = chat.chat_meta({"id": 1, "messages": [USER, own]})
    assert "No approved answer is close to this message** (the nearest: 0.31)" in line
    for held in (True, None):  # held to an approved answer, or not grounded at all
        shown = chat.chat_meta({"id": 1, "messages": [USER, {**own, "follows_approved": held}]})
        assert "No approved answer is close" not in shown
    result = {"model": "grounded", "latency_ms": 900, "completion_tokens": 9, "finish_reason": "stop"}
    assert "model's own words" in compare.done_meta(
        {"status": "succeeded", "result": {**result, "follows_approved": False}})
    assert "model's own words" not in compare.done_meta({"status": "succeeded", "result": result})
