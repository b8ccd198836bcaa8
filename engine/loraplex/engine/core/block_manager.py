"""Paged KV cache bookkeeping: fixed-size blocks, ref counts, a block table per sequence, and
the prefix cache.

Prefix caching (vLLM v1's scheme, per adapter): once a block is full, its KV depends only on
the tokens up to its end and on the adapter that computed them. Such a block is named by a hash
chain, `h_i = sha256(h_{i-1} | tokens of block i)`, seeded with the adapter's identity (name and
content digest; the base model has its own seed), and entered in `cached`. A new sequence walks
its chain and takes every block already cached, so its prefill starts after them. Blocks are
ref-counted: a shared block is freed only when its last user leaves.

A block whose ref count drops to zero keeps its KV and its hash: it counts as free, but is only
reused (evicted, least recently freed first) when no never-cached free block is left.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque

from loraplex.engine.core.sequence import Sequence


def chain_seed(adapter: str | None, digest: str | None) -> bytes:
    """The hash chain's root for a sequence's adapter: another adapter (or the same name with
    other weights) gives other K/V for the same tokens, so it must give other hashes."""
    ident = "base" if adapter is None else f"adapter\0{adapter}\0{digest or ''}"
    return hashlib.sha256(ident.encode()).digest()


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks  # set while the block is in `cached`
        self.cached: dict[bytes, int] = {}  # hash -> block id
        self.free_blocks: deque[int] = deque(range(num_blocks))  # free, holding nothing reusable
        self.free_cached: OrderedDict[int, None] = OrderedDict()  # free, still cached; LRU first
        # Counters (tokens, except evictions), read by /metrics.
        self.queries = 0
        self.hits = 0
        self.evictions = 0

    @property
    def num_free(self) -> int:
        return len(self.free_blocks) + len(self.free_cached)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks if self.num_blocks else 0.0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- allocation -------------------------------------------------------------------------

    def extra_blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks to add so that `seq` can hold `num_tokens` tokens of KV."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def can_hold(self, seq: Sequence, num_tokens: int) -> bool:
        return self.extra_blocks_needed(seq, num_tokens) <= self.num_free

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Extend seq's block table to hold num_tokens. Callers check can_hold first."""
        need = self.extra_blocks_needed(seq, num_tokens)
        if need > self.num_free:
            raise RuntimeError(f"block manager: {need} blocks needed, {self.num_free} free")
        seq.block_table.extend(self._take_free() for _ in range(need))

    def _take_free(self) -> int:
        if self.free_blocks:
            block = self.free_blocks.popleft()
        else:  # evict the least recently freed cached block
            block, _ = self.free_cached.popitem(last=False)
            del self.cached[self.hash_of[block]]
            self.hash_of[block] = None
            self.evictions += 1
        self.ref_counts[block] = 1
        return block

    def free(self, seq: Sequence) -> None:
        """Drop seq's references. The tail goes first into the LRU order, so it is evicted before
        the head of the same chain (a chain is useless past its first missing block)."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if self.hash_of[block] is not None:
                    self.free_cached[block] = None
                else:
                    self.free_blocks.append(block)
        seq.block_table = []
        seq.num_cached_blocks = 0
        seq.num_computed_tokens = 0

    # ---- the prefix cache ---------------------------------------------------------------------

    def _hashes(self, seq: Sequence, num_full_blocks: int) -> list[bytes]:
        """seq's chain over its first num_full_blocks blocks, extended lazily and kept on seq
        (recomputed if its adapter's identity changed while it waited)."""
        key = (seq.adapter, seq.adapter_digest)
        if seq.block_hashes_key != key:
            seq.block_hashes, seq.block_hashes_key = [], key
        hashes, bs = seq.block_hashes, self.block_size
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else chain_seed(*key)
            hashes.append(block_hash(parent, seq.token_slice(i * bs, (i + 1) * bs)))
        return hashes[:num_full_blocks]

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks a sequence without blocks could start from (no refs taken).

        Only blocks within the first num_tokens - 1 tokens: the last token is always computed,
        so that the step that finishes the prompt has a row to sample from. Requests that want
        prompt logprobs compute every position, so they take no cached blocks."""
        if not self.enable_prefix_caching or seq.block_table or seq.prompt_logprobs is not None:
            return []
        hits = []
        for h in self._hashes(seq, (seq.num_tokens - 1) // self.block_size):
            block = self.cached.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def can_admit(self, seq: Sequence, hits: list[int], num_tokens: int) -> bool:
        """Can seq start from `hits` and grow to num_tokens? Hits that sit in the free pool stop
        being free once taken."""
        taken_from_free = sum(1 for b in hits if self.ref_counts[b] == 0)
        return self.blocks_for(num_tokens) - len(hits) <= self.num_free - taken_from_free

    def admit(self, seq: Sequence, hits: list[int]) -> None:
        """Start seq's block table from the cached blocks `hits`; its prefill resumes after them."""
        for block in hits:
            if self.ref_counts[block] == 0:
                del self.free_cached[block]
            self.ref_counts[block] += 1
        seq.block_table = list(hits)
        seq.num_cached_blocks = len(hits)
        seq.num_computed_tokens = len(hits) * self.block_size
        if seq.num_preemptions == 0:  # what the request found cached (usage); not a recompute's own blocks
            seq.cached_prompt_tokens = seq.num_computed_tokens
        if self.enable_prefix_caching:
            self.queries += seq.num_tokens
            self.hits += seq.num_computed_tokens

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Enter seq's blocks that are full of computed KV into the cache (after a step)."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        hashes = self._hashes(seq, full)
        for i in range(seq.num_cached_blocks, full):
            block, h = seq.block_table[i], hashes[i]
            if self.hash_of[block] is None and h not in self.cached:
                # A block already cached under h (computed by a concurrent miss) stays the one;
                # this copy stays private and returns to the plain free list.
                self.cached[h] = block
                self.hash_of[block] = h
        seq.num_cached_blocks = full

    def check_invariants(self) -> None:
        """Every block is either referenced, or free exactly once (tests call this)."""
        free = list(self.free_blocks) + list(self.free_cached)
        free_set = set(free)
        assert len(free) == len(free_set), "a block is free twice"
        for b in range(self.num_blocks):
            assert self.ref_counts[b] >= 0, f"block {b} has a negative ref count"
            assert (self.ref_counts[b] == 0) == (b in free_set), f"block {b}: ref count {self.ref_counts[b]}"
        for h, b in self.cached.items():
            assert self.hash_of[b] == h
        assert all(self.hash_of[b] is not None for b in self.free_cached)
