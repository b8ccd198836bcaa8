"""The Helm chart (rendered and linted with helm-python-sdk), the kustomize trees (built offline by
`kubectl kustomize`), the Argo CD Applications and the Dockerfiles."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib

import pytest
import yaml

from .crd_tools import REPO

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed (test extra)")
CHART = REPO / "charts/loraplex"


def render(values: dict | None = None, name: str = "lp", namespace: str = "loraplex-system") -> list[dict]:
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(values or {}, name=name, namespace=namespace)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith(".txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def by_kind(docs: list[dict]) -> dict[str, dict]:
    return {d["kind"]: d for d in docs}


def test_chart_renders_operator_and_rbac():
    docs = by_kind(render())
    assert set(docs) == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment"}
    dep = docs["Deployment"]
    assert dep["metadata"]["namespace"] == "loraplex-system"
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    pod = dep["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    (c,) = pod["containers"]
    assert c["image"] == "ghcr.io/loraplex/loraplex-operator:0.1.0"
    assert "--standalone" in c["args"] and "--all-namespaces" in c["args"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["LORAPLEX_MAX_FAILURES"] == "5"
    binding = docs["ClusterRoleBinding"]
    assert binding["roleRef"]["name"] == docs["ClusterRole"]["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": docs["ServiceAccount"]["metadata"]["name"],
                                    "namespace": "loraplex-system"}]


def test_chart_values_change_the_render():
    docs = by_kind(render({"watchNamespaces": ["team-a", "team-b"], "image": {"tag": "9.9"},
                           "config": {"maxFailures": 7}, "logLevel": "debug"}))
    c = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert "--namespace=team-a" in c["args"] and "--namespace=team-b" in c["args"]
    assert "--all-namespaces" not in c["args"] and "--debug" in c["args"]
    assert c["image"].endswith(":9.9")
    assert {e["name"]: e["value"] for e in c["env"]}["LORAPLEX_MAX_FAILURES"] == "7"
    assert "ServiceAccount" not in by_kind(render({"serviceAccount": {"create": False, "name": "existing"}}))


def test_chart_rbac_is_least_privilege():
    rules = by_kind(render())["ClusterRole"]["rules"]
    grants = {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    assert not any("*" in x for g in grants for x in g), "no wildcards"
    assert not any(v in ("update", "deletecollection", "escalate", "bind", "impersonate") for _, _, v in grants), \
        "the operator never replaces (PUT) an object"
    assert {v for g, r, v in grants if r == "secrets"} == {"get"}
    assert {v for g, r, v in grants if r == "pods"} == {"list", "watch"}
    assert ("loraplex.dev", "loraadapters/status", "patch") in grants
    assert not any(r in ("basemodeldeployments", "loraadapters") and v in ("create", "delete")
                   for _, r, v in grants), "the operator never creates or deletes the users' objects"


def test_chart_lints_clean_and_ships_the_crds():
    report = helm.lint(str(CHART), strict=False)
    assert report["errors"] == []
    assert not [m for m in report["messages"] if m["severity"] >= 2], report["messages"]
    with helm.Chart.load(str(CHART)) as chart:
        assert sorted(c["name"] for c in chart.crds) == [
            "crds/loraplex.dev_basemodeldeployments.yaml", "crds/loraplex.dev_loraadapters.yaml"]
        assert chart.metadata["name"] == "loraplex"


kubectl = shutil.which("kubectl")


def kustomize(path: str) -> list[dict]:
    if kubectl is None:
        pytest.skip("kubectl not on PATH: `kubectl kustomize` cannot run")
    out = subprocess.run([kubectl, "kustomize", str(REPO / path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_kustomize_base():
    docs = kustomize("manifests/base")
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["BaseModelDeployment", "LoraAdapter", "LoraAdapter", "LoraAdapter"]
    bases = {d["spec"]["baseModel"] for d in docs if d["kind"] == "LoraAdapter"}
    assert bases == {d["metadata"]["name"] for d in docs if d["kind"] == "BaseModelDeployment"}


def test_kustomize_overlay():
    docs = kustomize("manifests/overlays/production")
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"llm-prod"}
    (bmd,) = [d for d in docs if d["kind"] == "BaseModelDeployment"]
    assert bmd["spec"]["autoscaling"]["enabled"] is True
    assert bmd["spec"]["ingress"]["host"] == "llm.example.com"
    assert bmd["spec"]["engine"]["maxLoraRank"] == 64, "the patch merges into the base"


def test_kustomize_crds():
    docs = kustomize("crds")
    assert sorted(d["metadata"]["name"] for d in docs) == ["basemodeldeployments.loraplex.dev",
                                                          "loraadapters.loraplex.dev"]


def test_argocd_applications_point_at_real_paths():
    apps = [d for d in yaml.safe_load_all((REPO / "manifests/argocd/applications.yaml").read_text()) if d]
    assert {a["kind"] for a in apps} == {"Application"}
    for a in apps:
        assert (REPO / a["spec"]["source"]["path"]).is_dir(), a["spec"]["source"]["path"]
        assert a["spec"]["syncPolicy"]["automated"]["selfHeal"] is True


def test_dockerfiles():
    op = (REPO / "Dockerfile.operator").read_text()
    assert re.search(r'pip install "?\.\[operator\]"?', op)
    assert not re.search(r"pip install[^\n]*torch", op), "the operator image never installs torch"
    eng = (REPO / "Dockerfile.engine").read_text()
    torch_at, extras_at = eng.index('pip install "torch=='), eng.index('pip install ".[engine,kernels]"')
    assert torch_at < extras_at, "torch is installed first, pinned"


def test_operator_extra_and_import_carry_no_torch():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not [d for d in extras["operator"] if d.lower().startswith(("torch", "triton", "transformers"))]
    code = ("import sys, loraplex.operator.handlers, loraplex.operator.cli; "
            "bad = [m for m in ('torch', 'transformers', 'loraplex.engine', 'loraplex.engine.api') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
