"""The pod's first program, before moelab exists there: install moelab, then run `python -m moelab.eval.pod`.

Standard library only. The pod's start command runs it as `python -c "$MOELAB_BOOTSTRAP"` (moelab.eval.remote puts
this file's text in that variable). It installs MOELAB_INSTALL (the user's --install) or else the wheel that the
local moelab put, base64-encoded, in the run's Gist (file MOELAB_WHEEL_FILE), with pip and an argument list (no
shell). If that fails it writes the reason to the Gist's moelab-error.txt, so the local side can say why.
"""

import base64
import json
import os
import subprocess
import sys
import tempfile
import urllib.request

ERROR_FILE = "moelab-error.txt"  # as moelab.eval.remote.ERROR_FILE


def gist_request(method: str, url: str, body: dict | None = None) -> bytes:
    headers = {"Authorization": f"token {os.environ['GITHUB_TOKEN']}", "Accept": "application/vnd.github+json"}
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    with urllib.request.urlopen(request, timeout=120) as answer:
        return answer.read()


def gist_url() -> str:
    api = os.environ.get("GITHUB_API_URL", "https://api.github.com").rstrip("/")
    return f"{api}/gists/{os.environ['MOELAB_GIST_ID']}"


def fetch_wheel(name: str) -> str:
    """The wheel from the Gist, written to a temporary folder; its path."""
    entry = json.loads(gist_request("GET", gist_url()))["files"][name]
    text = entry["content"] if not entry.get("truncated") else gist_request("GET", entry["raw_url"]).decode()
    path = os.path.join(tempfile.mkdtemp(), name[:-len(".b64")])
    with open(path, "wb") as wheel:
        wheel.write(base64.b64decode(text))
    return path


def main() -> int:
    try:
        requirement = os.environ.get("MOELAB_INSTALL") or fetch_wheel(os.environ["MOELAB_WHEEL_FILE"]) + "[eval]"
        print(f"installing moelab from {requirement}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", requirement], check=True)
    except Exception as err:  # the pod has no other way to tell the local side
        reason = f"could not install moelab on the pod ({type(err).__name__}: {err})"
        print(reason, file=sys.stderr, flush=True)
        try:
            gist_request("PATCH", gist_url(), {"files": {ERROR_FILE: {"content": reason + "\n"}}})
        except Exception:
            pass
        return 1
    os.execv(sys.executable, [sys.executable, "-m", "moelab.eval.pod"])


if __name__ == "__main__":
    sys.exit(main())
