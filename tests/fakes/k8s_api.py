"""A fake Kubernetes API server for exactly the calls the kubernetes pool provider makes, in the real
API's shapes (https://kubernetes.io/docs/reference/using-api/api-concepts/):

- GET  /api/v1/namespaces/{ns}/pods?labelSelector=...                 -> PodList (metadata.resourceVersion)
- GET  /api/v1/namespaces/{ns}/pods?watch=true&resourceVersion=N&...   -> newline-delimited watch events
  ({"type": "ADDED"|"MODIFIED"|"DELETED"|"ERROR", "object": ...}); a version older than the retained
  history gets 200 and one ERROR event carrying a 410 `Expired` Status, as the watch cache answers.
- GET/PATCH /apis/apps/v1/namespaces/{ns}/{deployments|statefulsets}/{name}/scale -> autoscaling/v1 Scale
  (PATCH: merge or strategic merge patch).

Errors are `Status` objects. A small controller plays the ReplicaSet/StatefulSet: scaling up
creates Pending pods, scaling down marks pods terminating (deletionTimestamp). Pods become Ready,
terminate and disappear when a test says so (make_ready, terminate, delete), or at once with
`auto_ready`/`auto_delete`. Optionally it enforces RBAC rules (a Role's `rules`): anything else is
403 Forbidden, as the API server answers a service account without the permission.

It runs in its own thread and event loop, so tests in any loop (or thread) can drive it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import json
import re
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

_SELECTOR_TERM = re.compile(r"\s*(!?)([\w./-]+)\s*(?:(==|=|!=)\s*([\w.-]*)|\s+(in|notin)\s*\(([^)]*)\))?\s*$")


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_selector(selector: str) -> list[Callable[[dict[str, str]], bool]]:
    """A label selector (`a=b,c!=d,e,!f,g in (x,y),h notin (z)`) as predicates over labels."""
    terms: list[str] = []
    depth, current = 0, ""
    for ch in selector:  # split on commas outside parentheses
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += ch
    if current.strip():
        terms.append(current)
    preds: list[Callable[[dict[str, str]], bool]] = []
    for term in terms:
        m = _SELECTOR_TERM.match(term)
        if m is None:
            raise ValueError(f"unable to parse requirement: {term!r}")
        neg, key, op, value, set_op, values = m.groups()
        if op in ("=", "=="):
            preds.append(lambda labels, k=key, v=value: labels.get(k) == v)
        elif op == "!=":
            preds.append(lambda labels, k=key, v=value: labels.get(k) != v)
        elif set_op:
            options = {v.strip() for v in values.split(",")}
            if set_op == "in":
                preds.append(lambda labels, k=key, o=options: labels.get(k) in o)
            else:
                preds.append(lambda labels, k=key, o=options: labels.get(k) not in o)
        elif neg:
            preds.append(lambda labels, k=key: k not in labels)
        else:
            preds.append(lambda labels, k=key: k in labels)
    return preds


def status(code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                            "message": message, "reason": reason, "code": code}  # fmt: skip
    if details:
        body["details"] = details
    return body


def _json(body: Any, status: int = 200) -> web.Response:
    # Exactly "application/json", as the API server sends it (no charset): clients match on it.
    return web.Response(body=json.dumps(body).encode(), status=status, headers={"Content-Type": "application/json"})


@dataclass
class Workload:
    kind: str  # "deployments" | "statefulsets"
    name: str
    labels: dict[str, str]  # the pod template's labels
    port: int
    ips: Iterator[str]  # pod IPs handed out in order
    replicas: int = 0
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    created: str = field(default_factory=now)
    resource_version: int = 1
    ordinals: itertools.count = field(default_factory=itertools.count)


class FakeKubernetes:
    def __init__(self, namespace: str = "tetri", rules: list[dict[str, Any]] | None = None,
                 auto_ready: bool = False, auto_delete: bool = False, history: int = 1000) -> None:  # fmt: skip
        self.namespace = namespace
        self.rules = rules
        self.auto_ready, self.auto_delete = auto_ready, auto_delete
        self.history_limit = history
        self.workloads: dict[tuple[str, str], Workload] = {}
        self.pods: dict[str, dict[str, Any]] = {}  # by name
        self.rv = 100
        self.history: list[tuple[int, str, dict[str, Any]]] = []  # (resourceVersion, type, pod)
        self.oldest_kept = 0  # watches from an older version get 410 Expired
        self.watchers: list[asyncio.Queue[tuple[int, str, dict[str, Any]] | None]] = []
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # (method, path, query) of every call
        self._partitioned = False
        self.loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.thread = threading.Thread(target=self.loop.run_forever, name="fake-k8s", daemon=True)

    # ---- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> FakeKubernetes:
        self.thread.start()
        self._call(self._serve())
        return self

    def stop(self) -> None:
        self._call(self._shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    def _sync(self, fn: Callable[..., Any], *args: Any) -> Any:
        async def run() -> Any:
            return fn(*args)

        return self._call(run())

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/{ns}/pods", self._pods)
        app.router.add_route("*", "/apis/apps/v1/namespaces/{ns}/{kind}/{name}/scale", self._scale)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _shutdown(self) -> None:
        self._drop_watches()
        if self._runner is not None:
            await self._runner.cleanup()

    # ---- test helpers (thread-safe) -----------------------------------------------------------------
    def add_workload(self, kind: str, name: str, labels: dict[str, str], port: int, ips: Iterable[str],
                     replicas: int = 0) -> None:  # fmt: skip
        self._sync(self._add_workload, Workload(kind, name, labels, port, iter(ips)), replicas)

    def make_ready(self, pod: str) -> None:
        self._sync(self._make_ready, pod)

    def terminate(self, pod: str) -> None:
        self._sync(self._terminate, pod)

    def delete(self, pod: str) -> None:
        self._sync(self._delete, pod)

    def drop_watches(self) -> None:
        """End every open watch stream, as the API server does at its timeout or on a restart."""
        self._sync(self._drop_watches)

    @contextlib.contextmanager
    def partitioned(self) -> Iterator[None]:
        """Changes made inside reach no open watch; after, the history is compacted and the streams
        ended: a watch resuming from its last version gets 410 Expired and has to list again."""
        self._sync(setattr, self, "_partitioned", True)
        try:
            yield
        finally:
            self._sync(setattr, self, "_partitioned", False)
            self._sync(self._compact)
            self._sync(self._drop_watches)

    def compact(self) -> None:
        """Forget the event history (etcd compaction): resuming from an older version gets 410."""
        self._sync(self._compact)

    def pod_names(self, workload: str | None = None) -> list[str]:
        return self._sync(
            lambda: sorted(
                n for n, p in self.pods.items() if workload is None or p["metadata"]["name"].startswith(workload + "-")
            )
        )

    def replicas(self, kind: str, name: str) -> int:
        return self._sync(lambda: self.workloads[(kind, name)].replicas)

    def watch_requests(self) -> list[dict[str, str]]:
        return self._sync(lambda: [q for m, p, q in self.requests if q.get("watch") in ("true", "1")])

    # ---- state changes (on the fake's loop) ---------------------------------------------------------
    def _bump(self) -> int:
        self.rv += 1
        return self.rv

    def _emit(self, kind: str, pod: dict[str, Any]) -> None:
        rv = int(pod["metadata"]["resourceVersion"])
        event = (rv, kind, json.loads(json.dumps(pod)))
        self.history.append(event)
        if len(self.history) > self.history_limit:
            dropped = self.history.pop(0)
            self.oldest_kept = dropped[0]
        if not self._partitioned:
            for queue in self.watchers:
                queue.put_nowait(event)

    def _compact(self) -> None:
        self.history.clear()
        self.oldest_kept = self.rv

    def _drop_watches(self) -> None:
        for queue in self.watchers:
            queue.put_nowait(None)

    def _add_workload(self, wl: Workload, replicas: int) -> None:
        self.workloads[(wl.kind, wl.name)] = wl
        self._set_replicas(wl, replicas)

    def _set_replicas(self, wl: Workload, replicas: int) -> None:
        wl.replicas = replicas
        wl.resource_version = self._bump()
        mine = [p for p in self.pods.values() if p["metadata"]["labels"].get("fake/workload") == wl.name
                and "deletionTimestamp" not in p["metadata"]]  # fmt: skip
        for _ in range(replicas - len(mine)):
            self._create_pod(wl)
        # Scale down keeps the first `replicas`: a StatefulSet its lowest ordinals; a ReplicaSet its
        # ready pods, oldest first (controller.ActivePods ranking, simplified).
        if wl.kind == "statefulsets":
            mine.sort(key=lambda p: p["_ordinal"])
        else:
            mine.sort(key=lambda p: (not self._ready(p), p["_ordinal"]))
        for pod in mine[replicas:]:
            self._terminate(pod["metadata"]["name"])

    @staticmethod
    def _ready(pod: dict[str, Any]) -> bool:
        return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))

    def _create_pod(self, wl: Workload) -> None:
        ordinal = next(wl.ordinals)
        if wl.kind == "statefulsets":
            name = f"{wl.name}-{ordinal}"
        else:
            name = f"{wl.name}-7d9c8b6f5-{uuid.uuid4().hex[:5]}"
        owner_kind = "StatefulSet" if wl.kind == "statefulsets" else "ReplicaSet"
        pod = {
            "metadata": {
                "name": name, "namespace": self.namespace, "uid": str(uuid.uuid4()),
                "resourceVersion": str(self._bump()), "creationTimestamp": now(),
                "labels": {**wl.labels, "fake/workload": wl.name},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": owner_kind, "name": wl.name, "uid": wl.uid,
                                     "controller": True, "blockOwnerDeletion": True}],
            },
            "spec": {
                "containers": [{"name": "engine", "image": "tetri-worker:latest",
                                "ports": [{"name": "http", "containerPort": wl.port, "protocol": "TCP"}]}],
                "restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "nodeName": "node-1",
            },
            "status": {"phase": "Pending", "qosClass": "BestEffort",
                       "conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": now()}]},
        }  # fmt: skip
        pod["_ip"] = next(wl.ips)  # kept aside: a pod gets its IP when it runs
        pod["_ordinal"] = ordinal
        self.pods[name] = pod
        self._emit("ADDED", self._public(pod))
        if self.auto_ready:
            self._make_ready(name)

    @staticmethod
    def _public(pod: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in pod.items() if not k.startswith("_")}

    def _make_ready(self, name: str) -> None:
        pod = self.pods[name]
        ip, started = pod["_ip"], now()
        pod["status"] = {
            "phase": "Running", "hostIP": "10.0.0.1", "hostIPs": [{"ip": "10.0.0.1"}], "podIP": ip,
            "podIPs": [{"ip": ip}], "startTime": started, "qosClass": "BestEffort",
            "conditions": [{"type": t, "status": "True", "lastTransitionTime": started}
                           for t in ("PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady",
                                     "PodScheduled")],
            "containerStatuses": [{"name": "engine", "ready": True, "started": True, "restartCount": 0,
                                   "image": "tetri-worker:latest", "imageID": "", "containerID": "containerd://0",
                                   "state": {"running": {"startedAt": started}}}],
        }  # fmt: skip
        pod["metadata"]["resourceVersion"] = str(self._bump())
        self._emit("MODIFIED", self._public(pod))

    def _terminate(self, name: str) -> None:
        pod = self.pods[name]
        pod["metadata"]["deletionTimestamp"] = now()
        pod["metadata"]["deletionGracePeriodSeconds"] = 30
        pod["metadata"]["resourceVersion"] = str(self._bump())
        self._emit("MODIFIED", self._public(pod))
        if self.auto_delete:
            self._delete(name)

    def _delete(self, name: str) -> None:
        pod = self.pods.pop(name)
        pod["metadata"]["resourceVersion"] = str(self._bump())
        self._emit("DELETED", self._public(pod))

    # ---- RBAC ---------------------------------------------------------------------------------------
    def _allowed(self, verb: str, resource: str, name: str | None) -> bool:
        if self.rules is None:
            return True
        for rule in self.rules:
            group = "" if resource == "pods" else "apps"
            if group not in rule.get("apiGroups", []) or resource not in rule.get("resources", []):
                continue
            if verb not in rule.get("verbs", []):
                continue
            names = rule.get("resourceNames")
            if names and name not in names:
                continue
            return True
        return False

    def _forbidden(self, verb: str, resource: str, name: str | None) -> web.Response:
        what, _, sub = resource.partition("/")
        group = "" if what == "pods" else "apps"
        message = (f'{what}{"." + group if group else ""} {f"{name!r} " if name else ""}is forbidden: User '
                   f'"system:serviceaccount:{self.namespace}:tetri" cannot {verb} resource "{what}"'
                   f'{f" in API group {group!r}" if group else ""} in the namespace "{self.namespace}"')  # fmt: skip
        return _json(status(403, "Forbidden", message, {"name": name or "", "kind": what}), status=403)

    # ---- handlers -----------------------------------------------------------------------------------
    async def _pods(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        self.requests.append((request.method, request.path, query))
        watching = query.get("watch") in ("true", "1")
        if not self._allowed("watch" if watching else "list", "pods", None):
            return self._forbidden("watch" if watching else "list", "pods", None)
        if request.match_info["ns"] != self.namespace:
            listing = {
                "kind": "PodList",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self.rv)},
                "items": [],
            }
            return _json(listing)
        try:
            preds = parse_selector(query.get("labelSelector", ""))
        except ValueError as exc:
            return _json(status(400, "BadRequest", str(exc)), status=400)

        def matches(pod: dict[str, Any]) -> bool:
            return all(p(pod["metadata"].get("labels", {})) for p in preds)

        if not watching:
            items = [self._public(p) for p in self.pods.values() if matches(p)]
            return _json({"kind": "PodList", "apiVersion": "v1",
                                      "metadata": {"resourceVersion": str(self.rv)}, "items": items})  # fmt: skip
        return await self._watch(request, query, matches)

    async def _watch(self, request: web.Request, query: dict[str, str], matches: Callable[[dict], bool]) -> Any:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)

        async def send(kind: str, obj: dict[str, Any]) -> None:
            if kind != "ERROR":
                obj = {"kind": "Pod", "apiVersion": "v1", **obj}
            await response.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

        since = query.get("resourceVersion")
        queue: asyncio.Queue[tuple[int, str, dict[str, Any]] | None] = asyncio.Queue()
        if since not in (None, "", "0") and int(since) < self.oldest_kept:
            message = f"too old resource version: {since} ({self.oldest_kept})"
            await send("ERROR", status(410, "Expired", message))
            return response
        if since in (None, "", "0"):  # "start at most recent": the current state as synthetic ADDED events
            for pod in list(self.pods.values()):
                if matches(pod):
                    await send("ADDED", self._public(pod))
        else:
            for rv, kind, pod in list(self.history):
                if rv > int(since) and matches(pod):
                    await send(kind, pod)
        self.watchers.append(queue)
        timeout = float(query.get("timeoutSeconds", 1800))
        try:
            deadline = self.loop.time() + timeout
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), max(0.0, deadline - self.loop.time()))
                except TimeoutError:
                    break
                if event is None:
                    break
                _, kind, pod = event
                if matches(pod):
                    await send(kind, pod)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.watchers.remove(queue)
        return response

    async def _scale(self, request: web.Request) -> web.Response:
        kind, name = request.match_info["kind"], request.match_info["name"]
        self.requests.append((request.method, request.path, dict(request.query)))
        verb = {"GET": "get", "PATCH": "patch", "PUT": "update"}.get(request.method, request.method.lower())
        if not self._allowed(verb, f"{kind}/scale", name):
            return self._forbidden(verb, f"{kind}/scale", name)
        wl = self.workloads.get((kind, name)) if request.match_info["ns"] == self.namespace else None
        if wl is None or kind not in ("deployments", "statefulsets"):
            return _json(status(404, "NotFound", f'{kind}.apps "{name}" not found',
                                            {"name": name, "group": "apps", "kind": kind}), status=404)  # fmt: skip
        if request.method == "PATCH":
            ctype = request.content_type
            if ctype not in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
                return _json(status(415, "UnsupportedMediaType", "the body of the request was in an "
                                                "unknown format - accepted media types include: "
                                                "application/merge-patch+json"), status=415)  # fmt: skip
            body = await request.json()
            replicas = (body.get("spec") or {}).get("replicas") if isinstance(body, dict) else None
            if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
                message = f'Scale.autoscaling "{name}" is invalid: spec.replicas: Invalid value: {replicas!r}'
                return _json(status(422, "Invalid", message), status=422)
            self._set_replicas(wl, replicas)
        elif request.method != "GET":
            return _json(status(405, "MethodNotAllowed", "the server does not allow this method"),
                                     status=405)  # fmt: skip
        selector = ",".join(f"{k}={v}" for k, v in {**wl.labels, "fake/workload": wl.name}.items())
        current = sum(1 for p in self.pods.values() if p["metadata"]["labels"].get("fake/workload") == wl.name)
        return _json({
            "kind": "Scale", "apiVersion": "autoscaling/v1",
            "metadata": {"name": name, "namespace": self.namespace, "uid": wl.uid,
                         "resourceVersion": str(wl.resource_version), "creationTimestamp": wl.created},
            "spec": {"replicas": wl.replicas},
            "status": {"replicas": current, "selector": selector},
        })  # fmt: skip
