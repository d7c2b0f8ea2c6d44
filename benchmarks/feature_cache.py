#!/usr/bin/env python
"""Issue 14: the demo head grid trained online (backbones every step) vs from cached features.

    python benchmarks/feature_cache.py [--steps 300] [--json results/bench/feature_cache.json]

One pack of the demo grid's heads (configs/grid/demo.yaml: pooling x fusion, one seed) is
trained twice on the same schedule: ``train.features=online`` (the paper's recipe: the
frozen backbones run on every training crop) and ``train.features=cached`` (the backbones
run once per clip into a fresh feature store, timed separately, then heads train on the
stored states). It prints wall times, the one-off extraction time and disk size, and both
runs' dev/test macro-F1 (the accuracy cost of cropping in feature space), then projects
the paper's 100-epoch schedule on the demo corpus from the measured per-step times and
prints the break-even point: the epochs x heads beyond which extraction pays for itself.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

from ser_hpc.atomic_io import write_json  # noqa: E402
from ser_hpc.config import load_config  # noqa: E402
from ser_hpc.features.extract import extract  # noqa: E402
from ser_hpc.logs import setup_logging  # noqa: E402
from ser_hpc.train.loop import train_pack  # noqa: E402

DEMO_GRID = ROOT / "configs" / "grid" / "demo.yaml"
PAPER_EPOCHS = 100


def pack_configs(work: Path, mode: str, steps: int, features_dir: Path) -> list:
    grid = yaml.safe_load(DEMO_GRID.read_text())
    pair = grid["backbone_pairs"][0]
    axes = grid["axes"]
    cfgs = []
    for pooling in axes["model.pooling"]:
        for fusion in axes["model.fusion"]:
            name = f"{pooling}-{fusion}"
            cfgs.append(load_config([ROOT / "configs" / "run" / "demo.yaml"], [
                f"model.speech.name={pair['speech']}", f"model.text.name={pair['text']}",
                f"model.pooling={pooling}", f"model.fusion={fusion}", f"train.features={mode}",
                f"data.features_dir={features_dir}", f"train.max_steps={steps}",
                f"train.eval_every={min(steps, 100)}", f"train.checkpoint_every={steps}",
                f"run.dir={work / mode / name}", f"run.name={name}"]))
    return cfgs


def timed_pack(cfgs) -> tuple[float, list[dict]]:
    start = time.perf_counter()
    finals = train_pack(cfgs)
    return time.perf_counter() - start, finals


def mean(values) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps of each run (both modes)")
    ap.add_argument("--work", default=str(ROOT / "results" / "bench" / "feature_cache"))
    ap.add_argument("--json", default=str(ROOT / "results" / "bench" / "feature_cache.json"))
    args = ap.parse_args(argv)
    os.chdir(ROOT)  # the demo configs hold paths relative to the repository
    setup_logging()
    if not (ROOT / "results" / "demo_data" / "backbones" / "manifest.json").exists():
        subprocess.run([sys.executable, str(ROOT / "jobs" / "make_demo_data.py")], cwd=ROOT, check=True)
    subprocess.run([sys.executable, str(ROOT / "jobs" / "prepare_audio.py"), "configs/run/demo.yaml",
                    "--no-progress"], cwd=ROOT, check=True, capture_output=True)
    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)  # fresh runs and a fresh store: nothing is reused
    features_dir = work / "features"

    online_s, online = timed_pack(pack_configs(work, "online", args.steps, features_dir))
    cached_cfgs = pack_configs(work, "cached", args.steps, features_dir)
    start = time.perf_counter()
    store = extract(cached_cfgs)
    extract_s = time.perf_counter() - start
    cached_s, cached = timed_pack(cached_cfgs)

    heads = len(cached_cfgs)
    from ser_hpc.data.sources import load_splits
    n_train = len(load_splits(cached_cfgs[0].data).train)
    steps_per_epoch = n_train // cached_cfgs[0].train.batch_size
    paper_steps = PAPER_EPOCHS * steps_per_epoch
    per_step_online, per_step_cached = online_s / args.steps, cached_s / args.steps
    online_paper = per_step_online * paper_steps
    cached_paper = per_step_cached * paper_steps
    # Caching pays once the online forwards it saves exceed the one-off extraction:
    # per epoch, the pack's online overhead is (per_step_online - per_step_cached) * steps_per_epoch.
    saved_per_epoch = (per_step_online - per_step_cached) * steps_per_epoch
    break_even_epochs = extract_s / saved_per_epoch if saved_per_epoch > 0 else float("inf")
    result = {
        "steps": args.steps, "heads": heads, "threads": torch.get_num_threads(),
        "online_seconds": round(online_s, 2), "cached_seconds": round(cached_s, 2),
        "extract_seconds": round(extract_s, 2), "disk_bytes": store.nbytes,
        "speedup": round(online_s / cached_s, 2),
        "speedup_including_extraction": round(online_s / (cached_s + extract_s), 2),
        "online_dev_macro_f1": round(mean(f["dev_macro_f1"] for f in online), 4),
        "cached_dev_macro_f1": round(mean(f["dev_macro_f1"] for f in cached), 4),
        "online_test_macro_f1": round(mean(f["test_macro_f1"] for f in online), 4),
        "cached_test_macro_f1": round(mean(f["test_macro_f1"] for f in cached), 4),
        "paper_schedule": {"epochs": PAPER_EPOCHS, "steps": paper_steps,
                           "online_seconds": round(online_paper, 1),
                           "cached_seconds_with_extraction": round(cached_paper + extract_s, 1),
                           "speedup_head_training": round(online_paper / cached_paper, 2),
                           "speedup_with_extraction": round(online_paper / (cached_paper + extract_s), 2)},
        "break_even_epochs_for_this_pack": round(break_even_epochs, 2),
        "break_even_epoch_heads": round(break_even_epochs * heads, 2),
    }
    w = max(len(k) for k in ("online (backbones every step)", "cached (heads on stored states)"))
    print(f"\nFeature cache: a pack of {heads} demo heads, {args.steps} steps each, "
          f"{torch.get_num_threads()} thread(s)\n")
    print(f"| {'mode':{w}} | wall time | dev macro-F1 (mean of heads) | test macro-F1 |")
    print(f"|{'-' * (w + 2)}|----------:|-----------------------------:|-------------:|")
    print(f"| {'online (backbones every step)':{w}} | {online_s:8.1f}s | {result['online_dev_macro_f1']:28.4f} | "
          f"{result['online_test_macro_f1']:12.4f} |")
    print(f"| {'cached (heads on stored states)':{w}} | {cached_s:8.1f}s | {result['cached_dev_macro_f1']:28.4f} | "
          f"{result['cached_test_macro_f1']:12.4f} |")
    print(f"\nhead training speedup {result['speedup']}x; one-off extraction {extract_s:.1f} s, "
          f"{store.nbytes / 1e6:.1f} MB on disk ({store.meta['clips']} clips)")
    p = result["paper_schedule"]
    print(f"paper schedule ({PAPER_EPOCHS} epochs = {paper_steps} steps on the demo corpus), projected from "
          f"the per-step times: online {p['online_seconds']:.0f} s, cached {cached_paper:.0f} s + extraction "
          f"-> {p['speedup_head_training']}x for head training, {p['speedup_with_extraction']}x with extraction")
    print(f"break-even: caching pays after {break_even_epochs:.2f} epochs of this {heads}-head pack "
          f"({result['break_even_epoch_heads']:.1f} epoch x heads)")
    write_json(args.json, result)
    print(f"figures -> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
