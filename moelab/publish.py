"""Sharing: a model folder to the Hugging Face Hub with a regenerated card, an eval report to a GitHub Gist."""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from moelab.errors import MoelabError
from moelab.files import read_user_text
from moelab.redact import clean_secret, mask, secret_from_env

# Text files this small are checked for the token before upload; weights are not read for it.
TOKEN_SCAN_MAX_BYTES = 10 * 1024 * 1024
GITHUB_API_URL = "https://api.github.com"


@dataclass
class LocalFile:
    path_in_repo: str
    size_bytes: int
    source: Path | None  # None for the generated card, whose text is in ModelUpload.card
    status: str | None = None  # new | changed | unchanged against the repo; None until compared (dry run)


@dataclass
class ModelUpload:
    """What `publish_model` sends (or, with dry_run, would send) to a Hub repo, and how it went."""
    repo: str
    private: bool
    card: str
    files: list[LocalFile]
    commit_message: str
    commit_url: str | None = None
    repo_url: str | None = None
    dry_run: bool = False

    @property
    def uploaded(self) -> list[str]:
        return [f.path_in_repo for f in self.files if f.status != "unchanged"]

    @property
    def unchanged(self) -> list[str]:
        return [f.path_in_repo for f in self.files if f.status == "unchanged"]


@dataclass
class GistUpload:
    """The Gist `publish_gist` creates or updates for a report."""
    filename: str
    description: str
    content: str
    public: bool
    gist_id: str | None  # the report's Gist, updated instead of creating a new one


# --- model to the Hub ------------------------------------------------------------------------------------------

def plan_model_upload(model_dir: Path, repo: str, private: bool = False, report: Any = None) -> ModelUpload:
    """Every file of a moelab model folder, with README.md replaced by a card regenerated for `repo`."""
    from moelab import __version__
    from moelab.card import build_details, model_card
    from moelab.recipe import parse_recipe

    model_dir = Path(model_dir)
    _check_repo_id(repo)
    meta_path, recipe_path = model_dir / "moelab.json", model_dir / "moelab_recipe.yaml"
    if not model_dir.is_dir():
        raise MoelabError(f"{model_dir} is not a folder; give the folder that `moelab build` wrote")
    if not meta_path.is_file() or not recipe_path.is_file():
        raise MoelabError(f"{model_dir} has no moelab.json and moelab_recipe.yaml, so it was not built by moelab; "
                          "publish a folder written by `moelab build`")
    meta = _build_metadata(meta_path)
    recipe_text = read_user_text(recipe_path, "recipe")
    recipe = parse_recipe(recipe_text, str(recipe_path), allow_identical_experts=True)
    old_card = read_user_text(model_dir / "README.md", "model card") if (model_dir / "README.md").is_file() else ""
    notes, shared_deltas = build_details(old_card)
    eval_report = _load_report(report)
    card = mask(model_card(recipe, recipe_text, meta["architecture"], notes, shared_deltas, report=eval_report,
                           repo_id=repo, routing=meta.get("routing"), retention=_load_retention(report),
                           heal=meta.get("heal")))
    paths = [p for p in sorted(model_dir.rglob("*")) if p.is_file() and not _is_hidden(p.relative_to(model_dir))]
    files = [LocalFile(p.relative_to(model_dir).as_posix(), p.stat().st_size, p)
             for p in paths if p != model_dir / "README.md"]
    files.append(LocalFile("README.md", len(card.encode()), None))
    title = recipe.name or repo.split("/")[1]
    message = (f"moelab publish: {title}, a {meta['architecture']} MoE of {len(recipe.experts)} experts "
               f"(moelab {__version__})")
    return ModelUpload(repo, private, card, files, message)


def _build_metadata(path: Path) -> dict:
    """moelab.json, which `moelab build` writes: a JSON object naming at least the architecture."""
    try:
        meta = json.loads(read_user_text(path, "build metadata"))
    except (json.JSONDecodeError, RecursionError):
        meta = None
    if not isinstance(meta, dict) or not isinstance(meta.get("architecture"), str) \
            or not isinstance(meta.get("routing"), (dict, type(None))):
        raise MoelabError(f"{path} is damaged (not the JSON object `moelab build` writes); rebuild the model")
    return meta


def publish_model(model_dir: Path, repo: str, token: str | None, private: bool = False, report: Any = None,
                  dry_run: bool = False, show_progress: bool = False) -> ModelUpload:
    """Create `repo` if needed and upload the folder in one commit; files the repo already holds are skipped.

    `report`: an EvalReport (or its JSON path) whose scores go into the card. The token comes from the argument,
    HF_TOKEN or a saved `hf auth login`. HF_ENDPOINT selects another Hub. A failed upload commits nothing; the
    error says what was stored and a re-run finishes without sending stored files again.
    """
    upload = plan_model_upload(model_dir, repo, private, report)
    if dry_run:
        upload.dry_run = True
        return upload
    token = _hub_token(token)
    _refuse_files_with_token(upload, token)

    from huggingface_hub import CommitOperationAdd, HfApi

    # HF_ENDPOINT is read now, not when huggingface_hub was imported, so that it can be set at any time.
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    try:
        upload.repo_url = str(api.create_repo(repo, private=private, exist_ok=True))
        repo_is_private = api.model_info(repo).private
        remote = {f.path: f for f in api.list_repo_tree(repo, recursive=True) if hasattr(f, "blob_id")}
    except Exception as err:
        raise _hub_error(err, repo, "nothing was uploaded") from None
    if private and not repo_is_private:
        raise MoelabError(f"{repo} already exists and is public, and --private only applies to a new repo; make it "
                          "private in its settings on the Hub or choose another --repo; nothing was uploaded")
    for file in upload.files:
        file.status = _compare(file, upload.card, remote.get(file.path_in_repo))
    changed = [f for f in upload.files if f.status != "unchanged"]
    if not changed:
        return upload

    operations = [CommitOperationAdd(f.path_in_repo, str(f.source) if f.source else upload.card.encode())
                  for f in changed]
    stored: list[str] = []
    try:
        with _byte_progress(show_progress, sum(f.size_bytes for f in changed)) as advance:
            for file, operation in zip(changed, operations):
                # One file at a time, so that a failure can say which large files are already stored.
                api.preupload_lfs_files(repo, [operation])
                if getattr(operation, "_upload_mode", None) == "lfs":
                    stored.append(file.path_in_repo)
                advance(file.size_bytes)
    except Exception as err:
        not_sent = [f.path_in_repo for f in changed if f.path_in_repo not in stored]
        raise _hub_error(err, repo, f"large files stored: {_names(stored)}; not uploaded: {_names(not_sent)}; "
                                    f"nothing was committed, so {repo} is unchanged") from None
    description = "Files: " + ", ".join(f"{f.path_in_repo} ({f.status})" for f in changed)
    try:
        info = api.create_commit(repo, operations, commit_message=upload.commit_message,
                                 commit_description=description)
    except Exception as err:
        raise _hub_error(err, repo, f"large files stored: {_names(stored)}; the commit failed, so none of the "
                                    f"{len(changed)} new or changed files is on {repo} yet") from None
    upload.commit_url = info.commit_url
    return upload


def upload_view(upload: ModelUpload) -> Any:
    """A rich table of the files of an upload: size and whether each is new, changed or unchanged on the Hub."""
    from rich.table import Table

    title = f"{'dry run: ' if upload.dry_run else ''}{upload.repo}{' (private)' if upload.private else ''}"
    table = Table(title=title)
    table.add_column("file")
    table.add_column("size", justify="right")
    table.add_column("on the Hub")
    for file in upload.files:
        note = " (generated card)" if file.source is None else ""
        table.add_row(file.path_in_repo + note, _human_bytes(file.size_bytes), file.status or "not checked")
    return table


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _compare(file: LocalFile, card: str, remote: Any) -> str:
    """new, changed or unchanged: LFS files by sha256, others by git blob id, as the Hub stores them."""
    if remote is None:
        return "new"
    data = card.encode() if file.source is None else None
    if remote.lfs is not None:
        return "unchanged" if _sha256(file, data) == remote.lfs.sha256 else "changed"
    if data is None:
        data = file.source.read_bytes() if file.size_bytes <= TOKEN_SCAN_MAX_BYTES else None
    if data is None:
        return "changed"
    blob_id = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    return "unchanged" if blob_id == remote.blob_id else "changed"


def _sha256(file: LocalFile, data: bytes | None) -> str:
    digest = hashlib.sha256()
    if data is not None:
        digest.update(data)
    else:
        with open(file.source, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _refuse_files_with_token(upload: ModelUpload, token: str) -> None:
    secret = token.encode()  # the card is masked; the files are sent as they are
    for file in upload.files:
        if file.source is not None and file.size_bytes <= TOKEN_SCAN_MAX_BYTES \
                and not file.path_in_repo.endswith(".safetensors") and secret in file.source.read_bytes():
            raise MoelabError(f"{file.source} contains your Hub token; remove it before publishing")


def _hub_token(token: str | None) -> str:
    if not token:
        from huggingface_hub import get_token

        token = clean_secret(get_token())  # remembered, so that every message masks it
    if not token:
        raise MoelabError("no Hugging Face token: pass --token, set HF_TOKEN or run `hf auth login` "
                          "(a token with write access, from https://huggingface.co/settings/tokens)")
    return token


def _hub_error(err: Exception, repo: str, state: str) -> Exception:
    """A MoelabError for a Hub failure that says what happened and what is on the Hub; other errors unchanged."""
    from huggingface_hub.errors import HfHubHTTPError

    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, HfHubHTTPError) and not _is_transport_error(cause):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return err
    status = getattr(getattr(cause, "response", None), "status_code", None)
    if status == 401:
        what = "the Hub rejected the token (401); check --token / HF_TOKEN"
    elif status == 403:
        what = (f"the token may not write to {repo} (403); use a write token of '{repo.split('/')[0]}' "
                "or a namespace you belong to")
    elif status is not None:
        server_message = getattr(cause, "server_message", None) or ""
        what = f"the Hub answered {status}{': ' + server_message.strip() if server_message else ''}"
    else:
        what = f"cannot reach the Hub ({type(cause).__name__}: {cause})"
    return MoelabError(f"publishing to {repo} failed: {what}; {state}; re-run the same command to finish")


def _is_transport_error(err: BaseException) -> bool:
    # huggingface_hub 2.x talks through httpx2: its TransportError covers refused connections and timeouts.
    return any(c.__name__ == "TransportError" and c.__module__.startswith("httpx") for c in type(err).__mro__)


def _check_repo_id(repo: str) -> None:
    name = repo.split("/")
    if len(name) != 2 or not all(name) or any(c in repo for c in " \\:") or repo.startswith((".", "-")):
        raise MoelabError(f"--repo '{repo}' is not a Hub repo id; write it as user/name (or org/name)")


def _is_hidden(relative: Path) -> bool:
    return any(part.startswith(".") or part == "__pycache__" for part in relative.parts)


def _names(paths: list[str]) -> str:
    return ", ".join(paths) if paths else "none"


@contextmanager
def _byte_progress(shown: bool, total_bytes: int) -> Iterator[Callable[[int], None]]:
    """A rich bar over bytes on stderr when shown; yields `advance(n_bytes)` either way."""
    if not shown:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    with Progress(TextColumn("uploading"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("upload", total=total_bytes)
        yield lambda n: bar.advance(task, n)


def _load_retention(report: Any) -> list[dict] | None:
    """The retention table `moelab compare` wrote beside the report (reports/<moe>/compare/retention.json)."""
    from moelab.compare import RETENTION_FILE

    if not isinstance(report, (str, Path)):
        return None
    path = Path(report).parent / "compare" / RETENTION_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _load_report(report: Any):
    if report is None or not isinstance(report, (str, Path)):
        return report
    from moelab.eval.report import EvalReport

    return EvalReport.load(Path(report))


# --- report to a Gist ------------------------------------------------------------------------------------------

def plan_gist(report_path: Path, public: bool = False, repo_id: str | None = None) -> GistUpload:
    """The Gist for a report: AutoEval's `<model>-Nous.md` markdown; the report's gist_id says which to update.

    `repo_id`: the Hub repo the model cell links to (leaderboards need that link), when the report names a folder.
    """
    from moelab.eval.report import report_markdown

    report = _load_report(Path(report_path))
    return GistUpload(filename=f"{report.model_name}-Nous.md",
                      description=f"{report.model_name}: Nous suite scores (moelab eval, LLM AutoEval layout)",
                      content=mask(report_markdown(report, repo_id)), public=public, gist_id=report.gist_id)


def publish_gist(report_path: Path, token: str | None, public: bool = False, base_url: str | None = None,
                 repo_id: str | None = None) -> str:
    """Post the report's markdown as a Gist, or update the Gist it was posted to before; returns the Gist id
    and records it in the report JSON. The token comes from the argument or GITHUB_TOKEN (gist scope)."""
    plan = plan_gist(report_path, public, repo_id)
    token = clean_secret(token) or secret_from_env("GITHUB_TOKEN")
    if not token:
        raise MoelabError("no GitHub token: pass --token or set GITHUB_TOKEN (a token with the gist scope, from "
                          "https://github.com/settings/tokens)")
    import github

    client = github.Github(auth=github.Auth.Token(token),
                           base_url=base_url or os.environ.get("GITHUB_API_URL") or GITHUB_API_URL)
    files = {plan.filename: github.InputFileContent(plan.content)}
    try:
        gist = _existing_gist(client, plan.gist_id)
        if gist is None:
            gist = client.get_user().create_gist(public, files, plan.description)
        elif gist.public != public:
            raise MoelabError(
                f"Gist {gist.id} is {'public' if gist.public else 'secret'} and GitHub cannot change that; "
                f"re-run with{'' if gist.public else 'out'} --public, or delete the Gist to post a new one")
        elif gist.files.get(plan.filename) is None or gist.files[plan.filename].content != plan.content \
                or gist.description != plan.description:
            gist.edit(description=plan.description, files=files)
    except github.GithubException as err:
        raise _github_error(err) from None
    except OSError as err:  # requests' errors (no connection, retries used up on 5xx) are OSErrors
        import requests

        what = ("GitHub kept answering server errors" if isinstance(err, requests.exceptions.RetryError)
                else f"cannot reach GitHub ({type(err).__name__})")
        raise MoelabError(f"publishing the Gist failed: {what}; nothing was changed; re-run the same command "
                          "later") from None
    if gist.id != plan.gist_id:
        from moelab.eval.report import EvalReport

        report = EvalReport.load(Path(report_path))
        report.gist_id = gist.id
        report.save(Path(report_path))
    return gist.id


def _existing_gist(client: Any, gist_id: str | None) -> Any:
    import github

    if gist_id is None:
        return None
    try:
        gist = client.get_gist(gist_id)
        gist.public  # noqa: B018 (loads the Gist now, so that a deleted one shows here)
        return gist
    except github.UnknownObjectException:
        return None  # deleted on GitHub: post a new one


def _github_error(err: Any) -> MoelabError:
    message = (err.data or {}).get("message", "") if isinstance(err.data, dict) else str(err.data or "")
    if err.status == 401:
        what = "GitHub rejected the token (401); check --token / GITHUB_TOKEN"
    elif err.status == 403:
        what = f"the token may not write Gists (403: {message}); use a token with the gist scope"
    else:
        what = f"GitHub answered {err.status}: {message}"
    return MoelabError(f"publishing the Gist failed: {what}; nothing was changed; re-run the same command")
