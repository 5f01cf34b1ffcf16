"""The `opslib` commands as data: each is one function, registered with its arguments by :func:`command`;
:func:`build_parser` makes argparse's parser from them (help from each function's docstring), and each
parsed command carries its function (``args.func``), as Alembic's ``CommandLine`` does."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Callable

from opslib import __version__
from opslib.outcome import Outcome


@dataclass(frozen=True)
class Arg:
    """One argument of a command, as ``argparse.ArgumentParser.add_argument`` takes it."""

    flags: tuple[str, ...]
    options: dict[str, Any]


@dataclass(frozen=True)
class OneOf:
    """Arguments that exclude each other (``--halt-after`` or ``--no-halt``)."""

    args: tuple[Arg, ...]


def arg(*flags: str, **options: Any) -> Arg:
    """An argument, in ``add_argument``'s own terms."""
    return Arg(flags, options)


@dataclass(frozen=True)
class Command:
    """One command: its name (and the group it belongs to, as ``audit list`` belongs to ``audit``), its
    function, and its arguments; help and description come from the function's docstring."""

    name: str
    func: Callable[..., int]
    args: tuple[Arg | OneOf, ...]
    group: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    add_help: bool = True

    @property
    def help(self) -> str:
        """The docstring's first paragraph, on one line."""
        return " ".join((self.func.__doc__ or "").strip().split("\n\n")[0].split())

    @property
    def description(self) -> str | None:
        """The docstring's later paragraphs, if any (shown by ``opslib COMMAND --help``)."""
        rest = (self.func.__doc__ or "").strip().split("\n\n")[1:]
        return "\n\n".join(" ".join(p.split()) for p in rest) or None


COMMANDS: list[Command] = []
# The groups of subcommands (`opslib audit …`), with their help.
GROUPS: dict[str, str] = {}


def command(name: str, *args: Arg | OneOf, group: str | None = None, add_help: bool = True, **defaults: Any):
    """Register the decorated function as the command ``name`` (``group`` ``name`` in a group) taking
    ``args``; ``defaults`` are set on the parsed arguments as they are."""

    def register(func: Callable[..., int]) -> Callable[..., int]:
        COMMANDS.append(Command(name, func, tuple(args), group, defaults, add_help))
        return func

    return register


def group(name: str, help: str) -> None:  # noqa: A002 -- argparse's own word
    """Declare a group of subcommands (`opslib audit list`, `opslib audit verify`, …)."""
    GROUPS[name] = help


def _add(parser: argparse.ArgumentParser, spec: Arg | OneOf) -> None:
    if isinstance(spec, OneOf):
        exclusive = parser.add_mutually_exclusive_group()
        for one in spec.args:
            exclusive.add_argument(*one.flags, **one.options)
    else:
        parser.add_argument(*spec.flags, **spec.options)


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose refusal of an argument another command of the group takes says which does."""

    def parse_args(self, args=None, namespace=None):  # noqa: D102 -- argparse's own
        self._given = list(args or [])
        return super().parse_args(args, namespace)

    def error(self, message: str):  # noqa: D102 -- argparse's own
        given = getattr(self, "_given", [])
        if message.startswith("unrecognized arguments: "):
            found = misplaced(given, message.removeprefix("unrecognized arguments: ").split())
            if found is not None:  # bad input, said in one line as every other (exit 2)
                self.exit(Outcome.INVALID.exit_code, f"opslib: {found}\n")
        super().error(message)


def misplaced(argv: list[str], extra: list[str]) -> str | None:
    """For arguments a group's subcommand does not take (`opslib audit verify --warnings`): which of its
    siblings do, in one line; None when that is not what went wrong (argparse's own message then stands)."""
    words = [a for a in argv if not a.startswith("-")]
    if len(words) < 2 or words[0] not in GROUPS:
        return None
    name, action = words[0], words[1]
    commands = {c.name: c for c in COMMANDS if c.group == name}
    if action not in commands:
        return None
    siblings = [c for c in commands.values() if c.name != action]
    flags = [a.split("=")[0] for a in extra if a.startswith("-")]
    if flags:
        if any(f in _flags(commands[action]) for f in flags):  # `audit --json list`: its own, given too early
            return f"{_listed(flags)} go{'es' if len(flags) == 1 else ''} after the action: `opslib {name} {action} {' '.join(flags)}`"
        takers = [c.name for c in siblings if all(f in _flags(c) for f in flags)]
        if not takers:
            return None
        verb = "belongs" if len(flags) == 1 else "belong"
        owners = " and ".join([f"`opslib {name} {takers[0]}`", *[f"`{name} {t}`" for t in takers[1:]]])
        return f"{_listed(flags)} {verb} to {owners}, not `{name} {action}`"
    takers = [(c.name, _positional(c)) for c in siblings if _positional(c)]
    if _positional(commands[action]) or not takers:
        return None
    only = " and ".join(f"`{name} {t}`" for t, _ in takers)
    return f"`opslib {name} {action}` takes no {takers[0][1]} (only {only} do{'es' if len(takers) == 1 else ''})"


def _flags(cmd: Command) -> set[str]:
    specs = [a for s in cmd.args for a in (s.args if isinstance(s, OneOf) else (s,))]
    return {f for a in specs for f in a.flags if f.startswith("-")}


def _positional(cmd: Command) -> str | None:
    found = [a for a in cmd.args if isinstance(a, Arg) and not a.flags[0].startswith("-")]
    return (found[0].options.get("metavar") or found[0].flags[0].upper()) if found else None


def _listed(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + f" and {items[-1]}"


def build_parser() -> argparse.ArgumentParser:
    """The `opslib` parser: every registered command, in the order they were registered."""
    p = _Parser(
        prog="opslib",
        description="Operate an Alembic-managed PostgreSQL database: status, migrations, the embedded server.",
        epilog="Target: DATABASE_URL, or the embedded server under .opslib/ when unset. "
        "Alembic project: OPSLIB_ALEMBIC_INI (default ./alembic.ini).",
    )
    p.add_argument("--version", action="version", version=f"opslib {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="show what the migrations printed or logged")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for cmd in COMMANDS:
        where = sub
        if cmd.group is not None:
            if cmd.group not in groups:
                parent = sub.add_parser(cmd.group, help=GROUPS[cmd.group], description=GROUPS[cmd.group])
                groups[cmd.group] = parent.add_subparsers(dest="action", required=True, metavar="ACTION")
            where = groups[cmd.group]
        s = where.add_parser(cmd.name, help=cmd.help, description=cmd.description or cmd.help, add_help=cmd.add_help)
        for spec in cmd.args:
            _add(s, spec)
        s.set_defaults(func=cmd.func, usage=s.format_help, **cmd.defaults)
    return p
