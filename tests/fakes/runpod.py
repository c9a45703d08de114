"""A loopback fake of RunPod's GraphQL API, speaking exactly what the runpod 1.12 SDK sends, with injectable faults.

The SDK posts `{"query": "<GraphQL text>"}` to `$RUNPOD_API_BASE_URL/graphql` with `Authorization: Bearer <key>`;
arguments are inlined in the text as `input: {...}`. This fake parses those literals, keeps pods in memory, records
every call, and answers in the shape the SDK reads (`data.<field>`, or `errors[0].message`, or HTTP 401).
Operations: gpuTypes (create_pod checks the GPU id first), podFindAndDeployOnDemand, pod, myself.pods, podTerminate.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from fakes import LoopbackServer, Request, Response

GPU_TYPES = {
    "NVIDIA A100 80GB PCIe": {"displayName": "A100 80GB", "memoryInGb": 80, "securePrice": 1.64, "communityPrice": 1.19},
    "NVIDIA GeForce RTX 4090": {"displayName": "RTX 4090", "memoryInGb": 24, "securePrice": 0.69, "communityPrice": 0.34},
    "NVIDIA H100 80GB HBM3": {"displayName": "H100 SXM", "memoryInGb": 80, "securePrice": 2.99, "communityPrice": 2.69},
}


class GatewayTimeout(Exception):
    """Raised by an operation whose answer is lost after it took effect."""


@dataclass
class Call:
    operation: str  # the top-level GraphQL field: gpuTypes, podFindAndDeployOnDemand, pod, myself, podTerminate
    input: dict[str, Any] | None
    query: str
    api_key: str


@dataclass
class FakePod:
    id: str
    name: str
    spec: dict[str, Any]  # the parsed `input` of podFindAndDeployOnDemand
    cost_per_hr: float
    created_s: float = field(default_factory=time.monotonic)
    polls: int = 0
    terminated: bool = False

    @property
    def env(self) -> dict[str, str]:
        return {item["key"]: item["value"] for item in self.spec.get("env", [])}


class FakeRunPod(LoopbackServer):
    """Run with `with FakeRunPod(user_key) as api:`; point the SDK at it with RUNPOD_API_BASE_URL=api.url.

    `api_keys` are the keys it accepts (the user's, and the pod-scoped key a pod gets); others get HTTP 401.
    Faults (set before or during a run; `fail_next` from LoopbackServer gives HTTP-level ones):
      create_error / poll_error / terminate_error: a GraphQL error message for that operation (None = works);
      lose_create_response: the pod is created but the answer is an HTML 504 (the caller never sees its id);
      ready_after_polls: the pod reports a runtime (container up) from this `pod` query on; None = never ready;
      exited_after_polls: from this `pod` query on the container has stopped (desiredStatus EXITED);
      delay_s: every answer waits this long (a slow API);
      on_deploy: called with the new FakePod in a thread, to run its container (see test_remote's pod runner);
      on_terminate: called with the FakePod when it is terminated (to stop that container).
    """

    def __init__(self, *api_keys: str):
        super().__init__()
        self.api_keys = set(api_keys)
        self.calls: list[Call] = []
        self.pods: dict[str, FakePod] = {}
        self.create_error: str | None = None
        self.lose_create_response = False
        self.poll_error: str | None = None
        self.terminate_error: str | None = None
        self.ready_after_polls: int | None = 1
        self.exited_after_polls: int | None = None
        self.delay_s = 0.0
        self.received = 0
        self.on_deploy: Callable[[FakePod], None] | None = None
        self.on_terminate: Callable[[FakePod], None] | None = None
        self._ids = (f"fakepod{n:04d}" for n in itertools.count(1))

    def operations(self, name: str, api_key: str | None = None) -> list[Call]:
        return [c for c in self.calls if c.operation == name and api_key in (None, c.api_key)]

    def terminate_calls(self, pod_id: str, api_key: str | None = None) -> int:
        """podTerminate requests for this pod (by `api_key` if given), whether or not they succeeded."""
        return sum(1 for c in self.operations("podTerminate", api_key) if c.input == {"podId": pod_id})

    def wait_for(self, condition: Callable[[], bool], timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met in {timeout_s}s; calls: {[c.operation for c in self.calls]}")
            time.sleep(0.05)

    # --- HTTP ------------------------------------------------------------------------------------------------

    def record(self, request: Request) -> None:
        self.received += 1  # counted on arrival: a test can act while a slow request is in flight
        time.sleep(self.delay_s)  # outside the server's lock, so a slow answer does not block the others

    def fault(self, status: int, message: str | None) -> Response:
        return Response.json(status, {"errors": [{"message": message or f"HTTP {status}"}]})

    def handle(self, request: Request) -> Response:
        if request.method != "POST" or request.path != "/graphql":
            return Response.json(404, {"error": "not found"})
        api_key = request.headers.get("authorization", "").removeprefix("Bearer ")
        try:
            status, payload = self.answer(request.json()["query"], api_key)
        except GatewayTimeout:  # what the edge proxy sends when the backend is slow: HTML, not GraphQL
            return Response(504, b"<html><body><h1>504 Gateway Time-out</h1></body></html>",
                            {"Content-Type": "text/html"})
        return Response.json(status, payload)

    # --- GraphQL ---------------------------------------------------------------------------------------------

    def answer(self, query: str, api_key: str) -> tuple[int, dict]:
        if api_key not in self.api_keys:
            return 401, {"error": "unauthorized"}
        operation = re.search(r"\{\s*(\w+)", query).group(1)
        call_input = parse_input(query, operation)
        self.calls.append(Call(operation, call_input, query, api_key))
        handler = getattr(self, f"_op_{operation}", None)
        if handler is None:
            return 200, {"errors": [{"message": f"Cannot query field \"{operation}\" (not in the fake)"}]}
        return handler(call_input or {})

    def _op_gpuTypes(self, call_input: dict) -> tuple[int, dict]:
        gpus = [{"id": gpu_id, **info} for gpu_id, info in GPU_TYPES.items()
                if call_input.get("id") in (None, gpu_id)]
        return 200, {"data": {"gpuTypes": gpus}}

    def _op_podFindAndDeployOnDemand(self, spec: dict) -> tuple[int, dict]:
        if self.create_error:
            return 200, {"errors": [{"message": self.create_error}]}
        gpu = GPU_TYPES.get(spec.get("gpuTypeId"))
        if gpu is None:
            return 200, {"errors": [{"message": "There are no longer any instances available with the requested specifications."}]}
        price = gpu["securePrice" if spec.get("cloudType") == "SECURE" else "communityPrice"]
        pod = FakePod(next(self._ids), spec["name"], spec, round(price * spec.get("gpuCount", 1), 3))
        self.pods[pod.id] = pod
        if self.on_deploy:
            threading.Thread(target=self.on_deploy, args=(pod,), daemon=True).start()
        if self.lose_create_response:
            raise GatewayTimeout
        return 200, {"data": {"podFindAndDeployOnDemand": {
            "id": pod.id, "imageName": spec.get("imageName"), "env": [f"{k}={v}" for k, v in pod.env.items()],
            "machineId": "fakemachine1", "machine": {"podHostId": f"{pod.id}-host"}}}}

    def _op_pod(self, call_input: dict) -> tuple[int, dict]:
        if self.poll_error:
            return 200, {"errors": [{"message": self.poll_error}]}
        pod = self.pods.get(call_input.get("podId"))
        if pod is None or pod.terminated:
            return 200, {"data": {"pod": None}}
        pod.polls += 1
        return 200, {"data": {"pod": self._pod_fields(pod)}}

    def _op_myself(self, call_input: dict) -> tuple[int, dict]:
        pods = [self._pod_fields(p) for p in self.pods.values() if not p.terminated]
        return 200, {"data": {"myself": {"pods": pods}}}

    def _op_podTerminate(self, call_input: dict) -> tuple[int, dict]:
        if self.terminate_error:
            return 200, {"errors": [{"message": self.terminate_error}]}
        pod = self.pods.get(call_input.get("podId"))
        if pod is None or pod.terminated:
            return 200, {"errors": [{"message": "pod not found"}]}
        pod.terminated = True
        if self.on_terminate:
            threading.Thread(target=self.on_terminate, args=(pod,), daemon=True).start()
        return 200, {"data": {"podTerminate": None}}

    def _pod_fields(self, pod: FakePod) -> dict:
        ready = self.ready_after_polls is not None and pod.polls >= self.ready_after_polls
        exited = self.exited_after_polls is not None and pod.polls >= self.exited_after_polls
        uptime = int(time.monotonic() - pod.created_s) if ready else 0
        return {
            "id": pod.id, "name": pod.name, "containerDiskInGb": pod.spec.get("containerDiskInGb"),
            "costPerHr": pod.cost_per_hr, "desiredStatus": "EXITED" if exited else "RUNNING",
            "dockerArgs": pod.spec.get("dockerArgs", ""), "dockerId": None, "env": [f"{k}={v}" for k, v in pod.env.items()],
            "gpuCount": pod.spec.get("gpuCount", 1), "imageName": pod.spec.get("imageName"),
            "lastStatusChange": "Rented by User", "machineId": "fakemachine1", "memoryInGb": 62, "podType": "RESERVED",
            "port": None, "ports": "", "uptimeSeconds": uptime, "vcpuCount": 8, "volumeInGb": pod.spec.get("volumeInGb", 0),
            "volumeMountPath": pod.spec.get("volumeMountPath"),
            "runtime": {"ports": []} if ready and not exited else None,
            "machine": {"gpuDisplayName": GPU_TYPES[pod.spec["gpuTypeId"]]["displayName"]},
        }


# --- a small reader for the GraphQL input literals the SDK writes -----------------------------------------------

_TOKEN = re.compile(r"[A-Za-z0-9_.+-]+")


def parse_input(query: str, operation: str) -> dict[str, Any] | None:
    """The `input: {...}` argument of `operation` in `query`, as Python values; None when it has none."""
    match = re.search(rf"\b{operation}\s*\(\s*input\s*:\s*", query)
    if not match:
        return None
    value, _ = _parse_value(query, match.end())
    return value


def _parse_value(text: str, i: int) -> tuple[Any, int]:
    i = _skip(text, i)
    if text[i] == '"':
        end = i + 1
        while text[end] != '"':
            end += 2 if text[end] == "\\" else 1
        return json.loads(text[i:end + 1]), end + 1  # GraphQL string escapes are JSON's
    if text[i] == "{":
        obj, i = {}, _skip(text, i + 1)
        while text[i] != "}":
            key = _TOKEN.match(text, i)
            i = _skip(text, key.end())
            assert text[i] == ":", f"expected ':' at {i} in {text!r}"
            obj[key.group()], i = _parse_value(text, i + 1)
            i = _skip(text, i)
        return obj, i + 1
    if text[i] == "[":
        items, i = [], _skip(text, i + 1)
        while text[i] != "]":
            item, i = _parse_value(text, i)
            items.append(item)
            i = _skip(text, i)
        return items, i + 1
    token = _TOKEN.match(text, i)
    word = token.group()
    literals = {"true": True, "false": False, "null": None}
    if word in literals:
        return literals[word], token.end()
    try:
        return (float(word) if "." in word else int(word)), token.end()
    except ValueError:
        return word, token.end()  # an enum such as SECURE


def _skip(text: str, i: int) -> int:
    while text[i] in " \t\r\n,":
        i += 1
    return i
