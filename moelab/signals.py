"""Stop signals (Ctrl-C, SIGTERM, a closed terminal's SIGHUP) unwind moelab like an exception, so cleanup runs."""

from __future__ import annotations

import os
import signal
import sys
import threading
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


def _raise_interrupted(signum, frame) -> None:
    if signum == signal.SIGHUP:
        _detach_from_closed_terminal()
    raise Interrupted(signum)


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
    try:
        yield
    finally:
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
