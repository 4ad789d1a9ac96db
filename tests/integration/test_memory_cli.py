"""``csra memory`` against the real stack: the summary, a search, the list, removing a wrong approval and a
rebuild, each as a person runs it (a subprocess), and the API's errors as one line."""

from __future__ import annotations

import subprocess
import sys

import httpx

from tests.integration.helpers import approve_in_chat
from tests.integration.test_memory import ensure_memory
from tests.stack import Stack


def csra_memory(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**stack.env, "COLUMNS": "250"}  # the tables' cells whole, not wrapped
    return subprocess.run([sys.executable, "-m", "csra.cli", "memory", *args], env=env, capture_output=True,
                          text=True, timeout=240)


def test_a_wrong_approval_is_found_listed_and_removed(stack: Stack, api: httpx.Client) -> None:
    ensure_memory(api)
    question = "the parcel box arrived open and the scarf inside is missing"
    wrong = "Scarves are never shipped in boxes, so this cannot have happened."
    entry_id = approve_in_chat(api, question, wrong)

    summary = csra_memory(stack)
    stats = api.get("/memory").json()
    assert summary.returncode == 0, summary.stderr
    assert summary.stdout.startswith(f"{stats['entries']:,} approved answers: ")
    assert f"{stats['by_source']['chat']:,} approved in chats" in summary.stdout

    found = csra_memory(stack, "search", question, "-k", "3")
    assert found.returncode == 0, found.stderr
    assert found.stderr.startswith("intent: ")
    first = next(line for line in found.stdout.splitlines() if line.startswith("│"))  # the table's first row
    assert f"│ {entry_id} " in first and "1.000" in first and wrong in first

    listed = csra_memory(stack, "list", "--source", "chat", "--limit", "500")
    assert listed.returncode == 0 and wrong in listed.stdout, listed.stderr

    removed = csra_memory(stack, "remove", str(entry_id))
    assert removed.returncode == 0 and f"answer {entry_id} removed" in removed.stderr
    assert entry_id not in [h["id"] for h in api.get("/memory/search", params={"q": question}).json()["data"]]
    again = csra_memory(stack, "remove", str(entry_id))
    assert (again.returncode, again.stderr) == (1, f"error: memory entry {entry_id} was already removed\n")


def test_a_rebuild_is_followed_to_its_end_and_bad_input_is_one_line(stack: Stack, api: httpx.Client) -> None:
    ensure_memory(api)
    dataset_id = api.get("/memory").json()["datasets"][0]
    rebuilt = csra_memory(stack, "rebuild", str(dataset_id))
    assert rebuilt.returncode == 0, rebuilt.stderr
    rows = api.get(f"/datasets/{dataset_id}").json()["stats"]["split_rows"]["train"]
    assert f"dataset {dataset_id}: {rows:,} answers (replaced " in rebuilt.stderr

    missing = csra_memory(stack, "rebuild", "999999")
    assert (missing.returncode, missing.stderr) == (1, "error: dataset 999999 does not exist\n")
    bad = csra_memory(stack, "list", "--source", "email")
    assert bad.returncode == 2 and "email" in bad.stderr  # typer names the value it refuses
