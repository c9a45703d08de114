"""A loopback fake of GitHub's REST API for Gists, answering what PyGithub sends to `Github(base_url=...)`.

Endpoints: GET /user, POST /gists, GET /gists (the user's), GET /gists/{id}, PATCH /gists/{id}, DELETE /gists/{id},
GET /users/{login}/gists, and GET /raw/{id}/{filename} (each file's raw_url). Gist JSON has GitHub's shape (id, url,
html_url, public, description, files{filename, type, language, raw_url, size, truncated, content}, owner, history,
created_at, updated_at). Error bodies are GitHub's {"message", "documentation_url"}. With `token=` set, a request with
another token gets 401 "Bad credentials"; writes without any token get 401 "Requires authentication".

    with FakeGitHub(token="ghp_test") as gh:
        client = github.Github(auth=github.Auth.Token("ghp_test"), base_url=gh.base_url)
"""

from __future__ import annotations

import itertools
from datetime import datetime, timezone
from typing import Any

from fakes import LoopbackServer, Request, Response

ERROR_MESSAGES = {401: "Bad credentials", 403: "Resource not accessible by personal access token", 404: "Not Found",
                  422: "Validation Failed", 500: "Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}


class FakeGitHub(LoopbackServer):
    def __init__(self, token: str | None = None, login: str = "moelab-tester") -> None:
        super().__init__()
        self.token = token
        self.login = login
        self.gists: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str, Any]] = []  # (method, path, json body or None)
        self._ids = (f"{n:032x}" for n in itertools.count(0xa11ce))

    @property
    def base_url(self) -> str:
        return self.url

    def record(self, request: Request) -> None:
        self.requests.append((request.method, request.path, request.json()))

    def fault(self, status: int, message: str | None) -> Response:
        return self._error(status, message)

    def _error(self, status: int, message: str | None = None) -> Response:
        return Response.json(status, {"message": message or ERROR_MESSAGES.get(status, "Error"),
                                      "documentation_url": "https://docs.github.com/rest"})

    def _auth_problem(self, request: Request) -> Response | None:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            return self._error(401, "Requires authentication") if request.method != "GET" or \
                request.path == "/user" else None
        if scheme.lower() not in ("token", "bearer") or (self.token is not None and token != self.token):
            return self._error(401, "Bad credentials")
        return None

    def handle(self, request: Request) -> Response:
        if request.path.startswith("/raw/"):
            _, _, gist_id, filename = request.path.split("/", 3)
            file = self.gists.get(gist_id, {}).get("files", {}).get(filename)
            return Response(200, file["content"].encode()) if file else Response(404, b"404: Not Found")
        problem = self._auth_problem(request)
        if problem is not None:
            return problem
        parts = request.path.strip("/").split("/")
        method = request.method
        if parts == ["user"] and method == "GET":
            return Response.json(200, self._owner())
        if parts == ["gists"] and method == "POST":
            return self._create(request.json() or {})
        if parts == ["gists"] and method == "GET":
            return Response.json(200, list(self.gists.values()))
        if len(parts) == 3 and parts[0] == "users" and parts[2] == "gists" and method == "GET":
            return Response.json(200, [g for g in self.gists.values() if g["owner"]["login"] == parts[1]])
        if len(parts) == 2 and parts[0] == "gists":
            gist = self.gists.get(parts[1])
            if gist is None:
                return self._error(404)
            if method == "GET":
                return Response.json(200, gist)
            if method == "PATCH":
                return self._edit(gist, request.json() or {})
            if method == "DELETE":
                del self.gists[parts[1]]
                return Response(204)
        return self._error(404)

    def _owner(self) -> dict[str, Any]:
        return {"login": self.login, "id": 1, "type": "User", "url": f"{self.url}/users/{self.login}",
                "html_url": f"https://github.com/{self.login}"}

    def _file(self, gist_id: str, filename: str, content: str) -> dict[str, Any]:
        language = {"md": "Markdown", "json": "JSON", "py": "Python"}.get(filename.rsplit(".", 1)[-1])
        return {"filename": filename, "type": "text/markdown" if language == "Markdown" else "text/plain",
                "language": language, "raw_url": f"{self.url}/raw/{gist_id}/{filename}",
                "size": len(content.encode()), "truncated": False, "content": content}

    def _create(self, body: dict[str, Any]) -> Response:
        files = body.get("files") or {}
        if not files or any(not isinstance(f, dict) or not f.get("content") for f in files.values()):
            return self._error(422)
        gist_id = next(self._ids)
        now = _now()
        gist = {"id": gist_id, "node_id": f"G_{gist_id}", "url": f"{self.url}/gists/{gist_id}",
                "html_url": f"https://gist.github.com/{self.login}/{gist_id}",
                "git_pull_url": f"https://gist.github.com/{gist_id}.git",
                "git_push_url": f"https://gist.github.com/{gist_id}.git",
                "forks_url": f"{self.url}/gists/{gist_id}/forks", "commits_url": f"{self.url}/gists/{gist_id}/commits",
                "comments_url": f"{self.url}/gists/{gist_id}/comments", "comments": 0,
                "public": bool(body.get("public", False)), "description": body.get("description"),
                "files": {name: self._file(gist_id, name, f["content"]) for name, f in files.items()},
                "owner": self._owner(), "user": None, "truncated": False, "created_at": now, "updated_at": now,
                "history": [self._version(gist_id, 1, now)]}
        self.gists[gist_id] = gist
        return Response.json(201, gist)

    def _edit(self, gist: dict[str, Any], body: dict[str, Any]) -> Response:
        if "description" in body:
            gist["description"] = body["description"]
        for name, change in (body.get("files") or {}).items():
            if change is None:
                gist["files"].pop(name, None)
                continue
            new_name = change.get("filename") or name
            content = change.get("content", gist["files"].get(name, {}).get("content"))
            if content is None:
                return self._error(422)
            gist["files"].pop(name, None)
            gist["files"][new_name] = self._file(gist["id"], new_name, content)
        gist["updated_at"] = _now()
        gist["history"].insert(0, self._version(gist["id"], len(gist["history"]) + 1, gist["updated_at"]))
        return Response.json(200, gist)

    def _version(self, gist_id: str, number: int, when: str) -> dict[str, Any]:
        version = f"{number:040x}"
        return {"version": version, "committed_at": when, "user": self._owner(),
                "change_status": {}, "url": f"{self.url}/gists/{gist_id}/{version}"}


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
