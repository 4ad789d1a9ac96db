"""``csra chat`` against the real stack (tiny baseline): the one-shot form, an interactive session driven
through stdin, and the API's errors as one line. The command runs as a subprocess, as a person runs it."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx

from tests.stack import Stack

# sampling, so the tiny random model writes some text (greedy, it writes tokens that decode to nothing)
SAMPLED = ["--max-new-tokens", "8", "--temperature", "1.0"]


def csra_chat(stack: Stack, *args: str, stdin: str = "", cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "csra.cli", "chat", *args], env=stack.env, cwd=cwd,
                          input=stdin, capture_output=True, text=True, timeout=120)


def chats_titled(api: httpx.Client, title: str) -> list[dict[str, Any]]:
    """The chats with this title, oldest first, each read in full (with its messages)."""
    ids = sorted(c["id"] for c in api.get("/chats", params={"limit": 500}).json()["data"] if c["title"] == title)
    return [api.get(f"/chats/{i}").json() for i in ids]


def newlines(text: str) -> str:
    """``text`` as a text-mode pipe reads it: the sampled tiny model writes stray carriage returns too."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def test_one_shot_prints_the_reply_and_stores_a_normal_chat(stack: Stack, api: httpx.Client) -> None:
    title = f"cli one-shot {uuid.uuid4().hex[:8]}"
    proc = csra_chat(stack, "--message", "Where is my order?", "--title", title, "--tone", "friendly", *SAMPLED,
                     "--backend", "torch", "--copy-bias", "2.5")
    assert proc.returncode == 0, proc.stderr
    [chat] = chats_titled(api, title)
    user, reply = chat["messages"]
    assert (user["role"], user["content"]) == ("user", "Where is my order?")
    assert reply["role"] == "assistant" and reply["status"] == "done"
    assert reply["settings"]["tone"] == "friendly" and reply["settings"]["max_new_tokens"] == 8
    assert (reply["settings"]["backend"], reply["settings"]["copy_bias"]) == ("torch", 2.5)
    assert proc.stdout == newlines(reply["content"] + "\n")


def test_interactive_session_streams_rates_exports_and_opens_a_new_chat(
    stack: Stack, api: httpx.Client, tmp_path: Path
) -> None:
    title = f"cli session {uuid.uuid4().hex[:8]}"
    export = tmp_path / "turn.md"
    script = ["Where is my order?", "/feedback up", f"/export md {export}", "/bogus", "/new",
              "Can I get a refund?", "/quit"]
    proc = csra_chat(stack, "--title", title, *SAMPLED, stdin="\n".join(script) + "\n", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "unknown command /bogus" in proc.stderr  # a hint, and the session went on

    first, second = chats_titled(api, title)
    assert [m["role"] for m in first["messages"]] == [m["role"] for m in second["messages"]] == ["user", "assistant"]
    assert first["messages"][0]["content"] == "Where is my order?"
    assert second["messages"][0]["content"] == "Can I get a refund?"
    replies = [first["messages"][1], second["messages"][1]]
    assert all(r["status"] == "done" for r in replies)
    assert replies[0]["feedback"] == "up" and replies[1]["feedback"] is None
    # what was streamed to stdout is the stored reply, token for token (the model's own words)
    assert proc.stdout == newlines("".join(r["raw_content"] + "\n" for r in replies if r["raw_content"]))
    md = export.read_text()
    assert f"exported chat #{first['id']} to {export}" in proc.stderr
    assert "Where is my order?" in md and replies[0]["content"] in md and "Can I get a refund?" not in md


def test_api_errors_are_one_line_and_a_failed_exit(stack: Stack, api: httpx.Client) -> None:
    unknown = csra_chat(stack, "--message", "hi", "--model", "no-such-model")
    assert unknown.returncode == 1 and unknown.stdout == ""
    assert unknown.stderr == "error: unknown model 'no-such-model': GET /models lists the models\n"
    for bad in (["--backend", "gpu"], ["--copy-bias", "30"]):
        refused = csra_chat(stack, "--message", "hi", *bad)
        assert refused.returncode == 1 and refused.stdout == "" and refused.stderr.count("\n") == 1
        assert refused.stderr.startswith("error: ") and bad[0][2:].replace("-", "_") in refused.stderr, refused.stderr
    missing = csra_chat(stack, "--message", "hi", "--chat", "999999")
    assert (missing.returncode, missing.stderr) == (1, "error: chat 999999 not found\n")
    if api.get("/memory").json()["entries"] == 0:  # retrieval answers from the memory; without one it fails
        failed = csra_chat(stack, "--message", "hi", "--model", "retrieval")
        assert failed.returncode == 1 and failed.stdout == ""
        assert failed.stderr.startswith("error: generation failed: the retrieval responder needs the answer memory")
        assert failed.stderr.count("\n") == 1
