#!/usr/bin/env python
"""Benchmarks 1 and 2 (issue 5): a pack of K heads on one backbone forward, and the
cached dev evaluation, with backbones of realistic shape.

    python benchmarks/packing.py [--heads 8] [--steps 5] [--json OUT.json] [--check]

1. Packing: the same K runs (K head settings on one backbone pair), trained as K separate
   processes one after another (``jobs/train.py --plan P --pack i`` with packs of one) vs
   one process training a pack of K. Wall time of the training processes, start-up and
   model loading included: what K array tasks cost on a cluster vs one. Also checks that
   both give every run the same dev macro-F1.
2. Evaluation: one dev evaluation of all K heads of a pack from cached backbone outputs vs
   recomputing the backbone outputs (the median of a few repeats each).

The backbones are random models of the shapes of wav2vec2-base (95 M parameters, XLS-R's
layer-norm layout) and BERT-base, so the backbone dominates the cost as XLS-R and
RoBERTa-large do on the cluster. The corpus is a small generated demo corpus (mp3, 3-9 s
clips), prepared once into int16 before anything is timed. Everything lives under
``--work`` (default ``results/bench``) and is reused by the next run.
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from ser_hpc.config import config_from_dict  # noqa: E402
from ser_hpc.data.prepare_job import run_prepare  # noqa: E402
from ser_hpc.demo.backbones import build_base_sized_backbones  # noqa: E402
from ser_hpc.demo.corpus import generate_corpus  # noqa: E402
from ser_hpc.grid.plan import build_plan, expand, load_grid, make_packs, write_plan  # noqa: E402
from ser_hpc.logs import setup_logging  # noqa: E402

GOAL_PACK, GOAL_EVAL = 6.0, 10.0
# K head settings: every kind of head key, as a real head grid varies them.
HEAD_AXES = {"model.hidden_layers": [1, 2], "train.lr": [1.0e-3, 2.0e-3], "model.dropout": [0.1, 0.3]}


def make_assets(work: Path) -> tuple[Path, dict[str, Path]]:
    corpus = generate_corpus(work / "corpus", n_train=96, n_test=16, seed=7, progress=False)
    texts = []
    with open(corpus["train_path"], newline="", encoding="utf-8") as fh:
        texts += [row["transcription"] for row in csv.DictReader(fh)]
    return Path(corpus["root"]), build_base_sized_backbones(work / "backbones", seed=7, corpus_texts=texts)


def write_grid(work: Path, corpus: Path, backbones: dict[str, Path], heads: int, steps: int, pack_size: int) -> Path:
    axes, n = {}, 1
    for key, values in HEAD_AXES.items():  # the first axes whose product reaches K
        if n >= heads:
            break
        axes[key], n = values, n * len(values)
    base = {
        "data": {"train_csv": str(corpus / "train.csv"), "audio_dir": str(corpus / "audio"), "test_csv": "",
                 "dev_fraction": 0.16, "crop_seconds": 2.0, "eval_batch_size": 8,
                 "prepared_dir": str(work / "prepared")},
        "model": {"speech": {"layers": "weighted"}, "text": {"layers": "weighted"}, "head_width": 256},
        "train": {"batch_size": 8, "max_steps": steps, "eval_every": steps, "log_every": steps},
    }
    (work / "base.yaml").write_text(yaml.safe_dump(base))
    grid = {"name": f"pack{pack_size}", "run_config": "base.yaml", "backbone_pairs": [
        {"name": "w2v-base+bert-base", "speech": str(backbones["wav2vec2-base-sized"]),
         "text": str(backbones["bert-base-sized"])}], "axes": axes, "pack_size": pack_size,
        "results_dir": str(work / "runs")}
    path = work / f"grid_pack{pack_size}.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def plan_for(grid: Path, heads: int) -> tuple[Path, dict]:
    spec = load_grid(grid)
    runs = expand(spec)[:heads]
    packs = make_packs(runs, spec.pack_size)
    plan = build_plan(spec, runs, packs)
    return write_plan(plan, spec.out_dir), plan


def fresh(plan: dict) -> None:
    for run in plan["runs"]:
        shutil.rmtree(run["config"]["run"]["dir"], ignore_errors=True)


def train_tasks(plan_path: Path, plan: dict) -> float:
    """Run every pack of the plan as its own process, one after another; wall seconds."""
    start = time.perf_counter()
    for i in range(len(plan["packs"])):
        res = subprocess.run([sys.executable, str(ROOT / "jobs" / "train.py"), "--plan", str(plan_path),
                              "--pack", str(i)], capture_output=True, text=True)
        if res.returncode:
            sys.exit(f"pack {i} of {plan_path} failed:\n{res.stderr[-3000:]}")
    return time.perf_counter() - start


def dev_f1(plan: dict) -> dict[str, float]:
    out = {}
    for run in plan["runs"]:
        final = json.loads((Path(run["config"]["run"]["dir"]) / "final.json").read_text())
        out[run["name"]] = final["dev_macro_f1"]
    return out


def bench_packing(work: Path, corpus: Path, backbones, heads: int, steps: int) -> dict:
    alone_path, alone = plan_for(write_grid(work, corpus, backbones, heads, steps, 1), heads)
    pack_path, pack = plan_for(write_grid(work, corpus, backbones, heads, steps, heads), heads)
    assert len(alone["packs"]) == heads and len(pack["packs"]) == 1, (alone["packs"], pack["packs"])
    run_prepare(str(pack_path))  # decoded once, outside the timings
    fresh(alone), fresh(pack)
    print(f"benchmark 1: {heads} runs as {heads} processes ...", flush=True)
    t_alone = train_tasks(alone_path, alone)
    print(f"benchmark 1: {heads} runs as one pack ...", flush=True)
    t_pack = train_tasks(pack_path, pack)
    same = dev_f1(alone) == dev_f1(pack)
    return {"heads": heads, "steps": steps, "separate_s": t_alone, "pack_s": t_pack,
            "ratio": t_alone / t_pack, "same_dev_f1": same, "pack_plan": pack}


def bench_eval(pack_plan: dict, repeats: int = 2) -> dict:
    import torch
    from ser_hpc.data.sources import load_splits
    from ser_hpc.train import distributed as D
    from ser_hpc.train.heads import predict
    from ser_hpc.train.loop import setup
    cfgs = [config_from_dict(r["config"]) for r in pack_plan["runs"]]
    for c in cfgs:
        c.run.dir = str(Path(c.run.dir).parent / ("eval-" + Path(c.run.dir).name))
    inputs, heads = setup(cfgs, load_splits(cfgs[0].data), D.DistEnv(), torch.device("cpu"))
    dev = inputs.splits.dev
    print(f"benchmark 2: dev evaluation of {len(cfgs)} heads on {len(dev)} clips ...", flush=True)
    t0 = time.perf_counter()
    predict(inputs, heads, dev, cache=True)  # builds the cache: one backbone pass
    build = time.perf_counter() - t0

    def timed(cache: bool) -> float:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            predict(inputs, heads, dev, cache=cache)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    cached, recompute = timed(True), timed(False)
    return {"heads": len(cfgs), "dev_clips": len(dev), "cache_build_s": build, "cached_s": cached,
            "recompute_s": recompute, "ratio": recompute / cached, "cache_mb": inputs._dev_cache.nbytes / 1e6}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--work", default=str(ROOT / "results" / "bench"))
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--check", action="store_true", help=f"exit 1 unless packing >= {GOAL_PACK}x and eval >= {GOAL_EVAL}x")
    args = ap.parse_args(argv)
    setup_logging()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    corpus, backbones = make_assets(work)
    p = bench_packing(work, corpus, backbones, args.heads, args.steps)
    e = bench_eval(p.pop("pack_plan"))
    print()
    rows = [(f"1. {p['heads']} runs x {p['steps']} steps: {p['heads']} processes vs one pack",
             f"{p['separate_s']:.1f} s", f"{p['pack_s']:.1f} s", p["ratio"], GOAL_PACK),
            (f"2. dev eval, {e['heads']} heads x {e['dev_clips']} clips: recompute vs cached",
             f"{e['recompute_s']:.2f} s", f"{e['cached_s']:.3f} s", e["ratio"], GOAL_EVAL)]
    print(f"| {'benchmark (wav2vec2-base + BERT-base sized backbones)':<58} | {'before':>9} | {'after':>9} "
          f"| {'ratio':>6} | {'goal':>5} |")
    print(f"|{'-' * 60}|{'-' * 10}:|{'-' * 10}:|{'-' * 7}:|{'-' * 6}:|")
    for name, before, after, ratio, goal in rows:
        print(f"| {name:<58} | {before:>9} | {after:>9} | {ratio:5.1f}x | {goal:4.0f}x |")
    print(f"\nsame dev macro-F1 for every run, packed or alone: {'yes' if p['same_dev_f1'] else 'NO'}; "
          f"dev cache {e['cache_mb']:.0f} MB, built in {e['cache_build_s']:.1f}s")
    if args.json:
        Path(args.json).write_text(json.dumps({"packing": p, "eval": e}, indent=1))
    ok = p["ratio"] >= GOAL_PACK and e["ratio"] >= GOAL_EVAL and p["same_dev_f1"]
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
