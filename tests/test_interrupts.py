"""SIGINT, SIGTERM and SIGHUP at several moments of a real `moelab eval` and of a remote wait: one "interrupted"
line, the shell's exit code, no debris, no pod left running, and an eval that resumes where it stopped."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moelab.eval.suite import tasks_of_group
from test_remote import (MOELAB, assert_no_secrets, assert_terminated_once_by_us, cli_env, github_api,  # noqa: F401
                         remote_eval_args, restore_default_sigint, runpod_api)

SHIPPED_DATA = Path(__file__).resolve().parents[1] / "moelab" / "data"
TASKS = ["bigbench_navigate", "bigbench_snarks", "bigbench_sports_understanding"]
# The whole BIG-bench group, in the order the eval runs it: with a tiny model each task takes about 70 ms, so three
# tasks left only 0.15 s between the first task's file and the end of the run, which a busy test process missed.
ALL_TASKS = [task.name for task in tasks_of_group("Bigbench")]
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}


def eval_args(model: Path, output: Path, engine: str = "auto", tasks: list[str] = TASKS) -> list[str]:
    return [*MOELAB, "eval", str(model), "--tasks", ",".join(tasks), "--limit", "1", "--data-dir", str(SHIPPED_DATA),
            "--device", "cpu", "--engine", engine, "--output", str(output)]


def start(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=restore_default_sigint)


def wait_until(condition, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the moment never came"
        time.sleep(0.05)


def stop(process: subprocess.Popen, signum: int) -> str:
    process.send_signal(signum)
    try:
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == EXIT_CODES[signum], err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"interrupted ({signal.Signals(signum).name})"
    return err


def debris(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# All three signals go through one handler (each is tested early, below); this slower one (two evals) uses SIGHUP.
# lm-eval's engine finishes tasks one by one, so the signal lands between two of them; the moelab engine finishes
# them all at once at the end of its pass (its request-level resume: test_eval_scheduler.py).
@pytest.mark.parametrize("signum", [signal.SIGHUP])
def test_a_signal_after_a_finished_task_keeps_it_and_the_rerun_resumes(signum, tmp_path, tiny_moe_dir):
    output = tmp_path / "reports" / "nous.json"
    partial = output.with_name("nous.json.partial")
    process = start(eval_args(tiny_moe_dir, output, engine="lm-eval", tasks=ALL_TASKS), tmp_path)
    wait_until(lambda: (partial / f"{ALL_TASKS[0]}.json").is_file() or process.poll() is not None)
    stop(process, signum)

    assert not output.exists() and debris(output.parent) == []
    cached = json.loads((partial / f"{ALL_TASKS[0]}.json").read_text())
    cached["result"]["value"] = 0.123456  # a value no run computes: the re-run must take it from the cache
    (partial / f"{ALL_TASKS[0]}.json").write_text(json.dumps(cached))
    rerun = subprocess.run(eval_args(tiny_moe_dir, output, engine="lm-eval", tasks=ALL_TASKS), cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)

    assert rerun.returncode == 0, rerun.stderr
    results = {r["task"]: r for r in json.loads(output.read_text())["results"]}
    assert list(results) == ALL_TASKS and results[ALL_TASKS[0]]["value"] == 0.123456
    assert not partial.exists() and debris(output.parent) == []


# A signal can land anywhere in the imports: in the import system's weakref callbacks, where Python ignores what a
# handler raises (the eval then ran to its end), in torch's C++ calling back into Python, where an exception
# aborts the process, or halfway through numpy's import, which broke accelerate's (all three at 0.7-0.8 s).
@pytest.mark.parametrize("delay_s", [0.3, 0.5, 0.7, 0.9, 1.1])
def test_a_ctrl_c_during_the_imports_is_one_line(delay_s, tmp_path, tiny_moe_dir):
    process = start(eval_args(tiny_moe_dir, tmp_path / "nous.json"), tmp_path)
    time.sleep(delay_s)  # past the interpreter's start: Typer, rich and moelab (0.5 s), then torch and lm-eval
    assert process.poll() is None
    stop(process, signal.SIGINT)
    # On a fast machine the later signals come after the first requests: their resume cache is all that stays.
    assert [p.name for p in tmp_path.iterdir()] in ([], ["nous.json.partial"])


@pytest.mark.parametrize("signum", list(EXIT_CODES))
def test_a_signal_while_the_model_loads_leaves_nothing(signum, tmp_path, tiny_moe_dir):
    output = tmp_path / "reports" / "nous.json"
    process = start(eval_args(tiny_moe_dir, output), tmp_path)
    time.sleep(4)  # past the imports, into the run: loading lm-eval and the model, or the first task
    assert process.poll() is None
    stop(process, signum)

    assert not output.exists()
    assert debris(output.parent) == [] if output.parent.exists() else True


SWALLOWED_SIGNAL = """
import signal, sys, time
from moelab.signals import Interrupted, stop_signals_unwind

class SignalledWhileCollected:
    def __del__(self):
        signal.raise_signal(signal.SIGTERM)  # the handler runs here, and Python ignores what it raises

try:
    with stop_signals_unwind():
        if sys.argv[1] == "finalizer":
            SignalledWhileCollected()
        else:
            try:
                signal.raise_signal(signal.SIGTERM)
            except BaseException:  # a library that catches everything
                pass
        time.sleep(10)
        print("the signal was lost")
except Interrupted as stop:
    print("stopped by", stop.signal_name)
"""


@pytest.mark.parametrize("where", ["finalizer", "bare except"])
def test_a_signal_whose_exception_was_swallowed_arrives_again(where):
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-c", SWALLOWED_SIGNAL, where], capture_output=True, text=True,
                         timeout=60)

    assert (run.stdout, run.stderr, run.returncode) == ("stopped by SIGTERM\n", "", 0)
    assert time.monotonic() - started < 8


HUNG_IMPORT = """
import sys
sys.path.insert(0, sys.argv[1])
from moelab.signals import Interrupted, stop_signals_unwind

try:
    with stop_signals_unwind():
        import hung
except Interrupted as stop:
    print("stopped by", stop.signal_name)
"""


def test_a_signal_waits_for_an_import_but_not_for_ever(tmp_path):
    (tmp_path / "hung.py").write_text("import time\ntime.sleep(60)\n")  # an import that never finishes
    process = subprocess.Popen([sys.executable, "-c", HUNG_IMPORT, str(tmp_path)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    time.sleep(2)  # into the import
    process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    out, err = process.communicate(timeout=60)

    assert (out, err, process.returncode) == ("stopped by SIGTERM\n", "", 0)
    assert 9.5 < time.monotonic() - sent < 20  # held for LONGEST_WAIT_S (10 s), then raised inside the import


# --- the remote wait: every signal terminates the pod and removes the placeholder gist -------------------------

@pytest.mark.parametrize("signum", list(EXIT_CODES))
def test_a_signal_while_waiting_for_the_pod_terminates_it_and_removes_the_gist(signum, tmp_path, cli_env, runpod_api,
                                                                                github_api):
    runpod_api.ready_after_polls = 3
    process = start(remote_eval_args(), tmp_path, cli_env)
    runpod_api.wait_for(lambda: any(p.polls >= 4 for p in runpod_api.pods.values()))
    err = stop(process, signum)

    assert "pod fakepod0001: terminated" in " ".join(err.split())
    assert_terminated_once_by_us(runpod_api)
    assert github_api.gists == {} and not list(tmp_path.rglob("*.json"))
    assert_no_secrets(err)


def test_a_hangup_while_the_create_request_is_in_flight_still_terminates_the_pod(tmp_path, cli_env, runpod_api,
                                                                                 github_api):
    runpod_api.delay_s = 1.0  # gpuTypes, then podFindAndDeployOnDemand, each take a second
    process = start(remote_eval_args(), tmp_path, cli_env)
    runpod_api.wait_for(lambda: runpod_api.received >= 2)  # the create request has arrived, not yet answered
    err = stop(process, signal.SIGHUP)

    assert "pod fakepod0001: terminated" in " ".join(err.split())
    assert_terminated_once_by_us(runpod_api)
    assert github_api.gists == {}
