"""moelab publish against loopback fakes of the Hub and GitHub: what arrives, byte for byte, and every failure path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fakes.github import FakeGitHub
from fakes.hub import FakeHub
from huggingface_hub import ModelCard, constants

from moelab.errors import MoelabError
from moelab.eval.report import EvalReport, EvalSettings, TaskResult, group_scores, overall_average
from moelab.eval.suite import NOUS_TASKS
from moelab.publish import plan_gist, publish_gist, publish_model

HF_TOKEN = "hf_publishtesttoken0000000000000000"
GH_TOKEN = "ghp_publishtesttoken000000000000000"
REPO = "moelab-tester/tiny-moe"


@pytest.fixture(scope="module")
def moe_dir(tiny_moe_dir) -> Path:
    return tiny_moe_dir


@pytest.fixture
def hub(monkeypatch):
    with FakeHub(token=HF_TOKEN) as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.endpoint)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", "/nonexistent/moelab-test-token")
        yield fake


@pytest.fixture
def gh(monkeypatch):
    with FakeGitHub(token=GH_TOKEN) as fake:
        monkeypatch.delenv("GITHUB_TOKEN", raising=False)
        yield fake


def write_report(path: Path, value: float = 0.5, model: str = REPO) -> Path:
    results = [TaskResult(t.name, t.group, t.metric, value, 0.01, 100, "1", 0) for t in NOUS_TASKS]
    groups = group_scores(results)
    EvalReport(model=model, model_name="tiny-moe", settings=EvalSettings(), results=results, groups=groups,
               average=overall_average(groups), versions={"lm_eval": "0.4.13"}, wall_time_s=61.0,
               date="2026-11-23T12:00:00+00:00").save(path)
    return path


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def assert_no_secret_sent(fake, *secrets: str) -> None:
    stored = list(getattr(fake, "files", {}).values())
    blobs = [data for files in stored for data in files.values()] + list(getattr(fake, "blobs", {}).values())
    bodies = [body if isinstance(body, bytes) else json.dumps(body).encode() for _, _, body in fake.requests]
    for secret in secrets:
        assert not any(secret.encode() in data for data in blobs + bodies)


# --- Hub -----------------------------------------------------------------------------------------------------------

def test_publish_uploads_the_folder_byte_for_byte_in_one_commit_with_a_hub_card(hub, moe_dir, tmp_path):
    report = write_report(tmp_path / "nous.json")

    upload = publish_model(moe_dir, REPO, HF_TOKEN, report=report)

    remote = hub.files[REPO]
    local = local_files(moe_dir)
    shards = [name for name in local if name.endswith(".safetensors")]
    assert len(shards) >= 2
    for name, data in local.items():
        if name != "README.md":
            assert remote[name] == data, name
    assert remote["README.md"] == upload.card.encode()
    assert set(shards) <= hub.lfs_files[REPO]  # weights went through the LFS batch API
    commits = hub.repos[REPO]["commits"][1:]  # after the repo's initial .gitattributes commit
    assert len(commits) == 1 and commits[0]["oid"] in upload.commit_url
    assert commits[0]["summary"].startswith("moelab publish: tiny-moe, a mixtral MoE of 2 experts")
    assert hub.repos[REPO]["private"] is False

    card = ModelCard(remote["README.md"].decode())
    assert "frankenmoe" in card.data.tags and card.data.library_name == "transformers"
    assert len(card.data.eval_results) == len(NOUS_TASKS)
    assert 'from_pretrained("moelab-tester/tiny-moe")' in card.text
    assert (moe_dir / "README.md").read_bytes() == local["README.md"]  # the local folder is left as built
    assert_no_secret_sent(hub, HF_TOKEN)


def test_a_rerun_skips_unchanged_files_and_a_new_report_changes_only_the_card(hub, moe_dir, tmp_path):
    publish_model(moe_dir, REPO, HF_TOKEN)
    puts = sum(1 for method, _, _ in hub.requests if method == "PUT")

    again = publish_model(moe_dir, REPO, HF_TOKEN)
    assert again.commit_url is None and again.uploaded == []
    assert len(hub.repos[REPO]["commits"]) == 2

    updated = publish_model(moe_dir, REPO, HF_TOKEN, report=write_report(tmp_path / "nous.json", 0.6))
    assert updated.uploaded == ["README.md"]
    assert hub.repos[REPO]["commits"][-1]["paths"] == ["README.md"]
    assert "| AGIEval | 60.00 |" in hub.files[REPO]["README.md"].decode()
    assert sum(1 for method, _, _ in hub.requests if method == "PUT") == puts  # no weights sent twice


def test_private_repo_is_created_private(hub, moe_dir):
    publish_model(moe_dir, REPO, HF_TOKEN, private=True)

    assert hub.repos[REPO]["private"] is True


def test_private_is_refused_for_an_existing_public_repo(hub, moe_dir, tmp_path):
    publish_model(moe_dir, REPO, HF_TOKEN)
    commits = len(hub.repos[REPO]["commits"])

    with pytest.raises(MoelabError, match="already exists and is public.*nothing was uploaded"):
        publish_model(moe_dir, REPO, HF_TOKEN, private=True, report=write_report(tmp_path / "nous.json"))
    assert len(hub.repos[REPO]["commits"]) == commits


def test_dry_run_lists_every_file_and_the_card_without_network_or_token(hub, moe_dir):
    upload = publish_model(moe_dir, REPO, None, dry_run=True)

    assert sorted(f.path_in_repo for f in upload.files) == sorted(local_files(moe_dir))
    assert upload.card.startswith("---\n") and "## Recipe" in upload.card
    assert hub.requests == []


def test_a_missing_token_is_an_error_before_any_request(hub, moe_dir):
    with pytest.raises(MoelabError, match="no Hugging Face token: pass --token, set HF_TOKEN"):
        publish_model(moe_dir, REPO, None)
    assert hub.requests == []


def test_a_rejected_token_uploads_nothing(hub, moe_dir):
    with pytest.raises(MoelabError, match=r"rejected the token \(401\).*nothing was uploaded"):
        publish_model(moe_dir, REPO, "hf_wrongtoken")
    assert REPO not in hub.repos
    assert_no_secret_sent(hub, "hf_wrongtoken")


def test_a_namespace_the_token_cannot_write_is_a_403_error(hub, moe_dir):
    with pytest.raises(MoelabError, match=r"may not write to someone-else/tiny-moe \(403\)"):
        publish_model(moe_dir, "someone-else/tiny-moe", HF_TOKEN)


def test_a_5xx_at_commit_says_what_is_stored_and_a_rerun_completes(hub, moe_dir):
    hub.fail_next(500, method="POST", path_contains="/commit/")

    with pytest.raises(MoelabError) as failure:
        publish_model(moe_dir, REPO, HF_TOKEN)

    message = str(failure.value)
    assert "the Hub answered 500" in message and "re-run the same command" in message
    assert "model-00001-of-" in message and "the commit failed" in message
    assert set(hub.files[REPO]) == {".gitattributes"}  # nothing committed
    stored_blobs = len(hub.blobs)
    assert stored_blobs >= 2

    upload = publish_model(moe_dir, REPO, HF_TOKEN)

    assert upload.commit_url is not None
    assert len(hub.blobs) == stored_blobs
    assert not [p for m, p, _ in hub.requests if m == "PUT"][stored_blobs:]  # stored weights were not sent again
    assert {k: v for k, v in hub.files[REPO].items() if k not in (".gitattributes", "README.md")} == \
        {k: v for k, v in local_files(moe_dir).items() if k != "README.md"}


def test_a_failure_before_the_commit_names_what_was_not_uploaded(hub, moe_dir):
    hub.fail_next(404, method="POST", path_contains="/preupload/")  # a 5xx here is retried for 23 s

    with pytest.raises(MoelabError, match=r"the Hub answered 404.*not uploaded: .*nothing was committed"):
        publish_model(moe_dir, REPO, HF_TOKEN)


def test_a_token_inside_a_file_is_refused_before_upload(hub, moe_dir, tmp_path):
    leaky = tmp_path / "leaky"
    leaky.mkdir()
    for name, data in local_files(moe_dir).items():
        (leaky / name).write_bytes(data)
    (leaky / "notes.txt").write_text(f"my token is {HF_TOKEN}\n")

    with pytest.raises(MoelabError, match="notes.txt contains your Hub token"):
        publish_model(leaky, REPO, HF_TOKEN)
    assert hub.requests == []


@pytest.mark.parametrize("repo", ["tiny-moe", "a/b/c", "me/has space", "/abs"])
def test_a_malformed_repo_id_is_a_clear_error(moe_dir, repo):
    with pytest.raises(MoelabError, match="is not a Hub repo id; write it as user/name"):
        publish_model(moe_dir, repo, HF_TOKEN, dry_run=True)


def test_a_folder_not_built_by_moelab_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(MoelabError, match="was not built by moelab"):
        publish_model(tmp_path, REPO, HF_TOKEN, dry_run=True)


# --- Gist ----------------------------------------------------------------------------------------------------------

def test_gist_is_created_then_updated_in_place_and_its_id_kept_in_the_report(gh, tmp_path):
    report = write_report(tmp_path / "nous.json")

    gist_id = publish_gist(report, GH_TOKEN, base_url=gh.base_url)

    gist = gh.gists[gist_id]
    assert gist["public"] is False and list(gist["files"]) == ["tiny-moe-Nous.md"]
    content = gist["files"]["tiny-moe-Nous.md"]["content"]
    assert content == plan_gist(report).content and content.splitlines()[2].startswith("|[tiny-moe](")
    assert EvalReport.load(report).gist_id == gist_id

    rescored = EvalReport.load(report)  # the report changes (say, a fixed task), its gist_id stays
    rescored.groups["AGIEval"], rescored.average = 70.0, 55.0
    rescored.save(report)
    assert publish_gist(report, GH_TOKEN, base_url=gh.base_url) == gist_id
    assert len(gh.gists) == 1 and "Average score: 55.0%" in gh.gists[gist_id]["files"]["tiny-moe-Nous.md"]["content"]

    writes = [m for m, _, _ in gh.requests if m in ("POST", "PATCH")]
    assert publish_gist(report, GH_TOKEN, base_url=gh.base_url) == gist_id
    assert [m for m, _, _ in gh.requests if m in ("POST", "PATCH")] == writes  # unchanged: nothing written
    assert_no_secret_sent(gh, GH_TOKEN)


def test_the_gist_of_a_local_model_links_to_the_repo_it_was_published_to(gh, tmp_path):
    report = write_report(tmp_path / "nous.json", model=str(tmp_path))

    gist_id = publish_gist(report, GH_TOKEN, base_url=gh.base_url, repo_id=REPO)

    summary_row = gh.gists[gist_id]["files"]["tiny-moe-Nous.md"]["content"].splitlines()[2]
    assert summary_row.startswith(f"|[tiny-moe](https://huggingface.co/{REPO})|")


def test_a_public_gist_and_a_visibility_github_cannot_change(gh, tmp_path):
    report = write_report(tmp_path / "nous.json")
    gist_id = publish_gist(report, GH_TOKEN, public=True, base_url=gh.base_url)
    assert gh.gists[gist_id]["public"] is True

    with pytest.raises(MoelabError, match="is public and GitHub cannot change that; re-run with --public"):
        publish_gist(report, GH_TOKEN, public=False, base_url=gh.base_url)


def test_a_deleted_gist_is_posted_again(gh, tmp_path):
    report = write_report(tmp_path / "nous.json")
    first = publish_gist(report, GH_TOKEN, base_url=gh.base_url)
    del gh.gists[first]

    second = publish_gist(report, GH_TOKEN, base_url=gh.base_url)

    assert second != first and EvalReport.load(report).gist_id == second


def test_gist_token_errors(gh, tmp_path):
    report = write_report(tmp_path / "nous.json")
    with pytest.raises(MoelabError, match="no GitHub token: pass --token or set GITHUB_TOKEN"):
        publish_gist(report, None, base_url=gh.base_url)
    assert gh.requests == []

    with pytest.raises(MoelabError, match=r"GitHub rejected the token \(401\)"):
        publish_gist(report, "ghp_wrong", base_url=gh.base_url)

    gh.fail_next(403, method="POST")
    with pytest.raises(MoelabError, match=r"may not write Gists \(403.*gist scope"):
        publish_gist(report, GH_TOKEN, base_url=gh.base_url)
    assert gh.gists == {} and EvalReport.load(report).gist_id is None


def test_gist_server_errors_leave_the_report_unchanged(gh, tmp_path):
    report = write_report(tmp_path / "nous.json")
    before = report.read_bytes()
    gh.fail_next(502, times=30, method="POST")  # more than PyGithub's retries

    with pytest.raises(MoelabError, match="publishing the Gist failed.*re-run"):
        publish_gist(report, GH_TOKEN, base_url=gh.base_url)
    assert report.read_bytes() == before and gh.gists == {}


# --- CLI -----------------------------------------------------------------------------------------------------------

def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "GITHUB_TOKEN")}
    return subprocess.run([sys.executable, "-m", "moelab", "publish", *args], capture_output=True, text=True,
                          env={**clean, "HF_HUB_DISABLE_XET": "1", **env}, timeout=120)


def test_cli_publishes_a_model_and_a_gist(hub, gh, moe_dir, tmp_path):
    report = write_report(tmp_path / "nous.json")

    model = run_cli(str(moe_dir), "--repo", REPO, "--report", str(report), HF_ENDPOINT=hub.endpoint,
                    HF_TOKEN=HF_TOKEN, HF_TOKEN_PATH=str(tmp_path / "none"))
    gist = run_cli("--gist", str(report), GITHUB_TOKEN=GH_TOKEN, GITHUB_API_URL=gh.base_url)

    assert model.returncode == 0, model.stderr
    assert "published" in model.stderr and "model.safetensors.index.json" in model.stdout
    assert hub.files[REPO]["config.json"] == (moe_dir / "config.json").read_bytes()
    assert gist.returncode == 0, gist.stderr
    gist_id = EvalReport.load(report).gist_id
    assert f"https://gist.github.com/{gist_id}" in gist.stderr
    assert HF_TOKEN not in model.stdout + model.stderr and GH_TOKEN not in gist.stdout + gist.stderr


def test_cli_dry_run_and_user_errors(moe_dir, tmp_path):
    report = write_report(tmp_path / "nous.json")

    dry = run_cli(str(moe_dir), "--repo", REPO, "--dry-run", HF_ENDPOINT="http://127.0.0.1:9", COLUMNS="80")
    gist_dry = run_cli("--gist", str(report), "--dry-run", COLUMNS="80")
    no_token = run_cli(str(moe_dir), "--repo", REPO, HF_ENDPOINT="http://127.0.0.1:9",
                       HF_TOKEN_PATH=str(tmp_path / "none"))
    both = run_cli(str(moe_dir), "--gist", str(report))

    assert dry.returncode == 0 and "not checked" in dry.stdout and "frankenmoe" in dry.stdout
    assert "## Recipe" in dry.stdout
    # Printed verbatim in an 80-column terminal: markdown table rows longer than that are not hard-wrapped.
    card = publish_model(moe_dir, REPO, None, dry_run=True).card
    assert max(map(len, card.splitlines())) > 80 and card in dry.stdout
    assert plan_gist(report, False, None).content in gist_dry.stdout
    assert gist_dry.returncode == 0 and "would create a secret Gist with tiny-moe-Nous.md" in gist_dry.stderr
    assert "Average score: 50.0%" in gist_dry.stdout
    assert no_token.returncode == 2 and "no Hugging Face token" in no_token.stderr
    assert "Traceback" not in no_token.stderr
    assert both.returncode == 2 and "give either MODEL_DIR --repo user/name, or --gist REPORT" in both.stderr
