"""SIGINT and SIGTERM noted instead of raised, where an exception landing anywhere would do harm.

A run's record is sealed in several writes (the sidecar, the database's history, the ledger line); a
signal raising in the middle of them would leave it half-sealed (:func:`signals_held`). Waiting for a
worker thread or a child program, an exception raised inside the standard library's locking or
``subprocess`` bookkeeping can break them (:func:`signals_noted`: the waiter looks at the list and
stops the work itself). Low in the layers: the verbs, the recorder and the runner all use it.
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from opslib.errors import Interrupted


@contextmanager
def signals_noted() -> Iterator[list[int]]:
    """SIGINT and SIGTERM only append themselves to the list yielded while the block runs; the block
    polls it and stops its work (outside the main thread nothing is installed: no signal runs there)."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    saved = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum)) for sig in _STOPS}
    try:
        yield caught
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


_STOPS = (signal.SIGINT, signal.SIGTERM)
ONE_CTRL_C_S = 1.0  # signals this close together are one keypress reaching the run twice (see signals_held)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block ends; then the first is raised as :class:`Interrupted`,
    unless the block is already ending with an exception (which is not replaced).

    For clean-up that a signal must not cut mid-statement (giving a lock up, closing a session): cut
    there, the driver's half-done call turns the interruption into another error.
    """
    import sys  # only here: this module is imported early by everything

    ending = sys.exc_info()[1]  # in a finally clause: the exception already under way, if any
    outer = {sig: signal.getsignal(sig) for sig in _STOPS}
    with signals_noted() as caught:  # never raises inside: a second signal waits like the first
        yield
    if caught and ending is None:
        holder = outer[caught[0]]
        if getattr(holder, "holds_signals", False):
            # Inside signals_held (a record being sealed): the signals are the hold's to judge, as if
            # they had arrived there; raised here, one Ctrl-C would break the seal.
            for signum in caught:
                holder(signum, None)
            return
        raise Interrupted(caught[0])


@contextmanager
def signals_held() -> Iterator[list[int]]:
    """SIGINT and SIGTERM wait while the block runs; the list holds those that arrived.

    A second one raises :class:`Interrupted` once, so that an operator can break a seal the database
    is slow to answer (the caller then seals without it); any further one only waits. A signal within
    ONE_CTRL_C_S of the first is the same Ctrl-C: a terminal sends it to every process of the run, and the
    runner passes its own on to the kernel, so one keypress arrives twice. Outside the main thread (where
    Python runs no signal handler) nothing is installed.
    """
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    first: list[float] = []
    broken = []

    def hold(signum, frame) -> None:
        caught.append(signum)
        if not first:
            first.append(time.monotonic())
        elif not broken and time.monotonic() - first[0] >= ONE_CTRL_C_S:
            broken.append(signum)
            raise Interrupted(signum)

    hold.holds_signals = True  # type: ignore[attr-defined] - what signals_deferred nested in here looks for
    saved = {sig: signal.signal(sig, hold) for sig in _STOPS}
    try:
        yield caught
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
