"""``csra memory``: the answer memory (the team's approved answers) through the API, as the UI's Memory tab.

``csra memory`` says how many answers there are and where they come from; ``search`` lists the approved
answers to the customer messages most like a text; ``list`` pages through them; ``remove`` takes a wrong
one out; ``rebuild`` replaces a dataset's answers from its train split (a job, followed).
"""

from __future__ import annotations

from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.table import Table

from csra.client import ApiError, Client, memory_entry_source

memory_app = typer.Typer(help="The answer memory: the team's approved answers", invoke_without_command=True)
console = Console(stderr=True)
out = Console()


def _fail(e: ApiError) -> typer.Exit:
    console.print(f"error: {e.detail}", markup=False, soft_wrap=True)  # one line, as the API said it
    return typer.Exit(code=1)


@memory_app.callback()
def summary(ctx: typer.Context) -> None:
    """How many approved answers, from which datasets, how many approved in chats."""
    if ctx.invoked_subcommand is not None:
        return
    try:
        with Client() as c:
            s = c.memory()
    except ApiError as e:
        raise _fail(e) from None
    by = s.get("by_source") or {}
    datasets = ", ".join(str(d) for d in s.get("datasets") or []) or "none"
    out.print(f"{s['entries']:,} approved answers: {by.get('dataset', 0):,} from datasets ({datasets}), "
              f"{by.get('chat', 0):,} approved in chats" + ("" if s.get("embedder_ready") else
                                                             "; the embedding model is not ready yet"))


@memory_app.command("search")
def search(
    message: Annotated[str, typer.Argument(help="a customer message")],
    k: Annotated[int, typer.Option("-k", help="how many answers (1-50)")] = 5,
) -> None:
    """The approved answers to the customer messages most like MESSAGE, most similar first, and the intent."""
    try:
        with Client() as c:
            found = c.memory_search(message, k)
    except ApiError as e:
        raise _fail(e) from None
    if found.get("intent"):
        console.print(f"intent: {found['intent']} (confidence {found['intent_confidence']:.2f})")
    table = Table("id", "similarity", "intent", "source", "customer message", "approved answer")
    for h in found["data"]:
        table.add_row(str(h["id"]), f"{h['similarity']:.3f}", h.get("intent") or "", memory_entry_source(h),
                      h["message"], h["reply"])
    out.print(table)


@memory_app.command("list")
def list_entries(
    source: Annotated[Literal["dataset", "chat"] | None, typer.Option(help="only these")] = None,
    limit: Annotated[int, typer.Option(help="entries shown (1-500)")] = 20,
    offset: Annotated[int, typer.Option(help="skip this many first")] = 0,
) -> None:
    """The answers, newest first (an admin's key, when keys are on)."""
    try:
        with Client() as c:
            page = c.memory_entries(source, limit, offset)
    except ApiError as e:
        raise _fail(e) from None
    table = Table("id", "source", "intent", "customer message", "approved answer", "added")
    for entry in page["data"]:
        table.add_row(str(entry["id"]), memory_entry_source(entry), entry.get("intent") or "", entry["message"],
                      entry["reply"], (entry.get("created_at") or "")[:16].replace("T", " "))
    out.print(table)
    shown = len(page["data"])
    console.print(f"{offset + 1 if shown else 0}-{offset + shown} of {page['count']:,}")


@memory_app.command("remove")
def remove(entry_id: Annotated[int, typer.Argument(help="the answer's id (search or list show it)")]) -> None:
    """Take an answer out of the memory (a wrong approval, an outdated answer): no chat or model finds it."""
    try:
        with Client() as c:
            c.remove_memory_entry(entry_id)
    except ApiError as e:
        raise _fail(e) from None
    console.print(f"answer {entry_id} removed (one from a dataset comes back if that dataset's memory is rebuilt)")


@memory_app.command("rebuild")
def rebuild(
    dataset_id: Annotated[int, typer.Argument(help="the dataset whose train split the answers come from")],
    wait: Annotated[bool, typer.Option(help="wait for the job to end")] = True,
) -> None:
    """Replace a dataset's answers from its train split (a job); answers approved in chats stay."""
    try:
        with Client() as c:
            job = c.rebuild_memory(dataset_id)
            console.print(f"rebuild job {job['id']} {job['status']}")
            if not wait:
                return
            try:
                *_, job = c.poll_job(job["id"], interval=1.0)  # the last one yielded has ended
            except KeyboardInterrupt:
                console.print(f"detached; rebuild job {job['id']} keeps running (csra job {job['id']} --watch)")
                raise typer.Exit(code=130) from None
    except ApiError as e:
        raise _fail(e) from None
    if job["status"] != "succeeded":
        console.print(f"rebuild job {job['id']} {job['status']}: {job.get('error') or ''}", markup=False)
        raise typer.Exit(code=1)
    r = job.get("result") or {}
    console.print(f"dataset {dataset_id}: {r.get('entries', 0):,} answers (replaced {r.get('replaced', 0):,})")
