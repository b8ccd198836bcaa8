"""A catalog of adapters on disk for the just-in-time tests: a few distinct tiny PEFT adapters
(different seeds, ranks and targets, so outputs differ) hard-linked under thousands of names,
plus the bad cases: a folder that is not a checkpoint, a config of another PEFT type, a folder
without weights, a plain file and a symlink that leads out of the catalog."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

NUM_CLASSES = 4
CLASS_SPECS = [dict(rank=4, seed=31), dict(rank=8, seed=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
               dict(rank=2, seed=33, target_modules=["gate_proj", "up_proj", "down_proj"]), dict(rank=16, seed=34)]
FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class Catalog:
    root: Path  # --adapter-dir
    classes: list[Path]  # the distinct adapters (outside root)
    names: list[str]  # cat-00000 ... : name i has the weights of classes[i % NUM_CLASSES]

    def weights_class(self, name: str) -> int:
        return int(name.rsplit("-", 1)[1]) % NUM_CLASSES


def make_catalog(base: Path, where: Path, count: int) -> Catalog:
    from bench.tiny import make_tiny_adapter

    classes = [make_tiny_adapter(base, where / "classes" / f"class-{i}", **spec) for i, spec in enumerate(CLASS_SPECS)]
    root = where / "catalog"
    root.mkdir(parents=True)
    names = [f"cat-{i:05d}" for i in range(count)]
    for i, name in enumerate(names):  # hard links: thousands of adapters for the price of four
        (root / name).mkdir()
        for f in FILES:
            os.link(classes[i % NUM_CLASSES] / f, root / name / f)
    (root / "tenant-42").mkdir()
    for f in FILES:
        os.link(classes[0] / f, root / "tenant-42" / f)
    (root / "not-a-lora").mkdir()
    (root / "not-a-lora" / "README.md").write_text("just some notes\n")
    (root / "prefix-tuning").mkdir()
    (root / "prefix-tuning" / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    os.link(classes[0] / FILES[1], root / "prefix-tuning" / FILES[1])
    (root / "no-weights").mkdir()
    os.link(classes[0] / FILES[0], root / "no-weights" / FILES[0])
    (root / "plain-file").write_text("not a folder\n")
    (root / "escape-link").symlink_to(classes[1])  # a real adapter, but outside --adapter-dir
    return Catalog(root=root, classes=classes, names=names)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")
