#!/usr/bin/env python
"""Planning a big grid: time and peak memory of expand + validate + plan.json.

    python benchmarks/plan_scale.py [--runs 1000 10000] [--profile OUT.prof] [--keep DIR]

For each size, a synthetic grid is written to a temporary folder: 4 backbone pairs (speech
+ text names of local folders that do not exist, as in a dry run on a machine without the
checkpoints) x 10 head settings x as many seeds as make that many runs (packs of 4: 300
packs for 1,000 runs, 3,000 for 10,000), on a small generated WAV
corpus (so the data check reads real files). Then, in a fresh Python process each time:

- ``plan_launch()``: load the grid, expand every run (resolved, validated config), group the
  packs, check the data and backbones (the missing folders are reported as problems, as
  ``--dry-run`` does; nothing is loaded), and read which runs are finished;
- ``write_grid_files()``: grid.yaml and plan.json;
- ``describe()``: the dry-run summary.

It prints the wall time of each step, the total, the process's peak resident memory
(``ru_maxrss``) and, for comparison, the peak right after the imports (torch and
transformers alone are ~600 MB), the size of plan.json and the lines of the dry-run text.
The issue's target: 10,000 runs planned in <= 10 s.

Measured here (2 shared cores, loaded by other work: load average 3-4), before and after
the planning fixes (cached type hints, each run copying its pair's config instead of being
rebuilt from the YAML three times, one data config built per distinct data section, plan.json
written one run per line with the C JSON encoder, a summary instead of every run):

| runs | before | after | peak RSS before | after |
|---:|---:|---:|---:|---:|
| 1,000 | 43.3 s | 0.3-0.6 s | 642 MB | 630 MB |
| 10,000 | 793.6 s | 4.0-5.2 s | 841 MB | 724-734 MB |
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PAIRS = 4
LABELS = ("neutral", "disgust", "anger", "sadness", "joy", "fear")


def _axes(runs: int) -> dict[str, list]:
    """Head and seed axes whose product with PAIRS is exactly ``runs``: 10 head settings per
    seed (2 depths x 5 dropouts; packs of 4, 4 and 2), the rest seeds."""
    per_pair, rest = divmod(runs, PAIRS * 10)
    if rest or not per_pair:
        raise SystemExit(f"--runs must be a multiple of {PAIRS * 10}")
    return {"model.hidden_layers": [1, 2], "model.dropout": [0.0, 0.1, 0.2, 0.3, 0.4],
            "train.seed": list(range(1000, 1000 + per_pair))}


def write_corpus(folder: Path, clips: int = 24) -> dict[str, str]:
    import numpy as np
    import soundfile as sf
    audio = folder / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    rows = ["id,label,transcription"]
    rng = np.random.default_rng(0)
    for i in range(clips):
        name = f"clip{i:03d}.wav"
        sf.write(audio / name, (0.1 * rng.standard_normal(8000)).astype("float32"), 16000)
        rows.append(f"{name},{LABELS[i % len(LABELS)]},frase número {i}")
    (folder / "train.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return {"train_csv": str(folder / "train.csv"), "audio_dir": str(audio)}


def write_grid(folder: Path, runs: int) -> Path:
    import yaml
    data = write_corpus(folder / "corpus")
    base = {"data": {**data, "dev_fraction": 0.25, "crop_seconds": 2.0},
            "model": {"head_width": 64, "fusion": "late"},
            "train": {"max_steps": 100, "eval_every": 50, "lr": 1e-3}}
    (folder / "base.yaml").write_text(yaml.safe_dump(base), encoding="utf-8")
    pairs = [{"name": f"pair{i}", "speech": str(folder / f"no-such-speech-{i}"),
              "text": str(folder / f"no-such-text-{i}")} for i in range(PAIRS)]
    grid = {"name": f"scale{runs}", "run_config": "base.yaml", "backbone_pairs": pairs, "axes": _axes(runs),
            "pack_size": 4, "results_dir": str(folder / "results")}
    path = folder / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False), encoding="utf-8")
    return path


def write_speech_configs(folder: Path) -> list[dict]:
    """Five speech checkpoints as config files only (no weights: the dry run reads shapes from
    configs and reports the missing weights as problems): the shapes of XLS-R 300M, WavLM
    Large, HuBERT Large, wav2vec2-base and Whisper large-v3."""
    from transformers import (HubertConfig, Wav2Vec2Config, Wav2Vec2FeatureExtractor, WavLMConfig, WhisperConfig,
                              WhisperFeatureExtractor)
    large = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    models = {"xlsr-300m": Wav2Vec2Config(**large, feat_extract_norm="layer", do_stable_layer_norm=True),
              "wavlm-large": WavLMConfig(**large), "hubert-large": HubertConfig(**large),
              "wav2vec2-base": Wav2Vec2Config(),
              "whisper-large-v3": WhisperConfig(d_model=1280, encoder_layers=32, num_mel_bins=128)}
    pairs = []
    for name, cfg in models.items():
        cfg.save_pretrained(folder / name)
        fe = WhisperFeatureExtractor(feature_size=128) if name.startswith("whisper") else \
            Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, do_normalize=True)
        fe.save_pretrained(folder / name)
        pairs.append({"name": name, "speech": str(folder / name)})
    return pairs


def write_benchmark_grid(folder: Path, corpora: int = 10) -> Path:
    """A benchmark grid of ``corpora`` corpora x 5 speech encoders x 5 folds x 8 head settings
    (2,000 runs for 10 corpora): manifests with speakers, folds generated, audio only, cached."""
    import yaml
    import numpy as np
    import soundfile as sf
    pairs = write_speech_configs(folder / "models")
    entries = []
    for c in range(corpora):
        root = folder / f"corpus{c}"
        (root / "audio").mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(c)
        rows = ["path,emotion,speaker"]
        for i in range(40):
            sf.write(root / "audio" / f"c{i:03d}.wav", (0.1 * rng.standard_normal(8000)).astype("float32"), 16000)
            rows.append(f"c{i:03d}.wav,{LABELS[i % 4]},spk{i % 10}")
        (root / "manifest.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
        entries.append({"name": f"corpus{c}", "folds": [1, 2, 3, 4, 5], "data": {
            "format": "manifest", "manifest": str(root / "manifest.csv"), "audio_dir": str(root / "audio"),
            "columns": {"audio": "path", "label": "emotion", "speaker": "speaker"}, "folds": 5,
            "dev_fraction": 0.2}})
    base = {"data": {"crop_seconds": 0.0, "features_dir": str(folder / "features")},
            "model": {"modalities": "audio", "head_width": 64, "fusion": "late"},
            "train": {"features": "cached", "max_steps": 100, "eval_every": 50}}
    (folder / "base.yaml").write_text(yaml.safe_dump(base), encoding="utf-8")
    grid = {"name": "benchmark2000", "run_config": "base.yaml", "corpora": entries, "backbone_pairs": pairs,
            "axes": {"model.hidden_layers": [1, 2], "model.dropout": [0.1, 0.2], "train.lr": [1e-3, 3e-3]},
            "cross_corpus": {"train": ["corpus0", "corpus1"], "test": [e["name"] for e in entries]},
            "pack_size": 8, "results_dir": str(folder / "results")}
    path = folder / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False), encoding="utf-8")
    return path


# Runs in a fresh interpreter, so the peak memory is this grid's alone.
CHILD = r"""
import json, resource, sys, time, logging
sys.path.insert(0, sys.argv[1])
t0 = time.perf_counter()
from ser_hpc.grid import launch as L
logging.getLogger("ser_hpc").setLevel(logging.WARNING)
t_import = time.perf_counter() - t0
rss_import = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
prof = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] else None
if prof:
    import cProfile
    profiler = cProfile.Profile(); profiler.enable()
t = time.perf_counter()
lp = L.plan_launch(sys.argv[2], [], None, None, False)
t_plan = time.perf_counter() - t
t = time.perf_counter()
L.write_grid_files(lp)
t_write = time.perf_counter() - t
t = time.perf_counter()
text = L.describe(lp)
t_describe = time.perf_counter() - t
if prof:
    profiler.disable(); profiler.dump_stats(prof)
if len(sys.argv) > 4 and sys.argv[4] == "show":
    print(text + "\n" + L.describe_problems(lp), file=sys.stderr)
print(json.dumps({"runs": len(lp.runs), "packs": len(lp.packs), "problems": len(lp.problems),
                  "import_s": t_import, "plan_s": t_plan, "write_s": t_write, "describe_s": t_describe,
                  "describe_lines": text.count("\n") + 1, "import_rss_mb": rss_import,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(runs: int, work: Path, profile: str | None, benchmark: bool = False) -> dict:
    folder = work / (f"benchmark{runs}" if benchmark else f"grid{runs}")
    folder.mkdir(parents=True, exist_ok=True)
    path = write_benchmark_grid(folder, runs // 200) if benchmark else write_grid(folder, runs)
    res = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(path), profile or "",
                          "show" if benchmark else ""], capture_output=True, text=True, cwd=ROOT)
    if benchmark:
        print(res.stderr, flush=True)
    if res.returncode:
        raise SystemExit(f"planning {runs} runs failed:\n{res.stderr[-4000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    name = "benchmark2000" if benchmark else f"scale{runs}"
    out["plan_mb"] = (folder / "results" / name / "plan.json").stat().st_size / 1e6
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--profile", help="write a cProfile of the largest size's planning here")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    parser.add_argument("--benchmark", action="store_true",
                        help="a benchmark grid instead: corpora (runs / 200 of them) x 5 speech encoders x 5 folds x "
                             "8 head settings, cached features; prints its dry run")
    args = parser.parse_args()
    if args.benchmark:
        args.runs = [r for r in args.runs if r % 200 == 0] or [2000]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        print(f"{'runs':>6} {'packs':>6} {'plan':>8} {'plan.json':>9} {'describe':>8} {'total':>7} "
              f"{'peak RSS':>9} {'(imports)':>9} {'plan size':>9} {'summary lines':>13}")
        for n in args.runs:
            r = measure(n, work, args.profile if n == max(args.runs) else None, args.benchmark)
            total = r["plan_s"] + r["write_s"] + r["describe_s"]
            print(f"{r['runs']:>6} {r['packs']:>6} {r['plan_s']:>7.2f}s {r['write_s']:>8.2f}s "
                  f"{r['describe_s']:>7.2f}s {total:>6.2f}s {r['peak_rss_mb']:>7.0f}MB {r['import_rss_mb']:>7.0f}MB {r['plan_mb']:>7.1f}MB "
                  f"{r['describe_lines']:>13}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
