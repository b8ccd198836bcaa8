"""The merged adapters' cache (merged_cache.py) on its own: what a new merge pushes out, what it
never does, and the cap on merges being built (the HTTP side is tests/engine/api/test_adapter_isolation.py)."""
import pytest

from loraplex.engine.core.adapters.merged_cache import (IN_USE_GRACE_SECONDS, MAX_MERGED, MergeCapacityError,
                                                         MergedCache, MergeTooLargeError)
from loraplex.engine.core.adapters.registry import AdapterEntry
from loraplex.manifest import AdapterManifest


def entry(name: str, nbytes: int) -> AdapterEntry:
    e = AdapterEntry(manifest=AdapterManifest(name=name, source="local", uri=f"merged/{name}"), generation=0)
    e.nbytes = nbytes
    return e


def age(cache: MergedCache, *names: str) -> None:
    """As if the merges were last used longer ago than the grace period."""
    for n in names:
        cache.used_at[n] -= IN_USE_GRACE_SECONDS + 1


def test_a_new_merge_pushes_out_the_least_recently_used_merge_not_in_use():
    cache = MergedCache(budget_bytes=250, max_concurrent=1)
    a, b, c = entry("m-a", 100), entry("m-b", 100), entry("m-c", 100)
    cache.add(a)
    cache.add(b)
    assert cache.make_room(50) == []  # fits
    with pytest.raises(MergeCapacityError) as busy:  # both just made: in use
        cache.make_room(100)
    assert busy.value.status == 429 and busy.value.retry_after
    age(cache, "m-a", "m-b")
    a.waiters.add("req-1")  # a request waits for m-a: it stays, m-b goes
    assert cache.make_room(100) == [b]
    cache.touch(b)
    age(cache, "m-b")
    a.waiters.clear()
    assert cache.make_room(100) == [a]  # touched last: m-b is the more recently used
    cache.drop(a)
    cache.add(c)
    assert cache.bytes == 200 and list(cache.lru) == ["m-b", "m-c"]
    with pytest.raises(MergeTooLargeError):
        cache.make_room(251)


def test_the_count_cap_holds_whatever_the_bytes():
    cache = MergedCache(budget_bytes=10**9, max_concurrent=1)
    for i in range(MAX_MERGED):
        cache.add(entry(f"m-{i}", 1))
    with pytest.raises(MergeCapacityError):
        cache.make_room(1)
    age(cache, "m-0")
    assert [e.name for e in cache.make_room(1)] == ["m-0"]


def test_building_is_capped_and_the_place_comes_back():
    cache = MergedCache(budget_bytes=100, max_concurrent=2)
    with cache.building(), cache.building():
        with pytest.raises(MergeCapacityError, match="--max-concurrent-merges"):
            with cache.building():
                pass
    with pytest.raises(RuntimeError):
        with cache.building():
            raise RuntimeError("a failed merge")
    with cache.building(), cache.building():  # both places free again
        pass
