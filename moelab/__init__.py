"""moelab: build Mixture-of-Experts models from dense fine-tunes, then probe, evaluate, compare and publish them."""

__version__ = "0.1.0"


def main() -> None:
    """The `moelab` command. Its imports (Typer, rich, moelab's modules: half a second) run under the stop-signal
    handling too, so a Ctrl-C at once ends the run as cleanly as one later: a line, the shell's exit code."""
    import os
    import sys

    from moelab.signals import Interrupted, reported, stop_signals_unwind

    # Large CPU tensors on transparent huge pages (torch reads this at its first allocation): a build allocates
    # gigabytes of fresh tensors, and on 4 KB pages faulting them in cost a 4x1B build 2 s of system time.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

    try:
        with stop_signals_unwind():  # around the command too: a signal that came mid-import is raised after it
            from moelab.cli import main as run_command_line

            run_command_line()
    except Interrupted as stop:
        reported()
        sys.stderr.write(f"interrupted ({stop.signal_name})\n")
        sys.exit(stop.code)


def command() -> None:
    """The `moelab` program (and `python -m moelab`): main(), then an exit that skips the interpreter's teardown.
    Finalizing torch and transformers takes about 2 s, a sixth of a small build, and moelab needs none of it;
    output is flushed and atexit handlers run first. While a library's non-daemon thread still runs, the plain
    exit, which waits for it, is kept."""
    import atexit
    import os
    import sys
    import threading

    try:
        main()
        code = 0
    except SystemExit as done:
        code = done.code
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    if isinstance(code, str):  # sys.exit("message"): printed, status 1
        sys.stderr.write(code + "\n")
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 0 if code is None else 1)
