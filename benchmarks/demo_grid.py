#!/usr/bin/env python
"""Benchmark 4 (issue 5): wall time of the demo grid with packs of one vs packed.

    python benchmarks/demo_grid.py [--steps 300] [--json OUT.json]

Runs ``jobs/launch_grid.py configs/grid/demo.yaml --cluster local`` (what ``make demo``
runs after building the demo data) twice on the same grid: once with ``pack_size: 1``
(every run its own process, as before packing) and once with the grid's own pack_size.
Audio is prepared once beforehand, so both times count training and aggregation only.
``--steps`` shortens every run's schedule (``train.max_steps``, one evaluation at the
end when it is below the demo's eval_every) so that ``make bench`` stays short; the
README quotes both the short and the full (300-step) figures.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO_GRID = ROOT / "configs" / "grid" / "demo.yaml"


def launch(grid: Path, overrides: list[str]) -> float:
    start = time.perf_counter()
    res = subprocess.run([sys.executable, str(ROOT / "jobs" / "launch_grid.py"), str(grid), *overrides,
                          "--cluster", "local"], cwd=ROOT, capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"{grid} failed:\n{res.stderr[-3000:]}")
    return time.perf_counter() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="train.max_steps of every run (the demo's: 300)")
    ap.add_argument("--work", default=str(ROOT / "results" / "bench"))
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if not (ROOT / "results" / "demo_data" / "backbones" / "manifest.json").exists():
        subprocess.run([sys.executable, str(ROOT / "jobs" / "make_demo_data.py")], cwd=ROOT, check=True)
    work = Path(args.work).resolve() / "demo_grid"
    spec = yaml.safe_load(DEMO_GRID.read_text())
    eval_every = min(args.steps, 50)
    overrides = [f"train.max_steps={args.steps}", f"train.eval_every={eval_every}", f"train.log_every={eval_every}"]
    times, grids = {}, {}
    for label, pack_size in (("packs of one", 1), ("packed", spec["pack_size"])):
        tree = dict(spec, name=f"demo-pack{pack_size}", pack_size=pack_size, results_dir=str(work),
                    run_config=str((DEMO_GRID.parent / spec["run_config"]).resolve()))
        shutil.rmtree(work / tree["name"], ignore_errors=True)  # a rerun must not skip finished runs
        grids[label] = work / f"{tree['name']}.yaml"
        grids[label].parent.mkdir(parents=True, exist_ok=True)
        grids[label].write_text(yaml.safe_dump(tree, sort_keys=False))
    subprocess.run([sys.executable, str(ROOT / "jobs" / "prepare_audio.py"), "configs/run/demo.yaml"], cwd=ROOT,
                   check=True, capture_output=True)
    for label, grid in grids.items():
        print(f"benchmark 4: demo grid, {label} ...", flush=True)
        times[label] = launch(grid, overrides)
    n_runs = len(spec["backbone_pairs"]) * math.prod(len(v) for v in spec["axes"].values())
    ratio = times["packs of one"] / times["packed"]
    print()
    title = f"4. demo grid, {n_runs} runs x {args.steps} steps (launch_grid --cluster local)"
    print(f"| {title:<62} | wall time |")
    print(f"|{'-' * 64}|{'-' * 10}:|")
    for label, t in times.items():
        print(f"| {label:<62} | {t:7.1f} s |")
    print(f"| {'ratio':<62} | {ratio:7.1f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"steps": args.steps, "runs": n_runs, "seconds": times, "ratio": ratio}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
