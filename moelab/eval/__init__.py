"""Evaluation on the Nous suite: the suite table, the local lm-eval runner and the EvalReport it writes."""

from moelab.eval.report import EvalReport, EvalSettings, TaskResult, report_markdown

__all__ = ["EvalReport", "EvalSettings", "TaskResult", "report_markdown", "run_eval"]


def run_eval(*args, **kwargs):
    """See moelab.eval.local.run_eval (imported on first use, so importing moelab.eval stays light)."""
    from moelab.eval.local import run_eval as run

    return run(*args, **kwargs)
