"""Stop signals (Ctrl-C, SIGTERM, a closed terminal's SIGHUP) unwind moelab like an exception, so cleanup runs."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import weakref
from contextlib import contextmanager
from typing import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(SystemExit):
    """A stop signal arrived; exits 128 + its number, as a shell reports a process ended by that signal.

    A SystemExit rather than KeyboardInterrupt: Typer turns KeyboardInterrupt into a silent exit, and `except
    Exception` must not swallow it, while every `finally` (temp folders, the pod's termination) still runs."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


# Set once the run reports its interruption; an Interrupted dropped before that was swallowed somewhere.
_reported = threading.Event()
# When each signal, still to be raised, first waited for an import to finish; one that never finishes cannot
# hold it back for ever.
_waiting_since: dict[int, float] = {}
LONGEST_WAIT_S = 10.0


def reported() -> None:
    """The run ends on its interruption now: a dropped Interrupted after this is no lost signal."""
    _reported.set()


def _raise_interrupted(signum, frame) -> None:
    # An import stopped halfway leaves its module half-made, so a later import fails in some other way, and in a
    # C extension's call back into Python (torch's start-up makes many) an exception aborts the process: the
    # signal waits until the import is done.
    now = time.monotonic()
    if _inside_an_import(frame) and now - _waiting_since.setdefault(signum, now) < LONGEST_WAIT_S:
        _send_again_soon(signum)
        return
    _waiting_since.pop(signum, None)
    if signum == signal.SIGHUP:
        _detach_from_closed_terminal()
    raise _watched(Interrupted(signum))


def _inside_an_import(frame) -> bool:
    while frame is not None:
        code = frame.f_code
        if code.co_filename.startswith("<frozen importlib") or (
                code.co_name == "<module>" and frame.f_globals.get("__name__") != "__main__"):
            return True
        frame = frame.f_back
    return False


def _watched(stop: Interrupted) -> Interrupted:
    # An Interrupted that unwinds the run stays referenced until the run reports it. One dropped before that was
    # swallowed: by Python itself, which ignores an exception raised in a __del__ or a weakref callback, or by a
    # library's bare `except`; it is sent again. (The handler holds it in no variable: its frame, in the
    # exception's traceback, would keep it alive.)
    weakref.finalize(stop, _send_again_soon, stop.signum).atexit = False
    return stop


def _send_again_soon(signum: int) -> None:
    # From a thread, a moment later: sent at once, the signal would land where it was just put off or ignored.
    if not _reported.is_set():
        resend = threading.Timer(0.05, _send_if_still_handled, (signum,))
        resend.daemon = True
        resend.start()


def _send_if_still_handled(signum: int) -> None:
    if not _reported.is_set() and signal.getsignal(signum) is _raise_interrupted:
        os.kill(os.getpid(), signum)


def _quiet_about_interrupted(unraisable, report_others) -> None:
    # Python would print the ignored Interrupted as "Exception ignored in ..."; its finalizer sends it again.
    if not isinstance(unraisable.exc_value, Interrupted):
        report_others(unraisable)


def _detach_from_closed_terminal() -> None:
    # After a hangup, writing to the terminal fails (EIO), which would break the cleanup that prints progress.
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream.isatty():
                stream.flush()
                os.dup2(devnull, stream.fileno())
        except (OSError, ValueError):
            pass
    os.close(devnull)


@contextmanager
def stop_signals_unwind() -> Iterator[None]:
    """While the block runs, SIGINT, SIGTERM and SIGHUP raise Interrupted (main thread only, as Python allows)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise_interrupted) for s in STOP_SIGNALS}
    previous_hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: _quiet_about_interrupted(unraisable, previous_hook)
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def stop_signals_deferred() -> Iterator[None]:
    """Hold stop signals until the block ends (a create or terminate request must finish), then raise Interrupted."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        if received[0] == signal.SIGHUP:
            _detach_from_closed_terminal()
        raise Interrupted(received[0])
