"""What a line typed into ``csra chat`` asks for: a message, or one of its slash commands (no I/O).

Kept apart from the chat loop (``csra.terminal_chat``) so the commands and their usage hints are one
small, pure module: ``parse_line`` turns a line into an action the loop then carries out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

EXPORT_FORMATS = ("jsonl", "csv", "txt", "md")
RATINGS = ("up", "down")

HELP = """\
Type a customer message and press Enter; the reply is streamed as it is written.
  /export jsonl|csv|txt|md [PATH]  save this chat (default: the API's file name, in the current folder)
  /feedback up|down [corrected]    rate the last reply; up approves it, a corrected text gives the right answer
  /similar                         the approved answers most similar to the last message
  /new                             start a new chat with the same settings
  /help                            this help
  /quit                            leave (Ctrl-D too); Ctrl-C stops a reply being written
A message that starts with "/" is sent by doubling the slash: //etc."""


@dataclass(frozen=True)
class Say:
    text: str


@dataclass(frozen=True)
class Export:
    fmt: str
    path: Path | None = None


@dataclass(frozen=True)
class Rate:
    rating: str
    corrected: str | None = None


@dataclass(frozen=True)
class NewChat:
    pass


@dataclass(frozen=True)
class Similar:
    pass


@dataclass(frozen=True)
class Help:
    pass


@dataclass(frozen=True)
class Quit:
    pass


@dataclass(frozen=True)
class Hint:
    """Bad input: the one line that says what to type instead."""

    text: str


@dataclass(frozen=True)
class Blank:
    pass


Action = Say | Export | Rate | NewChat | Similar | Help | Quit | Hint | Blank


def parse_line(line: str) -> Action:
    """What a typed line asks for; a line that is not a command is a message."""
    line = line.strip()
    if not line:
        return Blank()
    if line.startswith("//"):
        return Say(line[1:])
    if not line.startswith("/"):
        return Say(line)
    name, _, rest = line[1:].partition(" ")
    return _parse_command(name.lower(), rest.strip())


def _parse_command(name: str, rest: str) -> Action:
    if name == "export":
        fmt, _, path = rest.partition(" ")
        if fmt.lower() not in EXPORT_FORMATS:
            return Hint(f"usage: /export {'|'.join(EXPORT_FORMATS)} [PATH]")
        return Export(fmt.lower(), Path(path.strip()).expanduser() if path.strip() else None)
    if name == "feedback":
        rating, _, corrected = rest.partition(" ")
        if rating.lower() not in RATINGS:
            return Hint("usage: /feedback up|down [corrected reply]")
        return Rate(rating.lower(), corrected.strip() or None)
    simple: dict[str, Action] = {"new": NewChat(), "similar": Similar(), "help": Help(), "?": Help(),
                                 "quit": Quit(), "exit": Quit(), "q": Quit()}
    if name not in simple:
        return Hint(f"unknown command /{name}; /help lists the commands")
    if rest:
        return Hint(f"/{name} takes no arguments")
    return simple[name]
