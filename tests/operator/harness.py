"""Test harness for the operator's integration tests: kmock's Kubernetes emulator served over HTTP
from a background thread, the real `loraplex-operator` as a subprocess against it, and helpers
that play the parts of the Kubernetes controllers kmock does not have (a ReplicaSet creating
Pods from the operator's Deployment, the kubelet marking them Ready).
"""
from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import httpx
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

GROUP, VERSION = "loraplex.dev", "v1alpha1"

# Every resource the operator touches must be declared, or kmock answers 404 to discovery.
RESOURCES: dict[str, dict[str, Any]] = {
    "v1/namespaces": dict(namespaced=False, kind="Namespace"),
    "v1/pods": dict(namespaced=True, kind="Pod", subresources={"status"}),
    "v1/configmaps": dict(namespaced=True, kind="ConfigMap"),
    "v1/services": dict(namespaced=True, kind="Service", subresources={"status"}),
    "v1/secrets": dict(namespaced=True, kind="Secret"),
    "v1/events": dict(namespaced=True, kind="Event"),
    "apps/v1/deployments": dict(namespaced=True, kind="Deployment", subresources={"status", "scale"}),
    "networking.k8s.io/v1/ingresses": dict(namespaced=True, kind="Ingress", subresources={"status"}),
    "coordination.k8s.io/v1/leases": dict(namespaced=True, kind="Lease"),
    f"{GROUP}/{VERSION}/basemodeldeployments": dict(
        namespaced=True, kind="BaseModelDeployment", singular="basemodeldeployment",
        shortnames={"bmd"}, subresources={"status", "scale"}),
    f"{GROUP}/{VERSION}/loraadapters": dict(
        namespaced=True, kind="LoraAdapter", singular="loraadapter", shortnames={"lora"},
        subresources={"status"}),
}
VERBS = {"get", "list", "watch", "create", "patch", "delete"}


def api_path(api_version: str, plural: str, namespace: str | None = None, name: str | None = None,
             sub: str | None = None) -> str:
    root = f"/apis/{api_version}" if "/" in api_version else f"/api/{api_version}"
    p = root + (f"/namespaces/{namespace}" if namespace else "") + f"/{plural}"
    if name:
        p += f"/{name}" + (f"/{sub}" if sub else "")
    return p


def _fix_kmock_namespace_list() -> None:
    """kmock 0.8 answers 500 to a list or watch of /api/v1/namespaces (its path parser expects a
    namespace name after `namespaces`). kopf lists and watches Namespaces whenever it runs with
    --namespace (to follow the namespaces its patterns match), so parse that path as the list of
    the cluster-scoped Namespace resource it is. Idempotent; test processes only."""
    from kmock._internal import parsing

    if getattr(parsing.parse_path, "_loraplex_fixed", False):
        return
    original = parsing.parse_path

    def parse_path(path: str):
        if path.strip("/") == "api/v1/namespaces":
            return parsing.ParsedPath(group="", version="v1", plural="namespaces")
        return original(path)

    parse_path._loraplex_fixed = True  # type: ignore[attr-defined]
    parsing.parse_path = parse_path


def _emulator_class(keep_log: bool):
    """kmock.KubernetesEmulator, or (keep_log=False) one whose request log holds only the requests
    in flight.

    kmock 0.8 costs more per request with every request it has served: RawHandler._handle
    (kmock/_internal/apps.py) tries each reaction with `request in payload._source`, which
    dsl.View.__contains__ answers by iterating the view, i.e. Filter.__iter__ over Root._requests
    (every request since the start), evaluating the filter's criteria on each. The emulator's own
    reactions are such filters. The harness keeps its own log (`log`, in arrival order) and takes
    each request out of kmock's once it has been answered, so that matching looks at the few
    requests in flight only (tests/operator/kmock_cost.py measures both)."""
    import kmock

    if keep_log:
        return kmock.KubernetesEmulator

    class Emulator(kmock.KubernetesEmulator):
        def __attrs_post_init__(self) -> None:
            super().__attrs_post_init__()
            self.log: list[Any] = []

        async def _handle(self, request):  # type: ignore[no-untyped-def]
            self.log.append(request)
            try:
                return await super()._handle(request)
            finally:
                for i in range(len(self._requests) - 1, -1, -1):  # by identity: requests may compare equal
                    if self._requests[i] is request:
                        del self._requests[i]
                        break
    return Emulator


class FakeCluster:
    """kmock.KubernetesEmulator on a local port, run by its own event loop in a thread. With
    keep_log=False (the default), kmock's own request log is kept short (see _emulator_class)."""

    # The Gateway API Inference Extension's pool, for clusters that have its CRD installed.
    INFERENCE_POOL = {"inference.networking.k8s.io/v1/inferencepools": dict(
        namespaced=True, kind="InferencePool", singular="inferencepool", subresources={"status"})}
    # The KEDA HTTP add-on's HTTPScaledObject, for clusters that have it installed.
    KEDA_HTTP = {"http.keda.sh/v1alpha1/httpscaledobjects": dict(
        namespaced=True, kind="HTTPScaledObject", singular="httpscaledobject", shortnames={"httpso"},
        subresources={"status"})}

    def __init__(self, extra_resources: dict[str, dict[str, Any]] | None = None, keep_log: bool = False) -> None:
        self.extra_resources = dict(extra_resources or {})
        self.keep_log = keep_log
        self.url: str = ""
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.emulator: Any = None
        self.http = None  # type: httpx.Client | None

    def __enter__(self) -> "FakeCluster":
        self._thread = threading.Thread(target=self._run, name="kmock", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("kmock did not start")
        if self._error:
            raise self._error
        self.http = httpx.Client(base_url=self.url, timeout=10, trust_env=False)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.http:
            self.http.close()
        if self._loop and self._stop:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread:
            self._thread.join(10)

    def _run(self) -> None:
        import kmock

        _fix_kmock_namespace_list()

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            async with _emulator_class(self.keep_log)() as k, kmock.Server(k) as srv:
                for key, info in {**RESOURCES, **self.extra_resources}.items():
                    k.resources[key] = kmock.ResourceInfo(verbs=VERBS, **info)
                self.emulator = k
                self.url = str(srv.url).rstrip("/")
                self._ready.set()
                await self._stop.wait()

        try:
            asyncio.run(main())
        except BaseException as e:  # noqa: BLE001 - surfaced to the test thread
            self._error = e
            self._ready.set()

    def install(self, resources: dict[str, dict[str, Any]]) -> None:
        """Serve more resources from now on (a CRD installed while the operator runs)."""
        import kmock

        async def add() -> None:
            for key, info in resources.items():
                self.emulator.resources[key] = kmock.ResourceInfo(verbs=VERBS, **info)
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(add(), self._loop).result(10)

    # --- the API, as a client would use it ----------------------------------------------------
    def _call(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        assert self.http is not None
        headers = {"Content-Type": content_type} if body is not None else {}
        resp = self.http.request(method, path, content=json.dumps(body) if body is not None else None,
                                 headers=headers)
        if resp.status_code == 404 and method == "GET":
            return None
        if resp.status_code >= 400:
            raise RuntimeError(f"{method} {path}: {resp.status_code} {resp.text[:500]}")
        return resp.json() if resp.content else None

    def create(self, obj: dict) -> dict:
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", "default")
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("resourceVersion", "1")
        meta.setdefault("generation", 1)
        meta.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        plural = PLURALS[obj["kind"]]
        return self._call("POST", api_path(obj["apiVersion"], plural, meta["namespace"]), obj)

    def get(self, api_version: str, plural: str, namespace: str, name: str) -> dict | None:
        return self._call("GET", api_path(api_version, plural, namespace, name))

    def list(self, api_version: str, plural: str, namespace: str | None = None) -> list[dict]:
        return (self._call("GET", api_path(api_version, plural, namespace)) or {}).get("items", [])

    def patch(self, api_version: str, plural: str, namespace: str, name: str, patch: dict,
              sub: str | None = None) -> dict:
        return self._call("PATCH", api_path(api_version, plural, namespace, name, sub), patch,
                          "application/merge-patch+json")

    def update_spec(self, api_version: str, plural: str, namespace: str, name: str, spec_patch: dict) -> dict:
        """A user's spec change: kmock does not bump metadata.generation, the test does."""
        live = self.get(api_version, plural, namespace, name)
        assert live is not None
        gen = int(live["metadata"].get("generation", 1)) + 1
        return self.patch(api_version, plural, namespace, name, {"metadata": {"generation": gen}, "spec": spec_patch})

    def delete(self, api_version: str, plural: str, namespace: str, name: str) -> Any:
        return self._call("DELETE", api_path(api_version, plural, namespace, name))

    # --- what was asked of it -------------------------------------------------------------------
    def requests(self) -> list[Any]:
        """Every request so far, in arrival order."""
        return list(self.emulator._requests if self.keep_log else self.emulator.log)

    def writes(self, since: int = 0) -> list[str]:
        """Write requests (POST/PATCH/PUT/DELETE) after the `since`-th request, as 'METHOD path'."""
        out = []
        for r in self.requests()[since:]:
            method = str(getattr(r.method, "value", r.method)).upper()
            if method in ("POST", "PATCH", "PUT", "DELETE"):
                out.append(f"{method} {r.url.path}")
        return out

    def write_kubeconfig(self, path: Path) -> Path:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "test-token"}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "tester",
                                                        "namespace": "default"}}],
        }))
        return path


PLURALS = {
    "Namespace": "namespaces", "Pod": "pods", "ConfigMap": "configmaps", "Service": "services",
    "Secret": "secrets", "Event": "events", "Deployment": "deployments", "Ingress": "ingresses",
    "BaseModelDeployment": "basemodeldeployments", "LoraAdapter": "loraadapters", "Lease": "leases",
    "InferencePool": "inferencepools", "HTTPScaledObject": "httpscaledobjects",
}


class OperatorProcess:
    """The real `loraplex-operator` console script, run against the fake cluster."""

    def __init__(self, kubeconfig: Path, log_path: Path, env: dict[str, str] | None = None,
                 name: str = "loraplex-operator-0", namespace: str = "loraplex-system",
                 scope: tuple[str, ...] = ("-A",)):
        self.kubeconfig = kubeconfig
        self.log_path = log_path
        self.scope = scope  # kopf's namespace flags: -A, or --namespace=... as the chart renders them
        self.env = env or {}
        self.name, self.namespace = name, namespace
        self.metrics_port = free_port(["127.0.0.1"])
        self.proc: subprocess.Popen | None = None

    def start(self) -> "OperatorProcess":
        env = dict(os.environ)
        env.update({"KUBECONFIG": str(self.kubeconfig), "PYTHONUNBUFFERED": "1", "NO_PROXY": "*",
                    # as the chart's downward API sets them: leader election is on
                    "POD_NAME": self.name, "POD_NAMESPACE": self.namespace,
                    "LORAPLEX_METRICS_PORT": str(self.metrics_port), "LORAPLEX_METRICS_ADDR": "127.0.0.1",
                    "LORAPLEX_LEASE_DURATION": "4", "LORAPLEX_LEASE_RENEW_DEADLINE": "3",
                    "LORAPLEX_LEASE_RETRY_PERIOD": "0.5"})
        env.update(self.env)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [str(BIN / "loraplex-operator"), *self.scope, "--standalone", "--verbose"],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if getattr(self, "_log", None):
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no cleanup, the Lease is not released (a crashed or partitioned leader)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if getattr(self, "_log", None):
            self._log.close()

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=20, trust_env=False).text

    def rss_bytes(self) -> int:
        """Resident memory of the operator process (Linux /proc)."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0


def from_operator(request: Any) -> bool:
    """A request kmock recorded that the operator (its client or kopf's) made."""
    ua = {k.lower(): v for k, v in request.headers.items()}.get("user-agent", "")
    return ua.startswith(("loraplex-operator", "kopf"))


def wait_for(fn: Callable[[], Any], timeout: float, what: str, interval: float = 0.2,
             on_timeout: Callable[[], str] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except Exception as e:  # noqa: BLE001 - keep polling, report the last one
            last = e
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    extra = on_timeout() if on_timeout else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}\n{extra}")


def pod_from_deployment(deployment: dict, name: str, ip: str, ready: bool = True) -> dict:
    """A Pod as a ReplicaSet would create it from the operator's Deployment, with the status a
    kubelet would report (IP, Running, Ready)."""
    template = copy.deepcopy(deployment["spec"]["template"])
    meta = template.get("metadata", {})
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": deployment["metadata"]["namespace"],
                     "labels": meta.get("labels", {})},
        "spec": template["spec"],
        "status": pod_status(ip, ready),
    }


def pod_status(ip: str, ready: bool) -> dict:
    return {"phase": "Running", "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}


# --- engine pods: the parts of a ReplicaSet and a kubelet that kmock does not have --------------

def free_port(ips: list[str]) -> int:
    """A TCP port free on every one of the loopback addresses (each engine binds its own)."""
    import random
    import socket
    for _ in range(200):
        port = random.randint(20000, 60000)
        socks = []
        try:
            for ip in ips:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind((ip, port))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port")


class EnginePod:
    """One engine pod: a Pod object in the fake cluster, and its container (`loraplex-engine`
    with the command line the operator rendered) as a local process on its own 127.0.0.x."""

    def __init__(self, kubelet: "Kubelet", name: str, ip: str, bind_ip: str | None = None):
        self.kubelet, self.name, self.ip = kubelet, name, ip
        self.bind_ip = bind_ip or ip  # where the engine listens (behind a FaultProxy: not the Pod's IP)
        self.proxy: FaultProxy | None = None
        self.proc: subprocess.Popen | None = None
        self.ready = False
        self.dir = kubelet.workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.starts = 0

    def argv(self) -> list[str]:
        dep = self.kubelet.deployment()
        (c,) = [c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "engine"]
        args = list(c["args"])
        args[args.index("--host") + 1] = self.bind_ip
        # The volumes, mounted as the kubelet would: each to its own local folder.
        volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"].get("volumes", [])}
        mounts = {}
        for m in c.get("volumeMounts", []):
            vol = volumes[m["name"]]
            local = self.dir / "volumes" / m["name"]
            local.mkdir(parents=True, exist_ok=True)
            if "configMap" in vol:
                # The kubelet has not synced the ConfigMap volume yet (that may take a minute):
                # it holds an empty list, so what this engine serves came through the operator.
                (local / "adapters.json").write_text('{"adapters": []}\n')
            elif "secret" in vol:
                secret = self.kubelet.cluster.get("v1", "secrets", self.kubelet.namespace, vol["secret"]["secretName"])
                assert secret is not None, f"Secret {vol['secret']['secretName']} missing"
                import base64
                for item in vol["secret"].get("items") or [{"key": k, "path": k} for k in secret["data"]]:
                    (local / item["path"]).write_bytes(base64.b64decode(secret["data"][item["key"]]))
            mounts[m["mountPath"]] = str(local)
        # The pod's /tmp scratch volume is not rewritten: no rendered argument points into it, and
        # the tests' own paths (pytest's tmp_path, e.g. the model folder) live under the host's /tmp.
        mounts.pop("/tmp", None)
        for i, a in enumerate(args):
            for src, dst in mounts.items():
                if a.startswith(src + "/"):
                    args[i] = dst + a[len(src):]
        return c["command"] + args

    def start(self) -> None:
        self.starts += 1
        log = open(self.dir / f"engine-{self.starts}.log", "wb")
        cmd = self.argv()
        cmd[0] = str(BIN / cmd[0])
        # POD_NAME as the downward API sets it (render._engine_env).
        env = dict(os.environ, NO_PROXY="*", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", POD_NAME=self.name)
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def url(self, path: str = "") -> str:
        return f"http://{self.ip}:{self.kubelet.port}{path}"

    def log(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(self.dir.glob("engine-*.log")))


class Kubelet:
    """Creates the Pods of a base from the operator's Deployment (as its ReplicaSet would), runs
    their containers, probes /ready like the readinessProbe and writes each Pod's Ready condition."""

    def __init__(self, cluster: FakeCluster, namespace: str, base: str, port: int, workdir: Path):
        self.cluster, self.namespace, self.base, self.port, self.workdir = cluster, namespace, base, port, workdir
        self.pods: dict[str, EnginePod] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._probe_loop, name="kubelet", daemon=True)
        self._http = httpx.Client(timeout=2, trust_env=False)

    def deployment(self) -> dict:
        dep = self.cluster.get("apps/v1", "deployments", self.namespace, self.base)
        assert dep is not None, "the operator has not created the Deployment"
        return dep

    def add_pod(self, name: str, ip: str, behind_proxy: str | None = None) -> EnginePod:
        """`behind_proxy`: the engine listens on that address, and a FaultProxy on the Pod's IP
        forwards to it (a test can then make the engine's admin API answer 500)."""
        pod = EnginePod(self, name, ip, bind_ip=behind_proxy)
        if behind_proxy:
            pod.proxy = FaultProxy(ip, self.port, behind_proxy)
        self.pods[name] = pod
        body = pod_from_deployment(self.deployment(), name, ip, ready=False)
        self.cluster.create(body)
        pod.start()
        if not self._thread.is_alive():
            self._thread.start()
        return pod

    def restart(self, name: str) -> None:
        """The container restarts (same Pod, new engine process): NotReady until /ready again."""
        pod = self.pods[name]
        pod.stop()
        # The kubelet sees the container die: the Pod is NotReady until /ready answers again.
        self.cluster.patch("v1", "pods", self.namespace, pod.name, {"status": pod_status(pod.ip, False)},
                           sub="status")
        pod.ready = False
        pod.start()

    def _probe_loop(self) -> None:
        while not self._stop.is_set():
            for pod in list(self.pods.values()):
                try:
                    ok = self._http.get(pod.url("/ready")).status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok != pod.ready:
                    try:
                        self.cluster.patch("v1", "pods", self.namespace, pod.name,
                                           {"status": pod_status(pod.ip, ok)}, sub="status")
                        pod.ready = ok
                    except Exception:  # noqa: BLE001 - the cluster may be going away
                        pass
            self._stop.wait(0.4)

    def wait_ready(self, timeout: float = 90) -> None:
        def all_ready() -> bool:
            for pod in self.pods.values():
                if pod.proc is not None and pod.proc.poll() is not None:
                    raise AssertionError(f"engine {pod.name} exited:\n{pod.log()}")
            return all(p.ready for p in self.pods.values())
        wait_for(all_ready, timeout, "engine pods Ready",
                 on_timeout=lambda: "\n".join(p.log() for p in self.pods.values()))

    def close(self) -> None:
        self._stop.set()
        for pod in self.pods.values():
            pod.stop()
            if pod.proxy is not None:
                pod.proxy.close()
        if self._thread.is_alive():
            self._thread.join(5)
        self._http.close()


class FaultProxy:
    """A loopback HTTP proxy in front of one engine, on the Pod's IP: forwards every request, or,
    while `failing`, answers 500 (in the engine's error shape) to the admin API the operator calls
    (/info, /v1/adapters...) and lets the probes and inference through, as an engine whose
    registry is in trouble would. Records when each failed answer was given."""

    FAULTY = ("/info", "/v1/adapters")
    MESSAGE = "injected fault: internal server error"

    def __init__(self, ip: str, port: int, target_ip: str):
        import http.server

        self.failing = False
        self.failed_at: list[tuple[float, str]] = []  # (monotonic time, "METHOD path")
        self.target = f"http://{target_ip}:{port}"
        self.client = httpx.Client(timeout=30, trust_env=False)
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if proxy.failing and self.path.startswith(proxy.FAULTY):
                    proxy.failed_at.append((time.monotonic(), f"{self.command} {self.path}"))
                    status, headers = 500, {"Content-Type": "application/json"}
                    data = json.dumps({"error": {"message": FaultProxy.MESSAGE, "type": "server_error",
                                                 "param": None, "code": "internal_error"}}).encode()
                else:
                    try:
                        r = proxy.client.request(self.command, proxy.target + self.path, content=body,
                                                 headers={k: v for k, v in self.headers.items()
                                                          if k.lower() not in ("host", "content-length")})
                        status, data = r.status_code, r.content
                        headers = {k: v for k, v in r.headers.items()
                                   if k.lower() in ("content-type", "retry-after")}
                    except httpx.HTTPError:
                        status, headers, data = 502, {"Content-Type": "text/plain"}, b"engine unreachable"
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = _forward

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((ip, port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name=f"proxy-{ip}", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.client.close()


@contextlib.contextmanager
def operator_cluster(tmp: Path, env: dict[str, str]):
    """A FakeCluster with the real operator running against it (`cluster.operator`), both stopped
    on exit: what a module of kopf-against-the-API tests shares."""
    with FakeCluster() as c:
        op = OperatorProcess(c.write_kubeconfig(tmp / "kubeconfig"), tmp / "operator.log", env=env).start()
        c.operator = op  # type: ignore[attr-defined]
        try:
            yield c
        finally:
            op.stop()
