"""moelab: build Mixture-of-Experts models from dense fine-tunes, then probe, evaluate, compare and publish them."""

__version__ = "0.1.0"


def main() -> None:
    """The `moelab` command. Its imports (Typer, rich, moelab's modules: half a second) run under the stop-signal
    handling too, so a Ctrl-C at once ends the run as cleanly as one later: a line, the shell's exit code."""
    import sys

    from moelab.signals import Interrupted, stop_signals_unwind

    try:
        with stop_signals_unwind():
            from moelab.cli import main as run_command_line
    except Interrupted as stop:
        sys.stderr.write(f"interrupted ({stop.signal_name})\n")
        sys.exit(stop.code)
    run_command_line()
