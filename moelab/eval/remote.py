"""`moelab eval --remote runpod`: rent a RunPod GPU pod, run the eval there, read the report back, never leak the pod.

How it works (both sides of the wire):
1. Local: create a secret GitHub Gist for this run (GITHUB_TOKEN, gist scope) holding a wheel of this moelab
   (moelab/eval/delivery.py), then a pod whose start command installs it (or --install) and runs
   `python -m moelab.eval.pod`. The model (a Hub repo id), the eval settings and the
   gist id travel as pod environment variables, and so do the secrets the pod needs (GITHUB_TOKEN, HF_TOKEN if set).
   The RunPod API key never leaves this machine.
2. Pod (moelab/eval/pod.py): run the same `run_eval`, write the EvalReport JSON and its AutoEval markdown into the
   gist (or an error file if it failed), then remove itself with its pod-scoped key, as AutoEval's pods do.
3. Local: poll the pod (state, elapsed time, cost per hour x time) and the gist until the report or an error
   arrives, save the report like a local run, and terminate the pod in a `finally` that also runs on errors,
   timeouts, Ctrl-C and SIGTERM. If termination fails, the error says so with the pod id and how to remove it.
"""

from __future__ import annotations

import json
import os
import re
import secrets as random_tokens
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from moelab.errors import MoelabError, check_number
from moelab.eval.delivery import (POD_ENV_INSTALL, POD_ENV_WHEEL, WHEEL_SUFFIX, bootstrap_source, check_install,
                                  wheel_file_name)
from moelab.eval.report import EvalReport, EvalSettings
from moelab.redact import clean_secret, mask, secret_from_env
from moelab.signals import Interrupted, stop_signals_deferred, stop_signals_unwind

DEFAULT_GPU = "NVIDIA A100 80GB PCIe"  # 80 GB holds a 4x7B frankenMoE in float16
DEFAULT_IMAGE = "runpod/pytorch:2.4.0-py3.11-cuda12.4.1-devel-ubuntu22.04"
CLOUDS = ("secure", "community")
PODS_CONSOLE_URL = "https://www.console.runpod.io/pods"
# A pod that has no running container after this long is not coming (no capacity, image pull stuck).
READY_TIMEOUT_S = 20 * 60
POLL_ENV = "MOELAB_REMOTE_POLL_S"  # seconds between polls of the pod and the gist; tests make it short
DEFAULT_POLL_S = 15.0
MAX_API_FAILURES = 3  # consecutive failed polls before we give up (and terminate)
GITHUB_API_ENV = "GITHUB_API_URL"
MAX_GPU_COUNT = 8  # the most GPUs RunPod puts in one pod
MAX_DISK_GB = 4000
MAX_TIMEOUT_MIN = 7 * 24 * 60

# What the local side and the pod agree on (names of gist files and pod environment variables).
# Git orders a gist's files by name, so "<model>-Nous.md" stays the first file, which YALL-style harvesters read.
REPORT_SUFFIX = "-Nous.report.json"
ERROR_FILE = "moelab-error.txt"
POD_ENV_MODEL = "MOELAB_MODEL"
POD_ENV_SETTINGS = "MOELAB_EVAL_SETTINGS"
POD_ENV_GIST = "MOELAB_GIST_ID"
POD_ENV_KEEP = "MOELAB_KEEP_POD"
POD_ENV_BOOTSTRAP = "MOELAB_BOOTSTRAP"  # the source of moelab/eval/bootstrap.py, which the start command runs
POD_SECRET_NAMES = ("GITHUB_TOKEN", "HF_TOKEN")


@dataclass
class RemoteOptions:
    gpu: str = DEFAULT_GPU
    gpu_count: int = 1
    cloud: str = "secure"
    image: str = DEFAULT_IMAGE
    disk_gb: int = 100
    timeout_min: float = 240.0
    install: str | None = None  # pip argument for moelab on the pod; None: this moelab, as a wheel in the Gist
    keep_pod: bool = False


@dataclass
class Secrets:
    runpod_api_key: str | None
    github_token: str | None
    hf_token: str | None = None

    @classmethod
    def from_env(cls, runpod_api_key: str | None = None) -> "Secrets":
        return cls(clean_secret(runpod_api_key) or secret_from_env("RUNPOD_API_KEY"), secret_from_env("GITHUB_TOKEN"),
                   secret_from_env("HF_TOKEN"))

    def values(self) -> tuple[str, ...]:
        return tuple(v for v in (self.runpod_api_key, self.github_token, self.hf_token) if v)

    def missing(self) -> list[str]:
        """The variables a real run needs but this one lacks (RUNPOD_API_KEY, GITHUB_TOKEN)."""
        return [name for name, value in (("RUNPOD_API_KEY", self.runpod_api_key), ("GITHUB_TOKEN", self.github_token))
                if not value]


@dataclass
class PodSpec:
    """Everything `runpod.create_pod` receives."""

    name: str
    image: str
    gpu: str
    gpu_count: int
    cloud: str  # SECURE | COMMUNITY, as the API spells it
    disk_gb: int
    start_command: str
    env: dict[str, str]

    def shown(self) -> dict[str, object]:
        """The spec as --dry-run prints it: secret environment values masked."""
        env = {k: ("***" if v else "<not set>") if k in POD_SECRET_NAMES else v for k, v in self.env.items()}
        if POD_ENV_BOOTSTRAP in env:
            env[POD_ENV_BOOTSTRAP] = f"<moelab/eval/bootstrap.py, {len(env[POD_ENV_BOOTSTRAP])} characters>"
        return {**asdict(self), "env": env}


@dataclass
class PodProgress:
    pod_id: str
    state: str  # created, starting, running, exited, report received, terminated, removed itself, kept running
    elapsed_s: float
    cost_per_hr: float | None

    @property
    def cost_usd(self) -> float | None:
        return None if self.cost_per_hr is None else self.cost_per_hr * self.elapsed_s / 3600


@dataclass
class RemoteResult:
    report: EvalReport
    pod_id: str
    elapsed_s: float
    cost_usd: float | None
    gist_url: str


def pod_spec_view(spec: PodSpec):
    """A rich table of the pod --dry-run would create, secrets masked."""
    from rich.table import Table
    from rich.text import Text

    table = Table("pod", "value", title="RunPod pod (dry run: nothing created)")
    table.columns[1].overflow = "fold"
    for key, value in spec.shown().items():
        rows = [(f"env {k}", v) for k, v in value.items()] if key == "env" else [(key, value)]
        for name, text in rows:
            table.add_row(name, Text(str(text)))  # Text: no rich markup, so "moelab[eval]" prints as written
    return table


def progress_line(progress: PodProgress) -> str:
    minutes, seconds = divmod(int(progress.elapsed_s), 60)
    cost = "" if progress.cost_usd is None else f"  ~${progress.cost_usd:.2f} at ${progress.cost_per_hr:.2f}/h"
    return f"pod {progress.pod_id}: {progress.state}  {minutes}m{seconds:02d}s{cost}"


def check_remote_model(model: str, push: str | None) -> str:
    """The Hub repo id the pod evaluates: MODEL itself, or --push REPO for a local folder."""
    if push:
        if not Path(model).is_dir():
            raise MoelabError(f"--push {push} uploads a local model folder, but '{model}' is not a folder")
        return push
    if Path(model).exists():
        raise MoelabError(f"'{model}' is a local folder, which the pod cannot read; add --push ORG/NAME to upload "
                          "it to the Hub first, or pass a Hub repo id")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        raise MoelabError(f"'{model}' is not a Hub repo id (org/name); the pod downloads the model from the Hub")
    return model


def check_remote_numbers(options: RemoteOptions) -> None:
    check_number("--gpu-count", options.gpu_count, 1, MAX_GPU_COUNT)
    check_number("--disk-gb", options.disk_gb, 10, MAX_DISK_GB)
    # A NaN or infinite timeout would disable both the run timeout and the never-ready guard.
    check_number("--timeout-min", options.timeout_min, 0, MAX_TIMEOUT_MIN, low_inclusive=False)


def pod_spec(repo_id: str, settings: EvalSettings, options: RemoteOptions, secrets: Secrets,
             gist_id: str = "<created at run time>") -> PodSpec:
    if options.cloud not in CLOUDS:
        raise MoelabError(f"--cloud {options.cloud} is not one of {', '.join(CLOUDS)}")
    check_remote_numbers(options)
    install = {POD_ENV_INSTALL: check_install(options.install)} if options.install else \
        {POD_ENV_WHEEL: wheel_file_name()}
    # The pod chooses replicas or sharding as a local run does, over the GPUs it was rented with.
    pod_settings = asdict(settings) | {"gpus": settings.gpus or options.gpu_count}
    env = {POD_ENV_MODEL: repo_id, POD_ENV_SETTINGS: json.dumps(pod_settings), POD_ENV_GIST: gist_id,
           "GITHUB_TOKEN": secrets.github_token or "", **install, POD_ENV_BOOTSTRAP: bootstrap_source()}
    if secrets.hf_token:
        env["HF_TOKEN"] = secrets.hf_token
    if os.environ.get(GITHUB_API_ENV):  # GitHub Enterprise: the pod must post to the same server
        env[GITHUB_API_ENV] = os.environ[GITHUB_API_ENV]
    run = f'python -c "${POD_ENV_BOOTSTRAP}"'  # installs moelab, then becomes the pod entry
    if options.keep_pod:
        env[POD_ENV_KEEP] = "1"
        command = f"{run}; sleep infinity"
    else:
        # If the install fails, the pod entry never runs: remove the pod from the shell instead.
        command = f"{run} || runpodctl remove pod $RUNPOD_POD_ID; sleep infinity"
    name = re.sub(r"[^A-Za-z0-9._-]", "-", f"moelab-eval-{repo_id.split('/')[-1]}")[:48]
    return PodSpec(name=f"{name}-{random_tokens.token_hex(3)}", image=options.image, gpu=options.gpu,
                   gpu_count=options.gpu_count, cloud=options.cloud.upper(), disk_gb=options.disk_gb,
                   start_command=f"bash -c '{command}'", env=env)


def planned_pod(model: str, settings: EvalSettings, options: RemoteOptions, secrets: Secrets,
                push: str | None = None) -> PodSpec:
    """The pod `run_remote_eval` would create (for --dry-run): nothing is created or uploaded."""
    return pod_spec(check_remote_model(model, push), settings, options, secrets)


def run_remote_eval(model: str, settings: EvalSettings, output: Path, options: RemoteOptions, secrets: Secrets,
                    push: str | None = None, on_progress: Callable[[PodProgress], None] = lambda p: None
                    ) -> RemoteResult:
    """Evaluate MODEL on a RunPod pod and save its EvalReport at OUTPUT; the pod is removed on every path."""
    from moelab.eval.delivery import own_wheel, wheel_as_text
    from moelab.eval.local import check_writable

    repo_id = check_remote_model(model, push)
    pod_spec(repo_id, settings, options, secrets)  # validate the options before anything is created
    if not secrets.runpod_api_key:
        raise MoelabError("no RunPod API key; set RUNPOD_API_KEY or pass --runpod-api-key (runpod.io > Settings)")
    if not secrets.github_token:
        raise MoelabError("the pod returns the report through a secret Gist: set GITHUB_TOKEN to a token with "
                          "the gist scope")
    check_writable(Path(output))
    wheel = None if options.install else own_wheel()  # before anything is created: a failed build costs nothing
    if push:
        publish_for_pod(model, push, secrets)
    report, failure, channel = None, None, None
    with stop_signals_unwind():
        pod = RunPodSession(secrets, on_progress)
        try:
            with stop_signals_deferred():  # a signal mid-request would lose the id of a gist that exists
                channel = GistChannel.create(secrets.github_token, repo_id,
                                             {wheel_file_name(): wheel_as_text(wheel)} if wheel else {})
            pod.create(pod_spec(repo_id, settings, options, secrets, channel.gist_id))
            report = pod.wait_for_report(channel, options.timeout_min * 60)
            if push:
                report.recipe = report.recipe or local_recipe(model)
            report.gist_id = channel.gist_id
            report.save(output)
        except BaseException as err:
            failure = err
            raise
        finally:
            try:
                pod.finish(keep=options.keep_pod, failure=failure)
            finally:
                if report is None and channel is not None:
                    channel.delete()
    return RemoteResult(report, pod.pod_id, pod.elapsed_s, pod.cost_usd, channel.html_url)


def publish_for_pod(model: str, repo_id: str, secrets: Secrets) -> None:
    """Upload the local folder as a private Hub repo; the pod downloads it with the same token."""
    try:
        from moelab.publish import publish_model
    except ImportError:
        raise MoelabError(f"--push needs `moelab publish`, which this moelab lacks; upload the folder yourself "
                          f"(huggingface-cli upload {repo_id} {model}) and pass {repo_id} as MODEL") from None
    from huggingface_hub import get_token

    secrets.hf_token = secrets.hf_token or clean_secret(get_token())
    publish_model(Path(model), repo_id, token=secrets.hf_token, private=True, show_progress=True)


def local_recipe(model: str) -> dict | None:
    from moelab.eval.local import model_identity

    return model_identity(model)[2]


class RunPodSession:
    """One pod's life: create, poll, terminate exactly once. Progress goes to `on_progress`."""

    def __init__(self, secrets: Secrets, on_progress: Callable[[PodProgress], None]):
        import runpod

        runpod.api_key = secrets.runpod_api_key  # create/terminate_pod take no key argument, only this global
        self.runpod = runpod
        self.secret_values = secrets.values()
        self.on_progress = on_progress
        self.pod_id: str | None = None
        self.pod_name = ""
        self.created_s = 0.0
        self.cost_per_hr: float | None = None
        self.gone = False  # the pod removed itself (or was never created)

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.created_s if self.pod_id else 0.0

    @property
    def cost_usd(self) -> float | None:
        return None if self.cost_per_hr is None else self.cost_per_hr * self.elapsed_s / 3600

    def report(self, state: str) -> None:
        self.on_progress(PodProgress(self.pod_id or "-", state, self.elapsed_s, self.cost_per_hr))

    def api_error(self, action: str, err: Exception) -> MoelabError:
        return MoelabError(f"RunPod API failed to {action}: {mask(str(err), self.secret_values)}")

    def create(self, spec: PodSpec) -> None:
        from requests import RequestException

        self.pod_name = spec.name
        with stop_signals_deferred():  # a Ctrl-C mid-request would lose the id of a pod that exists
            try:
                created = self.runpod.create_pod(
                    name=graphql_text(spec.name), image_name=graphql_text(spec.image), gpu_type_id=spec.gpu,
                    cloud_type=spec.cloud, gpu_count=spec.gpu_count, container_disk_in_gb=spec.disk_gb,
                    volume_in_gb=0, start_ssh=False, support_public_ip=False,
                    docker_args=graphql_text(spec.start_command),
                    env={k: graphql_text(v) for k, v in spec.env.items()})
            except RequestException as err:  # no usable answer (timeout, a proxy's error page): the pod may exist
                self.remove_half_created_pod()
                raise self.api_error("create the pod", err) from None
            except ValueError as err:  # the SDK checks the GPU id before creating
                raise MoelabError(f"RunPod has no GPU type '{spec.gpu}' ({err}); pick an id from "
                                  "`python -c 'import runpod; print(runpod.get_gpus())'`") from None
            except self.runpod.error.AuthenticationError:
                raise MoelabError("RunPod refused the API key (HTTP 401); check RUNPOD_API_KEY or "
                                  "--runpod-api-key (runpod.io > Settings > API Keys, read+write)") from None
            except self.runpod.error.QueryError as err:  # RunPod answered no: nothing was created
                raise self.api_error("create the pod", err) from None
            except Exception as err:  # an answer we cannot read: the pod may exist all the same
                self.remove_half_created_pod()
                raise self.api_error("create the pod", err) from None
            self.pod_id = created["id"]
            self.created_s = time.monotonic()
        self.report("created")

    def remove_half_created_pod(self) -> None:
        """After a failed create (e.g. a timeout), the pod may exist anyway: find it by its unique name."""
        try:
            pods = self.runpod.get_pods()
        except Exception:
            raise MoelabError(f"RunPod failed while creating pod '{self.pod_name}' and cannot say whether it exists; "
                              f"check {PODS_CONSOLE_URL} and remove it there if listed") from None
        for found in pods:
            if found.get("name") == self.pod_name:
                self.pod_id = found["id"]

    def wait_for_report(self, channel: "GistChannel", timeout_s: float) -> EvalReport:
        poll_s = check_number(POLL_ENV, float(os.environ.get(POLL_ENV, DEFAULT_POLL_S)), 0, 3600, low_inclusive=False)
        ready_timeout_s = min(timeout_s, READY_TIMEOUT_S)
        ever_ready, failures, last_state = False, 0, ""
        while True:
            try:
                pod = self.runpod.get_pod(self.pod_id)
                outcome = channel.poll()
                failures = 0
            except Exception as err:  # a network blip is not a failed run; several in a row are
                failures += 1
                if failures >= MAX_API_FAILURES:
                    if isinstance(err, MoelabError):  # from GitHub, already worded
                        raise
                    raise self.api_error(f"report the pod's state {failures} times in a row", err) from None
                time.sleep(poll_s)
                continue
            if pod is None or pod.get("desiredStatus") == "TERMINATED":
                self.gone = True  # it removed itself: after posting its report, or after a failed install
                if outcome is None:
                    raise MoelabError(f"pod {self.pod_id} stopped without sending a report (the install or the "
                                      "eval failed on the pod); re-run with --keep-pod to read its logs at "
                                      f"{PODS_CONSOLE_URL}")
            else:
                self.cost_per_hr = pod.get("costPerHr", self.cost_per_hr)
                ever_ready = ever_ready or pod.get("runtime") is not None
                last_state = "exited" if pod.get("desiredStatus") == "EXITED" else \
                    "running" if pod.get("runtime") is not None else "starting"
                self.report(last_state)
            if isinstance(outcome, EvalReport):
                self.report("report received")
                return outcome
            if isinstance(outcome, str):
                raise MoelabError(f"the evaluation failed on pod {self.pod_id}: {outcome}")
            if last_state == "exited":
                raise MoelabError(f"pod {self.pod_id}'s container stopped without sending a report; "
                                  f"re-run with --keep-pod to read its logs at {PODS_CONSOLE_URL}")
            if not ever_ready and self.elapsed_s > ready_timeout_s:
                raise MoelabError(f"pod {self.pod_id} never became ready in {ready_timeout_s / 60:g} min (no "
                                  "capacity for this GPU, or the image is stuck); try another --gpu or --cloud")
            if self.elapsed_s > timeout_s:
                raise MoelabError(f"no report from pod {self.pod_id} within --timeout-min {timeout_s / 60:g}; "
                                  "raise --timeout-min for big models or the full suite")
            time.sleep(poll_s)

    def finish(self, keep: bool, failure: BaseException | None = None) -> None:
        """Terminate the pod once (unless it is gone already or --keep-pod); a failure here is loud."""
        if self.pod_id is None or self.gone:
            if self.gone:
                self.report("removed itself")
            return
        if keep:
            self.report("kept running")
            return
        with stop_signals_deferred():  # a second Ctrl-C must not stop the termination
            try:
                self.runpod.terminate_pod(self.pod_id)
            except Exception as err:
                if not self.already_gone():
                    first = "" if failure is None else \
                        f". Before that, the run had failed: {mask(describe(failure), self.secret_values)}"
                    raise MoelabError(
                        f"POD STILL RUNNING AND BILLING: pod {self.pod_id} could not be terminated "
                        f"({mask(str(err), self.secret_values)}); remove it now with "
                        f"`runpodctl remove pod {self.pod_id}` or at {PODS_CONSOLE_URL}{first}") from None
            self.gone = True
        self.report("terminated")

    def already_gone(self) -> bool:
        try:
            return self.runpod.get_pod(self.pod_id) is None
        except Exception:
            return False


def describe(failure: BaseException) -> str:
    if isinstance(failure, Interrupted):
        return f"interrupted ({failure.signal_name})"
    if isinstance(failure, KeyboardInterrupt):
        return "interrupted"
    if isinstance(failure, SystemExit):
        return f"exit {failure.code}"
    return str(failure) or type(failure).__name__


def graphql_text(value: str) -> str:
    """Escape a value for the SDK, which pastes strings into its GraphQL text between quotes without escaping."""
    return json.dumps(value)[1:-1]  # GraphQL string escapes are JSON's


# --- the report channel: a secret Gist ----------------------------------------------------------------------

@dataclass
class GistChannel:
    gist: object  # github.Gist.Gist
    secret_values: tuple[str, ...] = ()

    @property
    def gist_id(self) -> str:
        return self.gist.id

    @property
    def html_url(self) -> str:
        return self.gist.html_url

    @classmethod
    def create(cls, token: str, repo_id: str, extra_files: dict[str, str] | None = None) -> "GistChannel":
        """The run's secret gist: a placeholder for the report, and `extra_files` for the pod (moelab's wheel)."""
        from github import InputFileContent

        name = repo_id.split("/")[-1]
        placeholder = f"moelab is evaluating {repo_id} on a RunPod pod; the report lands here when it finishes.\n"
        files = {f"{name}-Nous.md": placeholder, **(extra_files or {})}
        with github_errors("create the run's secret gist", token):
            gist = github_client(token).get_user().create_gist(
                public=False, files={n: InputFileContent(text) for n, text in files.items()},
                description=f"moelab eval {repo_id} (running)")
        return cls(gist, (token,))

    @classmethod
    def open(cls, token: str, gist_id: str) -> "GistChannel":
        with github_errors(f"open gist {gist_id}", token):
            return cls(github_client(token).get_gist(gist_id), [token])

    def poll(self) -> EvalReport | str | None:
        """The report, the pod's error text, or None while the pod works."""
        with github_errors("read the run's gist", *self.secret_values):
            self.gist.update()
            files = self.gist.files
        report_file = next((f for name, f in files.items() if name.endswith(REPORT_SUFFIX)), None)
        if report_file is not None:
            return EvalReport.from_dict(json.loads(report_file.content))
        if ERROR_FILE in files:
            return files[ERROR_FILE].content.strip()
        return None

    def post_report(self, report: EvalReport, markdown: str) -> None:
        from github import InputFileContent

        delivered = {name: None for name in self.gist.files if name.endswith(WHEEL_SUFFIX)}  # served its purpose
        with github_errors("write the report to the gist", *self.secret_values):
            self.gist.edit(description=f"moelab eval {report.model} (Nous)", files={
                f"{report.model_name}-Nous.md": InputFileContent(mask(markdown, self.secret_values)),
                f"{report.model_name}{REPORT_SUFFIX}": InputFileContent(
                    mask(json.dumps(report.to_dict(), indent=2), self.secret_values)),
                **delivered})

    def post_error(self, text: str) -> None:
        from github import InputFileContent

        with github_errors("write the error to the gist", *self.secret_values):
            self.gist.edit(files={ERROR_FILE: InputFileContent(mask(text, self.secret_values) + "\n")})

    def delete(self) -> None:
        """Best effort: a run without a report leaves no placeholder gist behind."""
        try:
            self.gist.delete()
        except Exception:
            pass


def github_client(token: str):
    from github import Auth, Github

    return Github(auth=Auth.Token(token), base_url=os.environ.get(GITHUB_API_ENV, "https://api.github.com"), retry=3)


@contextmanager
def github_errors(action: str, *secret_values: str) -> Iterator[None]:
    from github import GithubException
    from requests import RequestException

    try:
        yield
    except GithubException as err:
        hint = "; GITHUB_TOKEN needs the gist scope" if err.status in (401, 403, 404) else ""
        raise MoelabError(mask(f"GitHub refused to {action} (HTTP {err.status}){hint}", secret_values)) from None
    except RequestException as err:
        raise MoelabError(mask(f"cannot reach GitHub to {action}: {err}", secret_values)) from None
