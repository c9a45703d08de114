"""Hostile input on the secrets, remote and reader side: canary tokens, numbers out of range, damaged files,
links that would run script, scores no verdict may rest on. Through the real CLI entry, against loopback fakes."""

from __future__ import annotations

import json
import math
import resource
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
from fakes.github import FakeGitHub
from fakes.hub import FakeHub
from test_compare import CODE, MATH, MOE
from test_remote import (MOELAB, github_api, remote_eval_args, run_cli, runpod_api,  # noqa: F401 (fixtures)
                         cli_env)

from moelab import main
from moelab.redact import mask

SHIPPED_DATA = Path(__file__).resolve().parents[1] / "moelab" / "data"
GH_CANARY = "ghp_CANARYhostileio0000000000000000001"
HF_CANARY = "hf_CANARYhostileio00000000000000000002"
RP_CANARY = "rpa_CANARYhostileio000000000000000003"


def run_moelab(*args: str) -> tuple[int, str, str]:
    """`moelab ARGS` in this process, through moelab.main, which the program runs: (exit code, stdout, stderr)."""
    import logging

    from typer.testing import CliRunner

    code = 0
    # Log handlers made during an earlier call write to that call's closed streams; that is the harness, not moelab.
    raise_exceptions, logging.raiseExceptions = logging.raiseExceptions, False
    with CliRunner().isolation() as (stdout, stderr, _):
        argv, sys.argv = sys.argv, ["moelab", *args]
        try:
            main()
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        finally:
            sys.argv, logging.raiseExceptions = argv, raise_exceptions
        return code, stdout.getvalue().decode(errors="replace"), stderr.getvalue().decode(errors="replace")


def one_line_error(code: int, err: str) -> str:
    """The error line of a clean failure: exit 2, no traceback, the last line of stderr and the only error."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err, err
    assert lines and lines[-1].startswith("error: ") and sum(line.startswith("error:") for line in lines) == 1, err
    return lines[-1]


def secret_forms(secret: str) -> list[str]:
    return [secret, secret.strip(), repr(secret)[1:-1], quote(secret.strip(), safe="")]


def assert_never_shown(secret: str, *texts: str, files_under: Path | None = None) -> None:
    if files_under is not None:
        texts += tuple(f.read_text(errors="replace") for f in files_under.rglob("*") if f.is_file())
    for text in texts:
        for form in secret_forms(secret):
            assert form not in text


# --- 3. secrets ------------------------------------------------------------------------------------------------

def test_every_form_of_a_secret_is_masked(monkeypatch):
    monkeypatch.setenv("GITHUB_TOKEN", GH_CANARY + "\r\n")  # a CRLF token file, read with $(cat ...)
    texts = [f"Invalid header value b'token {GH_CANARY}\\r\\n'", f"{{'Authorization': 'token {GH_CANARY}\\r'}}",
             f"https://x/?access_token={quote(GH_CANARY)}", f"Authorization: Bearer {GH_CANARY}\r\n",
             "Authorization: Basic dXNlcjpwYXNz", f"{GH_CANARY!r}", json.dumps(GH_CANARY + "\r\n")]
    for text in texts:
        masked = mask(text)
        assert GH_CANARY not in masked and "dXNlcjpwYXNz" not in masked and "***" in masked
    assert mask("the token needs the gist scope (HTTP 401)") == "the token needs the gist scope (HTTP 401)"


def test_a_crlf_github_token_in_remote_eval_is_stripped_and_never_shown(tmp_path, cli_env, runpod_api, github_api):
    token = github_api.token
    cli_env["GITHUB_TOKEN"] = token + "\r\n"
    github_api.fail_next(502, times=10, method="POST", message=f"bad gateway for token {token}")  # a proxy echo
    result = run_cli(remote_eval_args(), cli_env, tmp_path)

    assert "GitHub refused to create the run's secret gist (HTTP 502)" in one_line_error(result.returncode,
                                                                                          result.stderr)
    assert runpod_api.pods == {}
    assert_never_shown(token + "\r\n", result.stdout, result.stderr, files_under=tmp_path)


def test_a_crlf_github_token_authenticates_once_stripped(tmp_path, cli_env, runpod_api, github_api):
    cli_env["GITHUB_TOKEN"] = github_api.token + "\r\n"
    runpod_api.create_error = f"no capacity (key {cli_env['RUNPOD_API_KEY']})"  # an API that echoes the key
    cli_env["RUNPOD_API_KEY"] += "\n"
    result = run_cli(remote_eval_args(), cli_env, tmp_path)

    one_line_error(result.returncode, result.stderr)
    assert [m for m, path, _ in github_api.requests if path == "/gists"] == ["POST"]  # accepted: token stripped
    assert github_api.gists == {}  # and the placeholder removed
    assert_never_shown(cli_env["RUNPOD_API_KEY"], result.stderr)
    assert_never_shown(github_api.token + "\r\n", result.stdout, result.stderr)


def test_publish_token_flags_are_stripped_and_masked_in_server_errors(tmp_path, monkeypatch, tiny_moe_dir):
    from huggingface_hub import constants

    from test_publish import write_report

    report = write_report(tmp_path / "nous.json")
    monkeypatch.delenv("GITHUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", "/nonexistent/moelab-test-token")
    with FakeGitHub(token=GH_CANARY) as gh:
        monkeypatch.setenv("GITHUB_API_URL", gh.base_url)
        code, out, err = run_moelab("publish", "--gist", str(report), "--token", GH_CANARY + "\r\n")
        assert code == 0, err  # the stripped token is the one GitHub knows
        gh.fail_next(403, times=5, message=f"token {GH_CANARY} lacks the gist scope")
        report.write_text(report.read_text().replace('"gist_id": "', '"gist_id": "f'))  # an unknown gist: post anew
        code, out2, err2 = run_moelab("publish", "--gist", str(report), "--token", GH_CANARY + "\r\n")
    assert "the token may not write Gists (403" in one_line_error(code, err2)
    with FakeHub(token=HF_CANARY) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        hub.fail_next(500, times=20, message=f"internal error for {HF_CANARY}")
        code, out3, err3 = run_moelab("publish", str(tiny_moe_dir), "--repo", "moelab-tester/m",
                                      "--token", f"  {HF_CANARY}\r\n")
    assert "publishing to moelab-tester/m failed" in one_line_error(code, err3)
    assert_never_shown(GH_CANARY + "\r\n", out, err, out2, err2, out3, err3)
    assert_never_shown(HF_CANARY + "\r\n", out3, err3, report.read_text())


def test_a_crlf_hf_token_in_eval_push_uploads_and_is_never_shown(tmp_path, cli_env, runpod_api, github_api,
                                                                  tiny_moe_dir):
    with FakeHub(token=HF_CANARY, user="moelab-test") as hub:
        cli_env.update(HF_ENDPOINT=hub.endpoint, HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "hf"),
                       HF_TOKEN=HF_CANARY + "\r\n")
        runpod_api.create_error = f"refused: HF_TOKEN={HF_CANARY} is not a RunPod key"
        args = remote_eval_args("--push", "moelab-test/tiny-moe")
        args[args.index("moelab-test/tiny-moe")] = str(tiny_moe_dir)
        result = run_cli(args, cli_env, tmp_path)
        pushed = hub.files.get("moelab-test/tiny-moe", {})

    assert "RunPod API failed to create the pod: refused: HF_TOKEN=***" in one_line_error(result.returncode,
                                                                                           result.stderr)
    assert pushed["config.json"] == (tiny_moe_dir / "config.json").read_bytes()  # pushed with the stripped token
    assert_never_shown(HF_CANARY + "\r\n", result.stdout, result.stderr, files_under=tmp_path)


# --- 4. and 7. numbers: finite and in range, before anything is created -------------------------------------

@pytest.mark.parametrize("args, flag", [
    (["chat", "m", "--max-new-tokens", "0"], "--max-new-tokens 0"),
    (["chat", "m", "--top-p", "2"], "--top-p 2.0"),
    (["chat", "m", "--top-p", "nan"], "--top-p nan"),
    (["chat", "m", "--temperature", "-1"], "--temperature -1.0"),
    (["chat", "m", "--seed", str(2**70)], "--seed"),
    (["eval", "org/m", "--max-length", "-3"], "--max-length -3"),
    (["eval", "org/m", "--limit", "0"], "--limit 0"),
    (["build", "r.yaml", "out", "--seed", "-1"], "--seed -1"),
    (["build", "r.yaml", "out", "--shard-size", "inf"], "cannot read size 'inf'"),
    (["run", "r.yaml", "--limit", "-2"], "--limit -2"),
    (["demo", "--limit", "0"], "--limit 0"),
])
def test_numbers_out_of_range_are_one_line_errors(args, flag, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text("name: r\nbase_model: a\nexperts: [{source_model: a}, {source_model: b}]\n")
    code, out, err = run_moelab(*args)
    assert flag in one_line_error(code, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


@pytest.mark.parametrize("args, message", [
    (["eval", "m", "--limit", "inf"], "Invalid value for '--limit'"),
    (["chat", "m", "--device"], "Option '--device' requires an argument"),
    (["build"], "Missing argument 'recipe'. (see moelab build --help)"),
    (["bogus"], "No such command 'bogus'. (see moelab --help)"),
])
def test_what_typer_rejects_is_one_line_too(args, message):
    code, out, err = run_moelab(*args)
    assert message in one_line_error(code, err) and "╭" not in err and out == ""


def test_bare_moelab_prints_its_help_once():
    code, out, err = run_moelab()
    assert code == 2 and out.count("Usage: moelab") == 1 and "build" in out and err == ""


@pytest.mark.parametrize("flag, value", [("--timeout-min", "nan"), ("--timeout-min", "inf"), ("--timeout-min", "0"),
                                         ("--gpu-count", "0"), ("--gpu-count", "99"), ("--disk-gb", "5")])
def test_remote_numbers_are_checked_before_any_pod_or_gist(flag, value, tmp_path, cli_env, runpod_api, github_api):
    result = run_cli(remote_eval_args(flag, value), cli_env, tmp_path)

    assert f"{flag} {value}" in one_line_error(result.returncode, result.stderr).replace(".0 ", " ")
    assert runpod_api.calls == [] and github_api.requests == []


# --- 7. damaged files: one line, exit 2, nothing written -------------------------------------------------------

@pytest.fixture
def reports(tmp_path) -> dict[str, Path]:
    return {r.model_name: r.save(tmp_path / f"{r.model_name}.json") for r in (MOE, MATH, CODE)}


def damaged_report_commands(path: Path, reports: dict[str, Path], out: Path) -> list[list[str]]:
    return [["compare", str(path), str(reports["math"]), "--out", str(out)],
            ["leaderboard", str(path), "--out", str(out)],
            ["publish", "--gist", str(path), "--dry-run"]]


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe{}", "is not UTF-8 text"),
    (b"[1, 2]", "is not a moelab eval report (a JSON object)"),
    (b'{"schema_version": 1, "results": {}}', "is not a moelab eval report"),
])
def test_a_damaged_report_is_one_line_for_every_reader(content, message, tmp_path, reports):
    damaged = tmp_path / "damaged.json"
    damaged.write_bytes(content)
    for args in damaged_report_commands(damaged, reports, tmp_path / "out"):
        code, out, err = run_moelab(*args)
        assert message in one_line_error(code, err), args
    assert not (tmp_path / "out").exists()


def test_publish_report_of_the_wrong_shape(tmp_path, tiny_moe_dir):
    (tmp_path / "r.json").write_text('{"schema_version": 1, "settings": [], "results": []}')
    code, out, err = run_moelab("publish", str(tiny_moe_dir), "--repo", "u/m", "--report", str(tmp_path / "r.json"),
                                "--dry-run")
    assert "r.json is not a moelab eval report" in one_line_error(code, err)


@pytest.mark.parametrize("file, content, message", [
    ("probe.json", b"\x80\x81", "is not UTF-8 text"),
    ("probe.json", b'{"expert_names": ["math", "code"], "usage": {"math": "x"}}', "not the JSON of `moelab chat"),
    ("probe.json", b'{"expert_names": ["math"], "accuracy_per_expert": {"math": NaN}, "usage": {"math": 1}}',
     "accuracy_per_expert.math"),
])
def test_a_damaged_probe_file_is_one_line(file, content, message, tmp_path, reports):
    (tmp_path / file).write_bytes(content)
    code, out, err = run_moelab("compare", str(reports["moe"]), str(reports["math"]), str(reports["code"]),
                                "--probe", str(tmp_path / file), "--out", str(tmp_path / "out"))
    assert message in one_line_error(code, err)
    assert not (tmp_path / "out").exists()


def test_a_non_utf8_gist_is_one_line(tmp_path):
    (tmp_path / "m-Nous.md").write_bytes(b"| Model |\xff\xff")
    code, out, err = run_moelab("leaderboard", str(tmp_path / "m-Nous.md"), "--out", str(tmp_path / "out"))
    assert "is not UTF-8 text" in one_line_error(code, err)


NAVIGATE = {"inputs": "Q: Take 1 step.\nA:", "targets": ["True"], "multiple_choice_targets": ["True", "False"],
            "multiple_choice_scores": [1, 0]}


@pytest.mark.parametrize("rows, message", [
    ([{**NAVIGATE, "targets": ["Maybe"]}], "the target 'Maybe' is not among the multiple_choice_targets"),
    ([{**NAVIGATE, "multiple_choice_targets": []}], "'multiple_choice_targets' is not a non-empty list"),
    ([{**NAVIGATE, "inputs": None}], "'inputs' is not text"),
    ([{**NAVIGATE, "multiple_choice_scores": [1]}], "'multiple_choice_scores' is not one number per choice"),
    ([], "navigate.jsonl is empty"),
])
def test_malformed_bigbench_data_is_one_line_before_the_model_loads(rows, message, tmp_path, tiny_moe_dir):
    (tmp_path / "data" / "bigbench").mkdir(parents=True)
    (tmp_path / "data" / "bigbench" / "navigate.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = run_moelab("eval", str(tiny_moe_dir), "--tasks", "bigbench_navigate", "--data-dir",
                                str(tmp_path / "data"), "--output", str(tmp_path / "out" / "r.json"))
    assert message in one_line_error(code, err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("line, message", [
    ('{"question": null, "answer": 4}', "field question is null"),
    ('{"question": "2+2?", "answer": ""}', 'field answer is ""'),
    ("", "math.jsonl is empty"),
    ('{"question": "2+2?", "answer": [4]}', "field answer is [4]"),
])
def test_malformed_domain_data_is_one_line(line, message, tmp_path, tiny_moe_dir):
    (tmp_path / "math.jsonl").write_text(line + "\n")
    (tmp_path / "tasks.yaml").write_text("math: {path: math.jsonl, kind: exact_match}\n")
    code, out, err = run_moelab("eval", str(tiny_moe_dir), "--tasks", str(tmp_path / "tasks.yaml"),
                                "--output", str(tmp_path / "out" / "r.json"))
    assert message in one_line_error(code, err)


def test_eval_offline_without_data_dir_says_how_to_point_at_local_data(tmp_path, tiny_moe_dir):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": ":".join(sys.path)}
    result = subprocess.run([*MOELAB, "eval", str(tiny_moe_dir), "--tasks", "bigbench_navigate", "--limit", "1",
                             "--output", str(tmp_path / "out" / "r.json")], env=env, capture_output=True, text=True,
                            timeout=300)
    line = one_line_error(result.returncode, result.stderr)
    assert "cannot download its data from the Hub" in line and f"--data-dir {SHIPPED_DATA}" in line
    assert not (tmp_path / "out" / "r.json").exists()


def ignore_file_size_signal_and_cap_files_at(max_bytes: int):
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the cap then fails with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return limit


def test_a_full_disk_while_writing_the_leaderboard_is_one_line_and_leaves_no_partial_file(tmp_path, reports):
    result = subprocess.run([*MOELAB, "leaderboard", str(reports["moe"]), "--out", str(tmp_path / "board")],
                            capture_output=True, text=True, timeout=120,
                            preexec_fn=ignore_file_size_signal_and_cap_files_at(3000))

    assert "cannot write" in one_line_error(result.returncode, result.stderr)
    assert not (tmp_path / "board" / "leaderboard.png").exists()
    assert not [p for p in (tmp_path / "board").iterdir() if p.name.startswith(".")]  # no temp files


# --- 8. links from gists ---------------------------------------------------------------------------------------

def test_a_javascript_link_in_a_gist_is_not_a_link_in_the_leaderboard(tmp_path):
    gist = (Path(__file__).parent / "fixtures" / "gists" / "SmolLM2-MoE-2x135M-Nous.md").read_text()
    hostile = gist.replace("[SmolLM2-MoE-2x135M](https://huggingface.co/moelab/SmolLM2-MoE-2x135M)",
                           "[<img src=x onerror=alert(1)>](javascript:alert%281%29)")
    (tmp_path / "evil-Nous.md").write_text(hostile)
    code, out, err = run_moelab("leaderboard", str(tmp_path / "evil-Nous.md"), "--out", str(tmp_path / "board"))

    assert code == 0, err
    page = (tmp_path / "board" / "leaderboard.html").read_text()
    assert "javascript:" not in page and "<img" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "](javascript:" not in (tmp_path / "board" / "leaderboard.md").read_text()


# --- 10. scores no verdict may rest on -------------------------------------------------------------------------

@pytest.mark.parametrize("value", [math.nan, math.inf, -0.2, 1.5])
def test_compare_refuses_scores_that_are_not_scores(value, tmp_path, reports):
    data = json.loads(reports["moe"].read_text())
    data["results"][1]["value"] = value
    reports["moe"].write_text(json.dumps(data))
    code, out, err = run_moelab("compare", str(reports["moe"]), str(reports["math"]), "--out", str(tmp_path / "out"))

    assert f"task bigbench_snarks has the score {value}, outside 0..1" in one_line_error(code, err)
    assert "Verdict" not in out and not (tmp_path / "out").exists()
