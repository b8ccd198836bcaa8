"""The step-cost model, fitted to the engine's own measured step times (data/engine_costs.json).

A step's wall time is modelled as linear in what the step computes:

    seconds = c0 + c_row * rows + c_token * prefill_tokens + c_adapter * distinct_adapters

- c0: the fixed cost of a forward (weights read once, Python, sampling setup);
- c_row: each sequence in the batch (its decode token, its sampling, its KV gather);
- c_token: each prompt token prefilled in the step;
- c_adapter: each distinct adapter in the batch (one more LoRA segment per projection).

It is fitted by ordinary least squares to every recorded step, and the report states its R²
and its median and 90th-percentile relative errors on the samples. Adapter loads are not in
it: a disk -> host load is drawn from the measured loads (it runs on the engine's loader pool,
off the step), and a host -> device copy adds the measured median to the step that places it
(the engine copies on the step thread).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

DEFAULT_DATA = Path(__file__).resolve().parent / "data" / "engine_costs.json"
FEATURES = ("const", "rows", "prefill_tokens", "distinct_adapters")


@dataclass(frozen=True)
class StepCost:
    c0: float
    c_row: float
    c_token: float
    c_adapter: float
    disk_load_s: tuple[float, ...]  # measured disk -> host loads, drawn from at random
    h2d_s: float  # median host -> device slot copy
    fit: dict  # how good the fit is, for the report

    def step_seconds(self, rows: int, prefill_tokens: int, distinct: int) -> float:
        return self.c0 + self.c_row * rows + self.c_token * prefill_tokens + self.c_adapter * distinct

    def draw_disk_load(self, rng: np.random.Generator) -> float:
        return float(self.disk_load_s[int(rng.integers(len(self.disk_load_s)))])

    def scaled(self, factor: float) -> "StepCost":
        """Every cost times `factor`: the same engine on a CPU `factor` times slower (the
        validation's speed-calibrated what-if)."""
        return replace(self, c0=self.c0 * factor, c_row=self.c_row * factor, c_token=self.c_token * factor,
                       c_adapter=self.c_adapter * factor, disk_load_s=tuple(s * factor for s in self.disk_load_s),
                       h2d_s=self.h2d_s * factor)

    def with_disk_loads_scaled(self, factor: float) -> "StepCost":
        """Disk -> host loads `factor` times slower (an object store or the Hub instead of the
        page cache); the steps unchanged."""
        return replace(self, disk_load_s=tuple(s * factor for s in self.disk_load_s))

    def coefficients(self) -> dict:
        return {"c0_s": self.c0, "c_row_s": self.c_row, "c_token_s": self.c_token, "c_adapter_s": self.c_adapter}


def fit(data: dict) -> StepCost:
    cols = data["columns"]
    s = np.asarray(data["step_samples"], dtype=np.float64)
    rows, prefill, distinct, seconds = (s[:, cols.index(c)] for c in ("rows", "prefill_tokens", "distinct_adapters", "seconds"))
    x = np.column_stack([np.ones_like(rows), rows, prefill, distinct])
    coef, *_ = np.linalg.lstsq(x, seconds, rcond=None)
    pred = x @ coef
    rel = np.abs(pred - seconds) / seconds
    r2 = 1 - ((seconds - pred) ** 2).sum() / ((seconds - seconds.mean()) ** 2).sum()
    disk = tuple(float(v) for v in data["disk_to_host_seconds"])
    h2d = float(np.median(data["host_to_device_seconds"]))
    quality = {
        "samples": int(len(seconds)), "r2": float(r2),
        "median_rel_error": float(np.median(rel)), "p90_rel_error": float(np.quantile(rel, 0.9)),
        "disk_load_median_s": float(np.median(disk)), "disk_load_p90_s": float(np.quantile(disk, 0.9)),
        "h2d_median_s": h2d, "meta": data.get("meta", {}),
        "engine_start_s": data.get("engine_start_seconds"),  # the model-load part of a cold start
    }
    return StepCost(*(float(c) for c in coef), disk_load_s=disk, h2d_s=h2d, fit=quality)


def load(path: Path = DEFAULT_DATA) -> StepCost:
    return fit(json.loads(Path(path).read_text()))
