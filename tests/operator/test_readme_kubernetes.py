"""The README's Kubernetes section, taken literally: its helm values, its two YAML blocks, its
`kubectl get` columns and its Service call are checked against the chart, the CRDs and the objects
the operator renders, so the first page a platform team reads cannot drift from the code."""
from __future__ import annotations

import re
import shlex

import yaml

from loraplex.operator import render as R

from .crd_tools import REPO, load_crd
from .test_deploy_files import render, schema_errors

SECTION = REPO.joinpath("README.md").read_text().split("## On Kubernetes", 1)[1].split("\n## ", 1)[0]


def fenced() -> list[tuple[str, str]]:
    """(language, text) of each fenced code block of the section, in order."""
    out, lang, lines = [], None, []
    for line in SECTION.splitlines():
        if line.startswith("```"):
            if lang is None:
                lang, lines = line[3:].strip(), []
            else:
                out.append((lang, "\n".join(lines) + "\n"))
                lang = None
        elif lang is not None:
            lines.append(line)
    return out


def blocks(lang: str) -> list[str]:
    return [text for got, text in fenced() if got == lang]


def readme_objects() -> dict[str, dict]:
    docs = [yaml.safe_load(b) for b in blocks("yaml")]
    assert [d["kind"] for d in docs] == ["BaseModelDeployment", "LoraAdapter"], "one base, one adapter"
    return {d["kind"]: d for d in docs}


def helm_values() -> dict:
    """The `--set` values of the README's `helm install` line (the forms it uses: a list in braces)."""
    (install,) = [b for b in blocks("bash") if "helm install" in b]
    words = shlex.split(install.replace("\\\n", " ").splitlines()[0])
    values = {}
    for i, w in enumerate(words):
        if w == "--set":
            key, val = words[i + 1].split("=", 1)
            values[key] = val.strip("{}").split(",") if val.startswith("{") else val
    return values


def test_the_readme_custom_resources_pass_the_crds():
    objs = readme_objects()
    assert not schema_errors(list(objs.values())), schema_errors(list(objs.values()))
    bmd, lora = objs["BaseModelDeployment"], objs["LoraAdapter"]
    assert lora["spec"]["baseModel"] == bmd["metadata"]["name"]
    assert lora["metadata"]["namespace"] == bmd["metadata"]["namespace"]


def test_the_objects_the_operator_renders_from_them_are_valid_kubernetes():
    bmd = readme_objects()["BaseModelDeployment"]
    bmd = {**bmd, "metadata": {**bmd["metadata"], "uid": "u-1", "generation": 1}}
    docs = [R.render_deployment(bmd, bmd["spec"]["replicas"], None), R.render_service(bmd)]
    assert not schema_errors(docs), schema_errors(docs)


def test_the_chart_with_the_readme_values_renders_valid_objects_watching_that_namespace():
    values = helm_values()
    assert values, "the README installs the chart with --set values"
    docs = render(values, name="loraplex", namespace="loraplex-system")
    assert not schema_errors(docs), schema_errors(docs)
    ns = readme_objects()["BaseModelDeployment"]["metadata"]["namespace"]
    assert ns in values["watchNamespaces"], "the operator watches the namespace the README applies to"
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"--namespace={ns}" in args or ["--namespace", ns] in [args[i:i + 2] for i in range(len(args))]


def test_kubectl_get_shows_the_crds_printer_columns():
    (out,) = [b for b in blocks("") if "kubectl get bmd,lora" in b]
    headers = [line.split() for line in out.splitlines() if line.startswith("NAME")]
    for crd, header in zip(("basemodeldeployments", "loraadapters"), headers):
        cols = load_crd(crd)["spec"]["versions"][0]["additionalPrinterColumns"]
        want = ["NAME"] + [c["name"].upper() for c in cols if not c.get("priority")]
        assert header == want, (crd, header, want)


def test_the_openai_call_goes_to_the_service_the_operator_renders():
    objs = readme_objects()
    bmd, lora = objs["BaseModelDeployment"], objs["LoraAdapter"]
    svc = R.render_service(bmd)
    (call,) = [b for b in blocks("bash") if "port-forward" in b]
    m = re.search(r"port-forward -n (\S+) svc/(\S+) (\d+):(\d+)", call)
    assert m, call
    assert (m.group(1), m.group(2)) == (svc["metadata"]["namespace"], svc["metadata"]["name"])
    assert int(m.group(4)) == svc["spec"]["ports"][0]["port"]
    assert f'"model": "{lora["metadata"]["name"]}"' in call
    assert f"127.0.0.1:{m.group(3)}/v1/chat/completions" in call
