"""The `opslib` console script: parse, run the command's function, and turn its error into one line and an
exit code (through :func:`opslib.outcome.outcome_of`, the one mapping)."""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import signal
import sys
import traceback
from typing import Sequence

# The commands register themselves when their modules are imported, in this order (`opslib --help`'s);
# each imports what it needs only when it runs (Alembic's import is a large part of a command's start-up).
# isort: off
from opslib.cli import migrations, backups, runs, approvals, audit, server  # noqa: F401 -- registered by import
# isort: on
from opslib.cli.commands import build_parser
from opslib.cli.common import _CONSOLE, EXIT_OK, outcome_known
from opslib.config import load_settings
from opslib.errors import Interrupted, OpsError
from opslib.outcome import outcome_of
from opslib.redact import CleanStream


def _on_sigterm(signum, frame) -> None:
    # A cancelled job or a stopped container ends the command as Ctrl-C does: cleanly, saying where things stand.
    raise Interrupted(signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``opslib`` console script; returns the exit code."""
    argv_given = argv
    argv = list(sys.argv[1:] if argv is None else argv)
    # `opslib open RUNBOOK … -- ARGS`: what follows -- is JupyterLab's, whatever it looks like.
    lab_args: list[str] = []
    command = next((a for a in argv if not a.startswith("-")), None)
    if command == "open" and "--" in argv:
        argv, lab_args = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    args = build_parser().parse_args(argv)
    args.lab_args = lab_args
    # Everything the command prints passes through the one sink that removes passwords.
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = CleanStream(sys.stdout), CleanStream(sys.stderr)
    try:
        _CONSOLE[0] = argv_given is None
        return _main(args)
    finally:
        for wrapped in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                wrapped.flush()
        if isinstance(sys.stdout, CleanStream):
            sys.stdout = streams[0]
        sys.stderr = streams[1]


def _config_error_of(err: BaseException):
    """:func:`opslib.db.config_error_of`, for a driver error only (the CLI imports no driver for the rest)."""
    if getattr(getattr(err, "orig", None), "pgcode", None) is None:
        return None
    from opslib import db

    return db.config_error_of(err)


def _main(args: argparse.Namespace) -> int:
    """The command of ``args`` run, its failure printed as one line: the exit code."""
    # The console script owns logging (its stderr is the cleaning stream); an in-process caller keeps its own.
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr, force=_CONSOLE[0])
    if args.verbose:
        logging.getLogger("alembic").setLevel(logging.INFO)
    signal.signal(signal.SIGTERM, _on_sigterm)
    from opslib import kernelfiles

    with contextlib.suppress(OSError):  # what a runner killed with SIGKILL left in the temporary folder
        kernelfiles.remove_orphans()
    try:
        code = args.func(load_settings(), args)
        outcome_known()
        return code
    except (OpsError, KeyboardInterrupt) as err:
        outcome_known()
        if args.verbose and getattr(err, "output", ""):  # what the migrations printed or logged before
            sys.stderr.write(err.output)
        message = getattr(err, "message", "") or "interrupted (Ctrl-C)"
        print(f"opslib: {message}", file=sys.stderr)
        return outcome_of(err)[1]
    except BrokenPipeError:  # `opslib status | head`: the reader left, which is not an error of ours
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps Python's exit-time flush quiet
        return EXIT_OK
    except Exception as err:  # noqa: BLE001 - an error opslib did not foresee: one line, the traceback on -v
        outcome_known()
        known = _config_error_of(err)
        if known is not None:  # a role lacking a privilege, a read-only role: configuration, exit 2
            print(f"opslib: {known.message}", file=sys.stderr)
            return outcome_of(known)[1]
        if args.verbose:
            traceback.print_exc()
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(f"opslib: unexpected error: {type(err).__name__}: {text} (run with -v for the traceback)", file=sys.stderr)
        return outcome_of(err)[1]
    finally:
        # The process ends next: freezing what it made spares the exit a last full collection (0.1 s).
        gc.freeze()
