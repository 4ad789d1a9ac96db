"""``csra models reply-settings NAME``: how a grounded model's replies follow their approved answers.

Without options it shows each setting as the model serves it and as it was trained; with options it sets
those (the others keep what was set before); ``--reset`` takes every one back to its trained value. The
settings are the API's (``PUT /models/{ref}/reply-settings``, ``csra.specs.ReplySettings``): an
evaluation measures one with its overrides (``csra eval --set copy_bias=2.5``), this serves it.
"""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from csra.client import ApiError, Client
from csra.specs import ReplySettings

console = Console(stderr=True)
out = Console()


def reply_settings(
    model: Annotated[str, typer.Argument(help="a grounded model's name or id")],
    copy_bias: Annotated[Optional[float], typer.Option(help="how hard a reply keeps to the approved answer")] = None,
    copy_exemplars: Annotated[Optional[int], typer.Option(help="the copy bias follows the first N answers")] = None,
    length_floor: Annotated[Optional[float], typer.Option(help="the share of the answer a reply must reach")] = None,
    consensus_pool: Annotated[Optional[int], typer.Option(help="the N nearest answers the agreeing ones come from")
                              ] = None,
    loop_guard: Annotated[Optional[int], typer.Option(help="no run of this many tokens twice in a reply")] = None,
    min_similarity: Annotated[Optional[float], typer.Option(help="below it, the model writes on its own")] = None,
    reset: Annotated[bool, typer.Option("--reset", help="every setting back to its trained value")] = False,
) -> None:
    """Show or set a grounded model's reply settings (admin key to set)."""
    given = {"copy_bias": copy_bias, "copy_exemplars": copy_exemplars, "length_floor": length_floor,
             "consensus_pool": consensus_pool, "no_repeat_ngram_size": loop_guard, "min_similarity": min_similarity}
    changes = {k: v for k, v in given.items() if v is not None}
    if reset and changes:
        raise typer.BadParameter("--reset takes every setting back; it goes with no other option")
    try:
        with Client() as c:
            row = c.model(model)
            if reset or changes:
                row = c.set_reply_settings(model, {} if reset else {**(row.get("reply_settings") or {}), **changes})
    except ApiError as e:
        console.print(f"error: {e.detail}", markup=False, soft_wrap=True)  # one line, as the API said it
        raise typer.Exit(code=1) from None
    out.print(settings_table(row))


def settings_table(row: dict[str, Any]) -> Table | str:
    """Each reply setting as served and as trained (a set one marked)."""
    served, trained = row.get("grounding"), (row.get("training_config") or {}).get("grounding")
    if not served or not trained:
        return f"{row['name']} was not trained grounded: it has no reply settings"
    table = Table("setting", "serving", "trained", title=f"{row['name']}: reply settings")
    for field in ReplySettings.model_fields:
        set_after = field in (row.get("reply_settings") or {})
        table.add_row(field, f"{served.get(field)}" + (" (set)" if set_after else ""), f"{trained.get(field, '')}")
    return table
