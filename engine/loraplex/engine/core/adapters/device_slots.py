"""The device tier: a fixed number of slots in the model's stacked LoRA buffers.

A slot is pinned while running sequences use it (`pins`); a `preload` adapter's slot is never
taken. Free slots go first, then the least recently used unpinned one. Writes into the buffers
happen only on the step thread (the manager calls `write` from `acquire`/`on_step`), so they
never race a forward pass.

Every method runs under the manager's lock.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from loraplex.engine.core.adapters.checkpoint import AdapterWeights
from loraplex.engine.core.adapters.registry import AdapterEntry


def slot_bytes(model_config, max_rank: int, dtype: torch.dtype) -> int:
    """Bytes one slot reserves: every projection of every layer, padded to max_rank."""
    per_layer = sum(fan_in + fan_out for fan_in, fan_out in model_config.projection_shapes().values())
    return per_layer * model_config.num_layers * max_rank * torch.tensor([], dtype=dtype).element_size()


class DeviceSlots:
    def __init__(self, projections: list, num_slots: int):
        self.projections = projections  # (layer, module, LoRAProjection)
        self.num_slots = num_slots
        self.owner: list[AdapterEntry | None] = [None] * num_slots
        self.pins = [0] * num_slots
        self.lru: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_slots))

    def take(self) -> tuple[int, AdapterEntry | None] | None:
        """A slot for a new adapter: (slot, the entry evicted from it or None), or None when every
        slot is pinned or held by a preload."""
        for slot in self.lru:  # least recently used first
            if self.owner[slot] is None:
                return slot, None
        for slot in self.lru:
            owner = self.owner[slot]
            if self.pins[slot] == 0 and not owner.manifest.preload:
                owner.slot = None
                self.owner[slot] = None
                return slot, owner
        return None

    def take_free(self) -> int | None:
        """A slot nobody holds, or None: what a warm start may fill without evicting anything."""
        return next((slot for slot in self.lru if self.owner[slot] is None), None)

    def assign(self, slot: int, entry: AdapterEntry) -> None:
        self.owner[slot], entry.slot = entry, slot
        self.lru.move_to_end(slot)

    def pin(self, slot: int) -> None:
        self.pins[slot] += 1
        self.lru.move_to_end(slot)

    def unpin(self, slot: int) -> int:
        self.pins[slot] -= 1
        return self.pins[slot]

    def free(self, slot: int) -> None:
        owner = self.owner[slot]
        if owner is not None:
            owner.slot = None
        self.owner[slot] = None

    def resident(self) -> list[AdapterEntry]:
        return [o for o in self.owner if o is not None]

    @torch.no_grad()
    def write(self, slot: int, weights: AdapterWeights) -> None:
        for layer, module, proj in self.projections:
            proj.lora_a[slot].zero_()
            proj.lora_b[slot].zero_()
            pair = weights.weights.get((layer, module))
            proj.slot_has_weights[slot] = pair is not None
            if pair is not None:
                a, b = pair
                proj.lora_a[slot, : a.shape[0]].copy_(a, non_blocking=True)
                proj.lora_b[slot, :, : a.shape[0]].copy_(b, non_blocking=True)


def num_slots(config, model_config, dtype: torch.dtype, device: torch.device) -> int:
    """Device slots: --max-active-adapters, fewer when a byte budget (--adapter-device-bytes, or
    --adapter-memory-fraction of the device's memory; of RAM on the CPU) holds fewer."""
    budget = config.adapter_device_bytes
    if budget is None and config.adapter_memory_fraction is not None:
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
        else:
            import os

            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        budget = int(total * config.adapter_memory_fraction)
    if config.max_active_adapters < 1:
        raise ValueError("--max-active-adapters must be at least 1")
    if budget is None:
        return config.max_active_adapters
    per_slot = slot_bytes(model_config, config.max_lora_rank, dtype)
    slots = min(config.max_active_adapters, budget // per_slot)
    if slots < 1:
        raise ValueError(f"the adapter device budget ({budget} bytes) holds no slot: one slot at --max-lora-rank "
                         f"{config.max_lora_rank} takes {per_slot} bytes")
    return slots
