"""A loopback fake of the Hugging Face Hub API for `HF_ENDPOINT`, answering what huggingface_hub 2.4 sends.

Endpoints: POST /api/repos/create, GET /api/models/{repo}[/revision/{rev}] (repo info), GET
/api/models/{repo}/tree/{rev}[/{path}] (file list with git and LFS oids), POST /api/validate-yaml (README metadata),
POST /api/models/{repo}/preupload/{rev} (upload mode and the oid already stored per file), POST
/{repo}.git/info/lfs/objects/batch (LFS batch API, "basic" transfer), PUT /lfs/upload/{oid} and POST /lfs/verify,
POST /api/models/{repo}/commit/{rev} (NDJSON: header, file, lfsFile, deletedFile), and GET/HEAD
/{repo}/resolve/{rev}/{path} (downloads, with the ETag/X-Repo-Commit headers hf_hub_download reads).
Errors carry the Hub's {"error": ...} body and X-Error-Code header.

The Xet storage protocol (hf_xet's CAS server) is not faked: while running, the fake turns Xet off in
huggingface_hub so large files take the LFS batch + basic transfer path, which the Hub still serves.

    with FakeHub(token="hf_test", user="moelab-tester") as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        ...; hub.files["moelab-tester/m"]["config.json"] == local bytes
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
from typing import Any
from urllib.parse import unquote

from fakes import LoopbackServer, Request, Response

# Files the Hub's default .gitattributes sends to LFS, by suffix; anything over 10 MB or binary goes there too.
LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".model", ".npy",
                ".zip", ".tar", ".gz", ".parquet", ".arrow", ".pkl")
LFS_MIN_BYTES = 10 * 1024 * 1024


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    sha256 = hashlib.sha256(data).hexdigest()
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n".encode()


class FakeHub(LoopbackServer):
    def __init__(self, token: str | None = None, user: str = "moelab-tester", orgs: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.token = token
        self.user = user
        self.namespaces = {user, *orgs}
        self.repos: dict[str, dict[str, Any]] = {}  # repo -> {"private", "sha", "commits": [{"oid", "summary", ...}]}
        self.files: dict[str, dict[str, bytes]] = {}  # repo -> {path: bytes} at the head of main
        self.lfs_files: dict[str, set[str]] = {}  # repo -> paths committed as LFS files
        self.blobs: dict[str, bytes] = {}  # sha256 -> content, uploaded through LFS (committed or not)
        self.requests: list[tuple[str, str, Any]] = []  # (method, path, JSON / NDJSON lines / raw bytes)
        self._commit_ids = (hashlib.sha1(b"commit %d" % n).hexdigest() for n in itertools.count(1))
        self._xet_was_disabled: bool | None = None

    @property
    def endpoint(self) -> str:
        return self.url

    def start(self) -> "FakeHub":
        from huggingface_hub import constants

        self._xet_was_disabled = constants.HF_HUB_DISABLE_XET
        constants.HF_HUB_DISABLE_XET = True
        super().start()
        return self

    def stop(self) -> None:
        super().stop()
        if self._xet_was_disabled is not None:
            from huggingface_hub import constants

            constants.HF_HUB_DISABLE_XET = self._xet_was_disabled
            self._xet_was_disabled = None

    def record(self, request: Request) -> None:
        content_type = request.headers.get("content-type", "")
        if "ndjson" in content_type:
            payload: Any = [json.loads(line) for line in request.body.splitlines() if line.strip()]
        elif "json" in content_type:
            payload = request.json()
        else:
            payload = request.body
        self.requests.append((request.method, request.path, payload))

    def fault(self, status: int, message: str | None) -> Response:
        return self._error(status, message or f"fake Hub fault {status}")

    def _error(self, status: int, message: str, code: str | None = None) -> Response:
        headers = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {})}
        return Response.json(status, {"error": message}, headers)

    # --- auth -----------------------------------------------------------------------------------------------
    def _caller(self, request: Request) -> tuple[str | None, Response | None]:
        """(user, None) for a valid or absent token; (None, 401 response) for a wrong one."""
        header = request.headers.get("authorization", "")
        if not header:
            return None, None
        scheme, _, token = header.partition(" ")
        if scheme != "Bearer" or not token or (self.token is not None and token != self.token):
            return None, self._error(401, "Invalid credentials in Authorization header")
        return self.user, None

    def _can_write(self, caller: str | None, repo: str) -> Response | None:
        if caller is None:
            return self._error(401, "You must be authenticated to access this resource")
        if repo.split("/")[0] not in self.namespaces:
            return self._error(403, f"You don't have the rights to write to {repo}")
        return None

    def _readable(self, caller: str | None, repo: str) -> Response | None:
        if repo not in self.repos or (self.repos[repo]["private"] and caller is None):
            return self._error(404 if caller else 401, "Repository not found", "RepoNotFound")
        return None

    # --- routing ----------------------------------------------------------------------------------------------
    def handle(self, request: Request) -> Response:
        caller, problem = self._caller(request)
        if problem is not None:
            return problem
        path, method = unquote(request.path), request.method
        if path == "/api/repos/create" and method == "POST":
            return self._create_repo(caller, request.json() or {})
        if path == "/api/validate-yaml" and method == "POST":
            return self._validate_yaml(request.json() or {})
        if path == "/api/whoami-v2" and method == "GET":
            return Response.json(200, {"type": "user", "name": self.user}) if caller else \
                self._error(401, "Invalid username or password.")
        if path.startswith("/api/models/"):
            return self._models_api(caller, request, path[len("/api/models/"):])
        if path.startswith("/lfs/upload/") and method == "PUT":
            return self._lfs_put(path.rsplit("/", 1)[1], request.body)
        if path == "/lfs/verify" and method == "POST":
            body = request.json() or {}
            return Response.json(200, {}) if body.get("oid") in self.blobs else self._error(404, "object not found")
        if path.endswith(".git/info/lfs/objects/batch") and method == "POST":
            return self._lfs_batch(caller, path[1:-len(".git/info/lfs/objects/batch")], request.json() or {})
        if "/resolve/" in path and method in ("GET", "HEAD"):
            repo, _, rest = path[1:].partition("/resolve/")
            return self._resolve(caller, repo, rest.partition("/")[2])
        return self._error(404, f"no route {method} {path}")

    def _models_api(self, caller: str | None, request: Request, rest: str) -> Response:
        parts = rest.split("/")
        repo, action, args = "/".join(parts[:2]), (parts[2] if len(parts) > 2 else ""), parts[3:]
        method = request.method
        if action in ("preupload", "commit"):
            problem = self._can_write(caller, repo) or self._readable(caller, repo)
            if problem is not None:
                return problem
            if action == "preupload":
                return self._preupload(repo, request.json() or {})
            return self._commit(repo, request.body)
        problem = self._readable(caller, repo)
        if problem is not None:
            return problem
        if method == "GET" and action in ("", "revision"):
            return Response.json(200, self._repo_info(repo))
        if method == "GET" and action == "tree":
            return Response.json(200, self._tree(repo, "/".join(args[1:]), request.query))
        return self._error(404, f"no route {method} /api/models/{rest}")

    # --- repos --------------------------------------------------------------------------------------------------
    def _create_repo(self, caller: str | None, body: dict[str, Any]) -> Response:
        repo = f"{body.get('organization') or caller}/{body.get('name')}"
        problem = self._can_write(caller, repo)
        if problem is not None:
            return problem
        if repo in self.repos:
            return Response.json(409, {"error": "You already created this model repo", "url": f"{self.url}/{repo}"})
        private = body.get("visibility") == "private" or bool(body.get("private"))
        self.repos[repo] = {"private": private, "sha": None, "commits": []}
        self.files[repo] = {}
        self.lfs_files[repo] = set()
        self._apply_commit(repo, "initial commit", "", {".gitattributes": b"*.safetensors filter=lfs diff=lfs "
                                                                          b"merge=lfs -text\n"}, set(), [])
        return Response.json(200, {"url": f"{self.url}/{repo}", "name": repo, "id": hashlib.md5(repo.encode())
                                   .hexdigest()[:24]})

    def _repo_info(self, repo: str) -> dict[str, Any]:
        state = self.repos[repo]
        return {"_id": repo, "id": repo, "modelId": repo, "author": repo.split("/")[0], "sha": state["sha"],
                "private": state["private"], "disabled": False, "gated": False, "downloads": 0, "likes": 0,
                "tags": [], "lastModified": "2026-01-01T00:00:00.000Z", "createdAt": "2026-01-01T00:00:00.000Z",
                "siblings": [{"rfilename": p} for p in sorted(self.files[repo])]}

    def _tree(self, repo: str, prefix: str, query: dict[str, list[str]]) -> list[dict[str, Any]]:
        recursive = query.get("recursive", ["False"])[0].lower() == "true"
        entries, folders = [], set()
        for path in sorted(self.files[repo]):
            if prefix and not path.startswith(prefix.rstrip("/") + "/"):
                continue
            rest = path[len(prefix.rstrip("/")) + 1:] if prefix else path
            if "/" in rest and not recursive:
                folders.add(rest.split("/")[0])
                continue
            entries.append(self._file_entry(repo, path))
        return [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f"{prefix}/{f}".lstrip("/")}
                for f in sorted(folders)] + entries

    def _file_entry(self, repo: str, path: str) -> dict[str, Any]:
        data = self.files[repo][path]
        if path in self.lfs_files[repo]:
            pointer = lfs_pointer(data)
            return {"type": "file", "oid": git_blob_sha1(pointer), "size": len(data), "path": path,
                    "lfs": {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": len(pointer)}}
        return {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path}

    def _validate_yaml(self, body: dict[str, Any]) -> Response:
        import yaml

        content = body.get("content", "")
        if not content.startswith("---"):
            return Response.json(200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]})
        try:
            metadata = yaml.safe_load(content.split("---", 2)[1])
        except (yaml.YAMLError, IndexError) as err:
            return Response.json(400, {"errors": [{"message": f"invalid YAML: {err}"}]})
        if not isinstance(metadata, dict):
            return Response.json(400, {"errors": [{"message": "metadata must be a YAML mapping"}]})
        return Response.json(200, {"errors": [], "warnings": []})

    # --- uploads ------------------------------------------------------------------------------------------------
    def _upload_mode(self, path: str, size: int, sample: bytes) -> str:
        return "lfs" if path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_BYTES or b"\0" in sample else "regular"

    def _preupload(self, repo: str, body: dict[str, Any]) -> Response:
        answers = []
        for file in body.get("files", []):
            mode = self._upload_mode(file["path"], file["size"], base64.b64decode(file.get("sample", "")))
            stored = self.files[repo].get(file["path"])
            oid = None
            if stored is not None:
                oid = hashlib.sha256(stored).hexdigest() if mode == "lfs" else git_blob_sha1(stored)
            answers.append({"path": file["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return Response.json(200, {"files": answers, "commitOid": self.repos[repo]["sha"]})

    def _lfs_batch(self, caller: str | None, repo: str, body: dict[str, Any]) -> Response:
        problem = self._can_write(caller, repo) or self._readable(caller, repo)
        if problem is not None:
            return problem
        if body.get("operation") != "upload" or "basic" not in body.get("transfers", ["basic"]):
            return self._error(422, "only the basic upload transfer is served")
        objects = []
        for obj in body.get("objects", []):
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.blobs:
                entry["actions"] = {"upload": {"href": f"{self.url}/lfs/upload/{obj['oid']}", "header": {}},
                                    "verify": {"href": f"{self.url}/lfs/verify", "header": {}}}
            objects.append(entry)
        return Response.json(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                             {"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_put(self, oid: str, data: bytes) -> Response:
        if hashlib.sha256(data).hexdigest() != oid:
            return self._error(400, "uploaded content does not match its sha256 oid")
        self.blobs[oid] = data
        return Response(200)

    def _commit(self, repo: str, body: bytes) -> Response:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            return self._error(400, "the first NDJSON line must be the commit header")
        header = lines[0]["value"]
        parent = header.get("parentCommit")
        if parent and parent != self.repos[repo]["sha"]:
            return self._error(412, "parent commit is not the head of the branch")
        added, lfs_added, deleted = {}, set(), []
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                added[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                if value["oid"] not in self.blobs:
                    return self._error(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                added[value["path"]] = self.blobs[value["oid"]]
                lfs_added.add(value["path"])
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:
                return self._error(400, f"unknown commit operation {key}")
        oid = self._apply_commit(repo, header.get("summary", ""), header.get("description", ""), added, lfs_added,
                                 deleted)
        return Response.json(200, {"success": True, "commitOid": oid, "commitUrl": f"{self.url}/{repo}/commit/{oid}",
                                   "pullRequestUrl": None})

    def _apply_commit(self, repo: str, summary: str, description: str, added: dict[str, bytes], lfs_added: set[str],
                      deleted: list[str]) -> str:
        files, lfs = self.files[repo], self.lfs_files[repo]
        for path in deleted:
            for existing in [p for p in files if p == path or p.startswith(path.rstrip("/") + "/")]:
                del files[existing]
                lfs.discard(existing)
        for path, data in added.items():
            files[path] = data
            (lfs.add if path in lfs_added else lfs.discard)(path)
        oid = next(self._commit_ids)
        self.repos[repo]["sha"] = oid
        self.repos[repo]["commits"].append({"oid": oid, "summary": summary, "description": description,
                                            "paths": sorted(added), "deleted": deleted})
        return oid

    # --- downloads ----------------------------------------------------------------------------------------------
    def _resolve(self, caller: str | None, repo: str, path: str) -> Response:
        problem = self._readable(caller, repo)
        if problem is not None:
            return problem
        if path not in self.files[repo]:
            return self._error(404, "Entry not found", "EntryNotFound")
        data, entry = self.files[repo][path], self._file_entry(repo, path)
        headers = {"ETag": f'"{entry["oid"]}"', "X-Repo-Commit": self.repos[repo]["sha"],
                   "Content-Type": "application/octet-stream"}
        if "lfs" in entry:
            headers.update({"X-Linked-Etag": f'"{entry["lfs"]["oid"]}"', "X-Linked-Size": str(len(data))})
        return Response(200, data, headers)
