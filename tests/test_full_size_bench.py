"""benchmarks/full_size.py --tiny: the full-size figure's code on tiny shapes, as a subprocess."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_full_size_bench_tiny_figures_are_consistent(tmp_path):
    out = tmp_path / "figures.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "full_size.py"), "--tiny", "--device", "cpu",
           "--threads", "1", "--peak-tflops", "2.0", "--json", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=REPO,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "clips/s" in res.stdout and "extract" in res.stdout
    r = json.loads(out.read_text())

    assert (r["device"], r["shape"], r["batch"], r["heads"], r["steps"]) == ("cpu", "tiny", 2, 2, 2)
    assert r["frames_per_clip"] == 49  # 1 s at 16 kHz through XLS-R's conv stack: 20 ms frames
    assert 0 < r["text_tokens_padded"] <= 24
    for key in ("clips_per_s_online", "clips_per_s_extract", "backbone_flops_per_clip", "tflops_extract",
                "tflops_online", "mfu_extract", "mfu_online", "peak_memory_bytes", "head_train_flops_per_clip",
                "backbone_flops_per_clip_analytic", "online_s", "extract_s"):
        assert isinstance(r[key], (int, float)) and math.isfinite(r[key]) and r[key] > 0, (key, r[key])

    # The figures follow from one another.
    assert math.isclose(r["clips_per_s_extract"], r["batch"] * r["steps"] / r["extract_s"], rel_tol=1e-9)
    assert math.isclose(r["clips_per_s_online"], r["batch"] * r["steps"] / r["online_s"], rel_tol=1e-9)
    assert math.isclose(r["tflops_extract"], r["backbone_flops_per_clip"] * r["clips_per_s_extract"] / 1e12,
                        rel_tol=1e-9)
    online_flops = r["backbone_flops_per_clip"] + r["heads"] * r["head_train_flops_per_clip"]
    assert math.isclose(r["tflops_online"], online_flops * r["clips_per_s_online"] / 1e12, rel_tol=1e-9)
    assert math.isclose(r["mfu_extract"], r["tflops_extract"] / 2.0, rel_tol=1e-9)
    assert math.isclose(r["mfu_online"], r["tflops_online"] / 2.0, rel_tol=1e-9)
    assert r["peak_memory_bytes"] == max(r["peak_memory_extract_bytes"], r["peak_memory_online_bytes"])

    # FlopCounterMode agrees with the analytic count from the configs, and speech + text make the total.
    ratio = r["backbone_flops_per_clip"] / r["backbone_flops_per_clip_analytic"]
    assert 1 / 1.5 < ratio < 1.5, ratio
    assert math.isclose(r["backbone_flops_per_clip_speech"] + r["backbone_flops_per_clip_text"],
                        r["backbone_flops_per_clip"], rel_tol=1e-9)
    a = r["analytic_breakdown"]
    assert math.isclose(a["speech"] + a["text"], a["total"], rel_tol=1e-12)
    assert 1 / 1.5 < r["backbone_flops_per_clip_speech"] / a["speech"] < 1.5
