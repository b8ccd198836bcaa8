"""Tenants (spec.tenants) rendered into the engines' API keys file: the pure parts (tenants.py,
render.py, status.py), and the rendering step against the size-enforcing API server
(fake_api.FakeApi, real HTTP): the widest spec the CRD admits fits a Secret, a file over the
limit is refused before the write and the engines keep the previous one."""
from __future__ import annotations

import asyncio
import base64
import json

import pytest

from loraplex.manifest import hash_api_key, salted_key_hash
from loraplex.operator import constants as C
from loraplex.operator import render, status as S, tenants as T
from loraplex.operator.adapters import tenant_salt
from loraplex.operator.config import OperatorConfig
from loraplex.operator.runtime import Runtime

from .fake_api import TOKEN, FakeApi
from .sizes import SECRET_DATA_LIMIT, assert_within_limits, secret_data_bytes
from .test_render import bmd

NS, BASE = "team-a", "llama"
SALT = tenant_salt(NS, BASE)


def secret(name: str, **data: str) -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": NS},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


def h(key: str) -> str:
    return salted_key_hash(key, SALT)


ACME = {"name": "acme", "apiKeySecretRefs": [{"name": "acme-keys"}], "weight": 2,
        "limits": {"requestsPerMinute": 600, "tokensPerMinute": 200000, "maxConcurrent": 16}}
GLOBEX = {"name": "globex", "apiKeySecretRefs": [{"name": "globex-keys", "key": "primary"}]}
SECRETS = {"acme-keys": secret("acme-keys", a="sk-acme-1", b="sk-acme-2"),
           "globex-keys": secret("globex-keys", primary="sk-globex-1", other="sk-not-this-one")}


# --- the per-pod split ---------------------------------------------------------------------------

@pytest.mark.parametrize("limit, ready, share", [
    (600, 1, 600), (600, 3, 200), (200000, 3, 66667), (16, 3, 6), (1, 3, 1), (5, 0, 5), (7, 7, 1), (8, 7, 2)])
def test_each_pod_enforces_its_share_rounded_up(limit, ready, share):
    assert T.per_pod(limit, ready) == share


def test_the_fleet_admits_at_most_limit_plus_pods_minus_one():
    """The documented bound (docs/operator.md, Tenants): with N pods and even routing the fleet
    admits N * ceil(L / N), never below L and at most L + N - 1."""
    for limit in range(1, 200):
        for n in range(1, 40):
            fleet = n * T.per_pod(limit, n)
            assert limit <= fleet <= limit + n - 1, (limit, n)


# --- the file's entries --------------------------------------------------------------------------

def test_keys_are_salted_hashes_and_limits_are_divided():
    out = T.resolve([ACME, GLOBEX], SECRETS, SALT, 3, {})
    assert out.problems == [] and out.kept == out.locked == []
    assert out.entries == {
        "acme": {"keys": sorted([h("sk-acme-1"), h("sk-acme-2")]), "weight": 2,
                 "limits": {"requests_per_minute": 200, "tokens_per_minute": 66667, "max_concurrent": 6}},
        "globex": {"keys": [h("sk-globex-1")]}}  # only the named key; no weight or limits: none rendered
    text = T.keys_file(out.entries)
    assert "sk-" not in text, "never a raw key"
    assert text == T.keys_file(T.resolve([ACME, GLOBEX], SECRETS, SALT, 3, {}).entries), "byte-identical"
    assert T.resolve([ACME], SECRETS, SALT, 0, {}).entries["acme"]["limits"]["requests_per_minute"] == 600


def test_a_broken_ref_keeps_that_tenants_previous_keys_and_the_others_render():
    previous = T.previous_entries(render.render_api_keys_secret(
        bmd(), T.keys_file(T.resolve([ACME, GLOBEX], SECRETS, SALT, 1, {}).entries), 1))
    assert previous == {"acme": sorted([h("sk-acme-1"), h("sk-acme-2")]), "globex": [h("sk-globex-1")]}
    broken = {**SECRETS, "globex-keys": None, "acme-keys": secret("acme-keys", a="sk-acme-3")}
    newcomer = {"name": "initech", "apiKeySecretRefs": [{"name": "initech-keys"}]}
    out = T.resolve([ACME, GLOBEX, newcomer], {**broken, "initech-keys": None}, SALT, 2, previous)
    assert out.entries["acme"]["keys"] == [h("sk-acme-3")], "a working tenant follows its Secret (rotation)"
    assert out.entries["acme"]["limits"]["requests_per_minute"] == 300
    assert out.entries["globex"] == {"keys": [h("sk-globex-1")]}, "kept, not emptied"
    assert "initech" not in out.entries, "a tenant that never had keys gets none (fails closed)"
    assert (out.kept, out.locked) == (["globex"], ["initech"])
    assert [(p.tenant, p.reason) for p in out.problems] == [("globex", "SecretNotFound"), ("initech", "SecretNotFound")]
    cond = T.condition_of(out, "llama-api-keys", 2)
    assert (cond["type"], cond["status"], cond["reason"]) == ("TenantsReady", "False", "SecretNotFound")
    assert "globex" in cond["message"] and "Kept their previous keys: globex" in cond["message"]
    assert "No keys (no access) until fixed: initech" in cond["message"]
    missing_key = T.resolve([GLOBEX], {"globex-keys": secret("globex-keys", other="x")}, SALT, 1, {})
    assert missing_key.problems[0].reason == "SecretKeyNotFound"


def test_one_key_belongs_to_one_tenant_and_one_name_to_one_tenant():
    thief = {"name": "thief", "apiKeySecretRefs": [{"name": "acme-keys", "key": "a"}]}
    out = T.resolve([ACME, thief], SECRETS, SALT, 1, {"thief": [h("sk-acme-1"), h("sk-thief")]})
    assert [(p.tenant, p.reason) for p in out.problems] == [("thief", "DuplicateKey")]
    assert out.entries["thief"]["keys"] == [h("sk-thief")], "its previous keys, less the one acme holds"
    every = [k for e in out.entries.values() for k in e["keys"]]
    assert len(every) == len(set(every)), "the engine refuses a file listing one key twice"
    twice = T.resolve([ACME, {**ACME, "weight": 9}], SECRETS, SALT, 1, {})
    assert twice.entries["acme"]["weight"] == 2 and twice.problems[0].reason == "InvalidTenant"


@pytest.mark.parametrize("tenant, words", [
    ({**ACME, "limits": {"requestsPerMinute": -5}}, "limits.requestsPerMinute -5"),
    ({**ACME, "limits": {"maxConcurrent": 0}}, "limits.maxConcurrent 0"),
    ({**ACME, "weight": 1.5}, "weight 1.5"),
    ({**ACME, "name": "Acme_Corp"}, "DNS-1123"),
    ({**ACME, "apiKeySecretRefs": []}, "no apiKeySecretRefs"),
])
def test_what_the_schema_refuses_the_operator_refuses_too(tenant, words):
    """For an API server (or an emulator) that did not validate against the CRD."""
    out = T.resolve([tenant], SECRETS, SALT, 1, {})
    assert out.entries == {} and out.problems[0].reason == "InvalidTenant" and words in out.problems[0].message


def test_previous_entries_ignore_what_is_not_a_salted_hash():
    assert T.previous_entries(None) == {}
    assert T.previous_entries({"data": {C.API_KEYS_KEY: "not base64!"}}) == {}
    odd = {"a": {"keys": ["sk-raw", h("k")]}, "b": ["old-format"], "c": {"keys": "x"}}
    body = {"data": {C.API_KEYS_KEY: base64.b64encode(json.dumps(odd).encode()).decode()}}
    assert T.previous_entries(body) == {"a": [h("k")]}


def test_the_file_is_what_the_engine_reads():
    """The contract with the engine's parser: the same tenants, keys, weights and per-pod limits
    come out of what the operator renders (3 ready pods: each limit divided by 3, rounded up)."""
    auth = pytest.importorskip("loraplex.engine.api.auth", reason="the engine is not installed (operator-only venv)")
    parsed = auth.parse_api_keys(T.keys_file(T.resolve([ACME, GLOBEX], SECRETS, SALT, 3, {}).entries))
    assert parsed.get(hash_api_key("sk-acme-2")) == "acme" and parsed.get(hash_api_key("sk-globex-1")) == "globex"
    assert parsed.get(hash_api_key("sk-not-this-one")) is None
    acme = parsed.settings_of("acme")
    assert acme.weight == 2
    assert (acme.limits.requests_per_minute, acme.limits.tokens_per_minute, acme.limits.max_concurrent) == (200, 66667, 6)
    assert parsed.settings_of("globex").weight == 1 and not parsed.settings_of("globex").limits.any()


# --- the rendered objects ------------------------------------------------------------------------

def test_the_deployment_mounts_the_keys_file_only_when_tenants_are_declared():
    plain = render.render_deployment(bmd(), 1)
    (c,) = plain["spec"]["template"]["spec"]["containers"]
    assert "--api-keys-file" not in c["args"], "no tenants: nothing changes"
    assert not [v for v in plain["spec"]["template"]["spec"]["volumes"] if v["name"] == "api-keys"]
    dep = render.render_deployment(bmd({"tenants": [ACME]}), 1)
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["args"][c["args"].index("--api-keys-file") + 1] == C.API_KEYS_PATH
    (vol,) = [v for v in pod["volumes"] if v["name"] == "api-keys"]
    assert vol["secret"] == {"secretName": "llama-api-keys", "items": [{"key": C.API_KEYS_KEY, "path": C.API_KEYS_KEY}]}
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "api-keys"]
    assert C.API_KEYS_PATH == f"{mount['mountPath']}/{C.API_KEYS_KEY}" and mount["readOnly"]
    sec = render.render_api_keys_secret(bmd(), "{}\n", 3)
    assert sec["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert sec["metadata"]["annotations"] == {C.ANN_TENANT_DIVISOR: "3"}


def test_tenants_condition_transitions_become_events():
    ok = {"phase": "Ready", "conditions": [S.condition("TenantsReady", True, "Rendered", "2 tenant(s)")]}
    bad = {"phase": "Ready", "conditions": [S.condition("TenantsReady", False, "SecretNotFound", "tenant 'g': gone")]}
    worse = {"phase": "Ready", "conditions": [S.condition("TenantsReady", False, "SecretNotFound", "two gone")]}
    assert S.base_events(ok, bad) == [("Warning", "SecretNotFound", "tenant 'g': gone")]
    assert S.base_events(bad, bad) == []
    assert S.base_events(bad, worse) == [("Warning", "SecretNotFound", "two gone")]
    assert S.base_events(bad, ok) == [("Normal", "TenantsReady", "2 tenant(s)")]
    assert S.base_events(None, ok) == [("Normal", "Ready", "")] and S.base_events(ok, ok) == []


# --- against the size-enforcing API server ---------------------------------------------------------

def widest_spec(keys_per_ref: int = 1) -> tuple[list[dict], dict[str, dict]]:
    """The CRD's caps (256 tenants of 16 refs, 63-character names), every limit and weight set."""
    tenants, secrets = [], {}
    for t in range(256):
        name = f"t{t:03d}-" + "x" * 58
        refs = []
        for r in range(16):
            sname = f"keys-{t}-{r}"
            secrets[sname] = secret(sname, **{f"k{k}": f"sk-{t}-{r}-{k}-" + "r" * 40 for k in range(keys_per_ref)})
            refs.append({"name": sname})
        tenants.append({"name": name, "apiKeySecretRefs": refs, "weight": 1000,
                        "limits": {"requestsPerMinute": 10**12, "tokensPerMinute": 10**15, "maxConcurrent": 10**6}})
    return tenants, secrets


async def render_against(api: FakeApi, tenants: list[dict], secrets: dict[str, dict], ready: int) -> dict | None:
    for name, body in secrets.items():
        api.objects[f"/api/v1/namespaces/{NS}/secrets/{name}"] = body
    rt = Runtime(OperatorConfig(resync_interval=30))
    rt.set_client(await api.client())
    try:
        pods = [S.PodView(name=f"p{i}", uid=f"u{i}", ip="10.0.0.1", port=8080, ready=True) for i in range(ready)]
        return await T.ensure_api_keys(rt, bmd({"tenants": tenants}), pods)
    finally:
        await rt.aclose()


@pytest.mark.slow
def test_the_widest_spec_the_crd_admits_fits_a_secret():
    tenants, secrets = widest_spec()
    api = FakeApi()

    async def run():
        try:
            return await render_against(api, tenants, secrets, 1)
        finally:
            await api.aclose()
    cond = asyncio.run(run())
    assert cond["status"] == "True", cond
    written = api.objects[f"/api/v1/namespaces/{NS}/secrets/llama-api-keys"]
    sizes = assert_within_limits(written)
    print(f"\nwidest tenants spec (256 x 16 keys): Secret data {secret_data_bytes(written)} B "
          f"(limit {SECRET_DATA_LIMIT}), object {sizes['object']} B")
    assert secret_data_bytes(written) < SECRET_DATA_LIMIT * 0.6, "the cap leaves room for refs naming whole Secrets"
    assert len(json.loads(base64.b64decode(written["data"][C.API_KEYS_KEY]))) == 256


@pytest.mark.slow
def test_a_file_over_the_secret_limit_is_refused_and_the_previous_one_stays():
    api = FakeApi()
    small, small_secrets = [ACME], {"acme-keys": SECRETS["acme-keys"]}
    big, big_secrets = widest_spec(keys_per_ref=3)  # 12,288 keys: about 1.4 MB of hashes

    async def run():
        try:
            first = await render_against(api, small, small_secrets, 2)
            before = api.objects[f"/api/v1/namespaces/{NS}/secrets/llama-api-keys"]
            writes = api.writes()
            second = await render_against(api, big, big_secrets, 2)
            return first, before, writes, second
        finally:
            await api.aclose()
    first, before, writes, second = asyncio.run(run())
    assert first["status"] == "True"
    assert (second["status"], second["reason"]) == ("False", "TooLarge"), second
    assert "the engines keep the previous file" in second["message"]
    assert api.writes() == writes, "refused before the write, not by the API server"
    assert api.objects[f"/api/v1/namespaces/{NS}/secrets/llama-api-keys"] == before
