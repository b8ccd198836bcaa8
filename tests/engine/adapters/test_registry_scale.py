"""Registration at catalog scale: registering, updating and removing one adapter does work that does
not grow with the number of adapters already registered, and registering loads nothing.

The work is counted (passes over the registry and over the manager's location map), not timed:
with 10,000 adapters on a pod, an O(N) step per call makes the operator's first push O(N^2).
"""
from __future__ import annotations

from loraplex.engine.core.adapters import manager as M
from loraplex.engine.core.adapters.registry import Registry
from loraplex.manifest import AdapterManifest
from tests.engine.adapters.conftest import make_engine

N = 300


class CountingDict(dict):
    """A dict that counts full passes over it (items/keys/values/iteration)."""

    passes = 0

    def _count(self):
        CountingDict.passes += 1

    def items(self):
        self._count()
        return super().items()

    def keys(self):
        self._count()
        return super().keys()

    def values(self):
        self._count()
        return super().values()

    def __iter__(self):
        self._count()
        return super().__iter__()


def test_register_update_and_unregister_do_no_work_that_grows_with_the_registry(tiny_models, tiny_adapters,
                                                                                 monkeypatch):
    engine = make_engine(tiny_models["llama"], adapter_dir=str(tiny_adapters["llama"]), max_active_adapters=4)
    mgr = engine.adapters
    registry_passes = []
    original_iter = Registry.__iter__
    monkeypatch.setattr(Registry, "__iter__", lambda self: registry_passes.append(1) or original_iter(self))
    mgr.locations = CountingDict()
    CountingDict.passes = 0
    loads = []
    monkeypatch.setattr(mgr.loader, "load", lambda manifest: loads.append(manifest.name) or 1 / 0)

    for i in range(N):
        mgr.register(AdapterManifest(name=f"t-{i}", uri="qv-r4"))
    for i in range(N):  # tenants change: updated in place
        mgr.register(AdapterManifest(name=f"t-{i}", uri="qv-r4", tenants=["a" * 64]))
    for i in range(0, N, 2):  # content changes: the entry is replaced
        mgr.register(AdapterManifest(name=f"t-{i}", uri="patterns-r8"))
    for i in range(1, N, 2):
        assert mgr.unregister(f"t-{i}")

    assert registry_passes == [] and CountingDict.passes == 0, (len(registry_passes), CountingDict.passes)
    assert loads == [], "registering without preload loads nothing"
    assert len(mgr.registry) == N // 2
    # The location map (files -> the name registered last for them) forgot the files of the
    # adapters that left, and still names one registered for patterns-r8.
    assert list(dict.values(mgr.locations)) == [f"t-{N - 2}"]
    # /ready's check looks at the preloaded adapters only.
    assert mgr.preload_ready() == (True, []) and registry_passes == []


def test_preload_slots_are_still_counted(tiny_models, tiny_adapters):
    """The O(1) preload count keeps the old rule: one device slot always stays free."""
    engine = make_engine(tiny_models["llama"], adapter_dir=str(tiny_adapters["llama"]), max_active_adapters=3)
    mgr = engine.adapters
    for i in range(50):
        mgr.register(AdapterManifest(name=f"plain-{i}", uri="qv-r4"))
    mgr.register(AdapterManifest(name="p1", uri="qv-r4", preload=True))
    mgr.register(AdapterManifest(name="p2", uri="patterns-r8", preload=True))
    try:
        mgr.register(AdapterManifest(name="p3", uri="mlp-layer1-r2", preload=True))
        raise AssertionError("a third preload on 3 slots must be refused")
    except M.RequestError as exc:
        assert "2 of 3 device slots" in str(exc)
    # Dropping the preload flag, or the adapter, frees its place; a new preload then fits.
    mgr.register(AdapterManifest(name="p1", uri="qv-r4"))
    mgr.register(AdapterManifest(name="p3", uri="mlp-layer1-r2", preload=True))
    assert mgr.unregister("p2")
    ready, missing = mgr.preload_ready()
    assert set(missing) <= {"p3"}
    mgr.register(AdapterManifest(name="p4", uri="all-r16-rslora", preload=True))
    assert mgr.preloads == {"p3", "p4"}
    engine.adapters.shutdown()
