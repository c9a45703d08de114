"""The pod side of `moelab eval --remote runpod`: `python -m moelab.eval.pod` evaluates, reports to the gist, removes the pod.

It reads everything from its environment (set by moelab.eval.remote.pod_spec): MOELAB_MODEL (Hub repo id),
MOELAB_EVAL_SETTINGS (EvalSettings JSON), MOELAB_GIST_ID, GITHUB_TOKEN, HF_TOKEN (optional, read by the Hub client),
MOELAB_KEEP_POD; RunPod adds RUNPOD_POD_ID and a pod-scoped RUNPOD_API_KEY. MOELAB_DATA_DIR (optional) points at
the datasets in a custom image instead of the Hub (a folder, or pkg:moelab/data). Its output is the pod's log.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

from moelab.errors import MoelabError
from moelab.eval.remote import (POD_ENV_GIST, POD_ENV_KEEP, POD_ENV_MODEL, POD_ENV_SETTINGS, POD_SECRET_NAMES,
                                GistChannel)
from moelab.redact import clean_secret, mask

ERROR_TAIL_LINES = 30


def evaluate_and_post(env: dict[str, str]) -> int:
    """Run the eval and post the report (exit 0) or the error (exit 1) to the run's gist."""
    from moelab.eval import EvalSettings, report_markdown, run_eval
    from moelab.eval.local import resolve_data_dir

    secret_values = tuple(env[name] for name in POD_SECRET_NAMES if env.get(name))
    channel = GistChannel.open(clean_secret(env["GITHUB_TOKEN"]), env[POD_ENV_GIST])
    try:
        settings = EvalSettings(**json.loads(env[POD_ENV_SETTINGS]))
        data_dir = resolve_data_dir(env.get("MOELAB_DATA_DIR") or None)
        with tempfile.TemporaryDirectory() as tmp:
            report = run_eval(env[POD_ENV_MODEL], settings, data_dir, Path(tmp) / "report.json")
        report.gist_id = env[POD_ENV_GIST]
        channel.post_report(report, report_markdown(report))
        print(f"report posted to gist {env[POD_ENV_GIST]}", flush=True)
        return 0
    except Exception as err:
        if isinstance(err, MoelabError):
            text = str(err)
        else:
            lines = traceback.format_exc().strip().splitlines()
            text = "\n".join(lines[-ERROR_TAIL_LINES:])
        text = mask(text, secret_values)
        print(text, file=sys.stderr, flush=True)
        channel.post_error(text)
        return 1


def remove_this_pod(env: dict[str, str]) -> None:
    """As AutoEval's pods do: runpodctl with the pod-scoped key RunPod provides; the SDK where runpodctl is absent."""
    pod_id = env.get("RUNPOD_POD_ID")
    if not pod_id:
        print("RUNPOD_POD_ID is not set: not on a RunPod pod, nothing to remove", file=sys.stderr)
        return
    try:
        if shutil.which("runpodctl"):
            subprocess.run(["runpodctl", "remove", "pod", pod_id], check=True)
        else:
            import runpod

            runpod.api_key = env.get("RUNPOD_API_KEY")
            runpod.terminate_pod(pod_id)
    except Exception as err:  # the local side terminates the pod too; this is the backstop
        print(f"could not remove pod {pod_id} ({type(err).__name__}); the local moelab terminates it",
              file=sys.stderr)


def main() -> int:
    env = dict(os.environ)
    print(f"moelab {Path(__file__).resolve().parents[1]}", flush=True)  # which install runs, for the pod's log
    try:
        return evaluate_and_post(env)
    except MoelabError as err:  # the gist itself is unreachable: only the pod's log can tell
        print(f"error: {mask(str(err))}", file=sys.stderr)
        return 2
    finally:
        if env.get(POD_ENV_KEEP) != "1":
            remove_this_pod(env)


if __name__ == "__main__":
    sys.exit(main())
