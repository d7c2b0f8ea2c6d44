#!/usr/bin/env python
"""The full-size model figure: throughput, FLOPs, MFU and peak memory of the paper's
backbone pair (XLS-R 300M + RoBERTa-large shapes) feeding a pack of 8 heads.

    python benchmarks/full_size.py                         # full shape (meant for a GPU node)
    python benchmarks/full_size.py --tiny --json out.json  # the same code, tiny shapes, seconds on CPU

The backbones are random: transformers configs with the shapes of XLS-R 300M (wav2vec2,
24 layers x 1024, 16 heads, FFN 4096, layer-norm conv feature encoder, stable layer norm)
and RoBERTa-large (24 x 1024, vocabulary 50265; a small byte-level BPE tokenizer trained
here, as ``ser_hpc/demo/backbones.py`` does), written with ``save_pretrained`` and loaded
back through ``ser_hpc.models.encoders.FrozenBackbones``, the path real runs take.
Nothing comes from a hub.

Workload, per step: a batch of ``--batch`` 5.5 s crops at 16 kHz (no padding: training
crops are repeat-padded to the crop length) and as many transcriptions of about
``--text-tokens`` tokens.

* online: one backbone forward under no_grad, then each of the K heads (``heads.new_head``:
  the ``build_head`` model with the ModelConfig defaults, AdamW) does forward, weighted-CE
  backward and an optimizer step on the shared output, as the loop in ``train/loop.py`` does;
* extract: the backbone forward alone (the one-off cost of cached features).

bf16 autocast is on by default on CUDA devices with bf16, off on CPU (``--bf16`` turns it on).
Backbone FLOPs per clip are counted with ``torch.utils.flop_counter.FlopCounterMode`` on
one forward of the benchmark batch (matmuls and convolutions; the CPU flash-attention op
is added to its table) and checked against an analytic count from the configs. That
counted forward runs before any timing, so even ``--warmup 0`` is not a cold start.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

MODELS_VERSION = 1
SAMPLE_RATE = 16000
# XLS-R's conv feature encoder (7 layers, 20 ms frames at 16 kHz) and positional conv.
CONV_KERNEL = (10, 3, 3, 3, 3, 2, 2)
CONV_STRIDE = (5, 2, 2, 2, 2, 2, 2)
POS_CONV_KERNEL, POS_CONV_GROUPS = 128, 16
# Class counts of the EmoSPeech 2024 train split (neutral, disgust, anger, sadness, joy, fear):
# the heads' inverse-frequency loss weights.
TRAIN_COUNTS = (1166, 705, 399, 345, 362, 23)

SHAPES = {
    "full": {
        "speech": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                   "intermediate_size": 4096, "conv_dim": [512] * 7},
        "text": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                 "intermediate_size": 4096, "vocab_size": 50265},
        "batch": 16, "crop_seconds": 5.5, "text_tokens": 48, "heads": 8, "steps": 10, "warmup": 3,
    },
    "tiny": {
        "speech": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "intermediate_size": 128, "conv_dim": [32] * 7},
        "text": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "intermediate_size": 128, "vocab_size": None},  # None: the tokenizer's size
        "batch": 2, "crop_seconds": 1.0, "text_tokens": 24, "heads": 2, "steps": 2, "warmup": 1,
    },
}

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by device-name substring; first match wins.
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),   # SXM
    ("A100", 312.0),
    ("L40S", 362.0),
)


# ---------------------------------------------------------------------------- the models
def speech_config(shape: dict):
    from transformers import Wav2Vec2Config
    s = shape["speech"]
    return Wav2Vec2Config(
        hidden_size=s["hidden_size"], num_hidden_layers=s["num_hidden_layers"],
        num_attention_heads=s["num_attention_heads"], intermediate_size=s["intermediate_size"],
        conv_dim=tuple(s["conv_dim"]), conv_kernel=CONV_KERNEL, conv_stride=CONV_STRIDE, conv_bias=True,
        feat_extract_norm="layer", feat_extract_activation="gelu", do_stable_layer_norm=True,
        num_conv_pos_embeddings=POS_CONV_KERNEL, num_conv_pos_embedding_groups=POS_CONV_GROUPS,
        hidden_act="gelu", layer_norm_eps=1e-5, mask_time_prob=0.0, mask_feature_prob=0.0, vocab_size=32)


def text_config(shape: dict, tokenizer_size: int):
    from transformers import RobertaConfig
    t = shape["text"]
    return RobertaConfig(
        vocab_size=max(t["vocab_size"] or 0, tokenizer_size), hidden_size=t["hidden_size"],
        num_hidden_layers=t["num_hidden_layers"], num_attention_heads=t["num_attention_heads"],
        intermediate_size=t["intermediate_size"], max_position_embeddings=514, type_vocab_size=1,
        layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2)


def build_models(out_dir: Path, shape_name: str, seed: int = 1234) -> None:
    """Write random ``speech/`` and ``text/`` models of the shape with save_pretrained (or keep them)."""
    from transformers import RobertaModel, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    from ser_hpc.demo.backbones import EXTRA_SPANISH, _bpe_tokenizer
    from ser_hpc.demo.sentences import demo_sentences

    manifest = {"version": MODELS_VERSION, "shape": shape_name, "config": SHAPES[shape_name], "seed": seed}
    done = out_dir / "manifest.json"
    if done.is_file() and json.loads(done.read_text()) == manifest:
        return
    done.unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    shape = SHAPES[shape_name]
    torch.manual_seed(seed)
    with torch.no_grad():
        speech = Wav2Vec2Model(speech_config(shape))
    speech.save_pretrained(out_dir / "speech")
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0, do_normalize=True,
                             return_attention_mask=True).save_pretrained(out_dir / "speech")
    del speech
    tok = _bpe_tokenizer(demo_sentences(3000, seed) + EXTRA_SPANISH.splitlines())
    with torch.no_grad():
        text = RobertaModel(text_config(shape, len(tok)))
    text.save_pretrained(out_dir / "text")
    tok.save_pretrained(out_dir / "text")
    cfg_path = out_dir / "text" / "tokenizer_config.json"  # so AutoTokenizer gives a RoBERTa tokenizer
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "RobertaTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=1), encoding="utf-8")
    done.write_text(json.dumps(manifest))  # last: the folder is complete


def make_texts(tokenizer, n: int, target: int, seed: int) -> list[str]:
    """``n`` Spanish transcriptions of at most ``target`` tokens each (specials included), as close as words allow."""
    from ser_hpc.demo.sentences import demo_sentences
    words = " ".join(demo_sentences(40 * n + 40, seed + 1)).split()
    texts, i = [], 0
    for _ in range(n):
        chosen: list[str] = []
        while i < len(words) and len(tokenizer(" ".join(chosen + [words[i]]))["input_ids"]) <= target:
            chosen.append(words[i])
            i += 1
        if not chosen:  # one word longer than target: take it alone
            chosen, i = [words[i]], i + 1
        texts.append(" ".join(chosen))
    return texts


# ---------------------------------------------------------------------------- FLOPs
def analytic_flops(speech_cfg, text_cfg, samples: int, tokens: int) -> dict[str, float]:
    """Matmul + convolution FLOPs (2 per multiply-add) of one clip's backbone forward."""
    out = {}
    if speech_cfg is not None:
        d, ffn, n = speech_cfg.hidden_size, speech_cfg.intermediate_size, speech_cfg.num_hidden_layers
        conv, length, c_in = 0, samples, 1
        for c_out, k, s in zip(speech_cfg.conv_dim, speech_cfg.conv_kernel, speech_cfg.conv_stride):
            length = (length - k) // s + 1
            conv += 2 * length * c_out * c_in * k
            c_in = c_out
        f = length
        proj = 2 * f * c_in * d  # feature projection
        k_pos, groups = speech_cfg.num_conv_pos_embeddings, speech_cfg.num_conv_pos_embedding_groups
        pos = 2 * (f + 1 - k_pos % 2) * d * (d // groups) * k_pos  # padding k//2: one extra frame, trimmed
        layers = n * (4 * 2 * f * d * d + 2 * 2 * f * d * ffn + 2 * 2 * f * f * d)
        out.update(speech_conv=conv, speech_proj_pos=proj + pos, speech_layers=layers,
                   speech=conv + proj + pos + layers, frames=f)
    if text_cfg is not None:
        d, ffn, n, s = text_cfg.hidden_size, text_cfg.intermediate_size, text_cfg.num_hidden_layers, tokens
        layers = n * (4 * 2 * s * d * d + 2 * 2 * s * d * ffn + 2 * 2 * s * s * d)
        out.update(text_layers=layers, text=layers + 2 * d * d)  # + the pooler on the first token
    out["total"] = out.get("speech", 0) + out.get("text", 0)
    return out


def flop_counter():
    """FlopCounterMode that also counts the CPU flash-attention op (absent from its table in torch 2.9)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    extra = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        extra[op] = cpu_sdpa
    return FlopCounterMode(display=False, custom_mapping=extra)


def module_flops(counter, suffix: str) -> int:
    return sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items() if name.endswith(suffix))


# ---------------------------------------------------------------------------- device
def peak_tflops(device: torch.device, bf16: bool, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "CPU: give --peak-tflops"
    name = torch.cuda.get_device_name(device)
    if not bf16:
        return None, f"{name}: the table holds bf16 peaks; give --peak-tflops for this precision"
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return value, f"{key} dense bf16"
    return None, f"unknown GPU {name!r}: give --peak-tflops"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> bool:
    """Start a new peak-memory window; False when only the process-wide peak can be read."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:  # Linux >= 4.0: resets the RSS high-water mark that getrusage reports
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


# ---------------------------------------------------------------------------- the benchmark
def run(args) -> dict:
    from ser_hpc.config import Config
    from ser_hpc.data.labels import EMOSPEECH_LABELS
    from ser_hpc.models.backbones import FrozenBackbones
    from ser_hpc.models.head import build_head
    from ser_hpc.train import distributed as D
    from ser_hpc.train.heads import new_head
    from ser_hpc.train.run_folder import RunFolder
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    shape_name = "tiny" if args.tiny else "full"
    shape = SHAPES[shape_name]
    batch = args.batch or shape["batch"]
    crop = args.crop_seconds or shape["crop_seconds"]
    n_heads = args.heads or shape["heads"]
    target_tokens = args.text_tokens or shape["text_tokens"]
    steps = shape["steps"] if args.steps is None else args.steps
    warmup = shape["warmup"] if args.warmup is None else args.warmup
    if steps < 1 or warmup < 0:
        sys.exit("--steps must be >= 1 and --warmup >= 0")
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.bf16 is None:
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    else:
        bf16 = args.bf16
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)
    peak, peak_source = peak_tflops(device, bf16, args.peak_tflops)

    scratch = Path(tempfile.mkdtemp(prefix="full_size_bench-"))
    try:
        models = Path(args.models_dir).resolve() if args.models_dir else scratch / "models"
        t0 = time.perf_counter()
        build_models(models, shape_name)
        build_s = time.perf_counter() - t0
        log(f"models ready in {models} ({build_s:.1f} s)")

        t0 = time.perf_counter()
        torch.manual_seed(1234)
        backbones = FrozenBackbones(str(models / "speech"), str(models / "text")).to(device)
        load_s = time.perf_counter() - t0
        log(f"backbones loaded through FrozenBackbones ({load_s:.1f} s)")
        samples = int(round(crop * SAMPLE_RATE))
        waves = 0.1 * torch.randn(batch, samples)
        lengths = torch.full((batch,), samples, dtype=torch.long)
        texts = make_texts(backbones.text.tokenizer, batch, target_tokens, seed=7)
        token_counts = [len(backbones.text.tokenizer(t)["input_ids"]) for t in texts]
        padded_tokens = max(token_counts)
        labels = torch.arange(batch) % len(TRAIN_COUNTS)
        train_labels = [c for c, n in enumerate(TRAIN_COUNTS) for _ in range(n)]

        heads = []
        for k in range(n_heads):
            cfg = Config()
            cfg.run.name, cfg.run.dir = f"head{k}", str(scratch / f"head{k}")
            cfg.train.bf16, cfg.train.device = bf16, str(device)
            cfg.data.labels = list(EMOSPEECH_LABELS)  # what the loop resolves from the corpus
            heads.append(new_head(cfg, RunFolder(cfg.run.dir), backbones, train_labels, D.DistEnv(), device, True))
        for h in heads:
            h.model.train()

        def features():
            with torch.no_grad(), torch.autocast(**autocast):
                return backbones(waves, lengths, texts, device)

        def online_step():
            """The loop's step (train/loop.py) for one batch (no gradient accumulation)."""
            feats = features()
            target = labels.to(device)
            for h in heads:
                with h.rng:
                    with torch.autocast(**autocast):
                        logits = h.engine.forward(None, None, None, feats=feats).float()
                loss = h.weighted_ce_sum(logits, target)
                h.engine.backward(loss / h.loss_weights[target].sum())
            for h in heads:
                h.engine.step(h.cfg.train.max_grad_norm)

        # FLOPs: one counted forward of the benchmark batch (not timed), and one head's forward + backward.
        with flop_counter() as counter:
            feats = features()
        counted = counter.get_total_flops()
        counted_speech, counted_text = module_flops(counter, ".speech"), module_flops(counter, ".text")
        probe = build_head(heads[0].cfg.model, backbones, len(heads[0].labels)).to(device)
        with flop_counter() as head_counter:
            with torch.autocast(**autocast):
                logits = probe(feats).float()
            torch.nn.functional.cross_entropy(logits, labels.to(device)).backward()
        head_flops = head_counter.get_total_flops() / batch
        del probe, logits, feats
        analytic = analytic_flops(backbones.speech.backbone.config, backbones.text.backbone.config,
                                  samples, padded_tokens)
        flops_per_clip = counted / batch

        peak_windows: list[bool] = []

        def timed(fn, name: str) -> tuple[float, int]:
            for i in range(warmup):
                fn()
                log(f"{name}: warmup {i + 1}/{warmup}")
            sync(device)
            peak_windows.append(reset_peak(device))
            t = time.perf_counter()
            for _ in range(steps):
                fn()
            sync(device)
            seconds = time.perf_counter() - t
            log(f"{name}: {steps} step(s) in {seconds:.2f} s")
            return seconds, peak_memory(device)

        extract_s, extract_mem = timed(features, "extract")
        online_s, online_mem = timed(online_step, "online")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    clips_extract = batch * steps / extract_s
    clips_online = batch * steps / online_s
    tflops_extract = flops_per_clip * clips_extract / 1e12
    tflops_online = (flops_per_clip + n_heads * head_flops) * clips_online / 1e12

    def params(module) -> int:
        return sum(p.numel() for p in module.parameters())

    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "shape": shape_name,
        "autocast_bf16": bf16,
        "batch": batch,
        "crop_seconds": crop,
        "frames_per_clip": int(backbones.speech.frame_lengths(lengths[:1])[0]),
        "text_tokens_padded": padded_tokens,
        "text_tokens_mean": sum(token_counts) / len(token_counts),
        "heads": n_heads,
        "steps": steps,
        "warmup": warmup,
        "params_speech": params(backbones.speech),
        "params_text": params(backbones.text),
        "params_head": sum(p.numel() for p in heads[0].model.head.parameters()),
        "build_s": build_s,
        "load_s": load_s,
        "online_s": online_s,
        "extract_s": extract_s,
        "clips_per_s_online": clips_online,
        "clips_per_s_extract": clips_extract,
        "backbone_flops_per_clip": flops_per_clip,
        "backbone_flops_per_clip_speech": counted_speech / batch,
        "backbone_flops_per_clip_text": counted_text / batch,
        "backbone_flops_per_clip_analytic": float(analytic["total"]),
        "analytic_breakdown": {k: float(v) for k, v in analytic.items()},
        "head_train_flops_per_clip": head_flops,
        "tflops_extract": tflops_extract,
        "tflops_online": tflops_online,
        "peak_tflops": peak,
        "peak_tflops_source": peak_source,
        "mfu_extract": tflops_extract / peak if peak else None,
        "mfu_online": tflops_online / peak if peak else None,
        "peak_memory_bytes": max(extract_mem, online_mem),
        "peak_memory_extract_bytes": extract_mem,
        "peak_memory_online_bytes": online_mem,
        "peak_memory_kind": ("torch.cuda.max_memory_allocated, per phase" if device.type == "cuda"
                             else "peak RSS (getrusage), per phase" if all(peak_windows)
                             else "peak RSS of the whole process (getrusage), model building included"),
    }


def log(msg: str) -> None:
    print(f"[full_size] {msg}", file=sys.stderr, flush=True)


def table(r: dict) -> str:
    def mfu(x):
        return "n/a" if x is None else f"{100 * x:.1f} %"

    gflop = r["backbone_flops_per_clip"] / 1e9
    head = r["head_train_flops_per_clip"] / 1e9
    rows = [
        (f"online: backbone fwd + {r['heads']} heads fwd/bwd/AdamW", r["clips_per_s_online"],
         r["online_s"] / r["steps"], f"{gflop:.4g} + {r['heads']}x{head:.3g}", r["tflops_online"], r["mfu_online"],
         r["peak_memory_online_bytes"]),
        ("extract: backbone fwd only", r["clips_per_s_extract"], r["extract_s"] / r["steps"], f"{gflop:.4g}",
         r["tflops_extract"], r["mfu_extract"], r["peak_memory_extract_bytes"]),
    ]
    lines = [f"| {'phase':<46} | {'clips/s':>8} | {'s/step':>7} | {'GFLOP/clip':>20} | {'TFLOP/s':>8} | "
             f"{'MFU':>7} | {'peak mem':>9} |",
             f"|{'-' * 48}|{'-' * 9}:|{'-' * 8}:|{'-' * 21}:|{'-' * 9}:|{'-' * 8}:|{'-' * 10}:|"]
    for name, cps, sps, gf, tf, m, mem in rows:
        lines.append(f"| {name:<46} | {cps:8.2f} | {sps:7.3f} | {gf:>20} | {tf:8.3f} | {mfu(m):>7} | "
                     f"{mem / 2**30:6.2f} GiB |")
    a = r["analytic_breakdown"]
    prec = "bf16 autocast" if r["autocast_bf16"] else "fp32"
    lines += [
        "",
        f"{r['shape']} shape on {r['device']} ({r['device_name']}, {prec}, torch {r['torch']}, "
        f"{r['threads']} threads); batch {r['batch']} x {r['crop_seconds']} s "
        f"({r['frames_per_clip']} frames) + {r['text_tokens_padded']} text tokens (padded; mean "
        f"{r['text_tokens_mean']:.1f}); {r['steps']} timed steps after {r['warmup']} warmup",
        f"parameters: speech {r['params_speech'] / 1e6:.1f} M, text {r['params_text'] / 1e6:.1f} M, "
        f"head {r['params_head'] / 1e6:.2f} M each",
        f"backbone GFLOP/clip: counted {gflop:.2f} (speech {r['backbone_flops_per_clip_speech'] / 1e9:.2f}, "
        f"text {r['backbone_flops_per_clip_text'] / 1e9:.2f}); analytic {a['total'] / 1e9:.2f} "
        f"(speech conv {a['speech_conv'] / 1e9:.2f} + proj/pos conv {a['speech_proj_pos'] / 1e9:.2f} + "
        f"layers {a['speech_layers'] / 1e9:.2f}; text {a['text'] / 1e9:.2f}); "
        f"counted/analytic {r['backbone_flops_per_clip'] / a['total']:.3f}",
        f"MFU against {r['peak_tflops'] or 'n/a'} TFLOP/s ({r['peak_tflops_source']}); "
        f"peak memory: {r['peak_memory_kind']}",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (2 layers, width 64, batch 2 x 1 s, 2 heads)")
    ap.add_argument("--steps", type=int, help="timed steps per phase (full: 10, tiny: 2)")
    ap.add_argument("--warmup", type=int, help="untimed steps before each phase (full: 3, tiny: 1)")
    ap.add_argument("--batch", type=int, help="clips per step (full: 16)")
    ap.add_argument("--crop-seconds", type=float, help="crop length (full: 5.5)")
    ap.add_argument("--text-tokens", type=int, help="tokens per transcription, at most (full: 48)")
    ap.add_argument("--heads", type=int, help="heads in the pack (full: 8)")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                    help="bf16 autocast (default: on for CUDA with bf16, off on CPU)")
    ap.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s for MFU (overrides the table)")
    ap.add_argument("--models-dir", help="build the random models here and reuse them next time (default: a temp dir)")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    # SIGTERM (timeout, scancel) unwinds like Ctrl-C, so the temp models folder is removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    bad = [k for k in ("clips_per_s_online", "clips_per_s_extract", "backbone_flops_per_clip", "tflops_extract")
           if not (math.isfinite(result[k]) and result[k] > 0)]
    if bad:
        print(f"non-positive or non-finite figures: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
