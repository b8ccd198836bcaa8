"""Revision bookkeeping, readiness and rendering (revisions.py): pure functions."""
from __future__ import annotations

from loraplex.manifest import AdapterManifest, manifest_digest
from loraplex.operator import revisions as R

T0, T1 = "2025-01-01T00:00:00Z", "2025-01-02T00:00:00Z"


def spec(uri: str = "org/a", **source) -> dict:
    return {"baseModel": "b", "source": {"type": "hub", "uri": uri, **source}}


def test_first_pass_makes_revision_one_and_an_unchanged_source_makes_none():
    book = R.next_revisions(spec(), {}, T0)
    assert (book.latest, book.created) == (1, 1)
    (r,) = book.revisions
    assert r == {"revision": 1, "manifestDigest": R.weights_digest({"type": "hub", "uri": "org/a"}),
                 "source": {"type": "hub", "uri": "org/a"}, "createdAt": T0}
    status = {"latestRevision": 1, "revisions": R.with_readiness(book.revisions, {})}
    again = R.next_revisions(spec(), status, T1)
    assert (again.latest, again.created, again.revisions) == (1, None, book.revisions)


def test_each_weight_field_change_makes_a_new_revision_other_fields_do_not():
    status = {}
    for change in [{}, {"revision": "v2"}, {"revision": "v2", "sha256": "A" * 64},
                   {"revision": "v2", "sha256": "a" * 64},  # the same digest, lowercased: no revision
                   {"revision": "v2", "sha256": "a" * 64, "configSha256": "b" * 64}]:
        book = R.next_revisions(spec(**change), status, T0)
        status = {"latestRevision": book.latest, "revisions": book.revisions}
    assert status["latestRevision"] == 4
    assert [r["revision"] for r in status["revisions"]] == [4, 3, 2, 1]
    assert status["revisions"][0]["source"]["configSha256"] == "b" * 64
    other = {**spec(revision="v2", sha256="a" * 64, configSha256="b" * 64), "preload": True, "rank": 8}
    other["source"]["secretRef"] = {"name": "creds"}
    assert R.next_revisions(other, status, T1).created is None
    moved = R.next_revisions(spec("org/b"), status, T1)
    assert (moved.latest, moved.created) == (5, 5)


def test_garbage_collection_keeps_the_newest_and_the_named():
    revs = [{"revision": n} for n in range(9, 0, -1)]
    book = R.Book(9, revs)
    status = {"traffic": [{"revision": 2, "percent": 100}], "rollout": {"revision": 9, "stableRevision": 1}}
    sp = {"traffic": [{"revision": 3, "percent": 50}, {"latestRevision": True, "percent": 50}]}
    keep = R.named(sp, status, 9)
    assert keep == {9, 1, 2, 3}
    kept = R.collect_garbage(book, 2, keep)
    assert [r["revision"] for r in kept.revisions] == [9, 8, 3, 2, 1]
    assert R.history_limit({}) == 5 and R.history_limit({"revisionHistoryLimit": 1}) == 1


def test_readiness_needs_every_placed_ready_pod_and_names_failures():
    states = {"p0": {1: ("device", ""), 2: ("host", "")},
              "p1": {1: ("host", ""), 2: ("loading", "")},
              "p2": {1: ("host", ""), 2: ("failed", "sha256 mismatch")}}
    ready = R.readiness([1, 2, 3], ["p0", "p1", "p2"], states)
    assert ready[1].ready and ready[1].ready_replicas == 3
    assert not ready[2].ready and ready[2].not_ready == ("p1", "p2") and ready[2].failed == "p2: sha256 mismatch"
    assert not ready[3].ready and ready[3].ready_replicas == 0 and ready[3].failed is None
    assert not R.readiness([1], [], states)[1].ready, "no Ready pod: not ready"
    many = R.readiness([1], [f"p{i}" for i in range(30)], {})
    (entry,) = R.with_readiness([{"revision": 1}], many)
    assert (entry["readyReplicas"], entry["totalReplicas"], len(entry["notReady"])) == (0, 30, 10)


def test_listed_states_reads_the_engines_rows():
    row = {"name": "x", "state": "device", "revisions": [
        {"number": 2, "percent": 0, "state": "host", "message": "", "manifest_digest": "d2"},
        {"number": 1, "percent": 100, "state": "device", "manifest_digest": "d1"}, {"bad": 1}]}
    assert R.listed_states(row) == ((1, "device", ""), (2, "host", ""))
    assert R.listed_states({"name": "x"}) == () and R.listed_states(None) == ()


def _manifest() -> AdapterManifest:
    return AdapterManifest(name="x", source="hub", uri="org/new", tenants=[], preload=False)


def test_served_manifest_carries_the_served_revisions_with_their_percents():
    book = R.Book(3, [{"revision": 3, "source": {"type": "hub", "uri": "org/new"}},
                      {"revision": 2, "source": {"type": "hub", "uri": "org/mid", "sha256": "a" * 64}},
                      {"revision": 1, "source": {"type": "s3", "uri": "s3://bkt/old"}}])
    m = R.served(_manifest(), book, [{"revision": 2, "percent": 80}, {"revision": 1, "percent": 20}], [1, 2, 3])
    assert m.uri == "org/new", "the top-level weights stay spec.source"
    got = [(r.number, r.percent, r.source, r.uri, r.sha256) for r in m.revisions]
    assert got == [(1, 20, "s3", "s3://bkt/old", None), (2, 80, "hub", "org/mid", "a" * 64), (3, 0, "hub", "org/new", None)]
    # Valid under the shared schema, and its digest is stable.
    again = AdapterManifest.model_validate(m.model_dump(exclude_none=True))
    assert manifest_digest(again) == manifest_digest(m)
    # A traffic naming a revision the book no longer has falls back to the latest at 100 %.
    fallback = R.served(_manifest(), book, [{"revision": 7, "percent": 100}], [7])
    assert [(r.number, r.percent) for r in fallback.revisions] == [(3, 100)]


def test_served_caps_revisions_dropping_the_oldest_idle_ones():
    book = R.Book(20, [{"revision": n, "source": {"type": "hub", "uri": f"org/r{n}"}} for n in range(20, 0, -1)])
    m = R.served(_manifest(), book, [{"revision": 1, "percent": 100}], range(1, 21))
    numbers = [r.number for r in m.revisions]
    assert len(numbers) == 16 and 1 in numbers and 20 in numbers and 2 not in numbers


def test_served_from_status_rebuilds_what_the_pass_serves():
    status = {"latestRevision": 2,
              "revisions": [{"revision": 2, "manifestDigest": R.weights_digest({"type": "hub", "uri": "org/new"}),
                             "source": {"type": "hub", "uri": "org/new"}},
                            {"revision": 1, "manifestDigest": "x", "source": {"type": "hub", "uri": "org/old"}}],
              "traffic": [{"revision": 1, "percent": 90}, {"revision": 2, "percent": 10, "latestRevision": True}]}
    m = R.served_from_status(_manifest(), spec("org/new"), status)
    assert [(r.number, r.percent, r.uri) for r in m.revisions] == [(1, 90, "org/old"), (2, 10, "org/new")]
    fresh = R.served_from_status(_manifest(), spec("org/new"), {})
    assert [(r.number, r.percent, r.uri) for r in fresh.revisions] == [(1, 100, "org/new")]


def test_sixteen_revisions_per_adapter_fit_the_configmap_and_the_status():
    """The limits: a manifest serves at most 16 revisions; status.revisions keeps at most 100 +
    16 named (+ the rollout's two) entries of at most 10 pod names each. At the longest uri the
    schema allows, both fit the API server's limits."""
    from loraplex.operator import apply, limits, render

    from .sizes import assert_within_limits
    from .test_render import bmd

    uri = "/adapters/" + "u" * 1000
    # The ConfigMap carries the preload adapters (at most maxActiveAdapters - 1): at 16 revisions of
    # 1 KiB uris each, 45 of them fit; more is the base's render error (ObjectTooLarge, docs/operator.md).
    PRELOADS = 45
    book = R.Book(16, [{"revision": n, "source": {"type": "local", "uri": f"{uri}{n:04d}", "sha256": "a" * 64,
                                                   "configSha256": "b" * 64}} for n in range(16, 0, -1)])
    traffic = [{"revision": n, "percent": 100 // 16 + (1 if n <= 100 % 16 else 0)} for n in range(1, 17)]
    preload = [R.served(AdapterManifest(name=f"a{i:03d}", source="local", uri=uri, preload=True,
                                        tenants=[f"{i:064x}"] * 8), book, traffic, range(1, 17)) for i in range(PRELOADS)]
    assert all(len(m.revisions) == 16 for m in preload)
    created = apply.plan(None, render.render_configmap(bmd({"engine": {"maxActiveAdapters": PRELOADS + 1}}), preload))[1]
    limits.check(created)
    sizes = assert_within_limits(created)
    status = {"latestRevision": 118, "revisions": R.with_readiness(
        [{"revision": n, "manifestDigest": "f" * 16, "source": {"type": "local", "uri": uri, "sha256": "a" * 64,
                                                              "configSha256": "b" * 64},
          "createdAt": T0} for n in range(118, 0, -1)],
        R.readiness(range(1, 119), [f"pod-{'p' * 50}-{i}" for i in range(1000)], {})),
        "traffic": traffic, "pods": [{"name": f"pod-{'p' * 50}-{i}", "state": "host", "message": "",
                                      "failures": 0} for i in range(1000)]}
    lora = {"apiVersion": "loraplex.dev/v1alpha1", "kind": "LoraAdapter", "metadata": {"name": "a"}, "status": status}
    limits.check(lora)
    print(f"\n16 revisions x {PRELOADS} preload adapters: ConfigMap data {sizes['data']} bytes; a status with 118 "
          f"revisions over 1,000 pods: {limits.object_size(lora)} bytes")
