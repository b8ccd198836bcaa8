"""loraplex on a real Kubernetes cluster made by kind (`make e2e`).

One cluster for the module: build the three images (the engine's CPU variant, the CPU demo on top
of it, the operator), load them into kind, `helm install` the chart, apply manifests/cpu-demo,
wait for Ready, call the Service through `kubectl port-forward` with the OpenAI SDK for two
adapters, delete an engine pod and watch its adapters come back, scale the BaseModelDeployment
through its scale subresource, tear down.

Needs a Docker engine, kind, helm and kubectl. Where one is missing (these CI machines have only a
Docker client) the module skips with the reason printed. LORAPLEX_E2E_KEEP=1 keeps the cluster.
The steps run in order; a step whose predecessor failed is skipped with that reason.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NS, BASE = "loraplex-demo", "smollm2"
ADAPTERS = ("french", "pirate", "json")
TAG = "e2e"


def _missing() -> str | None:
    for tool in ("docker", "kind", "helm", "kubectl"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not on PATH"
    try:
        info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                              timeout=30)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 30 s"
    if info.returncode != 0 or not info.stdout.strip():
        return f"no Docker engine answers (`docker info`: {(info.stderr or info.stdout).strip()[:200]})"
    return None


_reason = _missing()
if _reason:
    print(f"\nSKIP tests/e2e (kind end-to-end): {_reason}")
    pytest.skip(_reason, allow_module_level=True)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


def run(*cmd: str, timeout: float = 900, check: bool = True, env: dict | None = None, **kw) -> str:
    print("$", " ".join(cmd), flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                         env={**os.environ, **(env or {})}, **kw)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out.stdout


class Cluster:
    def __init__(self, name: str, tmp: Path):
        self.name, self.tmp = name, tmp
        self.kubeconfig = tmp / "kubeconfig"
        self.failed: str | None = None

    def kubectl(self, *args: str, timeout: float = 600, check: bool = True) -> str:
        return run("kubectl", "--kubeconfig", str(self.kubeconfig), *args, timeout=timeout, check=check)

    def json(self, *args: str) -> dict:
        return json.loads(self.kubectl("get", *args, "-o", "json"))

    def step(self, name: str):
        if self.failed:
            pytest.skip(f"step {self.failed!r} failed before this one")
        return _Step(self, name)

    def diagnose(self) -> str:
        return self.kubectl("get", "bmd,lora,deploy,pods,events", "-A", "-o", "wide", check=False)[-6000:]


class _Step:
    def __init__(self, cluster: Cluster, name: str):
        self.cluster, self.name = cluster, name

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and exc_type is not pytest.skip.Exception:
            self.cluster.failed = self.name
            print(self.cluster.diagnose())
        return False


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kind")
    c = Cluster(f"loraplex-e2e-{uuid.uuid4().hex[:6]}", tmp)
    run("kind", "create", "cluster", "--name", c.name, "--kubeconfig", str(c.kubeconfig), "--wait", "180s")
    try:
        yield c
    finally:
        if os.environ.get("LORAPLEX_E2E_KEEP") == "1":
            print(f"keeping kind cluster {c.name} (KUBECONFIG={c.kubeconfig})")
        else:
            run("kind", "delete", "cluster", "--name", c.name, check=False, timeout=300)


def wait_for(fn, timeout: float, what: str, interval: float = 3.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except AssertionError as e:
            last = e
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


class PortForward:
    """`kubectl port-forward svc/<base> <local>:80`: the Service as a client outside sees it."""

    def __init__(self, cluster: Cluster):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(["kubectl", "--kubeconfig", str(cluster.kubeconfig), "-n", NS, "port-forward",
                                      f"svc/{BASE}", f"{self.port}:80"], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        import httpx

        def up():
            try:
                return httpx.get(f"http://127.0.0.1:{self.port}/ready", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 60, "the port-forward to answer /ready", interval=1)

    def close(self):
        self.proc.terminate()
        self.proc.wait(10)


def chat(port: int, adapter: str) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=120, max_retries=2)
    reply = client.chat.completions.create(model=adapter, max_tokens=24, temperature=0,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert reply.model == adapter
    assert reply.usage.completion_tokens > 0 and reply.choices[0].message.content.strip(), reply
    return reply.choices[0].message.content


def test_images_build_and_load(cluster: Cluster):
    with cluster.step("images"):
        run("docker", "build", "-f", "Dockerfile.engine", "--build-arg", "VARIANT=cpu", "-t", f"loraplex-engine:{TAG}",
            ".", timeout=2400)
        # QUICK=1: the demo adapters with a few training steps (same files and shapes).
        run("docker", "build", "-f", "Dockerfile.demo", "--build-arg", f"ENGINE_IMAGE=loraplex-engine:{TAG}",
            "--build-arg", "QUICK=1", "-t", f"loraplex-engine-demo:{TAG}", ".", timeout=2400)
        run("docker", "build", "-f", "Dockerfile.operator", "-t", f"loraplex-operator:{TAG}", ".", timeout=1200)
        out = run("docker", "run", "--rm", "--entrypoint", "python", f"loraplex-operator:{TAG}", "-c",
                  "import importlib.util as u; print([m for m in ('torch', 'triton', 'loraplex.engine') if u.find_spec(m)])")
        assert out.strip() == "[]", out
        out = run("docker", "run", "--rm", "--entrypoint", "python", f"loraplex-engine:{TAG}", "-c",
                  "import importlib.util as u, os; print(u.find_spec('triton') is None, os.getuid())")
        assert out.split() == ["True", "65532"], out
        for image in (f"loraplex-engine-demo:{TAG}", f"loraplex-operator:{TAG}"):
            run("kind", "load", "docker-image", image, "--name", cluster.name, timeout=900)


def test_helm_install_elects_one_leader(cluster: Cluster):
    with cluster.step("helm install"):
        # Namespaced RBAC (the chart's default): the demo's namespace exists first, is watched, and
        # its engine image (loaded into kind under a local name) is allowed.
        cluster.kubectl("apply", "-k", str(REPO / "manifests/namespaces"))
        run("helm", "install", "loraplex", "charts/loraplex", "--kubeconfig", str(cluster.kubeconfig),
            "-n", "loraplex-system", "--create-namespace", "--wait", "--timeout", "5m",
            "--set", "image.repository=loraplex-operator", "--set", f"image.tag={TAG}",
            "--set", "image.pullPolicy=Never", "--set", f"watchNamespaces={{{NS}}}",
            "--set", "engineImages.allowedPrefixes={loraplex-engine-demo}")
        pods = cluster.json("pods", "-n", "loraplex-system", "-l", "app.kubernetes.io/name=loraplex-operator")["items"]
        assert len(pods) == 2
        holder = wait_for(lambda: cluster.json("lease", "loraplex-operator", "-n", "loraplex-system")["spec"].get(
            "holderIdentity"), 120, "a leader")
        assert holder in {p["metadata"]["name"] for p in pods}


def test_cpu_demo_becomes_ready(cluster: Cluster):
    with cluster.step("cpu demo"):
        overlay = cluster.tmp / "demo"
        overlay.mkdir()
        (overlay / "kustomization.yaml").write_text(json.dumps({
            "resources": [os.path.relpath(REPO / "manifests/cpu-demo", overlay)],
            "images": [{"name": "ghcr.io/loraplex/loraplex-engine-demo", "newName": "loraplex-engine-demo",
                        "newTag": TAG}]}))
        cluster.kubectl("apply", "-k", str(overlay))
        cluster.kubectl("wait", "-n", NS, f"bmd/{BASE}", "--for=jsonpath={.status.phase}=Ready", "--timeout=15m",
                        timeout=1000)
        cluster.kubectl("wait", "-n", NS, "lora", "--all", "--for=jsonpath={.status.phase}=Ready", "--timeout=10m",
                        timeout=700)


def test_openai_sdk_through_the_service(cluster: Cluster):
    with cluster.step("openai sdk"):
        pf = PortForward(cluster)
        try:
            answers = {a: chat(pf.port, a) for a in ("french", "pirate")}
        finally:
            pf.close()
        assert all(answers.values())


def _adapter_pods(cluster: Cluster) -> dict[str, set[str]]:
    """Per adapter, the pods where it is servable (status.pods)."""
    out = {}
    for lora in cluster.json("lora", "-n", NS)["items"]:
        pods = (lora.get("status") or {}).get("pods") or []
        out[lora["metadata"]["name"]] = {p["name"] for p in pods if p.get("state") in ("registered", "host", "device")}
    return out


def _engine_pods(cluster: Cluster) -> list[dict]:
    return cluster.json("pods", "-n", NS, "-l", f"loraplex.dev/base-model={BASE}")["items"]


def _ready(pod: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod.get("status", {}).get("conditions", []))


def test_deleted_engine_pod_gets_its_adapters_back(cluster: Cluster):
    with cluster.step("pod deletion"):
        (old,) = _engine_pods(cluster)
        old_name = old["metadata"]["name"]
        assert all(old_name in pods for pods in _adapter_pods(cluster).values())
        cluster.kubectl("delete", "pod", "-n", NS, old_name, "--wait=true", timeout=300)

        def back():
            pods = [p for p in _engine_pods(cluster) if p["metadata"]["name"] != old_name and _ready(p)]
            if len(pods) != 1:
                return None
            new = pods[0]["metadata"]["name"]
            served = _adapter_pods(cluster)
            return new if all(served.get(a) == {new} for a in ADAPTERS) else None

        wait_for(back, 600, "a new engine pod serving every adapter")
        pf = PortForward(cluster)
        try:
            chat(pf.port, "json")
        finally:
            pf.close()


def test_scaling_spreads_the_adapters(cluster: Cluster):
    with cluster.step("scale"):
        cluster.kubectl("scale", "-n", NS, f"bmd/{BASE}", "--replicas=2")

        def scaled():
            pods = [p["metadata"]["name"] for p in _engine_pods(cluster) if _ready(p)]
            bmd = cluster.json("bmd", BASE, "-n", NS)
            served = _adapter_pods(cluster)
            return (len(pods) == 2 and (bmd.get("status") or {}).get("readyReplicas") == 2
                    and all(len(served.get(a, ())) == 2 for a in ADAPTERS))

        wait_for(scaled, 900, "two Ready engine pods serving every adapter")
        assert cluster.json("deploy", BASE, "-n", NS)["spec"]["replicas"] == 2


def test_teardown(cluster: Cluster):
    with cluster.step("teardown"):
        cluster.kubectl("delete", "-n", NS, "lora", "--all", "--wait=true", timeout=600)
        cluster.kubectl("delete", "-n", NS, f"bmd/{BASE}", "--wait=true", timeout=600)
        wait_for(lambda: not _engine_pods(cluster), 300, "the engine pods to go (garbage collection)")
        run("helm", "uninstall", "loraplex", "-n", "loraplex-system", "--kubeconfig", str(cluster.kubeconfig),
            "--wait", timeout=600)
