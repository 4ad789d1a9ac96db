"""``csra keys``: create, list and revoke named API keys, on the server host (straight to the database).

Key management talks to the database rather than the API so the first keys can be made before anyone
has one, and a lost admin key can always be replaced by whoever runs the server.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from csra.settings import get_settings

keys_app = typer.Typer(help="API keys with roles (admin, agent), stored hashed", no_args_is_help=True)
console = Console(stderr=True)
out = Console()


def _session():  # type: ignore[no-untyped-def]
    from db.migrate import upgrade
    from db.session import get_sessionmaker

    get_settings().data_dir.mkdir(parents=True, exist_ok=True)
    upgrade()
    return get_sessionmaker()()


def _fail(message: str) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code=1)


@keys_app.command("create")
def create(
    name: Annotated[str, typer.Option(help="who uses it (shown as the owner of their jobs and chats)")],
    role: Annotated[str, typer.Option(help="agent: chat, feedback, own exports, read models and evaluations; "
                                           "admin: also import, train, evaluate, delete, edit the profile")] = "agent",
) -> None:
    """Create a key and print it once (only its hash is kept): ``KEY=$(csra keys create --name alice)``."""
    from db.keys import KeyProblem, Role, create_key

    try:
        parsed = Role(role)
    except ValueError:
        raise _fail(f"unknown role {role!r}: use admin or agent") from None
    settings = get_settings()
    with _session() as db:
        try:
            new = create_key(db, name, parsed, reserved=frozenset({settings.api_key_name}))
        except KeyProblem as e:
            raise _fail(str(e)) from None
    out.print(new.secret, highlight=False, soft_wrap=True)
    console.print(f"created the {parsed.value} key {name!r}: give it to them once (it cannot be shown again); "
                  "they send it as 'Authorization: Bearer <key>' or set CSRA_API_KEY for the CLI and UI")
    if not settings.api_key:
        console.print("[yellow]warning:[/yellow] keys are off on this host: CSRA_API_KEY (the bootstrap admin key) "
                      "is not set, so the API does not check any key yet. Set it where the API runs to turn keys on")


@keys_app.command("list")
def list_(all_: Annotated[bool, typer.Option("--all", help="include revoked keys")] = False) -> None:
    """The keys (names, roles, first characters, last use); never the keys themselves."""
    from db.keys import list_keys

    settings = get_settings()
    table = Table("name", "role", "key starts", "created", "last used", "revoked")
    if settings.api_key:
        table.add_row(settings.api_key_name, "admin", "(CSRA_API_KEY)", "", "", "")
    with _session() as db:
        for k in list_keys(db, include_revoked=all_):
            table.add_row(k.name, k.role, k.prefix + "…", f"{k.created_at:%Y-%m-%d %H:%M}",
                          f"{k.last_used_at:%Y-%m-%d %H:%M}" if k.last_used_at else "never",
                          f"{k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "")
    out.print(table)


@keys_app.command("revoke")
def revoke(name: str) -> None:
    """Revoke a key at once (its next request gets 401); what it made keeps its owner name."""
    from db.keys import KeyProblem, revoke_key

    with _session() as db:
        try:
            revoke_key(db, name)
        except KeyProblem as e:
            raise _fail(str(e)) from None
    console.print(f"revoked the key {name!r}")
